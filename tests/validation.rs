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
