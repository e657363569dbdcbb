//! The distributed system over real gRPC on loopback: target-service,
//! draft-service and orchestrator as tonic servers on ephemeral ports.

mod common;

use duo_core::engine::{Engine, EngineConfig, GenerateParams, Mode};
use duo_core::tokenizer::Tokenizer;
use duo_rpc::pb::{self, generate_request};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const NEW_TOKENS: u32 = 128;

fn request(ids: Vec<u32>, mode: pb::Mode) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(generate_request::Prompt::TokenIds(pb::TokenIds { ids })),
        max_new_tokens: NEW_TOKENS,
        mode: mode as i32,
        ..Default::default()
    }
}

/// Prompts as ids, cut from the left to fit the context with NEW_TOKENS.
fn prompt_ids(per_category: usize, context: usize) -> Vec<Vec<u32>> {
    let tok = Tokenizer::from_file(common::models().join("tokenizer.json")).unwrap();
    common::spec_bench(per_category)
        .iter()
        .map(|p| {
            let mut ids = tok.encode(p).unwrap();
            let room = context - NEW_TOKENS as usize;
            if ids.len() > room {
                ids.drain(..ids.len() - room);
            }
            ids
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_over_grpc_matches_in_process_autoregressive() {
    let dep = common::start(&[common::models().join("tokenizer.json")]).await;
    let mut client = dep.client().await;
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    let prompts = prompt_ids(4, info.context_len as usize);
    assert!(prompts.len() >= 20);
    let reference = {
        let prompts = prompts.clone();
        tokio::task::spawn_blocking(move || {
            let mut engine = Engine::load(&EngineConfig::bundled(&common::models())).unwrap();
            prompts
                .into_iter()
                .map(|p| {
                    let params = GenerateParams {
                        max_new_tokens: NEW_TOKENS as usize,
                        mode: Mode::Autoregressive,
                        ..GenerateParams::default()
                    };
                    engine
                        .generate(p, &params, &mut |_, _, _| true)
                        .unwrap()
                        .tokens
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap()
    };
    for (i, (p, want)) in prompts.iter().zip(&reference).enumerate() {
        for mode in [
            pb::Mode::Autoregressive,
            pb::Mode::Speculative,
            pb::Mode::Duodecoding,
        ] {
            let got = client
                .generate(request(p.clone(), mode))
                .await
                .unwrap()
                .into_inner();
            common::check_greedy(&format!("prompt {i}, {mode:?}"), p, &got.token_ids, want);
            let stats = got.stats.unwrap();
            assert_eq!(stats.new_tokens as usize, got.token_ids.len());
            assert!(stats.accepted <= stats.drafted);
            if mode != pb::Mode::Autoregressive {
                assert!(!stats.draft_worker.is_empty());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_equals_unary_and_ends_with_one_final_chunk() {
    let dep = common::start(&[common::models().join("tokenizer.json")]).await;
    let mut client = dep.client().await;
    for (mode, stop) in [
        (pb::Mode::Duodecoding, vec![]),
        (pb::Mode::Speculative, vec!["\n\n".to_string()]),
    ] {
        let req = pb::GenerateRequest {
            prompt: Some(generate_request::Prompt::Text(
                "ROMEO.\nBut soft, what light through yonder window".into(),
            )),
            max_new_tokens: 96,
            mode: mode as i32,
            stop,
            logprobs: true,
            ..Default::default()
        };
        let unary = client.generate(req.clone()).await.unwrap().into_inner();
        let mut stream = client.generate_stream(req).await.unwrap().into_inner();
        let (mut text, mut ids, mut logprobs, mut finals) =
            (String::new(), Vec::new(), Vec::new(), Vec::new());
        while let Some(chunk) = stream.message().await.unwrap() {
            assert!(finals.is_empty(), "a chunk came after the final chunk");
            text.push_str(&chunk.text);
            ids.extend(chunk.token_ids);
            logprobs.extend(chunk.logprobs);
            if let Some(f) = chunk.r#final {
                finals.push(f);
            }
        }
        assert_eq!(finals.len(), 1, "exactly one final chunk");
        assert_eq!(text, unary.text);
        assert_eq!(ids, unary.token_ids);
        assert_eq!(logprobs.len(), ids.len());
        assert!(logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
        let f = &finals[0];
        let stats = f.stats.as_ref().unwrap();
        assert_eq!(stats.new_tokens as usize, ids.len());
        assert!(stats.accepted <= stats.drafted);
        assert!(stats.rounds >= 1 && stats.rounds as usize <= ids.len());
        assert_eq!(f.finish_reason, unary.finish_reason);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incompatible_tokenizer_is_refused() {
    // A draft worker whose tokenizer differs by one vocabulary entry.
    let dir = std::env::temp_dir().join(format!("duo-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(common::models().join("tokenizer.json")).unwrap();
    let other = text.replacen("\"<|endoftext|>\"", "\"<|end|>\"", 2);
    assert_ne!(text, other);
    let bad = dir.join("tokenizer.json");
    std::fs::write(&bad, other).unwrap();
    let dep = common::start(&[bad]).await;
    let mut client = dep.client().await;
    let err = client
        .generate(request(vec![1, 2, 3], pb::Mode::Duodecoding))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("share one tokenizer"),
        "{}",
        err.message()
    );
    // Autoregressive needs no draft: still served.
    client
        .generate(request(vec![1, 2, 3], pb::Mode::Autoregressive))
        .await
        .unwrap();
    // Over HTTP the mismatch is the server's fault: 500, not 400.
    let (code, _, body) = common::http(
        dep.http,
        "POST",
        "/v1/completions",
        r#"{"prompt": [1, 2, 3], "max_tokens": 4, "mode": "duodecoding"}"#,
    )
    .await;
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("server_error"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_reflection() {
    let dep = common::start(&[common::models().join("tokenizer.json")]).await;
    let services = [
        (dep.orchestrator, "duo.v1.Generation"),
        (dep.target, "duo.v1.Target"),
        (dep.drafts[0], "duo.v1.Draft"),
    ];
    for (addr, name) in services {
        let ch = common::channel(addr).await;
        // SERVING once loaded (the orchestrator: once the target answered).
        let mut status = ServingStatus::Unknown;
        for _ in 0..100 {
            status = HealthClient::new(ch.clone())
                .check(tonic_health::pb::HealthCheckRequest {
                    service: name.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status();
            if status == ServingStatus::Serving {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(status, ServingStatus::Serving, "{name}");
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let req = tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(ch)
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let msg = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("no service list from {name}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.contains(&name.to_string()), "{name} not in {names:?}");
        assert!(
            names.contains(&"grpc.health.v1.Health".to_string()),
            "{names:?}"
        );
    }
}

/// `duo up --demo` (the README's first command) is ready only when its
/// draft worker serves, so the demo drafts and accepts tokens.
#[test]
fn duo_up_demo_drafts() {
    // A base port with the four ports `duo up` uses (orchestrator, target,
    // one draft worker) free.
    let base = (0..50)
        .map(|_| common::free_port().port())
        .find(|&p| {
            p < 65000 && (p..p + 3).all(|q| std::net::TcpListener::bind(("127.0.0.1", q)).is_ok())
        })
        .expect("three free ports in a row");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duo"))
        .args(["up", "--port", &base.to_string(), "--max-new-tokens", "48"])
        .args(["--demo", "KING.\nWhat say you?"])
        .env("RUST_LOG", "warn,ort=error")
        .output()
        .expect("duo up runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "duo up --demo failed: {stderr}");
    let stats = stderr
        .lines()
        .find(|l| l.contains("tokens/round"))
        .unwrap_or_else(|| panic!("no stats line in: {stderr}"));
    let count = |what: &str| -> usize {
        stats
            .split(&format!("{what} "))
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {what} in {stats}"))
    };
    assert!(count("drafted") > 0, "the demo did not draft: {stats}");
    assert!(count("accepted") > 0, "the demo accepted nothing: {stats}");
    assert!(
        !stderr.contains("going on without it"),
        "the demo lost its draft: {stderr}"
    );
}

/// `duo up` checks its ports before it starts anything: an `--http-port`
/// on the target's port, or a port another program holds, is refused at
/// once with the port and the service named (not "address already in
/// use" from a child, with the others left running).
#[test]
fn duo_up_refuses_colliding_or_taken_ports() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().port();
    let base = common::free_port().port().min(64000);
    let run = |args: &[String]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_duo"))
            .arg("up")
            .args(args)
            .output()
            .expect("duo up runs");
        assert!(!out.status.success(), "duo up {args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&[
        "--port".into(),
        base.to_string(),
        "--http-port".into(),
        (base + 1).to_string(),
    ]);
    assert!(
        err.contains(&format!("port {}", base + 1))
            && err.contains("target-service")
            && err.contains("--http-port"),
        "{err}"
    );
    let err = run(&["--port".into(), taken.to_string()]);
    assert!(
        err.contains(&format!("port {taken}")) && err.contains("already in use"),
        "{err}"
    );
}
