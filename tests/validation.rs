//! Invalid requests get INVALID_ARGUMENT with a message that says what to
//! fix; nothing panics and the deployment keeps serving.

mod common;

use duo_rpc::pb::{self, generate_request};

fn text(t: &str) -> Option<generate_request::Prompt> {
    Some(generate_request::Prompt::Text(t.into()))
}

fn ok_request() -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: text("KING."),
        max_new_tokens: 8,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_requests_are_rejected_with_a_clear_message() {
    let dep = common::start(&[common::models().join("tokenizer.json")]).await;
    let mut client = dep.client().await;
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    let ctx = info.context_len;
    let cases: Vec<(&str, pb::GenerateRequest, &str)> = vec![
        (
            "no prompt",
            pb::GenerateRequest {
                prompt: None,
                ..ok_request()
            },
            "no prompt",
        ),
        (
            "empty text",
            pb::GenerateRequest {
                prompt: text(""),
                ..ok_request()
            },
            "empty",
        ),
        (
            "empty ids",
            pb::GenerateRequest {
                prompt: Some(generate_request::Prompt::TokenIds(pb::TokenIds {
                    ids: vec![],
                })),
                ..ok_request()
            },
            "empty",
        ),
        (
            "prompt text too large",
            pb::GenerateRequest {
                prompt: text(&"a".repeat(70_000)),
                ..ok_request()
            },
            "--max-prompt-bytes",
        ),
        (
            "prompt too long",
            pb::GenerateRequest {
                prompt: Some(generate_request::Prompt::TokenIds(pb::TokenIds {
                    ids: vec![5; ctx as usize],
                })),
                ..ok_request()
            },
            "exceeds the model context",
        ),
        (
            "max_new_tokens 0",
            pb::GenerateRequest {
                max_new_tokens: 0,
                ..ok_request()
            },
            "max_new_tokens",
        ),
        (
            "max_new_tokens past context",
            pb::GenerateRequest {
                max_new_tokens: ctx,
                ..ok_request()
            },
            "exceeds the model context",
        ),
        (
            "negative temperature",
            pb::GenerateRequest {
                temperature: -1.0,
                ..ok_request()
            },
            "temperature",
        ),
        (
            "NaN temperature",
            pb::GenerateRequest {
                temperature: f32::NAN,
                ..ok_request()
            },
            "temperature",
        ),
        (
            "infinite temperature",
            pb::GenerateRequest {
                temperature: f32::INFINITY,
                ..ok_request()
            },
            "temperature",
        ),
        (
            "top_p 0",
            pb::GenerateRequest {
                top_p: Some(0.0),
                ..ok_request()
            },
            "top_p",
        ),
        (
            "top_p 1.5",
            pb::GenerateRequest {
                top_p: Some(1.5),
                ..ok_request()
            },
            "top_p",
        ),
        (
            "too many stops",
            pb::GenerateRequest {
                stop: vec!["x".into(); 17],
                ..ok_request()
            },
            "stop sequences",
        ),
        (
            "stop too long",
            pb::GenerateRequest {
                stop: vec!["x".repeat(300)],
                ..ok_request()
            },
            "too long",
        ),
        (
            "token id outside vocabulary",
            pb::GenerateRequest {
                prompt: Some(generate_request::Prompt::TokenIds(pb::TokenIds {
                    ids: vec![1, 999_999],
                })),
                ..ok_request()
            },
            "outside the vocabulary",
        ),
        (
            "unknown mode",
            pb::GenerateRequest {
                mode: 42,
                ..ok_request()
            },
            "unknown mode",
        ),
        (
            "gamma 0",
            pb::GenerateRequest {
                gamma: Some(0),
                ..ok_request()
            },
            "gamma",
        ),
        (
            "gamma absurd",
            pb::GenerateRequest {
                gamma: Some(100_000),
                ..ok_request()
            },
            "gamma",
        ),
        (
            "branches 0",
            pb::GenerateRequest {
                max_branches: Some(0),
                ..ok_request()
            },
            "max_branches",
        ),
        (
            "branches absurd",
            pb::GenerateRequest {
                max_branches: Some(99),
                ..ok_request()
            },
            "max_branches",
        ),
    ];
    for (name, req, needle) in cases {
        for streaming in [false, true] {
            let err = if streaming {
                match client.generate_stream(req.clone()).await {
                    Err(e) => e,
                    Ok(resp) => {
                        let mut s = resp.into_inner();
                        loop {
                            match s.message().await {
                                Err(e) => break e,
                                Ok(Some(_)) => continue,
                                Ok(None) => panic!("{name}: stream ended without an error"),
                            }
                        }
                    }
                }
            } else {
                client.generate(req.clone()).await.expect_err(name)
            };
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {err:?}");
            assert!(
                err.message().contains(needle),
                "{name}: message {:?} should mention {needle:?}",
                err.message()
            );
        }
    }
    // A message over the transport limit (4 MiB) is refused before
    // decoding, with a message that gives the limit.
    let huge = pb::GenerateRequest {
        prompt: text(&"a".repeat(5 << 20)),
        ..ok_request()
    };
    let err = client.generate(huge).await.unwrap_err();
    assert!(err.message().contains("too large"), "{err:?}");
    // Still serving.
    client.generate(ok_request()).await.unwrap();
}

/// The target admits sessions by KV-cache bytes: with a 1 MiB budget one
/// full-context session of the bundled target (512 tokens x 2 KiB) fits, a
/// second is refused with RESOURCE_EXHAUSTED naming the bytes, and closing
/// the first frees its share. A generation through the orchestrator
/// reserves only what it can use (prompt + max_tokens + the longest tail);
/// while the budget is full its client gets the target's own status and
/// message (gRPC RESOURCE_EXHAUSTED, HTTP 429), not a generic UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn target_sessions_are_admitted_by_kv_bytes() {
    use duo_rpc::pb::target_client::TargetClient;
    use duo_rpc::pb::{target_reply, target_request};
    use tokio_stream::wrappers::ReceiverStream;

    let dep = common::start_with(common::Setup {
        target_flags: vec!["--kv-budget-mib".into(), "1".into()],
        ..common::Setup::drafts(1)
    })
    .await;
    let fp = TargetClient::new(common::channel(dep.target).await)
        .describe(pb::DescribeRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokenizer_fingerprint;
    let open = |max_context: u32| pb::TargetRequest {
        kind: Some(target_request::Kind::Open(pb::OpenTarget {
            vocab_size: 2048,
            tokenizer_fingerprint: fp.clone(),
            max_context,
            ..Default::default()
        })),
    };
    let session = |req: pb::TargetRequest| {
        let addr = dep.target;
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(req).await.unwrap();
            let mut replies = TargetClient::new(common::channel(addr).await)
                .session(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let first = replies.message().await;
            (tx, replies, first)
        }
    };
    let (first_tx, _first_rx, opened) = session(open(0)).await;
    assert!(
        matches!(
            opened.unwrap().unwrap().kind,
            Some(target_reply::Kind::Opened(_))
        ),
        "a full-context session fits a 1 MiB budget"
    );
    let (_tx, _rx, refused) = session(open(300)).await;
    let status = refused.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    for part in ["KV cache budget", "300 tokens x 2048 B", "--kv-budget-mib"] {
        assert!(status.message().contains(part), "{}", status.message());
    }
    // Through the orchestrator a generation is refused the same way while
    // the budget is full...
    let mut client = dep.client().await;
    let err = client.generate(ok_request()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    for part in ["KV cache budget", "--kv-budget-mib"] {
        assert!(err.message().contains(part), "{err:?}");
    }
    let mut stream = client
        .generate_stream(ok_request())
        .await
        .unwrap()
        .into_inner();
    let err = stream.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("KV cache budget"), "{err:?}");
    let (code, head, body) = common::http(
        dep.http,
        "POST",
        "/v1/completions",
        r#"{"prompt": "KING. Speak", "max_tokens": 8}"#,
    )
    .await;
    assert_eq!(code, 429, "{body}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(
        body.contains("rate_limit_error") && body.contains("KV cache budget"),
        "{body}"
    );
    // ...and runs once the first session closes.
    drop(first_tx);
    common::wait_until(10, "the closed session's reservation freed", || {
        let mut c = client.clone();
        async move { c.generate(ok_request()).await.is_ok() }
    })
    .await;
}
