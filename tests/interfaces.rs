//! The public interfaces behave as clients expect, over real sockets:
//! clients that leave a queue give their place up, invalid requests are
//! refused before any queue, and HTTP streams report errors known before
//! the first token as a proper status (with Retry-After when overloaded),
//! not as a 200 with an error event.

mod common;

use std::time::{Duration, Instant};

use common::{Setup, drain, greedy};
use duo_rpc::pb::Mode;
use serde_json::{Value, json};

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
    openai_options_are_honoured_or_refused_by_name().await;
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

const COMPLETIONS: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

/// A POST that must succeed: its JSON body.
async fn ok_json(addr: std::net::SocketAddr, path: &str, body: &serde_json::Value) -> Value {
    let (code, _, resp) = post(addr, path, &body.to_string()).await;
    assert_eq!(code, 200, "{body} -> {resp}");
    serde_json::from_str(&resp).unwrap_or_else(|e| panic!("{e}: {resp}"))
}

/// A POST that must be refused: a 400 with OpenAI's error object naming
/// `param` (in `param` and in the message), before any event for streams.
async fn refused(addr: std::net::SocketAddr, path: &str, body: &str, param: &str) {
    let (code, _, resp) = post(addr, path, body).await;
    assert_eq!(code, 400, "{body} -> {resp}");
    let e: Value = serde_json::from_str(&resp).unwrap_or_else(|e| panic!("{e}: {resp}"));
    let e = &e["error"];
    assert_eq!(e["type"], "invalid_request_error", "{body} -> {resp}");
    assert_eq!(e["param"], param, "{body} -> {resp}");
    assert!(
        e["message"].as_str().is_some_and(|m| m.contains(param)),
        "{body} -> {resp}"
    );
    assert!(e.get("code").is_some(), "{resp}");
}

/// Every OpenAI option is honoured or refused by name (the table in
/// docs/reliability.md): an option this server cannot honour, or a field
/// nobody knows, is a 400 whose error object names it, also for
/// `stream: true`; default and harmless values are accepted; `echo`,
/// `logprobs` 0/1, chat `logprobs`, text content parts, `developer` and
/// `name` are honoured; the chat template's own stop sequence does not
/// take a user's place when a user's makes it redundant.
async fn openai_options_are_honoured_or_refused_by_name() {
    let dep = common::start_with(Setup::drafts(1)).await;
    let addr = dep.http;
    let p = r#""prompt": "KING.", "max_tokens": 4"#;
    let m = r#""messages": [{"role": "user", "content": "What news?"}], "max_tokens": 4"#;
    let stops = |n: usize| (0..n).map(|i| format!("<{i}>")).collect::<Vec<_>>();
    let cases: Vec<(&str, String, &str)> = vec![
        (COMPLETIONS, format!(r#"{{{p}, "bogus": 1}}"#), "bogus"),
        // The SDK merges extra_body into the body; a literal one is unknown.
        (COMPLETIONS, format!(r#"{{{p}, "extra_body": {{"mode": "speculative"}}}}"#), "extra_body"),
        (COMPLETIONS, format!(r#"{{{p}, "logit_bias": {{"50": -100}}, "stream": true}}"#), "logit_bias"),
        (COMPLETIONS, format!(r#"{{{p}, "best_of": 3}}"#), "best_of"),
        (COMPLETIONS, format!(r#"{{{p}, "suffix": "and so farewell"}}"#), "suffix"),
        (COMPLETIONS, format!(r#"{{{p}, "logprobs": 5}}"#), "logprobs"),
        (COMPLETIONS, format!(r#"{{{p}, "presence_penalty": 1.2}}"#), "presence_penalty"),
        (COMPLETIONS, format!(r#"{{{p}, "frequency_penalty": 0.1, "stream": true}}"#), "frequency_penalty"),
        (COMPLETIONS, format!(r#"{{{p}, "n": 2}}"#), "n"),
        (COMPLETIONS, format!(r#"{{{p}, "echo": true, "logprobs": 0}}"#), "echo"),
        (COMPLETIONS, format!(r#"{{{p}, "top_k": -1}}"#), "top_k"),
        (COMPLETIONS, format!(r#"{{{p}, "temperature": "hot"}}"#), "temperature"),
        // Refused by the shared validation: named too.
        (COMPLETIONS, format!(r#"{{{p}, "temperature": -1, "stream": true}}"#), "temperature"),
        (COMPLETIONS, r#"{"prompt": "KING.", "max_tokens": 0}"#.into(), "max_tokens"),
        (COMPLETIONS, format!(r#"{{{p}, "stream_options": {{"include_usage": true}}}}"#), "stream_options"),
        (COMPLETIONS, format!(r#"{{{p}, "stream": true, "stream_options": {{"chunky": true}}}}"#), "stream_options.chunky"),
        (COMPLETIONS, r#"{"max_tokens": 4}"#.into(), "prompt"),
        (COMPLETIONS, format!(r#"{{{p}, "messages": []}}"#), "messages"),
        (CHAT, format!(r#"{{{m}, "tools": [{{"type": "function", "function": {{"name": "f"}}}}]}}"#), "tools"),
        (CHAT, format!(r#"{{{m}, "tool_choice": "required"}}"#), "tool_choice"),
        (CHAT, format!(r#"{{{m}, "functions": [{{"name": "f"}}]}}"#), "functions"),
        (CHAT, format!(r#"{{{m}, "function_call": {{"name": "f"}}}}"#), "function_call"),
        (CHAT, format!(r#"{{{m}, "response_format": {{"type": "json_schema", "json_schema": {{"name": "s"}}}}}}"#), "response_format"),
        (CHAT, format!(r#"{{{m}, "logprobs": true, "top_logprobs": 5}}"#), "top_logprobs"),
        (CHAT, format!(r#"{{{m}, "store": true}}"#), "store"),
        (CHAT, format!(r#"{{{m}, "audio": {{"voice": "alloy", "format": "wav"}}}}"#), "audio"),
        (CHAT, format!(r#"{{{m}, "service_tier": "priority", "stream": true}}"#), "service_tier"),
        // Unknown fields are refused even when null.
        (CHAT, format!(r#"{{{m}, "bogus": null}}"#), "bogus"),
        (CHAT, format!(r#"{{{m}, "echo": true}}"#), "echo"),
        (CHAT, format!(r#"{{{m}, "stop": {}}}"#, json!(stops(17))), "stop"),
        (CHAT, r#"{"messages": [], "max_tokens": 4}"#.into(), "messages"),
        (CHAT, r#"{"max_tokens": 4}"#.into(), "messages"),
        (CHAT, r#"{"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}"#.into(), "messages.[0].content.[0].type"),
        (CHAT, r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}"#.into(), "messages.[0].content.[1].type"),
        (CHAT, r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {}}]}]}"#.into(), "messages.[0].content.[0].cache_control"),
        (CHAT, r#"{"messages": [{"role": "user", "content": [{"text": "Hi"}]}]}"#.into(), "messages.[0].content.[0].type"),
        (CHAT, r#"{"messages": [{"role": "function", "name": "f", "content": "1"}]}"#.into(), "messages.[0].role"),
        (CHAT, r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "c", "content": "1"}]}"#.into(), "messages.[1].role"),
        (CHAT, r#"{"messages": [{"role": "narrator", "content": "Enter Brutus."}]}"#.into(), "messages.[0].role"),
        (CHAT, r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}"#.into(), "messages.[1].tool_calls"),
        (CHAT, r#"{"messages": [{"role": "user"}]}"#.into(), "messages.[0].content"),
        (CHAT, r#"{"messages": [{"role": "user", "content": "Hi", "mood": "glum"}]}"#.into(), "messages.[0].mood"),
        (CHAT, r#"{"messages": [{"role": "user", "content": "Hi", "name": "A.\nB"}]}"#.into(), "messages.[0].name"),
    ];
    for (path, body, param) in &cases {
        refused(addr, path, body, param).await;
    }

    // Default and harmless values are accepted, as clients such as
    // LangChain send them.
    let c = ok_json(
        addr,
        COMPLETIONS,
        &json!({"prompt": "KING.", "max_tokens": 4, "n": 1, "best_of": 1, "echo": false,
                "suffix": null, "logprobs": null, "presence_penalty": 0, "frequency_penalty": 0.0,
                "logit_bias": {}, "user": "u-1", "seed": -3, "stream": false, "top_p": 1,
                "temperature": 0.7, "stop": null, "model": "duo"}),
    )
    .await;
    assert!(c["choices"][0]["logprobs"].is_null(), "{c}");
    let c = ok_json(
        addr,
        CHAT,
        &json!({"messages": [
                    {"role": "developer", "content": "Be brief."},
                    {"role": "user", "name": "Brutus", "content": [{"type": "text", "text": "What news?"}]},
                    {"role": "assistant", "content": "None.", "tool_calls": [], "refusal": null},
                    {"role": "user", "content": "Speak."}],
                "max_tokens": 4, "tools": [], "tool_choice": "none", "parallel_tool_calls": true,
                "response_format": {"type": "text"}, "store": false, "metadata": {"k": "v"},
                "service_tier": "auto", "logprobs": false, "top_logprobs": 0, "user": "u-1",
                "stream_options": null, "modalities": ["text"], "functions": null,
                "function_call": "none", "safety_identifier": "s", "prompt_cache_key": "k"}),
    )
    .await;
    assert!(c["choices"][0]["logprobs"].is_null(), "{c}");

    // echo: the prompt (here token ids, decoded) leads the text.
    let ids = common::encode("KING. Speak");
    let c = ok_json(
        addr,
        COMPLETIONS,
        &json!({"prompt": ids, "max_tokens": 4, "temperature": 0, "echo": true}),
    )
    .await;
    let text = c["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("KING. Speak") && text.len() > 11, "{c}");
    let (code, _, body) = post(
        addr,
        COMPLETIONS,
        r#"{"prompt": "KING. Speak", "max_tokens": 4, "temperature": 0, "echo": true, "stream": true}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let streamed: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(streamed, text, "{body}");

    // logprobs 0 and 1: one log-probability per generated token.
    for n in [0, 1] {
        let c = ok_json(
            addr,
            COMPLETIONS,
            &json!({"prompt": "KING.", "max_tokens": 5, "temperature": 0, "logprobs": n}),
        )
        .await;
        let lp = &c["choices"][0]["logprobs"];
        let k = c["usage"]["completion_tokens"].as_u64().unwrap() as usize;
        assert_eq!(lp["tokens"].as_array().unwrap().len(), k, "{c}");
        let lps = lp["token_logprobs"].as_array().unwrap();
        assert_eq!(lps.len(), k, "{c}");
        assert!(lps.iter().all(|x| x.as_f64().unwrap() <= 0.0), "{c}");
    }
    let c = ok_json(
        addr,
        CHAT,
        &json!({"messages": [{"role": "user", "content": "What news?"}], "max_tokens": 6,
                "temperature": 0, "logprobs": true}),
    )
    .await;
    let content = c["choices"][0]["logprobs"]["content"].as_array().unwrap();
    let k = c["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(content.len(), k, "{c}");
    assert!(
        content
            .iter()
            .all(|t| t["logprob"].as_f64().unwrap() <= 0.0 && t["token"].is_string()),
        "{c}"
    );

    // Stop sequences in chat: 15 beside the template's end of turn; 16
    // when one of them makes it redundant ("\n", "\n\n").
    let chat = |stop: Vec<String>| {
        json!({"messages": [{"role": "user", "content": "What news from Rome?"}],
               "max_tokens": 48, "temperature": 0, "stop": stop})
    };
    ok_json(addr, CHAT, &chat(stops(15))).await;
    for end in ["\n", "\n\n"] {
        let mut s = stops(15);
        s.push(end.into());
        let c = ok_json(addr, CHAT, &chat(s)).await;
        let text = c["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!text.contains(end), "{c}");
    }
    // The limit of 16 is on the caller's sequences: 16 unrelated ones are
    // accepted beside the template's own; 17 are refused.
    ok_json(addr, CHAT, &chat(stops(16))).await;
    refused(addr, CHAT, &chat(stops(17)).to_string(), "stop").await;
}
