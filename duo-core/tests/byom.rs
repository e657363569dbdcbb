//! "Bring your own model": Hugging Face models exported by Optimum
//! (models/fixtures/byom/, made by models/make_byom_fixtures.py) load, encode
//! prompts and chats as transformers does, and decode greedily as
//! transformers' PyTorch model does (real ONNX Runtime, no Python).

use std::path::{Path, PathBuf};

use duo_core::chat::{ChatError, ChatMessage, ChatOptions, ChatTemplate, JsonValue, render_chat};
use duo_core::runtime::model::KvDType;
use duo_core::runtime::{CausalLm, ModelOptions, RuntimeError};
use duo_core::speculative::verify::{FP16_NEAR_TIE_GAP, NEAR_TIE_GAP};
use duo_core::tokenizer::{Tokenizer, TokenizerError};

const NAMES: [&str; 9] = [
    "llama",
    "llama-draft",
    "llama-draft-padded",
    "llama-fp16",
    "llama-external",
    "qwen2",
    "mistral",
    "phi3",
    "gpt2",
];

fn byom() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures/byom")
}

#[derive(serde::Deserialize)]
struct Reference {
    onnx_dtype: String,
    bos_added: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
    generation_eos_token_id: Vec<u32>,
    tokenizer_size: usize,
    config_vocab_size: usize,
    max_new_tokens: usize,
    prompts: Vec<Prompt>,
    #[serde(default)]
    chat: Vec<Chat>,
    chat_error: Option<ChatErrorCase>,
    chat_tool_use: Option<ToolUse>,
}

#[derive(serde::Deserialize)]
struct Prompt {
    prompt: String,
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    stopped_on_eos: bool,
    min_top2_logit_gap: f32,
}

#[derive(serde::Deserialize)]
struct Chat {
    messages: Vec<ChatMessage>,
    rendered: String,
    ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct ChatErrorCase {
    messages: Vec<ChatMessage>,
    error: String,
}

#[derive(serde::Deserialize)]
struct ToolUse {
    template: String,
    messages: Vec<ChatMessage>,
    tools: Vec<JsonValue>,
    rendered: String,
    ids: Vec<u32>,
}

fn reference(name: &str) -> Reference {
    let path = byom().join(name).join("reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run models/make_byom_fixtures.py)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn tokenizer(name: &str) -> Tokenizer {
    Tokenizer::from_model_dir(byom().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn model(path: &Path) -> CausalLm {
    CausalLm::load(path, &ModelOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// (a) Prompts encode to AutoTokenizer's ids (BOS where the tokenizer adds
/// it), and the declared special tokens are read.
#[test]
fn prompts_encode_as_autotokenizer() {
    for name in NAMES {
        let r = reference(name);
        let tok = tokenizer(name);
        assert_eq!(tok.vocab_size(), r.tokenizer_size, "{name}: tokenizer size");
        for p in &r.prompts {
            let ids = tok.encode_prompt(&p.prompt).unwrap();
            assert_eq!(ids, p.prompt_ids, "{name}: {:?}", p.prompt);
        }
        let special = tok.special_tokens();
        assert_eq!(special.bos, r.bos_token, "{name}: bos_token");
        assert_eq!(special.eos, r.eos_token, "{name}: eos_token");
        let bos_id = special.bos.as_deref().and_then(|b| tok.token_id(b));
        assert_eq!(
            r.bos_added,
            bos_id.is_some() && r.prompts[0].prompt_ids.first() == bos_id.as_ref(),
            "{name}: bos_added"
        );
    }
}

/// The bundled tokenizer's post-processor adds nothing: encoding a prompt
/// with special tokens equals the plain encoding existing callers use.
#[test]
fn bundled_tokenizer_prompt_encoding_is_unchanged() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tokenizer.json");
    let tok = Tokenizer::from_file(&path).unwrap();
    for text in ["To be, or not to be", " leading space", "<|endoftext|>", ""] {
        assert_eq!(tok.encode_prompt(text).unwrap(), tok.encode(text).unwrap());
    }
    assert!(tok.chat_templates().is_empty());
    assert_eq!(tok.special_tokens().bos, None);
}

/// Greedy decoding: prefill, then one token at a time, argmax, stop at any
/// eos id of the model or after the reference's length.
fn greedy(lm: &mut CausalLm, prompt: &[u32], max_new: usize) -> (Vec<u32>, Vec<f32>) {
    let eos = lm.info().eos_token_ids.clone();
    let mut seq = lm.sequence().unwrap();
    let mut logits = lm.extend(&mut seq, prompt).unwrap();
    let mut out = Vec::new();
    let mut gaps = Vec::new();
    while out.len() < max_new {
        let row = logits.last();
        let next = duo_core::sampling::argmax(row);
        let mut sorted = row.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        gaps.push(sorted[0] - sorted[1]);
        out.push(next);
        if eos.contains(&next) {
            break;
        }
        logits = lm.extend(&mut seq, &[next]).unwrap();
    }
    (out, gaps)
}

/// (b) ONNX Runtime greedy decoding equals transformers' PyTorch fp32
/// greedy continuation (eos-list stopping included); a divergence is
/// tolerated only where the reference's smallest top-2 gap is a near tie.
#[test]
fn greedy_matches_transformers() {
    for name in NAMES {
        let r = reference(name);
        let mut lm = model(&byom().join(name));
        let tie = if r.onnx_dtype == "float16" {
            FP16_NEAR_TIE_GAP
        } else {
            NEAR_TIE_GAP
        };
        for p in &r.prompts {
            let (got, gaps) = greedy(&mut lm, &p.prompt_ids, r.max_new_tokens);
            if got != p.generated_ids {
                let at = got
                    .iter()
                    .zip(&p.generated_ids)
                    .position(|(a, b)| a != b)
                    .unwrap_or(got.len().min(p.generated_ids.len()));
                assert!(
                    p.min_top2_logit_gap < tie,
                    "{name} {:?}: diverged at step {at}: got {got:?}, want {:?} (min gap {}, ours {:?})",
                    p.prompt,
                    p.generated_ids,
                    p.min_top2_logit_gap,
                    gaps
                );
                eprintln!(
                    "{name} {:?}: diverged at step {at} on a near tie (gap {})",
                    p.prompt, p.min_top2_logit_gap
                );
            }
            let stopped = got
                .last()
                .is_some_and(|t| lm.info().eos_token_ids.contains(t));
            assert_eq!(stopped, p.stopped_on_eos, "{name} {:?}: eos stop", p.prompt);
        }
    }
}

/// (c) Chat templates render as `apply_chat_template(add_generation_prompt=True)`
/// and the rendering encodes (no special tokens added) to its ids.
#[test]
fn chat_templates_render_as_transformers() {
    let mut rendered_any = 0;
    for name in NAMES {
        let r = reference(name);
        let tok = tokenizer(name);
        let opts = ChatOptions::generation();
        if r.chat.is_empty() {
            assert!(
                matches!(
                    render_chat(&tok, &[ChatMessage::new("user", "hi")], &opts),
                    Err(ChatError::NoTemplate)
                ),
                "{name}: no template declared"
            );
            continue;
        }
        for (i, c) in r.chat.iter().enumerate() {
            let text = render_chat(&tok, &c.messages, &opts)
                .unwrap_or_else(|e| panic!("{name} chat {i}: {e}"));
            assert_eq!(text, c.rendered, "{name} chat {i}");
            assert_eq!(tok.encode(&text).unwrap(), c.ids, "{name} chat {i}: ids");
            rendered_any += 1;
        }
        if let Some(case) = &r.chat_error {
            let err = render_chat(&tok, &case.messages, &opts).unwrap_err();
            assert!(matches!(err, ChatError::Raised { .. }), "{name}: {err}");
            assert!(err.to_string().contains(&case.error), "{name}: {err}");
        }
        if let Some(t) = &r.chat_tool_use {
            let with_tools = ChatOptions {
                tools: Some(t.tools.clone()),
                ..ChatOptions::generation()
            };
            // Chosen by the tools, as transformers does...
            let text = render_chat(&tok, &t.messages, &with_tools).unwrap();
            assert_eq!(text, t.rendered, "{name} tool_use");
            assert_eq!(tok.encode(&text).unwrap(), t.ids, "{name} tool_use ids");
            // ...or by name.
            let named = ChatTemplate::from_tokenizer(&tok, Some(&t.template)).unwrap();
            assert_eq!(named.name(), t.template);
            assert_eq!(named.render(&t.messages, &with_tools).unwrap(), t.rendered);
            // Without tools the default template renders.
            assert_eq!(
                render_chat(&tok, &t.messages, &opts).unwrap(),
                r.chat[0].rendered
            );
        }
    }
    assert!(
        rendered_any >= 3 * 8,
        "rendered {rendered_any} conversations"
    );
}

#[test]
fn qwen2_named_templates_and_object_special_tokens() {
    let tok = tokenizer("qwen2");
    let names: Vec<&str> = tok
        .chat_templates()
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(names, ["default", "tool_use"]);
    // special_tokens_map.json spells them as {"content": ...} objects.
    let s = tok.special_tokens();
    assert_eq!(s.eos.as_deref(), Some("<|im_end|>"));
    assert_eq!(s.pad.as_deref(), Some("<|endoftext|>"));
    assert_eq!(s.bos, None);
    assert_eq!(s.unk, None);
    let err = ChatTemplate::from_tokenizer(&tok, Some("nope")).unwrap_err();
    assert!(err.to_string().contains("default, tool_use"), "{err}");
}

/// (d) What the runtime reads from the folder.
#[test]
fn model_facts() {
    for name in NAMES {
        let r = reference(name);
        let lm = model(&byom().join(name));
        let info = lm.info();
        assert_eq!(info.context_len, Some(128), "{name}: context");
        assert_eq!(
            info.eos_token_ids, r.generation_eos_token_id,
            "{name}: eos ids"
        );
        assert_eq!(
            info.eos_token_id,
            r.generation_eos_token_id.first().copied()
        );
        assert_eq!(info.vocab_size, r.config_vocab_size, "{name}: vocabulary");
        assert!(info.has_position_ids, "{name}: position_ids");
        let want = if r.onnx_dtype == "float16" {
            KvDType::F16
        } else {
            KvDType::F32
        };
        assert_eq!(info.kv_dtype, want, "{name}: KV dtype");
    }
    // The padded draft's LM head is wider than its tokenizer.
    let info = model(&byom().join("llama-draft-padded")).info().clone();
    assert_eq!(
        (
            info.vocab_size,
            tokenizer("llama-draft-padded").vocab_size()
        ),
        (576, 509)
    );
    // GQA and head dims.
    let info = model(&byom().join("llama")).info().clone();
    assert_eq!((info.num_layers, info.kv_heads, info.head_dim), (2, 2, 16));
    assert_eq!(info.eos_token_ids, [2, 508]);
    let info = model(&byom().join("mistral")).info().clone();
    assert_eq!((info.kv_heads, info.head_dim), (2, 8));
}

/// External data (`model.onnx` + `model.onnx_data`) and fp16 load and give
/// the fp32 single-file export's logits.
#[test]
fn external_data_and_fp16_agree_with_the_single_file_export() {
    let r = reference("llama");
    let prompt = &r.prompts[0].prompt_ids;
    let last = |name: &str| {
        let mut lm = model(&byom().join(name));
        let mut seq = lm.sequence().unwrap();
        lm.extend(&mut seq, prompt).unwrap().last().to_vec()
    };
    let base = last("llama");
    let max_diff = |other: &[f32]| {
        base.iter()
            .zip(other)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    let external = max_diff(&last("llama-external"));
    assert!(external < 1e-5, "external data: {external}");
    let half = max_diff(&last("llama-fp16"));
    assert!(half < 0.05, "fp16: {half}");
}

/// A scratch folder under the target dir, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("duo-byom-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// onnxruntime-genai's genai_config.json stands in for a missing
/// config.json, and a folder's only .onnx file is the model whatever its name.
#[test]
fn genai_config_and_any_single_onnx_file() {
    let dir = scratch("genai");
    std::fs::copy(byom().join("gpt2/model.onnx"), dir.join("decoder.onnx")).unwrap();
    std::fs::write(
        dir.join("genai_config.json"),
        r#"{"model": {"context_length": 96, "eos_token_id": [456, 7], "vocab_size": 457,
            "decoder": {"head_size": 12, "num_key_value_heads": 4, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "hidden_size": 48}}}"#,
    )
    .unwrap();
    let lm = model(&dir);
    let info = lm.info();
    assert!(
        info.path.ends_with("decoder.onnx"),
        "{}",
        info.path.display()
    );
    assert_eq!(info.context_len, Some(96));
    assert_eq!(info.eos_token_ids, [456, 7]);
    assert_eq!(info.eos_token_id, Some(456));
    assert_eq!(
        (info.kv_heads, info.head_dim, info.vocab_size),
        (4, 12, 457)
    );
    // GPT-2's own config: the context is n_positions.
    std::fs::copy(byom().join("gpt2/config.json"), dir.join("config.json")).unwrap();
    assert_eq!(model(&dir).info().context_len, Some(128));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn model_file_resolution_errors() {
    let dir = scratch("several");
    for f in ["model_quantized.onnx", "model_fp16.onnx"] {
        std::fs::copy(byom().join("gpt2/model.onnx"), dir.join(f)).unwrap();
    }
    let err = CausalLm::load(&dir, &ModelOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RuntimeError::ModelMissing(_)), "{msg}");
    assert!(
        msg.contains("model_fp16.onnx, model_quantized.onnx"),
        "{msg}"
    );
    // model.onnx wins over the others.
    std::fs::copy(byom().join("gpt2/model.onnx"), dir.join("model.onnx")).unwrap();
    assert!(model(&dir).info().path.ends_with("model.onnx"));
    let _ = std::fs::remove_dir_all(&dir);

    // A user's folder is not told to run models/make.py...
    let empty = scratch("empty");
    let msg = CausalLm::load(&empty, &ModelOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("no .onnx file") && !msg.contains("make.py"),
        "{msg}"
    );
    let msg = CausalLm::load(&empty.join("gone"), &ModelOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("does not exist") && !msg.contains("make.py"),
        "{msg}"
    );
    // ...the bundled pair's folders are.
    let bundled = empty.join("models/target");
    let msg = CausalLm::load(&bundled, &ModelOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("models/make.py"), "{msg}");
    let _ = std::fs::remove_dir_all(&empty);
}

/// transformers' Llama fast tokenizer rebuilds its post-processor from
/// tokenizer_config's add_bos_token / add_eos_token.
#[test]
fn llama_add_bos_and_eos_flags_are_honoured() {
    let dir = scratch("flags");
    for f in ["tokenizer.json", "special_tokens_map.json"] {
        std::fs::copy(byom().join("llama").join(f), dir.join(f)).unwrap();
    }
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(byom().join("llama/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    config["add_bos_token"] = false.into();
    config["add_eos_token"] = true.into();
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    let r = reference("llama");
    let p = &r.prompts[0];
    let mut want = p.prompt_ids[1..].to_vec();
    want.push(2);
    assert_eq!(tok.encode_prompt(&p.prompt).unwrap(), want);
    // The plain encoding is the bare tokenizer.json's, as before.
    assert_eq!(tok.encode(&p.prompt).unwrap(), p.prompt_ids[1..]);

    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = Tokenizer::from_model_dir(&dir).unwrap_err();
    assert!(
        matches!(err, TokenizerError::NoTokenizerJson { .. }),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
