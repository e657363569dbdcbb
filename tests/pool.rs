//! The orchestrator's draft worker pool over real sockets: placement,
//! failover when a worker process dies mid-stream, target-only operation
//! with every worker down, rejoining, and DNS discovery.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::{Setup, Streamed, drain, greedy, pool, wait_until};
use duo_rpc::pb::{self, Mode};
use orchestrator::pool::{ResolveFuture, Resolver};

const PROMPTS: [&str; 4] = [
    "KING. Speak, what news",
    "ROMEO. But soft, what light",
    "HAMLET. To be, or",
    "First Citizen. Before we proceed",
];

/// The greedy autoregressive reference for each prompt.
async fn reference(dep: &common::Deployment, n: u32) -> Vec<Vec<u32>> {
    let mut client = dep.client().await;
    let mut out = Vec::new();
    for p in PROMPTS {
        let g = client
            .generate(greedy(p, Mode::Autoregressive, n))
            .await
            .unwrap()
            .into_inner();
        out.push(g.token_ids);
    }
    out
}

fn placed(pool: &[pb::DraftWorkerState], addr: SocketAddr) -> u64 {
    pool.iter()
        .find(|w| w.address == format!("http://{addr}"))
        .map_or(0, |w| w.sessions_placed)
}

fn healthy(pool: &[pb::DraftWorkerState]) -> usize {
    pool.iter().filter(|w| w.state == "healthy").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generations_spread_across_two_and_three_workers() {
    for n in [2, 3] {
        let dep = common::start_with(Setup::drafts(n)).await;
        let refs = reference(&dep, 24).await;
        let mut client = dep.client().await;
        for round in 0..2 {
            for (i, p) in PROMPTS.iter().enumerate() {
                let g = client
                    .generate(greedy(p, Mode::Duodecoding, 24))
                    .await
                    .unwrap()
                    .into_inner();
                common::check_greedy(
                    &format!("{n} workers, round {round} prompt {i}"),
                    &common::encode(p),
                    &g.token_ids,
                    &refs[i],
                );
            }
        }
        let pool = pool(&dep).await;
        assert_eq!(pool.len(), n);
        for d in &dep.drafts {
            // 8 generations over n workers, placed round-robin when idle.
            assert!(placed(&pool, *d) >= 2, "{n} workers: {pool:?}");
        }
    }
}

/// Holds generations and starts `streams` duodecoding streams, reading one
/// chunk from each: all stay in flight until `dep.release()`.
async fn start_streams(
    dep: &common::Deployment,
    streams: usize,
    n: u32,
) -> Vec<(usize, tonic::Streaming<pb::GenerateChunk>, Vec<u32>)> {
    dep.hold();
    let mut out = Vec::new();
    for i in 0..streams {
        let p = i % PROMPTS.len();
        let (s, first) = common::held_stream(dep, greedy(PROMPTS[p], Mode::Duodecoding, n)).await;
        out.push((p, s, first));
    }
    out
}

async fn finish(
    streams: Vec<(usize, tonic::Streaming<pb::GenerateChunk>, Vec<u32>)>,
    refs: &[Vec<u32>],
) -> Vec<Streamed> {
    let mut out = Vec::new();
    for (p, s, first) in streams {
        let g = drain(s, first).await.expect("the generation must not fail");
        common::check_greedy(
            &format!("prompt {p} across a failover"),
            &common::encode(PROMPTS[p]),
            &g.tokens,
            &refs[p],
        );
        out.push(g);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_workers_fail_over_run_target_only_and_rejoin() {
    let (a_addr, b_addr) = (common::free_port(), common::free_port());
    let mut a = common::draft_process(a_addr);
    let mut b = common::draft_process(b_addr);
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
    let n = 300;
    let refs = reference(&dep, n).await;

    // 1. Kill worker A while 4 streams are running (2 of them on A).
    let streams = start_streams(&dep, 4, n).await;
    a.kill();
    dep.release();
    let done = finish(streams, &refs).await;
    let failures: u32 = done.iter().map(|g| g.stats.draft_failures).sum();
    assert!(failures >= 1, "no generation noticed the dead worker");
    assert!(
        done.iter().any(|g| g.stats.draft_worker.contains(',')),
        "no draft session was re-homed: {:?}",
        done.iter()
            .map(|g| &g.stats.draft_worker)
            .collect::<Vec<_>>()
    );

    // 2. Kill B too: generations still complete, target-only, and health
    //    and metrics say the drafts are down.
    let streams = start_streams(&dep, 2, n).await;
    b.kill();
    dep.release();
    let done = finish(streams, &refs).await;
    assert!(
        done.iter()
            .all(|g| g.stats.draft_failures >= 1 || g.stats.draftless_rounds > 0)
    );
    let mut client = dep.client().await;
    let g = client
        .generate(greedy(PROMPTS[0], Mode::Duodecoding, 32))
        .await
        .unwrap()
        .into_inner();
    common::check_greedy(
        "all workers down",
        &common::encode(PROMPTS[0]),
        &g.token_ids,
        &refs[0][..32],
    );
    let stats = g.stats.unwrap();
    assert_eq!(stats.drafted, 0, "drafted with every worker down?");
    assert_eq!(stats.draft_worker, "");
    wait_until(10, "pool shows no healthy worker", || async {
        healthy(&pool(&dep).await) == 0
    })
    .await;
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(common::channel(dep.orchestrator).await);
    let draft_health = |h: &mut tonic_health::pb::health_client::HealthClient<_>| {
        let mut h = h.clone();
        async move {
            h.check(tonic_health::pb::HealthCheckRequest {
                service: "duo.v1.Draft".into(),
            })
            .await
            .map(|r| r.into_inner().status)
            .unwrap_or(-1)
        }
    };
    wait_until(10, "orchestrator health says the drafts are down", || {
        let f = draft_health(&mut health);
        async move { f.await == 2 }
    })
    .await;
    let metrics = common::http_get(dep.http, "/metrics").await;
    assert!(
        metrics.contains("duo_orchestrator_draft_workers{state=\"healthy\"} 0"),
        "{metrics}"
    );

    // 3. Restart A: it rejoins and takes generations again.
    let before = placed(&pool(&dep).await, a_addr);
    let _a = common::draft_process(a_addr);
    wait_until(60, "restarted worker healthy again", || async {
        healthy(&pool(&dep).await) == 1
    })
    .await;
    wait_until(10, "orchestrator health says drafts are back", || {
        let f = draft_health(&mut health);
        async move { f.await == 1 }
    })
    .await;
    let g = client
        .generate(greedy(PROMPTS[1], Mode::Duodecoding, 48))
        .await
        .unwrap()
        .into_inner();
    common::check_greedy(
        "after rejoining",
        &common::encode(PROMPTS[1]),
        &g.token_ids,
        &refs[1][..48],
    );
    assert!(g.stats.unwrap().drafted > 0);
    assert!(placed(&pool(&dep).await, a_addr) > before);
}

/// A resolver the test controls.
struct Fixed(Arc<Mutex<Vec<SocketAddr>>>);

impl Resolver for Fixed {
    fn resolve<'a>(&'a self, _name: &'a str) -> ResolveFuture<'a> {
        let addrs = self.0.lock().unwrap().clone();
        Box::pin(async move { Ok(addrs) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dns_discovery_picks_up_an_added_worker() {
    let addrs = Arc::new(Mutex::new(Vec::new()));
    // Two in-process workers; DNS first knows only the first.
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let tok = common::models().join("tokenizer.json");
    let w1 = common::spawn_draft(&tok, &[], &stop_rx).await;
    let w2 = common::spawn_draft(&tok, &[], &stop_rx).await;
    addrs.lock().unwrap().push(w1);
    let dep = common::start_with(Setup {
        orchestrator_flags: vec![
            "--draft-dns=drafts.test:50053".into(),
            "--discovery-interval-ms=100".into(),
            "--health-interval-ms=200".into(),
        ],
        resolver: Some(Arc::new(Fixed(addrs.clone()))),
        ..Setup::drafts(0)
    })
    .await;
    wait_until(30, "the first worker discovered and healthy", || async {
        healthy(&pool(&dep).await) == 1
    })
    .await;
    addrs.lock().unwrap().push(w2);
    wait_until(30, "the added worker discovered and healthy", || async {
        healthy(&pool(&dep).await) == 2
    })
    .await;
    let mut client = dep.client().await;
    for p in PROMPTS {
        client
            .generate(greedy(p, Mode::Duodecoding, 16))
            .await
            .unwrap();
    }
    let pool_now = pool(&dep).await;
    assert!(placed(&pool_now, w2) >= 1, "{pool_now:?}");
    assert!(pool_now.iter().all(|w| w.source == "dns:drafts.test:50053"));
    // The name stops resolving to w1: it leaves the pool.
    addrs.lock().unwrap().retain(|a| *a != w1);
    wait_until(30, "the removed worker gone", || async {
        pool(&dep).await.len() == 1
    })
    .await;
    drop(stop);
}

/// A draft pod going away as Kubernetes removes it: its DNS entry goes and
/// it gets SIGTERM (here: its stop signal) while it serves a generation.
/// Its health turns NOT_SERVING at once while it keeps serving for the
/// drain delay; the generation in flight completes unchanged, and new
/// generations go to the other worker. No request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminated_worker_reports_not_serving_drains_and_no_request_fails() {
    let addrs = Arc::new(Mutex::new(Vec::new()));
    let (stop_a, stop_a_rx) = tokio::sync::watch::channel(false);
    let (stop_b, stop_b_rx) = tokio::sync::watch::channel(false);
    let tok = common::models().join("tokenizer.json");
    let delay = ["--drain-delay-ms=3000".to_string()];
    let a = common::spawn_draft(&tok, &delay, &stop_a_rx).await;
    let b = common::spawn_draft(&tok, &delay, &stop_b_rx).await;
    addrs.lock().unwrap().extend([a, b]);
    let dep = common::start_with(Setup {
        orchestrator_flags: vec![
            "--draft-dns=drafts.test:50053".into(),
            "--discovery-interval-ms=100".into(),
            "--health-interval-ms=100".into(),
        ],
        resolver: Some(Arc::new(Fixed(addrs.clone()))),
        ..Setup::drafts(0)
    })
    .await;
    wait_until(30, "both workers discovered and healthy", || async {
        healthy(&pool(&dep).await) == 2
    })
    .await;
    let refs = reference(&dep, 120).await;
    // Two held generations: one on each worker.
    dep.hold();
    let mut streams = Vec::new();
    for (p, prompt) in PROMPTS.iter().enumerate().take(2) {
        let (s, first) = common::held_stream(&dep, greedy(prompt, Mode::Duodecoding, 120)).await;
        streams.push((p, s, first));
    }
    let pool_now = pool(&dep).await;
    assert_eq!(placed(&pool_now, b), 1, "{pool_now:?}");
    // B is terminated: out of DNS, then SIGTERM.
    addrs.lock().unwrap().retain(|x| *x != b);
    stop_b.send(true).unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(common::channel(b).await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "duo.v1.Draft".into(),
        })
        .await
        .expect("B still accepts during its drain delay")
        .into_inner()
        .status;
    assert_eq!(status, 2, "B should say NOT_SERVING while it drains");
    wait_until(10, "B gone from the pool", || async {
        !pool(&dep)
            .await
            .iter()
            .any(|w| w.address == format!("http://{b}"))
    })
    .await;
    dep.release();
    for (p, s, first) in streams {
        let g = drain(s, first).await.expect("no generation may fail");
        // Finished where it started: B drained its session, no failover.
        assert_eq!(g.stats.draft_failures, 0, "{:?}", g.stats);
        assert!(!g.stats.draft_worker.contains(','), "{:?}", g.stats);
        common::check_greedy(
            &format!("prompt {p} across B's drain"),
            &common::encode(PROMPTS[p]),
            &g.tokens,
            &refs[p],
        );
    }
    let mut client = dep.client().await;
    for p in PROMPTS {
        let g = client
            .generate(greedy(p, Mode::Duodecoding, 16))
            .await
            .expect("no generation may fail")
            .into_inner();
        assert!(g.stats.unwrap().draft_worker.contains(&a.to_string()));
    }
    drop(stop_a);
}

/// With a draft worker configured (a DNS name) but none ever found, a
/// generation runs target-only: its rounds are draftless, not draft
/// failures, and no worker name is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_worker_ever_found_means_draftless_rounds_not_failures() {
    let dep = common::start_with(Setup {
        orchestrator_flags: vec!["--draft-dns".into(), "no-such-draft.invalid:50052".into()],
        ..Setup::drafts(0)
    })
    .await;
    let g = dep
        .client()
        .await
        .generate(greedy("KING. Speak", Mode::Duodecoding, 24))
        .await
        .unwrap()
        .into_inner();
    let stats = g.stats.unwrap();
    assert_eq!(stats.draft_failures, 0, "{stats:?}");
    assert!(stats.draftless_rounds > 0, "{stats:?}");
    assert_eq!(stats.drafted, 0);
    assert!(stats.draft_worker.is_empty());
}

/// A frozen draft worker (SIGSTOP: its connection stays up, it answers
/// nothing) costs a generation a few round times, not --draft-timeout-ms:
/// the draft deadline adapts to the session's tree latency. The timeout is
/// set to 30 s here; the streams must finish, identical to autoregressive,
/// well within a third of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_draft_worker_is_failed_over_within_a_few_rounds() {
    let (a_addr, b_addr) = (common::free_port(), common::free_port());
    let a = common::draft_process(a_addr);
    let _b = common::draft_process(b_addr);
    let dep = common::start_with(Setup {
        orchestrator_flags: vec![
            format!("--draft=http://{a_addr}"),
            format!("--draft=http://{b_addr}"),
            "--health-interval-ms=200".into(),
            "--draft-timeout-ms=30000".into(),
        ],
        ..Setup::drafts(0)
    })
    .await;
    wait_until(60, "both draft processes healthy", || async {
        healthy(&pool(&dep).await) == 2
    })
    .await;
    let n = 200;
    let refs = reference(&dep, n).await;
    let streams = start_streams(&dep, 4, n).await;
    a.signal("STOP");
    let start = std::time::Instant::now();
    dep.release();
    let done = finish(streams, &refs).await;
    let took = start.elapsed();
    a.signal("CONT");
    assert!(
        took < std::time::Duration::from_secs(10),
        "a frozen draft worker stalled the generations for {took:?}"
    );
    let failures: u32 = done.iter().map(|g| g.stats.draft_failures).sum();
    assert!(failures >= 1, "no generation noticed the frozen worker");
}

/// A generation that started without a draft (its only worker was not up
/// yet) takes the worker up within a few rounds once it serves, even with
/// the periodic health probe far away (here every 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_generation_takes_up_a_draft_worker_once_it_serves() {
    let a_addr = common::free_port();
    let dep = common::start_with(Setup {
        orchestrator_flags: vec![
            format!("--draft=http://{a_addr}"),
            "--health-interval-ms=60000".into(),
        ],
        drafts_start_later: true,
        ..Setup::drafts(0)
    })
    .await;
    let n = 300;
    let refs = reference(&dep, n).await;
    // The generation starts draftless and is held after its first chunk.
    let streams = start_streams(&dep, 1, n).await;
    let _a = common::draft_process(a_addr);
    let lazy = tonic::transport::Endpoint::from_shared(format!("http://{a_addr}"))
        .unwrap()
        .connect_lazy();
    let health = tonic_health::pb::health_client::HealthClient::new(lazy);
    wait_until(60, "the late draft worker serving", || {
        let mut h = health.clone();
        async move {
            h.check(tonic_health::pb::HealthCheckRequest {
                service: "duo.v1.Draft".into(),
            })
            .await
            .is_ok_and(|r| r.into_inner().status == 1)
        }
    })
    .await;
    dep.release();
    let done = finish(streams, &refs).await;
    let s = &done[0].stats;
    assert!(s.draftless_rounds > 0, "{s:?}");
    assert!(
        s.drafted > 0,
        "the generation never took the worker up: {s:?}"
    );
    assert!(s.draft_worker.contains(&a_addr.to_string()), "{s:?}");
}

/// A draft model with a shorter context than the target's drafts within
/// its window and the generation goes on target-only beyond it: no draft
/// failure, output identical to autoregressive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draft_with_a_shorter_context_drafts_within_it() {
    // The bundled draft, declared with a 96-token context.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("draft-context-96");
    std::fs::create_dir_all(&dir).unwrap();
    let m = common::models();
    std::fs::copy(m.join("draft/model.onnx"), dir.join("model.onnx")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("draft/config.json")).unwrap())
            .unwrap();
    config["max_position_embeddings"] = 96.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let addr = common::free_port();
    let _draft = common::spawn_process(
        "draft-service",
        addr,
        &[
            "--model".into(),
            dir.display().to_string(),
            "--tokenizer".into(),
            m.join("tokenizer.json").display().to_string(),
        ],
    );
    let dep = common::start_with(Setup {
        orchestrator_flags: vec![format!("--draft=http://{addr}")],
        ..Setup::drafts(0)
    })
    .await;
    let n = 120;
    let refs = reference(&dep, n).await;
    let mut client = dep.client().await;
    for (p, want) in PROMPTS.iter().zip(&refs) {
        let g = client
            .generate(greedy(p, Mode::Duodecoding, n))
            .await
            .unwrap()
            .into_inner();
        common::check_greedy(p, &common::encode(p), &g.token_ids, want);
        let s = g.stats.unwrap();
        assert_eq!(s.draft_failures, 0, "{s:?}");
        assert!(s.drafted > 0, "{s:?}");
    }
}
