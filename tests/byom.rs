//! "Bring your own model" end to end: Optimum exports of real architectures
//! (models/fixtures/byom/, tiny random weights; reference.json holds
//! transformers' tokens) served by the real services — each worker with its
//! model folder's own tokenizer, no `--tokenizer` — give transformers'
//! greedy tokens in every mode, chat through the model's own template, stop
//! at any of the model's end ids, accept a draft whose LM head is padded,
//! and refuse a tokenizer that is not the model's at start.

mod common;

use std::path::{Path, PathBuf};

use common::byom;
use duo_core::engine::{Engine, EngineConfig, GenerateParams, Mode};
use duo_core::tokenizer::Tokenizer;
use duo_rpc::pb::{self, generate_request};
use serde_json::{Value, json};

/// A fixture's reference.json.
fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(byom(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

const MODES: [pb::Mode; 3] = [
    pb::Mode::Autoregressive,
    pb::Mode::Speculative,
    pb::Mode::Duodecoding,
];

/// Every reference prompt, in every mode, over gRPC as text: the prompt
/// encodes to transformers' ids (BOS where the tokenizer adds one) and the
/// greedy continuation is transformers' — ended by any id of the model's
/// end list. Returns the tokens drafted in the speculative modes.
async fn matches_transformers(dep: &common::Deployment, name: &str) -> u32 {
    let r = reference(name);
    let tok = Tokenizer::load(byom(name)).unwrap();
    let max_new = r["max_new_tokens"].as_u64().unwrap() as u32;
    let mut client = dep.client().await;
    let mut drafted = 0;
    for p in r["prompts"].as_array().unwrap() {
        let text = p["prompt"].as_str().unwrap();
        let prompt_ids = ids(&p["prompt_ids"]);
        assert_eq!(
            tok.encode_prompt(text).unwrap(),
            prompt_ids,
            "{name}: {text:?}"
        );
        let want = ids(&p["generated_ids"]);
        let eos = p["stopped_on_eos"].as_bool().unwrap();
        for mode in MODES {
            let g = client
                .generate(common::greedy(text, mode, max_new))
                .await
                .unwrap_or_else(|e| panic!("{name} {mode:?} {text:?}: {e}"))
                .into_inner();
            assert_eq!(g.token_ids, want, "{name} {mode:?} {text:?}");
            let stats = g.stats.unwrap();
            assert_eq!(stats.prompt_tokens as usize, prompt_ids.len(), "{name}");
            let finish = if eos {
                pb::FinishReason::Eos
            } else {
                pb::FinishReason::Length
            };
            assert_eq!(g.finish_reason, finish as i32, "{name} {mode:?} {text:?}");
            if mode != pb::Mode::Autoregressive {
                drafted += stats.drafted;
            }
        }
    }
    drafted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn llama_with_its_draft_equals_transformers_in_every_mode() {
    let dep = common::start_models(&byom("llama"), &[byom("llama-draft")], &byom("llama")).await;
    let info = dep
        .client()
        .await
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let model = info.target.unwrap().model.unwrap();
    // generation_config.json's list: </s> and <|eot_id|>.
    assert_eq!(model.eos_token_ids, [2, 508]);
    assert_eq!(info.draft_pool[0].state, "healthy");
    // The eos prompt ends at <|eot_id|>, the list's second id.
    assert!(matches_transformers(&dep, "llama").await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qwen2_equals_transformers_and_chats_with_its_own_template() {
    let qwen = byom("qwen2");
    let dep = common::start_models(&qwen, std::slice::from_ref(&qwen), &qwen).await;
    assert!(matches_transformers(&dep, "qwen2").await > 0);
    let r = reference("qwen2");
    let tok = Tokenizer::load(&qwen).unwrap();
    let mut client = dep.client().await;
    // The template renders as apply_chat_template: as many prompt tokens
    // as transformers' ids, and the reply is the greedy continuation of
    // exactly those ids.
    for c in r["chat"].as_array().unwrap() {
        let want_ids = ids(&c["ids"]);
        let body = json!({"messages": c["messages"], "max_tokens": 8, "temperature": 0});
        let (code, _, text) =
            common::http(dep.http, "POST", "/v1/chat/completions", &body.to_string()).await;
        assert_eq!(code, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["usage"]["prompt_tokens"], want_ids.len(), "{text}");
        let g = client
            .generate(pb::GenerateRequest {
                prompt: Some(generate_request::Prompt::TokenIds(pb::TokenIds {
                    ids: want_ids,
                })),
                max_new_tokens: 8,
                mode: pb::Mode::Autoregressive as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let eos = [458, 456];
        let shown: Vec<u32> = g
            .token_ids
            .into_iter()
            .filter(|t| !eos.contains(t))
            .collect();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            tok.decode(&shown).unwrap(),
            "{text}"
        );
    }
    // A reply that ends at <|endoftext|> (456): in generation_config.json's
    // eos list, not config.json's (458 only).
    let body = json!({
        "messages": [{"role": "user", "content": "river water"}],
        "max_tokens": 24, "temperature": 0,
    });
    let (code, _, text) =
        common::http(dep.http, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{text}");
    assert_eq!(v["usage"]["completion_tokens"], 7, "{text}");
    // Tools go to the template (its tool_use variant): the prompt is
    // transformers' 326 tokens, which this 128-token model cannot take.
    let t = &r["chat_tool_use"];
    let body = json!({"messages": t["messages"], "tools": t["tools"], "max_tokens": 4});
    let (code, _, text) =
        common::http(dep.http, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(code, 400, "{text}");
    let n = ids(&t["ids"]).len();
    assert!(text.contains(&format!("prompt of {n} tokens")), "{text}");
}

/// The other architectures (and an export with external data), each
/// drafting for itself: every mode gives transformers' tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn phi3_gpt2_and_external_data_equal_transformers_in_every_mode() {
    for name in ["phi3", "gpt2", "llama-external"] {
        let m = byom(name);
        let dep = common::start_models(&m, std::slice::from_ref(&m), &m).await;
        assert!(matches_transformers(&dep, name).await > 0, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mistral_equals_transformers_and_its_template_refusals_are_400s() {
    let mistral = byom("mistral");
    let dep = common::start_models(&mistral, std::slice::from_ref(&mistral), &mistral).await;
    assert!(matches_transformers(&dep, "mistral").await > 0);
    let r = reference("mistral");
    // raise_exception in the template: a 400 that says what it said.
    let e = &r["chat_error"];
    let body = json!({"messages": e["messages"], "max_tokens": 4});
    let (code, _, text) =
        common::http(dep.http, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(code, 400, "{text}");
    assert!(text.contains(e["error"].as_str().unwrap()), "{text}");
    // The first reference conversation renders to transformers' ids.
    let c = &r["chat"][0];
    let body = json!({"messages": c["messages"], "max_tokens": 2, "mode": "autoregressive"});
    let (code, _, text) =
        common::http(dep.http, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], ids(&c["ids"]).len(), "{text}");
}

fn engine_config(target: &Path, draft: &Path, tokenizer: &Path) -> EngineConfig {
    let mut cfg = EngineConfig::bundled(Path::new(""));
    cfg.target = target.to_path_buf();
    cfg.draft = draft.to_path_buf();
    cfg.tokenizer = tokenizer.to_path_buf();
    cfg
}

/// A draft whose LM head has 576 rows for the target's 509 (one tokenizer
/// of 509 ids): the extra rows are cut off and never sampled, in process
/// and over the services.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_padded_draft_vocabulary_is_accepted() {
    let padded = byom("llama-draft-padded");
    let r = reference("llama");
    let p = &r["prompts"][3];
    let prompt = ids(&p["prompt_ids"]);
    let want = ids(&p["generated_ids"]);
    {
        let mut engine =
            Engine::load(&engine_config(&byom("llama"), &padded, &byom("llama"))).unwrap();
        let d = engine.draft().unwrap().info();
        assert_eq!((d.vocab_size, d.padded_vocab_size), (509, 576));
        for mode in [Mode::Speculative, Mode::Duodecoding] {
            let params = GenerateParams {
                max_new_tokens: 12,
                mode,
                ..GenerateParams::default()
            };
            let g = engine
                .generate(prompt.clone(), &params, &mut |_, _, _| true)
                .unwrap();
            assert_eq!(g.tokens, want, "{mode}");
        }
    }
    let dep = common::start_models(&byom("llama"), &[padded], &byom("llama")).await;
    assert_eq!(common::pool(&dep).await[0].state, "healthy");
    let mut client = dep.client().await;
    let mut drafted = 0;
    for p in r["prompts"].as_array().unwrap() {
        for mode in [pb::Mode::Speculative, pb::Mode::Duodecoding] {
            let g = client
                .generate(common::greedy(p["prompt"].as_str().unwrap(), mode, 12))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(g.token_ids, ids(&p["generated_ids"]), "{mode:?}");
            drafted += g.stats.unwrap().drafted;
        }
    }
    assert!(drafted > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tokenizer_that_is_not_the_models_is_refused_at_start() {
    let llama = byom("llama");
    // In process: a draft with its own, different tokenizer.
    let err = Engine::load(&engine_config(&llama, &byom("qwen2"), &llama))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("share one tokenizer"), "{err}");
    // A draft whose head is not the tokenizer's plus padding (the bundled
    // draft: 2048 rows for llama's 509 ids).
    let bundled_draft = common::models().join("draft");
    let err = Engine::load(&engine_config(&llama, &bundled_draft, &llama))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("by more than padding"), "{err}");
    // A target-service given another model's tokenizer does not start.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let qwen = byom("qwen2");
    let flags = [
        "target-service",
        "--listen",
        "127.0.0.1:0",
        "--model",
        llama.to_str().unwrap(),
        "--tokenizer",
        qwen.to_str().unwrap(),
    ];
    let args = <target_service::Args as clap::Parser>::try_parse_from(flags).unwrap();
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        target_service::serve(args, l, std::future::pending()),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(err.contains("tokenizer"), "{err}");
    // Over the services: a draft worker with another tokenizer is kept
    // out (incompatible) and a speculative generation is refused.
    let dep = common::start_models(&llama, &[byom("qwen2")], &llama).await;
    assert_eq!(common::pool(&dep).await[0].state, "incompatible");
    let err = dep
        .client()
        .await
        .generate(common::greedy("Hello", pb::Mode::Duodecoding, 4))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("share one tokenizer"), "{err:?}");
}

/// `duo generate` with a user's model: the model folder's tokenizer,
/// `--chat` through its template, and no draft needed autoregressively.
#[test]
fn duo_generate_takes_the_models_own_tokenizer_and_template() {
    let duo = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_duo"))
            .arg("generate")
            .args(args)
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.success(), stdout, stderr)
    };
    let path = |p: PathBuf| p.display().to_string();
    let (llama, qwen) = (path(byom("llama")), path(byom("qwen2")));
    let r = reference("llama");
    let p = &r["prompts"][0];
    // Autoregressive: the draft is neither loaded nor needed.
    let (ok, out, err) = duo(&[
        "--target",
        &llama,
        "--draft",
        "/nonexistent",
        "--mode",
        "autoregressive",
        "-n",
        "12",
        "--json",
        p["prompt"].as_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ids(&v["token_ids"]), ids(&p["generated_ids"]));
    assert_eq!(v["stats"]["prompt_tokens"], ids(&p["prompt_ids"]).len());
    // --chat: one user message through the template.
    let c = &reference("qwen2")["chat"][0];
    let (ok, out, err) = duo(&[
        "--target",
        &qwen,
        "--mode",
        "autoregressive",
        "--chat",
        "-n",
        "2",
        "--json",
        c["messages"][0]["content"].as_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["stats"]["prompt_tokens"], ids(&c["ids"]).len());
    // A model folder without a tokenizer.json: one clear error.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("byom-no-tokenizer");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.onnx", "config.json"] {
        std::fs::copy(byom("llama").join(f), dir.join(f)).unwrap();
    }
    let (ok, _, err) = duo(&["--target", &path(dir), "--mode", "autoregressive", "x"]);
    assert!(!ok);
    assert!(err.contains("has no tokenizer.json"), "{err}");
}

/// Streamed text is exact under a byte-fallback tokenizer (issue: words
/// lost after `<0xHH>` tokens): sampled generations (T = 1, which makes
/// byte runs common) in every mode, over gRPC and over the OpenAI HTTP
/// stream, show exactly `decode(token ids)` — the end id kept out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streamed_text_after_byte_tokens_is_exact_over_grpc_and_http() {
    let dep = common::start_models(&byom("llama"), &[byom("llama-draft")], &byom("llama")).await;
    let tok = Tokenizer::load(byom("llama")).unwrap();
    let eos = [2u32, 508];
    let shown_ids = |ids: &[u32]| -> Vec<u32> {
        let mut ids = ids.to_vec();
        while ids.last().is_some_and(|t| eos.contains(t)) {
            ids.pop();
        }
        ids
    };
    let mut client = dep.client().await;
    let mut byte_runs = 0;
    for seed in 0..6u64 {
        for mode in MODES {
            let req = pb::GenerateRequest {
                prompt: Some(generate_request::Prompt::Text(
                    "Hello world, emoji 🙂 café".into(),
                )),
                max_new_tokens: 32,
                temperature: 1.0,
                seed,
                mode: mode as i32,
                ..Default::default()
            };
            let mut stream = client.generate_stream(req).await.unwrap().into_inner();
            let (mut text, mut ids) = (String::new(), Vec::new());
            while let Some(chunk) = stream.message().await.unwrap() {
                text += &chunk.text;
                ids.extend_from_slice(&chunk.token_ids);
            }
            let ids = shown_ids(&ids);
            byte_runs += ids.iter().filter(|&&t| tok.is_byte_token(t)).count();
            assert_eq!(
                text,
                tok.decode(&ids).unwrap(),
                "seed {seed} {mode:?} ids {ids:?}"
            );
        }
        // Over HTTP: seeded autoregressive sampling reproduces its tokens,
        // so the stream's text must be the decode of the gRPC run's ids.
        let body = json!({
            "prompt": "Hello world, emoji 🙂 café", "max_tokens": 32, "temperature": 1.0,
            "seed": seed, "stream": true, "mode": "autoregressive",
        });
        let (code, _, sse) =
            common::http(dep.http, "POST", "/v1/completions", &body.to_string()).await;
        assert_eq!(code, 200, "{sse}");
        let mut text = String::new();
        for line in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if line == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(line).unwrap();
            text += v["choices"][0]["text"].as_str().unwrap_or("");
        }
        let g = client
            .generate(pb::GenerateRequest {
                prompt: Some(generate_request::Prompt::Text(
                    "Hello world, emoji 🙂 café".into(),
                )),
                max_new_tokens: 32,
                temperature: 1.0,
                seed,
                mode: pb::Mode::Autoregressive as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let want = tok.decode(&shown_ids(&g.token_ids)).unwrap();
        assert_eq!(g.text, want, "seed {seed}");
        assert_eq!(text, want, "seed {seed}: {sse}");
    }
    assert!(
        byte_runs > 0,
        "no byte tokens were sampled: the test shows nothing"
    );
}
