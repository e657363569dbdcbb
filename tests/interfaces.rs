//! The public interfaces behave as clients expect, over real sockets:
//! clients that leave a queue give their place up, invalid requests are
//! refused before any queue, and HTTP streams report errors known before
//! the first token as a proper status (with Retry-After when overloaded),
//! not as a 200 with an error event.

mod common;

use std::time::{Duration, Instant};

use common::{Setup, drain, greedy};
use duo_rpc::pb::Mode;

const PROMPTS: [&str; 3] = [
    "KING. Speak, what news",
    "ROMEO. But soft, what light",
    "HAMLET. To be, or",
];

/// One generation at a time, a queue of two places that waits long.
async fn one_slot_two_queued() -> common::Deployment {
    common::start_with(Setup {
        orchestrator_flags: vec![
            "--max-generations=1".into(),
            "--generation-queue=2".into(),
            "--generation-queue-timeout-ms=60000".into(),
        ],
        ..Setup::drafts(1)
    })
    .await
}

async fn queued(dep: &common::Deployment) -> String {
    let m = common::http_get(dep.http, "/metrics").await;
    m.lines()
        .find(|l| l.starts_with("duo_orchestrator_generation_queue_waiting "))
        .unwrap_or("")
        .to_string()
}

/// A raw HTTP/1.0 POST of JSON: status code, headers, body.
async fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String, String) {
    common::http(addr, "POST", path, body).await
}

/// The scenarios run one after the other: they read the process-wide
/// queue gauge, which concurrent deployments in one test binary would share.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queues_validation_and_stream_statuses() {
    streams_abandoned_in_the_queue_never_block_a_live_client().await;
    invalid_requests_are_refused_before_the_queue_and_streams_get_statuses().await;
    http_errors_are_openai_error_objects().await;
}

fn cancelled(metrics: &str) -> String {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("duo_orchestrator_requests_total") && l.contains("outcome=\"Cancelled\"")
        })
        .unwrap_or("")
        .to_string()
}

async fn streams_abandoned_in_the_queue_never_block_a_live_client() {
    let dep = one_slot_two_queued().await;
    dep.hold();
    let (first, _) = common::held_stream(&dep, greedy(PROMPTS[0], Mode::Duodecoding, 32)).await;
    // Two streaming clients (one gRPC, one HTTP) queue behind it ...
    let mut c = dep.client().await;
    let grpc = c
        .generate_stream(greedy(PROMPTS[1], Mode::Duodecoding, 8))
        .await
        .unwrap();
    let http = tokio::spawn(post(
        dep.http,
        "/v1/completions",
        r#"{"prompt": "KING. Speak", "max_tokens": 8, "stream": true}"#,
    ));
    common::wait_until(10, "two streams queued", || async {
        queued(&dep).await.ends_with(" 2")
    })
    .await;
    // ... the queue is full ...
    let full = dep
        .client()
        .await
        .generate(greedy(PROMPTS[2], Mode::Duodecoding, 8))
        .await
        .unwrap_err();
    assert_eq!(full.code(), tonic::Code::ResourceExhausted, "{full:?}");
    // ... and both leave: their places are given up at once.
    drop(grpc);
    http.abort();
    common::wait_until(10, "the abandoned places freed", || async {
        queued(&dep).await.ends_with(" 0")
    })
    .await;
    // A unary HTTP client that leaves the queue is counted too.
    let unary = tokio::spawn(post(
        dep.http,
        "/v1/completions",
        r#"{"prompt": "KING. Speak", "max_tokens": 8}"#,
    ));
    common::wait_until(10, "the unary request queued", || async {
        queued(&dep).await.ends_with(" 1")
    })
    .await;
    unary.abort();
    common::wait_until(10, "three abandoned requests counted", || async {
        cancelled(&common::http_get(dep.http, "/metrics").await).ends_with(" 3")
    })
    .await;
    assert!(queued(&dep).await.ends_with(" 0"));
    // A live client now waits in the queue and is served.
    let live = tokio::spawn({
        let mut c = dep.client().await;
        async move { c.generate(greedy(PROMPTS[2], Mode::Duodecoding, 8)).await }
    });
    common::wait_until(10, "the live client queued", || async {
        queued(&dep).await.ends_with(" 1")
    })
    .await;
    dep.release();
    drain(first, Vec::new()).await.unwrap();
    let g = live.await.unwrap().expect("the live client is served");
    assert_eq!(g.into_inner().token_ids.len(), 8);
    let m = common::http_get(dep.http, "/metrics").await;
    assert!(
        m.contains("duo_orchestrator_streams_total{end=\"abandoned\"} 2"),
        "{m}"
    );
    common::wait_until(10, "the queue empty", || async {
        queued(&dep).await.ends_with(" 0")
    })
    .await;
}

async fn invalid_requests_are_refused_before_the_queue_and_streams_get_statuses() {
    let dep = one_slot_two_queued().await;
    dep.hold();
    let (first, _) = common::held_stream(&dep, greedy(PROMPTS[0], Mode::Duodecoding, 32)).await;
    // Invalid, while every slot is taken: INVALID_ARGUMENT at once, not a
    // wait in the queue.
    let t0 = Instant::now();
    let mut bad = greedy(PROMPTS[1], Mode::Duodecoding, 8);
    bad.gamma = Some(10_000);
    let err = dep.client().await.generate(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("gamma"), "{err:?}");
    let (code, _, body) = post(
        dep.http,
        "/v1/completions",
        r#"{"prompt": "KING.", "max_tokens": 8, "stream": true, "temperature": -1}"#,
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "an invalid request queued"
    );
    // Overloaded, streaming over HTTP: a 429 with Retry-After, before any
    // event (the queue holds two, then is full).
    let fillers: Vec<_> = (0..2)
        .map(|i| {
            let addr = dep.http;
            tokio::spawn(async move {
                post(
                    addr,
                    "/v1/completions",
                    &format!(r#"{{"prompt": "KING. {i}", "max_tokens": 4}}"#),
                )
                .await
            })
        })
        .collect();
    common::wait_until(10, "two requests queued", || async {
        queued(&dep).await.ends_with(" 2")
    })
    .await;
    let (code, head, body) = post(
        dep.http,
        "/v1/completions",
        r#"{"prompt": "KING.", "max_tokens": 8, "stream": true}"#,
    )
    .await;
    assert_eq!(code, 429, "{head}{body}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(body.contains("rate_limit_error"), "{body}");
    assert!(
        !body.contains("data:"),
        "an SSE body came with the error: {body}"
    );
    dep.release();
    drain(first, Vec::new()).await.unwrap();
    for f in fillers {
        let (code, _, body) = f.await.unwrap();
        assert_eq!(code, 200, "{body}");
    }
    // A healthy stream is still SSE, ending in [DONE].
    let (code, head, body) = post(
        dep.http,
        "/v1/completions",
        r#"{"prompt": "KING.", "max_tokens": 8, "stream": true}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(head.contains("text/event-stream"), "{head}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
}

/// Errors outside the generation path keep OpenAI's shape; field names are
/// the API's own.
async fn http_errors_are_openai_error_objects() {
    let dep = common::start_with(Setup::drafts(1)).await;
    let (code, _, body) = common::http(dep.http, "GET", "/v1/nothing", "").await;
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains("\"error\"") && body.contains("/v1/nothing"),
        "{body}"
    );
    let (code, _, body) = common::http(dep.http, "GET", "/v1/completions", "").await;
    assert_eq!(code, 405, "{body}");
    assert!(body.contains("\"error\"") && body.contains("GET"), "{body}");
    let (code, _, body) = common::http(dep.http, "GET", "/v1/models/duo", "").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"object\":\"model\""), "{body}");
    let (code, _, body) = common::http(dep.http, "GET", "/v1/models/gpt-4", "").await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("does not exist"), "{body}");
    // Prompts as the openai SDK sends them: a list of one string, token ids.
    for prompt in [r#"["KING."]"#, "[1, 2, 3]"] {
        let (code, _, body) = post(
            dep.http,
            "/v1/completions",
            &format!(r#"{{"prompt": {prompt}, "max_tokens": 4}}"#),
        )
        .await;
        assert_eq!(code, 200, "{prompt}: {body}");
    }
    let (code, _, body) = post(
        dep.http,
        "/v1/completions",
        r#"{"prompt": ["a", "b"], "max_tokens": 4}"#,
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("batches are not supported"), "{body}");
    let (code, _, body) = post(
        dep.http,
        "/v1/completions",
        r#"{"prompt": "KING.", "max_tokens": 100000}"#,
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("max_tokens") && !body.contains("max_new_tokens"),
        "{body}"
    );
}
