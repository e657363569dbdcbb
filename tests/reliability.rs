//! Faults and overload over real sockets: the target-service dies and comes
//! back under load, 32 concurrent streams, session limits, queues and
//! time-to-live, and random internal session messages (a bounded fuzz; set
//! DUO_FUZZ_CASES to run longer). Figures: docs/reliability.md.

mod common;

use std::time::{Duration, Instant};

use common::{Setup, drain, greedy};
use duo_rpc::pb::draft_client::DraftClient;
use duo_rpc::pb::target_client::TargetClient;
use duo_rpc::pb::{self, Mode, draft_request, target_request};
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const PROMPTS: [&str; 8] = [
    "KING. Speak, what news",
    "ROMEO. But soft, what light",
    "HAMLET. To be, or",
    "First Citizen. Before we proceed",
    "JULIET. O Romeo, Romeo",
    "MACBETH. Is this a dagger",
    "PORTIA. The quality of mercy",
    "LEAR. Blow, winds",
];

async fn generation_health(dep: &common::Deployment) -> i32 {
    let mut h =
        tonic_health::pb::health_client::HealthClient::new(common::channel(dep.orchestrator).await);
    h.check(tonic_health::pb::HealthCheckRequest {
        service: "duo.v1.Generation".into(),
    })
    .await
    .map(|r| r.into_inner().status)
    .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn target_restart_fails_in_flight_requests_then_serves_again() {
    let target_addr = common::free_port();
    let mut target = common::target_process(target_addr);
    let dep = common::start_with(Setup {
        external_target: Some(target_addr),
        orchestrator_flags: vec!["--health-interval-ms=200".into()],
        ..Setup::drafts(1)
    })
    .await;
    let mut client = dep.client().await;
    let reference = client
        .generate(greedy(PROMPTS[0], Mode::Autoregressive, 32))
        .await
        .unwrap()
        .into_inner()
        .token_ids;
    // Load: 8 long streams, each held past its first chunk.
    dep.hold();
    let mut streams = Vec::new();
    for p in PROMPTS {
        let (s, _) = common::held_stream(&dep, greedy(p, Mode::Duodecoding, 400)).await;
        streams.push(s);
    }
    target.kill();
    dep.release();
    // Every in-flight request fails with UNAVAILABLE, promptly (no hang).
    for mut s in streams {
        let end = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match s.message().await {
                    Ok(Some(c)) if c.r#final.is_none() => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("a stream hung after the target died");
        match end {
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(status.message().contains("target-service"), "{status:?}");
            }
            Ok(other) => panic!("expected UNAVAILABLE, got {other:?}"),
        }
    }
    common::wait_until(10, "orchestrator NOT_SERVING", || async {
        generation_health(&dep).await == 2
    })
    .await;
    let down = client
        .generate(greedy(PROMPTS[0], Mode::Duodecoding, 8))
        .await
        .unwrap_err();
    assert_eq!(down.code(), tonic::Code::Unavailable);
    assert!(down.message().contains("target-service"), "{down:?}");
    // The target returns on the same address: served again, no restart.
    let _target = common::target_process(target_addr);
    common::wait_until(60, "orchestrator SERVING again", || async {
        generation_health(&dep).await == 1
    })
    .await;
    let g = client
        .generate(greedy(PROMPTS[0], Mode::Duodecoding, 32))
        .await
        .unwrap()
        .into_inner();
    common::check_greedy(
        "after the target came back",
        &common::encode(PROMPTS[0]),
        &g.token_ids,
        &reference,
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_concurrent_streams_match_autoregressive() {
    let dep = common::start_with(Setup::drafts(2)).await;
    let n = 32;
    let mut client = dep.client().await;
    let mut refs = Vec::new();
    for p in PROMPTS {
        refs.push(
            client
                .generate(greedy(p, Mode::Autoregressive, n))
                .await
                .unwrap()
                .into_inner()
                .token_ids,
        );
    }
    let refs = std::sync::Arc::new(refs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..32usize {
        let mut client = dep.client().await;
        let refs = refs.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for r in 0..3usize {
                let p = (c + r) % PROMPTS.len();
                let mode = if (c + r) % 3 == 0 {
                    Mode::Speculative
                } else {
                    Mode::Duodecoding
                };
                let t0 = Instant::now();
                let s = client
                    .generate_stream(greedy(PROMPTS[p], mode, n))
                    .await
                    .unwrap()
                    .into_inner();
                let g = drain(s, Vec::new()).await.unwrap();
                latencies.push(t0.elapsed().as_secs_f64() * 1e3);
                common::check_greedy(
                    &format!("client {c} request {r}"),
                    &common::encode(PROMPTS[p]),
                    &g.tokens,
                    &refs[p],
                );
            }
            latencies
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let wall = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    eprintln!(
        "32 streams x 3 generations of {n} tokens: {} requests in {wall:.1} s, latency p50 {:.0} ms, p99 {:.0} ms",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    common::wait_until(10, "all sessions closed", || async {
        let p = common::pool(&dep).await;
        p.iter().all(|w| w.active == 0)
    })
    .await;
}

/// Opens a raw draft session and returns its request sender and replies.
async fn draft_session(
    addr: std::net::SocketAddr,
) -> Result<
    (
        mpsc::Sender<pb::DraftRequest>,
        tonic::Streaming<pb::DraftReply>,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(8);
    let replies = DraftClient::new(common::channel(addr).await)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, replies))
}

fn open_draft(fingerprint: &str) -> pb::DraftRequest {
    pb::DraftRequest {
        kind: Some(draft_request::Kind::Open(pb::OpenDraft {
            vocab_size: 2048,
            tokenizer_fingerprint: fingerprint.into(),
            ..Default::default()
        })),
    }
}

async fn fingerprint(dep: &common::Deployment) -> String {
    DraftClient::new(common::channel(dep.drafts[0]).await)
        .describe(pb::DescribeRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokenizer_fingerprint
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sessions_expire_on_both_workers() {
    let dep = common::start_with(Setup {
        draft_flags: vec!["--session-ttl-s=1".into()],
        target_flags: vec!["--session-ttl-s=1".into()],
        ..Setup::drafts(1)
    })
    .await;
    let fp = fingerprint(&dep).await;
    let (tx, mut rx) = draft_session(dep.drafts[0]).await.unwrap();
    tx.send(open_draft(&fp)).await.unwrap();
    rx.message().await.unwrap().unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .expect("idle draft session not closed");
    let status = end.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("--session-ttl-s"));
    let (ttx, trx) = mpsc::channel(4);
    let mut treplies = TargetClient::new(common::channel(dep.target).await)
        .session(ReceiverStream::new(trx))
        .await
        .unwrap()
        .into_inner();
    ttx.send(pb::TargetRequest {
        kind: Some(target_request::Kind::Open(pb::OpenTarget {
            vocab_size: 2048,
            tokenizer_fingerprint: fp.clone(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    treplies.message().await.unwrap().unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), treplies.message())
        .await
        .expect("idle target session not closed");
    assert_eq!(end.unwrap_err().code(), tonic::Code::DeadlineExceeded);
    common::wait_until(10, "expired sessions freed", || async {
        common::pool(&dep)
            .await
            .first()
            .is_some_and(|w| w.sessions_open == 0)
    })
    .await;
}

/// A target that ends a session mid-generation with a status of its own
/// ends the generation with that status and the target's message: here the
/// generations are held past the target's `--session-ttl-s`, the target
/// closes the idle sessions with DEADLINE_EXCEEDED, and the clients get
/// DEADLINE_EXCEEDED naming the flag (gRPC stream) and 408 (HTTP) — not
/// "target-service unavailable", which it never was.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_session_that_expires_mid_generation_ends_it_with_deadline_exceeded() {
    let dep = common::start_with(Setup {
        target_flags: vec!["--session-ttl-s=1".into()],
        ..Setup::drafts(1)
    })
    .await;
    dep.hold();
    let (mut stream, _) =
        common::held_stream(&dep, greedy(PROMPTS[0], Mode::Duodecoding, 64)).await;
    let http = tokio::spawn(common::http(
        dep.http,
        "POST",
        "/v1/completions",
        r#"{"prompt": "ROMEO. But soft, what light", "max_tokens": 64, "temperature": 0}"#,
    ));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    dep.release();
    let end = loop {
        match stream.message().await {
            Ok(Some(c)) => assert!(c.r#final.is_none(), "the generation finished"),
            Ok(None) => panic!("the stream ended without its final message"),
            Err(s) => break s,
        }
    };
    assert_eq!(end.code(), tonic::Code::DeadlineExceeded, "{end:?}");
    assert!(end.message().contains("--session-ttl-s"), "{end:?}");
    let (code, _, body) = http.await.unwrap();
    assert_eq!(code, 408, "{body}");
    assert!(body.contains("--session-ttl-s"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_limits_queues_and_backpressure() {
    // A worker with room for one session and a queue of one.
    let dep = common::start_with(Setup {
        draft_flags: vec![
            "--max-sessions=1".into(),
            "--session-queue=1".into(),
            "--session-queue-timeout-ms=300".into(),
        ],
        orchestrator_flags: vec![
            "--draft-queue=1".into(),
            "--draft-queue-timeout-ms=20000".into(),
        ],
        ..Setup::drafts(1)
    })
    .await;
    let fp = fingerprint(&dep).await;
    let d = dep.drafts[0];
    // 1. One session fits; the next waits in the worker's queue, then is
    //    refused.
    let (tx1, mut rx1) = draft_session(d).await.unwrap();
    tx1.send(open_draft(&fp)).await.unwrap();
    rx1.message().await.unwrap().unwrap();
    let t0 = Instant::now();
    let refused = draft_session(d).await.expect_err("over the limit");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(refused.message().contains("limit of 1"), "{refused:?}");
    assert!(t0.elapsed() >= Duration::from_millis(250), "did not queue");
    drop((tx1, rx1));
    // 2. Orchestrator backpressure: the worker is busy with one generation;
    //    a second one waits in the draft queue and runs when the first
    //    ends; a third finds the queue full.
    common::wait_until(10, "sessions freed", || async {
        common::pool(&dep)
            .await
            .first()
            .is_some_and(|w| w.sessions_open == 0)
    })
    .await;
    let mut client = dep.client().await;
    dep.hold();
    let (first, _) = common::held_stream(&dep, greedy(PROMPTS[0], Mode::Duodecoding, 300)).await;
    let mut c2 = dep.client().await;
    let second =
        tokio::spawn(async move { c2.generate(greedy(PROMPTS[1], Mode::Duodecoding, 16)).await });
    common::wait_until(10, "second generation queued", || async {
        let m = common::http_get(dep.http, "/metrics").await;
        m.contains("duo_orchestrator_draft_queue_waiting 1")
    })
    .await;
    let third = client
        .generate(greedy(PROMPTS[2], Mode::Duodecoding, 16))
        .await
        .unwrap_err();
    assert_eq!(third.code(), tonic::Code::ResourceExhausted, "{third:?}");
    assert!(third.message().contains("add draft workers"), "{third:?}");
    dep.release();
    drain(first, Vec::new()).await.unwrap();
    let second = second.await.unwrap().unwrap().into_inner();
    assert!(second.stats.unwrap().drafted > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generations_beyond_the_limit_queue_then_are_refused() {
    let dep = common::start_with(Setup {
        orchestrator_flags: vec![
            "--max-generations=1".into(),
            "--generation-queue=1".into(),
            "--generation-queue-timeout-ms=300".into(),
        ],
        ..Setup::drafts(1)
    })
    .await;
    let mut client = dep.client().await;
    dep.hold();
    let (first, _) = common::held_stream(&dep, greedy(PROMPTS[0], Mode::Duodecoding, 300)).await;
    let t0 = Instant::now();
    let refused = client
        .generate(greedy(PROMPTS[1], Mode::Duodecoding, 8))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused
            .message()
            .contains("limit of 1 concurrent generations"),
        "{refused:?}"
    );
    assert!(t0.elapsed() >= Duration::from_millis(250), "did not queue");
    // Once the first ends, the next one is served.
    dep.release();
    drain(first, Vec::new()).await.unwrap();
    client
        .generate(greedy(PROMPTS[1], Mode::Duodecoding, 8))
        .await
        .unwrap();
}

/// Below `usual` mostly, below `rare` sometimes.
fn range(rng: &mut impl Rng, usual: u32, rare: u32) -> u32 {
    let max = if rng.random_bool(0.8) { usual } else { rare };
    rng.random_range(0..max)
}

/// A random internal message: mostly plausible, sometimes absurd.
fn random_draft_request(rng: &mut impl Rng, fp: &str) -> pb::DraftRequest {
    let tokens = |rng: &mut dyn rand::RngCore, n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| {
                if rng.random_bool(0.05) {
                    rng.random()
                } else {
                    rng.random_range(0..2100)
                }
            })
            .collect()
    };
    let kind = match rng.random_range(0..10) {
        0 => None,
        1 | 2 => Some(draft_request::Kind::Open(pb::OpenDraft {
            vocab_size: if rng.random_bool(0.8) {
                2048
            } else {
                rng.random()
            },
            tokenizer_fingerprint: if rng.random_bool(0.8) {
                fp.into()
            } else {
                "x".into()
            },
            temperature: [0.0, 0.7, 1.0, -1.0, f32::NAN][rng.random_range(0..5)],
            top_k: rng.random_range(0..3000),
            top_p: [0.0, 0.5, 1.0, 1.5][rng.random_range(0..4)],
            seed: rng.random(),
        })),
        _ => {
            let max = if rng.random_bool(0.1) { 700 } else { 40 };
            let n = rng.random_range(0..max);
            Some(draft_request::Kind::Draft(pb::DraftJob {
                sync: Some(pb::Sync {
                    adopt: rng.random_bool(0.3).then(|| rng.random_range(0..10)),
                    keep: range(rng, 20, 600),
                    append: tokens(rng, n),
                }),
                gamma: if rng.random_bool(0.8) {
                    rng.random_range(1..8)
                } else {
                    rng.random_range(0..80)
                },
                max_branches: if rng.random_bool(0.8) {
                    rng.random_range(1..5)
                } else {
                    rng.random_range(0..12)
                },
                first_verified: rng.random(),
                max_hedges: rng.random_range(0..12),
            }))
        }
    };
    pb::DraftRequest { kind }
}

fn random_target_request(rng: &mut impl Rng, fp: &str) -> pb::TargetRequest {
    let kind = match rng.random_range(0..10) {
        0 => None,
        1 | 2 => Some(target_request::Kind::Open(pb::OpenTarget {
            vocab_size: 2048,
            tokenizer_fingerprint: if rng.random_bool(0.8) {
                fp.into()
            } else {
                "x".into()
            },
            temperature: [0.0, 0.7, 1.0, -1.0, f32::NAN, f32::INFINITY][rng.random_range(0..6)],
            top_k: rng.random_range(0..5000),
            top_p: [0.0, 0.5, 1.0, 1.5, -0.1][rng.random_range(0..5)],
            seed: rng.random(),
            logprobs: rng.random(),
            max_context: [0, 1, 100, u32::MAX][rng.random_range(0..4)],
        })),
        _ => {
            let max = if rng.random_bool(0.1) { 700 } else { 30 };
            let n = rng.random_range(0..max);
            let feed: Vec<u32> = (0..n).map(|_| rng.random_range(0..2100)).collect();
            let tail_len = rng.random_range(0..(n as u32 + 3));
            let proposals = if rng.random_bool(0.5) {
                Vec::new()
            } else {
                (0..rng.random_range(0..tail_len + 2))
                    .map(|_| random_proposal(rng))
                    .collect()
            };
            Some(target_request::Kind::Verify(pb::Verify {
                keep: range(rng, 10, 600),
                tail_len,
                feed,
                proposals,
            }))
        }
    };
    pb::TargetRequest { kind }
}

/// A proposal, often malformed: ids out of range or repeated, too many
/// entries, mismatched lengths, negative/NaN/unnormalised probabilities.
fn random_proposal(rng: &mut impl Rng) -> pb::Proposal {
    let n = if rng.random_bool(0.1) {
        rng.random_range(60..80)
    } else {
        rng.random_range(0..4)
    };
    let ids = (0..n).map(|_| rng.random_range(0..2100)).collect();
    let mut probs: Vec<f32> = (0..n + usize::from(rng.random_bool(0.1)))
        .map(|_| [0.5, 0.25, -0.1, f32::NAN, 1.0][rng.random_range(0..5)])
        .collect();
    if rng.random_bool(0.5) {
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    pb::Proposal { ids, probs }
}

/// Sends `msgs` one at a time, reading the reply to each; stops at the
/// first error or the end of the session. Returns (replies, errors).
async fn play<Req, Rep>(
    tx: mpsc::Sender<Req>,
    rx: &mut tonic::Streaming<Rep>,
    msgs: Vec<Req>,
) -> (usize, usize) {
    let mut replies = 0;
    for msg in msgs {
        if tx.send(msg).await.is_err() {
            break;
        }
        match rx.message().await {
            Ok(Some(_)) => replies += 1,
            Ok(None) => break,
            Err(_) => return (replies, 1),
        }
    }
    (replies, 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_session_messages_never_break_the_workers() {
    let cases: u64 = std::env::var("DUO_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let dep = common::start(&[common::models().join("tokenizer.json")]).await;
    let fp = fingerprint(&dep).await;
    let mut replies_seen = 0usize;
    let mut errors_seen = 0usize;
    for case in 0..cases {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(case);
        let len = rng.random_range(1..8);
        let (replies, errors) = if case % 2 == 0 {
            // Most sessions open properly, so later messages get deep.
            let msgs: Vec<_> = (0..len)
                .map(|i| {
                    if i == 0 && rng.random_bool(0.8) {
                        open_draft(&fp)
                    } else {
                        random_draft_request(&mut rng, &fp)
                    }
                })
                .collect();
            let (tx, mut rx) = draft_session(dep.drafts[0]).await.unwrap();
            play(tx, &mut rx, msgs).await
        } else {
            let msgs: Vec<_> = (0..len)
                .map(|i| {
                    let mut msg = random_target_request(&mut rng, &fp);
                    if i == 0 && rng.random_bool(0.8) {
                        msg.kind = Some(target_request::Kind::Open(pb::OpenTarget {
                            vocab_size: 2048,
                            tokenizer_fingerprint: fp.clone(),
                            ..Default::default()
                        }));
                    }
                    msg
                })
                .collect();
            let (tx, trx) = mpsc::channel(8);
            let mut rx = TargetClient::new(common::channel(dep.target).await)
                .session(ReceiverStream::new(trx))
                .await
                .unwrap()
                .into_inner();
            play(tx, &mut rx, msgs).await
        };
        replies_seen += replies;
        errors_seen += errors;
    }
    eprintln!("fuzz: {cases} sessions, {replies_seen} replies, {errors_seen} refused");
    // The workers still serve, and every fuzzed session was freed.
    common::wait_until(10, "fuzzed sessions freed", || async {
        let t = TargetClient::new(common::channel(dep.target).await)
            .describe(pb::DescribeRequest {})
            .await
            .map(|r| r.into_inner().sessions_open);
        let d = DraftClient::new(common::channel(dep.drafts[0]).await)
            .describe(pb::DescribeRequest {})
            .await
            .map(|r| r.into_inner().sessions_open);
        t.ok() == Some(0) && d.ok() == Some(0)
    })
    .await;
    let mut client = dep.client().await;
    let g = client
        .generate(greedy(PROMPTS[0], Mode::Duodecoding, 16))
        .await
        .unwrap();
    assert_eq!(g.into_inner().token_ids.len(), 16);
    assert!(replies_seen > 0 && errors_seen > 0);
}
