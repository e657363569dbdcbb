//! `/metrics` over HTTP: the counters exist and add up. (Its own test
//! binary: the recorder is per process, so no other test adds to it.)

mod common;

use common::{Setup, greedy};
use duo_rpc::pb::Mode;

use common::metric_sum as sum;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_are_exposed_and_add_up() {
    let draft_metrics = common::free_port();
    let dep = common::start_with(Setup {
        draft_flags: vec![format!("--metrics-listen={draft_metrics}")],
        ..Setup::drafts(1)
    })
    .await;
    let mut client = dep.client().await;
    let mut tokens = 0usize;
    let mut requests = 0usize;
    for (i, mode) in [Mode::Duodecoding, Mode::Speculative, Mode::Autoregressive]
        .into_iter()
        .cycle()
        .take(6)
        .enumerate()
    {
        let prompt = format!("KING. Speak, {i}");
        let (n, stats) = if i % 2 == 0 {
            let g = client
                .generate(greedy(&prompt, mode, 40))
                .await
                .unwrap()
                .into_inner();
            (g.token_ids.len(), g.stats.unwrap())
        } else {
            let s = client
                .generate_stream(greedy(&prompt, mode, 40))
                .await
                .unwrap()
                .into_inner();
            let d = common::drain(s, Vec::new()).await.unwrap();
            (d.tokens.len(), d.stats)
        };
        // One definition in every mode: each round commits its accepted
        // draft tokens plus one of its own (a stop can only cut the last).
        let committed = (stats.rounds + stats.accepted) as usize;
        assert!(
            committed >= n && (committed == n || stats.new_tokens < 40),
            "{mode:?}: {} rounds + {} accepted for {n} tokens",
            stats.rounds,
            stats.accepted
        );
        tokens += n;
        requests += 1;
    }
    // An invalid request counts as one, with its code.
    let bad = client.generate(greedy("", Mode::Duodecoding, 4)).await;
    assert!(bad.is_err());

    let m = common::http_get(dep.http, "/metrics").await;
    let ok = sum(&m, "duo_orchestrator_requests_total", "outcome=\"ok\"");
    assert_eq!(ok as usize, requests, "{m}");
    assert_eq!(
        sum(&m, "duo_orchestrator_requests_total", "InvalidArgument") as usize,
        1
    );
    assert_eq!(
        sum(&m, "duo_orchestrator_generated_tokens_total", "") as usize,
        tokens,
        "generated tokens must match what the clients received"
    );
    // Hedges and round kinds are exported (hedges may be 0 here: the
    // small regime's CPU target verifies too steeply for them to pay).
    for name in [
        "duo_orchestrator_hedges_total",
        "duo_orchestrator_hedge_hits_total",
        "duo_orchestrator_single_token_rounds_total",
        "duo_orchestrator_rounds_by_kind_total",
        "duo_orchestrator_tokens_by_round_kind_total",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
    let by_kind = sum(&m, "duo_orchestrator_rounds_by_kind_total", "");
    let rounds = sum(&m, "duo_orchestrator_rounds_total", "");
    assert_eq!(by_kind, rounds, "every round has a kind");
    for mode in ["duodecoding", "speculative"] {
        let f = format!("mode=\"{mode}\"");
        let drafted = sum(&m, "duo_orchestrator_drafted_tokens_total", &f);
        let accepted = sum(&m, "duo_orchestrator_accepted_tokens_total", &f);
        assert!(drafted > 0.0, "{mode}: nothing drafted");
        assert!(
            accepted <= drafted,
            "{mode}: accepted {accepted} > drafted {drafted}"
        );
    }
    for pos in ["1", "2", "3"] {
        let f = format!("position=\"{pos}\"");
        let offered = sum(&m, "duo_orchestrator_position_offered_total", &f);
        let accepted = sum(&m, "duo_orchestrator_position_accepted_total", &f);
        assert!(
            accepted <= offered,
            "position {pos}: {accepted} > {offered}"
        );
    }
    assert!(
        sum(
            &m,
            "duo_orchestrator_position_offered_total",
            "position=\"1\""
        ) > 0.0
    );
    let rounds = sum(&m, "duo_orchestrator_rounds_total", "");
    // Every round is one verification on the target.
    assert_eq!(sum(&m, "duo_target_verifies_total", ""), rounds);
    assert!(sum(&m, "duo_draft_jobs_total", "") > 0.0);
    for h in [
        "duo_orchestrator_ttft_seconds_count",
        "duo_orchestrator_inter_token_seconds_count",
        "duo_orchestrator_gamma_per_round_count",
        "duo_orchestrator_branches_per_round_count",
        "duo_orchestrator_generation_seconds_count",
        "duo_target_verify_seconds_count",
        "duo_draft_job_seconds_count",
    ] {
        assert!(sum(&m, h, "") > 0.0, "{h} missing:\n{m}");
    }
    assert_eq!(
        sum(&m, "duo_orchestrator_ttft_seconds_count", "") as usize,
        requests
    );
    for busy in [
        "duo_orchestrator_target_busy_microseconds_total",
        "duo_orchestrator_draft_busy_microseconds_total",
        "duo_orchestrator_target_idle_microseconds_total",
        "duo_orchestrator_draft_idle_microseconds_total",
    ] {
        assert!(m.contains(busy), "{busy} missing");
    }
    assert_eq!(
        sum(&m, "duo_orchestrator_draft_workers", "state=\"healthy\""),
        1.0
    );
    assert!(m.contains("duo_orchestrator_draft_worker_healthy{worker="));
    // Sessions close when generations end.
    common::wait_until(10, "sessions_open gauges back to 0", || async {
        let m = common::http_get(dep.http, "/metrics").await;
        sum(&m, "duo_target_sessions_open", "") == 0.0
            && sum(&m, "duo_draft_sessions_open", "") == 0.0
            && sum(&m, "duo_orchestrator_generations_open", "") == 0.0
    })
    .await;
    // The draft worker's own /metrics endpoint.
    let d = common::http_get(draft_metrics, "/metrics").await;
    assert!(d.contains("duo_draft_jobs_total"), "{d}");
}
