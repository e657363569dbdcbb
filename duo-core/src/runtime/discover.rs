//! What a model is, read from its files before it runs: which ONNX file a
//! path names ([`resolve_model_file`]), what the files beside it declare
//! (Hugging Face `config.json` and `generation_config.json`,
//! onnxruntime-genai's `genai_config.json`, under the names each
//! architecture uses) and what its graph says (inputs, outputs, KV layout),
//! combined into a [`ModelInfo`].

use std::path::{Path, PathBuf};

use ort::session::Session;
use ort::value::{TensorElementType, ValueType};

use super::RuntimeError;
use super::model::{KvDType, ModelInfo};

/// What the files beside a model declare about it (Hugging Face
/// `config.json` and `generation_config.json`, onnx-runtime-genai's
/// `genai_config.json`), resolved across the names architectures use.
/// Every field is `None`/empty when no file declares it; the graph's own
/// dimensions take precedence over these where it fixes them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct HfConfig {
    /// Maximum context length.
    context_len: Option<usize>,
    /// Rows of the LM head (the tokenizer-independent vocabulary size).
    vocab_size: Option<usize>,
    /// End-of-text ids: generation_config's, then config's, then genai's.
    eos_token_ids: Vec<u32>,
    /// KV heads per layer.
    kv_heads: Option<usize>,
    /// Dimension of one attention head.
    head_dim: Option<usize>,
    /// Decoder layers.
    num_layers: Option<usize>,
}

/// The ONNX file a model path names: `path` itself when it is a file; in a
/// folder, `model.onnx`, else its only `*.onnx` file (e.g.
/// `model_quantized.onnx`). A folder with several `*.onnx` files and no
/// `model.onnx` is an error listing them (pass the one to load).
///
/// Errors are [`RuntimeError::ModelMissing`], saying what was looked for;
/// only the bundled pair's folders (`models/target`, `models/draft`) are
/// told to run `models/make.py`.
pub fn resolve_model_file(path: &Path) -> Result<PathBuf, RuntimeError> {
    let bundled = {
        let dir = if path.extension().is_some_and(|e| e == "onnx") {
            path.parent().unwrap_or(path)
        } else {
            path
        };
        let name = dir.file_name().and_then(|n| n.to_str());
        let parent = dir
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str());
        matches!(name, Some("target" | "draft")) && parent == Some("models")
    };
    let hint = if bundled {
        " (the bundled pair lives in models/; remake it with `python models/make.py`)"
    } else {
        " (export a Hugging Face model with `optimum-cli export onnx --task \
         text-generation-with-past --model <model> <folder>` and pass the folder, or pass an \
         .onnx file)"
    };
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(RuntimeError::ModelMissing(format!(
            "{} does not exist{hint}",
            path.display()
        )));
    }
    let preferred = path.join("model.onnx");
    if preferred.is_file() {
        return Ok(preferred);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| RuntimeError::ModelMissing(format!("cannot list {}: {e}", path.display())))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    found.sort();
    match found.len() {
        0 => Err(RuntimeError::ModelMissing(format!(
            "{} holds no .onnx file{hint}",
            path.display()
        ))),
        1 => Ok(found.remove(0)),
        _ => {
            let names: Vec<String> = found
                .iter()
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect();
            Err(RuntimeError::ModelMissing(format!(
                "{} has no model.onnx but several ONNX files ({}): pass the path of the one to load",
                path.display(),
                names.join(", ")
            )))
        }
    }
}

/// Reads what the files beside `model_file` declare: `config.json` (and
/// its `text_config`, for multimodal wrappers), `generation_config.json`
/// and `genai_config.json`. Missing or unparsable files count as silent.
pub(crate) fn read_config(model_file: &Path) -> HfConfig {
    let Some(dir) = model_file.parent() else {
        return HfConfig::default();
    };
    let load = |name: &str| -> serde_json::Value {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    resolve_config(
        &load("config.json"),
        &load("generation_config.json"),
        &load("genai_config.json"),
    )
}

/// [`read_config`] on parsed files (`Null` for a missing one).
fn resolve_config(
    config: &serde_json::Value,
    generation: &serde_json::Value,
    genai: &serde_json::Value,
) -> HfConfig {
    use serde_json::Value;
    // config.json, then its text_config (multimodal models nest the LM's).
    let scopes: Vec<&Value> = [Some(config), config.get("text_config")]
        .into_iter()
        .flatten()
        .filter(|v| v.is_object())
        .collect();
    let uint = |v: Option<&Value>| -> Option<usize> {
        v.and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
    };
    let first = |keys: &[&str]| -> Option<usize> {
        scopes
            .iter()
            .find_map(|scope| keys.iter().find_map(|k| uint(scope.get(*k))))
    };
    let model = genai.get("model");
    let decoder = model.and_then(|m| m.get("decoder"));
    let genai_uint = |scope: Option<&Value>, key: &str| uint(scope.and_then(|s| s.get(key)));

    let context_len = first(&[
        "max_position_embeddings",
        "n_positions",
        "max_sequence_length",
        "seq_length",
        "n_ctx",
        "max_seq_len",
        "seq_len",
    ])
    .or_else(|| genai_uint(model, "context_length"));
    let attention_heads = first(&["num_attention_heads", "n_head", "n_heads", "num_heads"]);
    let hidden = first(&["hidden_size", "n_embd", "d_model"]);
    let genai_heads = genai_uint(decoder, "num_attention_heads");
    let per_head =
        |h: Option<usize>, n: Option<usize>| h.zip(n).and_then(|(h, n)| h.checked_div(n));
    let head_dim = first(&["head_dim"])
        .or_else(|| per_head(hidden, attention_heads))
        .or_else(|| genai_uint(decoder, "head_size"))
        .or_else(|| per_head(genai_uint(decoder, "hidden_size"), genai_heads));
    let kv_heads = first(&["num_key_value_heads", "num_kv_heads", "n_head_kv"])
        .or(attention_heads)
        .or_else(|| genai_uint(decoder, "num_key_value_heads"))
        .or(genai_heads);
    let num_layers = first(&["num_hidden_layers", "n_layer", "n_layers", "num_layers"])
        .or_else(|| genai_uint(decoder, "num_hidden_layers"));
    let vocab_size =
        first(&["vocab_size", "padded_vocab_size"]).or_else(|| genai_uint(model, "vocab_size"));

    let mut eos_token_ids: Vec<u32> = Vec::new();
    let mut add_ids = |v: Option<&Value>| {
        let ids: Vec<&Value> = match v {
            Some(Value::Array(items)) => items.iter().collect(),
            Some(one) => vec![one],
            None => Vec::new(),
        };
        for id in ids {
            if let Some(id) = id.as_u64().and_then(|n| u32::try_from(n).ok())
                && !eos_token_ids.contains(&id)
            {
                eos_token_ids.push(id);
            }
        }
    };
    add_ids(generation.get("eos_token_id"));
    for scope in &scopes {
        add_ids(scope.get("eos_token_id"));
    }
    add_ids(model.and_then(|m| m.get("eos_token_id")));

    HfConfig {
        context_len,
        vocab_size,
        eos_token_ids,
        kv_heads,
        head_dim,
        num_layers,
    }
}

pub(crate) type Discovered = (ModelInfo, Vec<String>, Vec<String>);

pub(crate) fn discover(
    session: &Session,
    file: &Path,
    config: &HfConfig,
    provider: &'static str,
    intra_threads: usize,
) -> Result<Discovered, RuntimeError> {
    let bad = |reason: String| RuntimeError::Incompatible {
        path: file.display().to_string(),
        reason,
    };
    let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
    let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    for required in ["input_ids", "attention_mask"] {
        if !inputs.contains(&required) {
            return Err(bad(format!("no `{required}` input (inputs: {inputs:?})")));
        }
    }
    if !outputs.contains(&"logits") {
        return Err(bad(format!("no `logits` output (outputs: {outputs:?})")));
    }
    let has_position_ids = inputs.contains(&"position_ids");
    let mut num_layers = 0;
    while inputs.contains(&format!("past_key_values.{num_layers}.key").as_str()) {
        num_layers += 1;
    }
    if num_layers == 0 {
        return Err(bad("no `past_key_values.0.key` input: export the model with its KV cache (e.g. Optimum's text-generation-with-past)".into()));
    }
    let mut past_names = Vec::new();
    let mut present_names = Vec::new();
    for i in 0..num_layers {
        for kind in ["key", "value"] {
            let past = format!("past_key_values.{i}.{kind}");
            let present = format!("present.{i}.{kind}");
            if !inputs.contains(&past.as_str()) {
                return Err(bad(format!("missing input `{past}`")));
            }
            if !outputs.contains(&present.as_str()) {
                return Err(bad(format!("missing output `{present}`")));
            }
            past_names.push(past);
            present_names.push(present);
        }
    }
    let past0 = session
        .inputs()
        .iter()
        .find(|o| o.name() == "past_key_values.0.key")
        .map(|o| o.dtype().clone());
    let Some(ValueType::Tensor { ty, shape, .. }) = past0 else {
        return Err(bad("`past_key_values.0.key` is not a tensor".into()));
    };
    let kv_dtype = match ty {
        TensorElementType::Float32 => KvDType::F32,
        TensorElementType::Float16 => KvDType::F16,
        other => {
            return Err(bad(format!(
                "KV cache of type {other:?}: only float32 and float16 are supported"
            )));
        }
    };
    if shape.len() != 4 {
        return Err(bad(format!(
            "KV cache of rank {}: expected [batch, kv_heads, past, head_dim]",
            shape.len()
        )));
    }
    let dim = |v: i64, fallback: Option<usize>, what: &str| -> Result<usize, RuntimeError> {
        if v > 0 {
            Ok(v as usize)
        } else {
            fallback.ok_or_else(|| {
                bad(format!(
                    "{what} is dynamic in the graph and neither config.json nor genai_config.json declares it"
                ))
            })
        }
    };
    let kv_heads = dim(shape[1], config.kv_heads, "the KV head count")?;
    let head_dim = dim(shape[3], config.head_dim, "the head dimension")?;
    let logits_shape = session
        .outputs()
        .iter()
        .find(|o| o.name() == "logits")
        .and_then(|o| match o.dtype() {
            ValueType::Tensor { shape, .. } => Some(shape.to_vec()),
            _ => None,
        })
        .unwrap_or_default();
    let vocab_size = dim(
        logits_shape.get(2).copied().unwrap_or(-1),
        config.vocab_size,
        "the vocabulary size",
    )?;
    if let Some(declared) = config.num_layers
        && declared != num_layers
    {
        tracing::warn!(
            model = %file.display(),
            graph = num_layers,
            declared,
            "the graph's layer count differs from the config's; using the graph's"
        );
    }
    Ok((
        ModelInfo {
            path: file.to_path_buf(),
            num_layers,
            kv_heads,
            head_dim,
            kv_dtype,
            vocab_size,
            padded_vocab_size: vocab_size,
            has_position_ids,
            context_len: config.context_len,
            eos_token_id: config.eos_token_ids.first().copied(),
            eos_token_ids: config.eos_token_ids.clone(),
            provider,
            intra_threads,
        },
        past_names,
        present_names,
    ))
}
