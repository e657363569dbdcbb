//! The draft worker batches its sessions' steps (draft-service's
//! scheduler): over real gRPC, sessions drafting at the same time on one
//! worker (and sharing its steps: checked on its metrics) get exactly what
//! the draft model gives each alone — every drafted token of every branch
//! and hedge is the model's solo greedy choice after that branch's own
//! context, every sampled proposal the solo forward's distribution (up to
//! float rounding) — while other sessions join, leave and walk away
//! mid-job.
//!
//! The reference is the draft model run in this process, one context at a
//! time. (A tree's *shape* — how many branches, hedges and steps — follows
//! the step costs the worker measures, so it is timing-dependent even
//! alone; what each row holds is not.)

mod common;

use std::time::Duration;

use duo_core::engine::proposal;
use duo_core::runtime::{CausalLm, ModelOptions};
use duo_core::sampling::{SamplingParams, argmax};
use duo_rpc::pb::draft_client::DraftClient;
use duo_rpc::pb::{self, draft_reply, draft_request};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// One session's script: its prompt and sampling.
#[derive(Clone)]
struct Script {
    prompt: Vec<u32>,
    temperature: f32,
    seed: u64,
}

/// A tree as compared: per branch its tokens, anchor and proposals.
type Tree = Vec<(Vec<u32>, Option<u32>, Vec<(Vec<u32>, Vec<f32>)>)>;

/// A drafted tree and what it continues: the synced context, whose last
/// `tail` tokens are the pending tail hedges are anchored in.
struct Round {
    context: Vec<u32>,
    tail: usize,
    tree: Tree,
}

const ROUNDS: usize = 10;

/// Opens a draft session on the worker at `addr` with this sampling;
/// returns its request sender and replies once the worker said `Opened`.
async fn open_session(
    addr: std::net::SocketAddr,
    info: &pb::WorkerInfo,
    temperature: f32,
    seed: u64,
) -> (
    mpsc::Sender<pb::DraftRequest>,
    tonic::Streaming<pb::DraftReply>,
) {
    let mut client = DraftClient::new(common::channel(addr).await);
    let (tx, rx) = mpsc::channel(4);
    let mut replies = client
        .session(ReceiverStream::new(rx))
        .await
        .expect("session opens")
        .into_inner();
    let open = pb::OpenDraft {
        vocab_size: info.model.as_ref().map_or(0, |m| m.vocab_size),
        tokenizer_fingerprint: info.tokenizer_fingerprint.clone(),
        temperature,
        top_k: 0,
        top_p: 1.0,
        seed,
    };
    tx.send(pb::DraftRequest {
        kind: Some(draft_request::Kind::Open(open)),
    })
    .await
    .unwrap();
    let opened = replies.message().await.expect("opened").expect("a reply");
    assert!(matches!(opened.kind, Some(draft_reply::Kind::Opened(_))));
    (tx, replies)
}

/// Runs `script` on the worker at `addr`: a prompt, then rounds whose
/// syncs follow the trees the worker drafts, alternating "branch 0 is the
/// next pending branch" (adopt it: the next tree may hedge inside its
/// tail) and "the pending tail was rejected halfway" (keep the accepted
/// half, append the target's other token). Returns every round.
async fn run(addr: std::net::SocketAddr, info: &pb::WorkerInfo, script: &Script) -> Vec<Round> {
    let vocab = info.model.as_ref().map_or(0, |m| m.vocab_size);
    let (tx, mut replies) = open_session(addr, info, script.temperature, script.seed).await;
    let mut sync = pb::Sync {
        adopt: None,
        keep: 0,
        append: script.prompt.clone(),
    };
    let mut context = script.prompt.clone();
    let mut tail = 0;
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let job = pb::DraftJob {
            sync: Some(sync.clone()),
            gamma: 6,
            max_branches: 4,
            first_verified: false,
            max_hedges: 4,
        };
        tx.send(pb::DraftRequest {
            kind: Some(draft_request::Kind::Draft(job)),
        })
        .await
        .unwrap();
        let reply = replies.message().await.expect("a tree").expect("a reply");
        let Some(draft_reply::Kind::Tree(tree)) = reply.kind else {
            panic!("expected a tree, got {reply:?}");
        };
        let main = tree.branches[0].tokens.clone();
        assert_eq!(tree.branches[0].anchor, None, "branch 0 continues the tail");
        rounds.push(Round {
            context: context.clone(),
            tail,
            tree: tree
                .branches
                .into_iter()
                .map(|b| {
                    let q = b.proposals.into_iter().map(|p| (p.ids, p.probs)).collect();
                    (b.tokens, b.anchor, q)
                })
                .collect(),
        });
        // The round state machine's two syncs: the tree's branch 0 becomes
        // the pending branch (adopted whole: its tokens after the head are
        // the tail, which the next tree may hedge inside), or the pending
        // tail was rejected after `a` tokens and the target drew `c` there
        // (the tree is dropped).
        sync = if round % 2 == 0 {
            context.extend_from_slice(&main);
            tail = main.len() - 1;
            pb::Sync {
                adopt: Some(0),
                keep: context.len() as u32,
                append: Vec::new(),
            }
        } else {
            let before_tail = context.len() - tail;
            let a = tail / 2;
            let c = match context.get(before_tail + a) {
                Some(&t) => (t + 1) % vocab,
                None => main[0],
            };
            context.truncate(before_tail + a);
            context.push(c);
            tail = 0;
            pb::Sync {
                adopt: None,
                keep: (before_tail + a) as u32,
                append: vec![c],
            }
        };
    }
    rounds
}

/// Opens a session, sends a job with a long prompt and walks away without
/// reading the tree (its stream dropped mid-job).
async fn walk_away(addr: std::net::SocketAddr, info: &pb::WorkerInfo, prompt: Vec<u32>) {
    let (tx, _replies) = open_session(addr, info, 0.0, 0).await;
    let job = pb::DraftJob {
        sync: Some(pb::Sync {
            adopt: None,
            keep: 0,
            append: prompt,
        }),
        gamma: 12,
        max_branches: 8,
        first_verified: false,
        max_hedges: 0,
    };
    let _ = tx
        .send(pb::DraftRequest {
            kind: Some(draft_request::Kind::Draft(job)),
        })
        .await;
    tokio::time::sleep(Duration::from_millis(2)).await;
}

/// Two proposals equal up to float rounding: the same probability for
/// every id (within 1e-4), where an id only one of them holds is a tie at
/// the top-k cut (its probability within 1e-4 of the other's smallest).
fn same_proposal(what: &str, got: &[(u32, f32)], want: &[(u32, f32)]) {
    let smallest = |q: &[(u32, f32)]| q.iter().map(|e| e.1).fold(f32::INFINITY, f32::min);
    let find = |q: &[(u32, f32)], id: u32| q.iter().find(|e| e.0 == id).map(|e| e.1);
    for (mine, other) in [(got, want), (want, got)] {
        for &(id, p) in mine {
            match find(other, id) {
                Some(q) => assert!((p - q).abs() < 1e-4, "{what}: id {id}: {p} vs {q}"),
                None => assert!(
                    (p - smallest(other)).abs() < 1e-4,
                    "{what}: id {id} ({p}) is in one proposal only, not at a tie with the other's cut ({}); got {got:?}, want {want:?}",
                    smallest(other)
                ),
            }
        }
    }
}

/// Checks every branch of every round against the draft model run alone
/// on that branch's context: each token after the head is the greedy
/// choice (or, at a near-tie, one of the tied), and for a sampled session
/// each proposal after the head is the solo forward's. Returns the hedges
/// seen.
fn check_rounds(who: &str, lm: &mut CausalLm, params: &SamplingParams, rounds: &[Round]) -> usize {
    let mut hedges = 0;
    for (r, round) in rounds.iter().enumerate() {
        for (b, (tokens, anchor, proposals)) in round.tree.iter().enumerate() {
            let at = round.context.len() - round.tail + anchor.map_or(round.tail, |a| a as usize);
            hedges += usize::from(anchor.is_some());
            let mut feed = round.context[..at].to_vec();
            feed.extend_from_slice(tokens);
            let mut seq = lm.sequence().unwrap();
            let logits = lm.extend(&mut seq, &feed).unwrap();
            // Row `at - 1 + i` predicts tokens[i].
            for i in 1..tokens.len() {
                let row = logits.row(at - 1 + i);
                if params.is_greedy() {
                    let best = argmax(row);
                    let gap = row[best as usize] - row[tokens[i] as usize];
                    assert!(
                        gap <= 1e-4,
                        "{who} round {r} branch {b} token {i}: drafted {} where the model alone picks {best} (gap {gap})",
                        tokens[i]
                    );
                } else {
                    let want = proposal(params, row);
                    let (ids, probs) = &proposals[i];
                    let got: Vec<(u32, f32)> =
                        ids.iter().copied().zip(probs.iter().copied()).collect();
                    same_proposal(
                        &format!("{who} round {r} branch {b} (anchor {anchor:?}) token {i}"),
                        &got,
                        want.entries(),
                    );
                    assert!(
                        ids.contains(&tokens[i]),
                        "{who}: the token is in its proposal"
                    );
                }
            }
        }
    }
    hedges
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_drafting_together_get_their_solo_trees() {
    let (_stop, stop_rx) = watch::channel(false);
    let metrics = common::free_port();
    let flags = vec!["--metrics-listen".to_string(), metrics.to_string()];
    let tokenizer = common::models().join("tokenizer.json");
    let addr = common::spawn_draft(&tokenizer, &flags, &stop_rx).await;
    let info = {
        let mut info = None;
        for _ in 0..600 {
            let mut c = DraftClient::new(common::channel(addr).await);
            if let Ok(i) = c.describe(pb::DescribeRequest {}).await {
                info = Some(i.into_inner());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        info.expect("the draft worker loads")
    };
    let prompts: Vec<Vec<u32>> = common::spec_bench(1)
        .iter()
        .take(6)
        .map(|t| common::encode(t).into_iter().take(120).collect())
        .collect();
    let scripts: Vec<Script> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Script {
            prompt: p.clone(),
            temperature: if i % 2 == 0 { 0.0 } else { 0.8 },
            seed: 100 + i as u64,
        })
        .collect();
    let scrape = || async { common::http_get(metrics, "/metrics").await };
    let before = scrape().await;
    // Together, joining a few ms apart, with others walking away mid-job.
    let mut tasks = Vec::new();
    for (i, s) in scripts.iter().enumerate() {
        let (s, info) = (s.clone(), info.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3 * i as u64)).await;
            run(addr, &info, &s).await
        }));
    }
    let quitters: Vec<_> = (0..3)
        .map(|i| {
            let (info, p) = (info.clone(), prompts[i].clone());
            tokio::spawn(async move { walk_away(addr, &info, p).await })
        })
        .collect();
    for q in quitters {
        q.await.unwrap();
    }
    let mut lm = CausalLm::load(&common::models().join("draft"), &ModelOptions::default())
        .expect("the draft model loads");
    let mut hedges = 0;
    for ((i, t), script) in tasks.into_iter().enumerate().zip(&scripts) {
        let rounds = t.await.expect("session task");
        let params = SamplingParams {
            temperature: script.temperature,
            top_k: 0,
            top_p: 1.0,
        };
        hedges += check_rounds(&format!("session {i}"), &mut lm, &params, &rounds);
    }
    assert!(hedges > 0, "the sessions hedged");
    let after = scrape().await;
    let steps = |t: &str| common::metric_sum(t, "duo_draft_step_sessions_count", "");
    let sessions = |t: &str| common::metric_sum(t, "duo_draft_step_sessions_sum", "");
    let (n, s) = (
        steps(&after) - steps(&before),
        sessions(&after) - sessions(&before),
    );
    assert!(n > 0.0, "the worker reports its steps");
    assert!(
        s / n > 1.2,
        "concurrent sessions shared steps: {s} session-steps in {n} steps"
    );
}
