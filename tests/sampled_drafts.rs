//! Sampled drafts over real gRPC: at temperature > 0 the draft worker
//! samples its tokens from its own processed distribution q and sends q
//! with them; the target accepts each with min(1, p/q) and draws from the
//! residual on rejection. Lossless: the emitted tokens must follow the
//! target model's distribution exactly. Checked here with the bundled models
//! end to end (orchestrator, draft-service, target-service on loopback): the
//! first three tokens of many seeded generations against the exact joint
//! computed in-process from the target model, by chi-square, for
//! speculative and duodecoding (1 and 4 branches), also with a draft worker
//! process killed mid-run; and malformed proposals sent straight to the
//! target's `Target/Session` are refused with INVALID_ARGUMENT.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use common::{Setup, pool, wait_until};
use duo_core::runtime::{CausalLm, ModelOptions};
use duo_core::sampling::SamplingParams;
use duo_core::stats::chi_square;
use duo_rpc::pb::target_client::TargetClient;
use duo_rpc::pb::{self, Mode, generate_request, target_reply, target_request};
use tokio_stream::wrappers::ReceiverStream;

/// The prompt: the target's next-token distribution after it is flat
/// enough (about 1.5-1.7 nats at the settings below, ~4 nats over three
/// tokens) that the test has power over many cells.
const PROMPT: &str = "KING.\n";
/// Tokens per generation: the joint of the first three is exact and small.
const NEW_TOKENS: usize = 3;
/// Seeded generations per (setting, mode).
const N: u64 = 1000;
/// The first seed of the generations across a killed draft worker.
const SEEDS_AFTER_A_KILL: u64 = 1 << 32;
/// Tokens of the generations in flight when a draft worker is killed.
const LONG_GENERATION: u32 = 12;
/// Generations in flight at once.
const STREAMS: u64 = 8;
/// The chi-square p-value below which a case fails.
const ALPHA: f64 = 0.01;

/// The sampling settings, named: small supports keep the exact joint
/// tractable (at most 6^3 sequences).
fn settings() -> [(&'static str, SamplingParams); 2] {
    [
        (
            "T=0.7 top_k=5",
            SamplingParams {
                temperature: 0.7,
                top_k: 5,
                top_p: 1.0,
            },
        ),
        (
            "T=1.0 top_k=6 top_p=0.9",
            SamplingParams {
                temperature: 1.0,
                top_k: 6,
                top_p: 0.9,
            },
        ),
    ]
}

/// (name, mode, max_branches) of the speculative modes checked.
const MODES: [(&str, Mode, u32); 3] = [
    ("speculative", Mode::Speculative, 1),
    ("duodecoding k=1", Mode::Duodecoding, 1),
    ("duodecoding k=4", Mode::Duodecoding, 4),
];

/// The exact distribution of the emitted tokens: every sequence of up to
/// `NEW_TOKENS` tokens the target can produce (a sequence ends early at
/// EOS, the EOS included) with its probability, computed in-process from
/// the target model with the same sampling processing.
struct Joint {
    outcomes: Vec<Vec<u32>>,
    probs: Vec<f32>,
    /// Entropy of the first token's distribution and of the joint (nats).
    first_entropy: f64,
    entropy: f64,
}

fn exact_joint(prompt: &[u32], sampling: &SamplingParams) -> Joint {
    let mut lm = CausalLm::load(&common::models().join("target"), &ModelOptions::default())
        .expect("the bundled target loads");
    let eos = lm.info().eos_token_id;
    let mut seq = lm.sequence().unwrap();
    let first = sampling.distribution(lm.extend(&mut seq, prompt).unwrap().last());
    let first_entropy = first
        .entries()
        .iter()
        .map(|&(_, p)| -f64::from(p) * f64::from(p).ln())
        .sum();
    let mut joint = Joint {
        outcomes: Vec::new(),
        probs: Vec::new(),
        first_entropy,
        entropy: 0.0,
    };
    // Depth-first over the prefixes: (prefix, its probability, the
    // distribution of its next token).
    let mut stack = vec![(Vec::new(), 1.0f64, first)];
    while let Some((prefix, p, next)) = stack.pop() {
        for &(t, q) in next.entries() {
            let mut seq_tokens = prefix.clone();
            seq_tokens.push(t);
            let pt = p * f64::from(q);
            if seq_tokens.len() == NEW_TOKENS || Some(t) == eos {
                joint.entropy -= pt * pt.ln();
                joint.outcomes.push(seq_tokens);
                joint.probs.push(pt as f32);
            } else {
                seq.truncate(prompt.len()).unwrap();
                let logits = lm.extend(&mut seq, &seq_tokens).unwrap();
                let d = sampling.distribution(logits.last());
                stack.push((seq_tokens, pt, d));
            }
        }
    }
    let total: f64 = joint.probs.iter().map(|&p| f64::from(p)).sum();
    assert!((total - 1.0).abs() < 1e-3, "the joint sums to {total}");
    joint
}

/// One case: a setting and a mode, run for seeds
/// `first_seed..first_seed + N`.
#[derive(Clone, Copy)]
struct Case {
    sampling: SamplingParams,
    mode: Mode,
    max_branches: u32,
    first_seed: u64,
    /// Seeds (from `first_seed`) whose generations run to
    /// `LONG_GENERATION` tokens instead of `NEW_TOKENS`, to stay in flight
    /// longer: only the first `NEW_TOKENS` are counted, whose distribution
    /// does not depend on it.
    long: (u64, u64),
    /// `max_hedges` of the requests (unset: the server's default, which
    /// drafts no hedges on this CPU target once its verify slope is
    /// measured).
    max_hedges: Option<u32>,
}

fn request(prompt: &[u32], case: &Case, seed: u64) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(generate_request::Prompt::TokenIds(pb::TokenIds {
            ids: prompt.to_vec(),
        })),
        max_new_tokens: if (case.long.0..case.long.1).contains(&(seed - case.first_seed)) {
            LONG_GENERATION
        } else {
            NEW_TOKENS as u32
        },
        temperature: case.sampling.temperature,
        top_k: case.sampling.top_k as u32,
        top_p: (case.sampling.top_p < 1.0).then_some(case.sampling.top_p),
        seed,
        mode: case.mode as i32,
        gamma: Some(3),
        max_branches: Some(case.max_branches),
        greedy_drafts: false,
        max_hedges: case.max_hedges,
        ..Default::default()
    }
}

/// What `N` seeded generations of one case gave.
#[derive(Default)]
struct Tally {
    counts: HashMap<Vec<u32>, u32>,
    drafted: u64,
    accepted: u64,
    draft_failures: u64,
    /// Rounds whose drawn token matched a hedge (duodecoding hedges by
    /// default: the distribution must hold with them).
    hedge_hits: u64,
    /// Generations whose draft session moved to another worker.
    rehomed: u64,
    failed: Vec<String>,
}

/// Runs `case`'s `N` generations in `STREAMS` concurrent streams; `done`
/// counts finished generations (for a test that acts mid-run).
async fn run_case(
    dep: &common::Deployment,
    prompt: &[u32],
    case: Case,
    done: Arc<AtomicUsize>,
) -> Tally {
    let mut tasks = tokio::task::JoinSet::new();
    for stream in 0..STREAMS {
        let mut client = dep.client().await;
        let (prompt, done) = (prompt.to_vec(), done.clone());
        tasks.spawn(async move {
            let mut tally = Tally::default();
            let seeds = case.first_seed + stream..case.first_seed + N;
            for seed in seeds.step_by(STREAMS as usize) {
                let req = request(&prompt, &case, seed);
                match client.generate(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        let stats = r.stats.unwrap_or_default();
                        tally.drafted += u64::from(stats.drafted);
                        tally.accepted += u64::from(stats.accepted);
                        tally.draft_failures += u64::from(stats.draft_failures);
                        tally.hedge_hits += u64::from(stats.hedge_hits);
                        tally.rehomed += u64::from(stats.draft_worker.contains(','));
                        let mut first = r.token_ids;
                        first.truncate(NEW_TOKENS);
                        *tally.counts.entry(first).or_default() += 1;
                    }
                    Err(e) => tally.failed.push(format!("seed {seed}: {e:?}")),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            tally
        });
    }
    let mut all = Tally::default();
    while let Some(t) = tasks.join_next().await {
        let t = t.expect("a generation task panicked");
        for (k, v) in t.counts {
            *all.counts.entry(k).or_default() += v;
        }
        all.drafted += t.drafted;
        all.accepted += t.accepted;
        all.draft_failures += t.draft_failures;
        all.hedge_hits += t.hedge_hits;
        all.rehomed += t.rehomed;
        all.failed.extend(t.failed);
    }
    all
}

/// Checks a case's tally against the exact joint: no generation failed,
/// the chi-square p-value is above `ALPHA`, and drafts were accepted.
fn check(what: &str, tally: &Tally, joint: &Joint) {
    assert!(
        tally.failed.is_empty(),
        "{what}: {} generations failed, e.g. {}",
        tally.failed.len(),
        tally.failed[0]
    );
    let index: HashMap<&[u32], usize> = joint
        .outcomes
        .iter()
        .enumerate()
        .map(|(i, o)| (o.as_slice(), i))
        .collect();
    let mut counts = vec![0u32; joint.outcomes.len()];
    for (tokens, &c) in &tally.counts {
        let i = index.get(tokens.as_slice()).unwrap_or_else(|| {
            panic!("{what}: emitted {tokens:?} ({c} times), which the target cannot produce")
        });
        counts[*i] += c;
    }
    assert_eq!(counts.iter().map(|&c| u64::from(c)).sum::<u64>(), N);
    let stat = chi_square(&counts, &joint.probs);
    eprintln!(
        "{what}: chi-square {:.1} df {} p {:.3}; drafted {} accepted {} ({:.0}%), draft failures {}",
        stat.statistic,
        stat.degrees_of_freedom,
        stat.p_value,
        tally.drafted,
        tally.accepted,
        100.0 * tally.accepted as f64 / tally.drafted.max(1) as f64,
        tally.draft_failures
    );
    assert!(
        stat.p_value > ALPHA,
        "{what}: the emitted tokens do not follow the target's distribution: {stat:?}"
    );
    // Drafts were sampled, sent and accepted (not a target-only run).
    assert!(
        tally.accepted > 0 && tally.accepted <= tally.drafted,
        "{what}: drafted {} accepted {}",
        tally.drafted,
        tally.accepted
    );
}

fn joints(prompt: &[u32]) -> Vec<(&'static str, SamplingParams, Joint)> {
    settings()
        .into_iter()
        .map(|(name, s)| {
            let j = exact_joint(prompt, &s);
            eprintln!(
                "{PROMPT:?} {prompt:?}, {name}: first-token entropy {:.3} nats, joint entropy {:.3} nats over {} sequences",
                j.first_entropy,
                j.entropy,
                j.outcomes.len()
            );
            (name, s, j)
        })
        .collect()
}

/// The first token's distribution in speculative mode under a *wrong*
/// verification that leaves out the residual (on rejection it draws from p
/// instead of norm(max(0, p - q))): min(p, q) + (1 - sum min(p, q)) p, with
/// the draft's q at the prompt. The chi-square must tell it from p with
/// the same counts: the test has power against that bug.
fn wrong_residual_first(prompt: &[u32], sampling: &SamplingParams) -> Vec<(u32, f32)> {
    let last_logits = |model: &str| {
        let mut lm = CausalLm::load(&common::models().join(model), &ModelOptions::default())
            .expect("the bundled model loads");
        let mut seq = lm.sequence().unwrap();
        lm.extend(&mut seq, prompt).unwrap().last().to_vec()
    };
    let p = sampling.distribution(&last_logits("target"));
    // The draft's proposal, as the draft worker computes it.
    let q = duo_core::engine::proposal(sampling, &last_logits("draft"));
    let overlap: f32 = p.entries().iter().map(|&(x, px)| px.min(q.prob(x))).sum();
    p.entries()
        .iter()
        .map(|&(x, px)| (x, px.min(q.prob(x)) + (1.0 - overlap) * px))
        .collect()
}

/// Counts of the first emitted token, in `first`'s order.
fn first_token_counts(tally: &Tally, first: &[(u32, f32)]) -> Vec<u32> {
    first
        .iter()
        .map(|&(x, _)| {
            tally
                .counts
                .iter()
                .filter(|(tokens, _)| tokens.first() == Some(&x))
                .map(|(_, &c)| c)
                .sum()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sampled_drafts_give_the_target_distribution_over_grpc() {
    let started = Instant::now();
    let prompt = common::encode(PROMPT);
    let joints = tokio::task::block_in_place(|| joints(&prompt));
    let dep = common::start_with(Setup::drafts(1)).await;
    let mut hedge_hits = 0;
    for (name, sampling, joint) in &joints {
        for (mode_name, mode, k) in MODES {
            let t = Instant::now();
            let what = format!("{name}, {mode_name}");
            let case = Case {
                sampling: *sampling,
                mode,
                max_branches: k,
                first_seed: 0,
                long: (0, 0),
                max_hedges: None,
            };
            let tally = run_case(&dep, &prompt, case, Default::default()).await;
            check(&what, &tally, joint);
            if mode == Mode::Duodecoding {
                eprintln!("  hedge hits: {}", tally.hedge_hits);
                hedge_hits += tally.hedge_hits;
            }
            if mode == Mode::Speculative {
                let wrong = tokio::task::block_in_place(|| wrong_residual_first(&prompt, sampling));
                let probs: Vec<f32> = wrong.iter().map(|e| e.1).collect();
                let stat = chi_square(&first_token_counts(&tally, &wrong), &probs);
                eprintln!(
                    "  power: against a verification without the residual, p {:.1e}",
                    stat.p_value
                );
                assert!(
                    stat.p_value < 1e-6,
                    "{what}: the test cannot tell a wrong residual from the right one: {stat:?}"
                );
            }
            eprintln!("  ({N} generations in {:.1} s)", t.elapsed().as_secs_f64());
        }
    }
    // Adopted hedges: every generation long enough for the second round
    // to draft (only the first NEW_TOKENS are counted), hedges forced on
    // (this CPU target's verify slope would turn the default off). A
    // rejection in the second round that meets a hedge makes the third
    // token the hedge's first tail token, verified next round.
    for (name, sampling, joint) in &joints {
        let what = format!("{name}, duodecoding k=4 with up to 8 hedges");
        let case = Case {
            sampling: *sampling,
            mode: Mode::Duodecoding,
            max_branches: 4,
            first_seed: 2 * N,
            long: (0, N),
            max_hedges: Some(8),
        };
        let tally = run_case(&dep, &prompt, case, Default::default()).await;
        check(&what, &tally, joint);
        eprintln!("  hedge hits: {}", tally.hedge_hits);
        hedge_hits += tally.hedge_hits;
        assert!(tally.hedge_hits > 0, "{what}: no hedge was adopted");
    }
    eprintln!("hedge hits in duodecoding: {hedge_hits}");
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
}

fn healthy(pool: &[pb::DraftWorkerState]) -> usize {
    pool.iter().filter(|w| w.state == "healthy").count()
}

/// Two draft worker processes; one is killed (SIGKILL) after a third of
/// the generations. The generations on it fail over or run target-only;
/// none fails, and the output distribution is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_draft_worker_leaves_the_sampled_distribution_unchanged() {
    let started = Instant::now();
    let prompt = common::encode(PROMPT);
    let (name, sampling) = settings()[0];
    let joint = tokio::task::block_in_place(|| exact_joint(&prompt, &sampling));
    let (a_addr, b_addr) = (common::free_port(), common::free_port());
    let mut a = common::draft_process(a_addr);
    let _b = common::draft_process(b_addr);
    let dep = common::start_with(Setup {
        orchestrator_flags: vec![
            format!("--draft=http://{a_addr}"),
            format!("--draft=http://{b_addr}"),
            "--health-interval-ms=200".into(),
        ],
        ..Setup::drafts(0)
    })
    .await;
    wait_until(60, "both draft processes healthy", || async {
        healthy(&pool(&dep).await) == 2
    })
    .await;
    // Other seeds than the first test's (independent evidence). The
    // generations around the kill are longer, so that the ones on A when
    // it dies still need drafts.
    let case = Case {
        sampling,
        mode: Mode::Duodecoding,
        max_branches: 4,
        first_seed: SEEDS_AFTER_A_KILL,
        long: (N / 3, N / 3 + 3 * STREAMS),
        max_hedges: None,
    };
    let done = Arc::new(AtomicUsize::new(0));
    let kill = async {
        wait_until(120, "a third of the generations done", || async {
            done.load(Ordering::Relaxed) as u64 >= N / 3 + STREAMS
        })
        .await;
        // Kill A mid-generation: hold every generation after its first
        // chunk until all streams' generations are in flight, some of them
        // with their draft session on A, then kill A and let them go on.
        dep.hold();
        wait_until(30, "every stream's generation held, some on A", || async {
            let p = pool(&dep).await;
            let on_a = p
                .iter()
                .find(|w| w.address == format!("http://{a_addr}"))
                .map_or(0, |w| w.active);
            on_a > 0 && p.iter().map(|w| u64::from(w.active)).sum::<u64>() == STREAMS
        })
        .await;
        a.kill();
        dep.release();
    };
    let (tally, ()) = tokio::join!(run_case(&dep, &prompt, case, done.clone()), kill);
    check(
        &format!("{name}, duodecoding k=4, a draft worker killed"),
        &tally,
        &joint,
    );
    assert!(
        tally.draft_failures + tally.rehomed > 0,
        "the kill hit no generation: {} draft failures, {} re-homed",
        tally.draft_failures,
        tally.rehomed
    );
    let pool_now = pool(&dep).await;
    let state = |addr: std::net::SocketAddr| {
        pool_now
            .iter()
            .find(|w| w.address == format!("http://{addr}"))
            .map(|w| (w.state.clone(), w.sessions_placed))
            .unwrap()
    };
    let (a_state, a_placed) = state(a_addr);
    let (b_state, _) = state(b_addr);
    assert!(
        a_placed > 0,
        "the killed worker served nothing: {pool_now:?}"
    );
    assert_ne!(a_state, "healthy", "{pool_now:?}");
    assert_eq!(b_state, "healthy", "{pool_now:?}");
    eprintln!(
        "  ({N} generations, {} re-homed, in {:.1} s)",
        tally.rehomed,
        started.elapsed().as_secs_f64()
    );
}

/// A Verify of `feed` (the prompt and 2 drafted tokens) with `proposals`
/// on a fresh target session at temperature 0.7: the reply.
async fn verify_on_fresh_session(
    dep: &common::Deployment,
    fp: &str,
    feed: &[u32],
    proposals: Vec<pb::Proposal>,
) -> Result<pb::Verdict, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::TargetRequest {
        kind: Some(target_request::Kind::Open(pb::OpenTarget {
            vocab_size: 2048,
            tokenizer_fingerprint: fp.into(),
            temperature: 0.7,
            seed: 7,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut replies = TargetClient::new(common::channel(dep.target).await)
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let opened = replies.message().await.unwrap().unwrap();
    assert!(matches!(opened.kind, Some(target_reply::Kind::Opened(_))));
    tx.send(pb::TargetRequest {
        kind: Some(target_request::Kind::Verify(pb::Verify {
            keep: 0,
            feed: feed.to_vec(),
            tail_len: 2,
            proposals,
        })),
    })
    .await
    .unwrap();
    let reply = replies.message().await?;
    match reply.and_then(|r| r.kind) {
        Some(target_reply::Kind::Verdict(v)) => Ok(v),
        other => panic!("expected a verdict or an error, got {other:?}"),
    }
}

fn proposal(ids: &[u32], probs: &[f32]) -> pb::Proposal {
    pb::Proposal {
        ids: ids.to_vec(),
        probs: probs.to_vec(),
    }
}

/// Malformed proposals straight to `Target/Session`: each is refused with
/// INVALID_ARGUMENT naming the problem (no panic: the session answers with
/// a status), and the target goes on serving; well-formed ones are
/// verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_proposals_are_invalid_argument() {
    let dep = common::start_with(Setup::drafts(0)).await;
    let fp = TargetClient::new(common::channel(dep.target).await)
        .describe(pb::DescribeRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokenizer_fingerprint;
    // The prompt, then two drafted tokens (41 and 350) as the tail.
    let (x1, x2) = (41u32, 350u32);
    let mut feed = common::encode(PROMPT);
    feed.extend([x1, x2]);
    let good1 = proposal(&[x1, 585, 33], &[0.5, 0.3, 0.2]);
    let good2 = proposal(&[350, 41], &[0.75, 0.25]);
    let many: Vec<u32> = (0..65)
        .map(|i| if i == 0 { x1 } else { 1000 + i })
        .collect();
    let cases: Vec<(&str, Vec<pb::Proposal>, &[&str])> = vec![
        (
            "a negative probability",
            vec![proposal(&[x1, 585], &[1.1, -0.1]), good2.clone()],
            &["proposal 0", "probability -0.1", "finite and > 0"],
        ),
        (
            "a NaN probability",
            vec![good1.clone(), proposal(&[x2, 585], &[f32::NAN, 0.5])],
            &["proposal 1", "probability NaN", "finite and > 0"],
        ),
        (
            "probabilities summing to 0.8",
            vec![proposal(&[x1, 585], &[0.5, 0.3]), good2.clone()],
            &["proposal 0", "sum to 0.8", "must be 1 within 1e-3"],
        ),
        (
            "an id outside the vocabulary",
            vec![good1.clone(), proposal(&[x2, 2048], &[0.5, 0.5])],
            &[
                "proposal 1",
                "token 2048",
                "outside the vocabulary (size 2048)",
            ],
        ),
        (
            "65 entries",
            vec![proposal(&many, &[1.0 / 65.0; 65]), good2.clone()],
            &["proposal 0", "65 entries", "1..=64 allowed"],
        ),
        (
            "ids and probabilities of different lengths",
            vec![proposal(&[x1, 585], &[0.5, 0.3, 0.2]), good2.clone()],
            &["proposal 0", "2 ids but 3 probabilities"],
        ),
        (
            "the drafted token absent from its proposal",
            vec![good1.clone(), proposal(&[585, 33], &[0.5, 0.5])],
            &["proposal 1", "drafted token 350 no probability"],
        ),
        (
            "one proposal for two drafted tokens",
            vec![good1.clone()],
            &["1 proposals for 2 drafted tokens"],
        ),
        (
            "a repeated id",
            vec![proposal(&[x1, x1], &[0.5, 0.5]), good2.clone()],
            &["proposal 0", "token 41 twice"],
        ),
    ];
    for (what, proposals, parts) in cases {
        let status = verify_on_fresh_session(&dep, &fp, &feed, proposals)
            .await
            .expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        );
        for part in ["Verify.proposals"].iter().chain(parts) {
            assert!(
                status.message().contains(part),
                "{what}: {:?} does not say {part:?}",
                status.message()
            );
        }
        eprintln!("{what}: {}", status.message());
    }
    // Well-formed proposals are verified (the target still serves).
    let v = verify_on_fresh_session(&dep, &fp, &feed, vec![good1, good2])
        .await
        .expect("well-formed proposals are verified");
    assert!(v.accepted <= 2 && v.next < 2048, "{v:?}");
    assert_eq!(v.fed as usize, feed.len());
    // Every session was freed.
    wait_until(10, "the target's sessions freed", || async {
        TargetClient::new(common::channel(dep.target).await)
            .describe(pb::DescribeRequest {})
            .await
            .map(|r| r.into_inner().sessions_open)
            .ok()
            == Some(0)
    })
    .await;
}
