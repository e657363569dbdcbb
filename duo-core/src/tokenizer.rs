//! `tokenizer.json` loading, encoding/decoding, a vocabulary fingerprint, and
//! streaming detokenization.
//!
//! [`Tokenizer`] wraps a Hugging Face [`tokenizers::Tokenizer`] loaded from a
//! `tokenizer.json` file ([`Tokenizer::from_file`]) or from a model folder
//! with its `tokenizer_config.json` and `special_tokens_map.json`
//! ([`Tokenizer::from_model_dir`]: special-token strings, chat templates,
//! and transformers' prompt-encoding rules). [`IncrementalDecoder`] turns a
//! stream of token ids into text chunks that never split a UTF-8 character
//! or a multi-token glyph.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Names under which tokenizers commonly store their end-of-text token, in
/// the order [`Tokenizer::eos_id`] tries them.
const EOS_CANDIDATES: [&str; 4] = ["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"];

/// Errors from loading a tokenizer or converting between text and ids.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The tokenizer file does not exist.
    #[error(
        "tokenizer file {} not found: run `python models/make.py` to create the bundled \
         models/tokenizer.json, or pass the path of an existing tokenizer.json",
        path.display()
    )]
    NotFound {
        /// The path that was tried.
        path: PathBuf,
    },
    /// The tokenizer file exists but could not be read.
    #[error("cannot read tokenizer file {}: {source}; check its permissions", path.display())]
    Read {
        /// The path that was tried.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file was read but is not a valid Hugging Face `tokenizer.json`.
    #[error(
        "cannot parse tokenizer file {}: {message}; it must be a Hugging Face tokenizer.json \
         (regenerate the bundled one with `python models/make.py`)",
        path.display()
    )]
    Parse {
        /// The path that was tried.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The tokenizer failed to encode the text.
    #[error("cannot encode text: {0}")]
    Encode(String),
    /// The tokenizer failed to decode the ids.
    #[error("cannot decode token ids: {0}")]
    Decode(String),
    /// A model folder has no `tokenizer.json`.
    #[error(
        "{} has no tokenizer.json: save the model's fast tokenizer into the folder \
         (`AutoTokenizer.from_pretrained(model).save_pretrained(folder)`; an Optimum export \
         does this), or name the model's tokenizer with --tokenizer (a tokenizer.json or a \
         model folder)",
        dir.display()
    )]
    NoTokenizerJson {
        /// The folder that was searched.
        dir: PathBuf,
    },
    /// A tokenizer side file (`tokenizer_config.json`,
    /// `special_tokens_map.json`, a chat template) is unreadable or malformed.
    #[error("cannot use {}: {message}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// An id has no token in this tokenizer's vocabulary.
    #[error(
        "token id {id} is not in the tokenizer's vocabulary ({vocab_size} tokens): the model and \
         the tokenizer do not match; load the tokenizer.json that was built with the model"
    )]
    UnknownId {
        /// The offending id.
        id: u32,
        /// The tokenizer's vocabulary size, added tokens included.
        vocab_size: usize,
    },
}

/// A loaded `tokenizer.json`.
///
/// Invariant: the wrapped tokenizer was parsed successfully; every method is
/// a pure function of the file's contents (no hidden state), so two
/// `Tokenizer`s loaded from the same file behave identically.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Declared special tokens (empty for [`Tokenizer::from_file`]).
    special: SpecialTokens,
    /// Chat templates (none for [`Tokenizer::from_file`]).
    chat_templates: Vec<ChatTemplateSource>,
    /// The ids of the `<0xHH>` tokens, sorted, when the decoder turns them
    /// back into raw bytes (`ByteFallback`, Llama-2 / Mistral / Gemma /
    /// Phi-3 style); empty otherwise. A run of such tokens decodes as one
    /// group, so its text is not final until a token that is not a byte
    /// closes the run.
    byte_tokens: Vec<u32>,
}

/// The special-token strings a model folder declares (`tokenizer_config.json`,
/// overridden by `special_tokens_map.json`, as transformers loads them;
/// either may spell a token as a string or as `{"content": ...}`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `bos_token`.
    pub bos: Option<String>,
    /// `eos_token`.
    pub eos: Option<String>,
    /// `unk_token`.
    pub unk: Option<String>,
    /// `pad_token`.
    pub pad: Option<String>,
    /// Every declared `*_token` by its transformers name (`bos_token`,
    /// `eos_token`, `unk_token`, `pad_token`, `sep_token`, `cls_token`,
    /// `mask_token`, ...), as a chat template sees them.
    pub named: BTreeMap<String, String>,
    /// `additional_special_tokens`, in order.
    pub additional: Vec<String>,
}

/// One chat template of a model folder: `tokenizer_config.json`'s
/// `chat_template` (a string, named `"default"`, or a list of
/// `{name, template}`), else `chat_template.jinja` (`"default"`) and
/// `additional_chat_templates/<name>.jinja`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplateSource {
    /// The template's name (`"default"` for a lone template).
    pub name: String,
    /// The Jinja source.
    pub source: String,
}

/// Tokenizer classes whose transformers fast tokenizer rebuilds the
/// post-processor from `add_bos_token` / `add_eos_token`
/// (`update_post_processor`), with these defaults.
/// Matched without a `Fast` suffix.
const BOS_EOS_RULE_CLASSES: [(&str, bool, bool); 4] = [
    ("LlamaTokenizer", true, false),
    ("CodeLlamaTokenizer", true, false),
    ("GemmaTokenizer", true, false),
    ("CohereTokenizer", true, false),
];

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json` from `path`.
    ///
    /// Errors: [`TokenizerError::NotFound`] when the file does not exist
    /// (naming the path and how to create it), [`TokenizerError::Read`] on
    /// other I/O failures, [`TokenizerError::Parse`] when the contents are not
    /// a valid tokenizer.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                TokenizerError::NotFound {
                    path: path.to_path_buf(),
                }
            } else {
                TokenizerError::Read {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let byte_tokens = byte_fallback_ids(&inner);
        Ok(Self {
            inner,
            special: SpecialTokens::default(),
            chat_templates: Vec::new(),
            byte_tokens,
        })
    }

    /// Loads the tokenizer of a Hugging Face model folder (an Optimum
    /// export, a `save_pretrained` folder): `tokenizer.json`, plus what
    /// `tokenizer_config.json` and `special_tokens_map.json` declare
    /// (special tokens, [`Self::special_tokens`]; chat templates,
    /// [`Self::chat_templates`], also from `chat_template.jinja` and
    /// `additional_chat_templates/*.jinja`).
    ///
    /// [`Self::encode_prompt`] then encodes as transformers' `AutoTokenizer`
    /// does: the post-processor of `tokenizer.json`, except for the
    /// Llama-family classes (`tokenizer_class` `LlamaTokenizer[Fast]`,
    /// `CodeLlamaTokenizer[Fast]`, `GemmaTokenizer[Fast]`,
    /// `CohereTokenizer[Fast]`), whose fast tokenizer rebuilds it from
    /// `add_bos_token` (default true) and `add_eos_token` (default false).
    /// [`Self::encode`], [`Self::decode`] and [`Self::fingerprint`] are
    /// those of the bare `tokenizer.json`.
    ///
    /// Errors: [`TokenizerError::NoTokenizerJson`] when the folder has no
    /// `tokenizer.json`; those of [`Self::from_file`];
    /// [`TokenizerError::Config`] when a side file is present but
    /// unreadable or not the JSON it should be (absent side files are fine).
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let dir = dir.as_ref();
        let json = dir.join("tokenizer.json");
        if !json.is_file() {
            return Err(TokenizerError::NoTokenizerJson {
                dir: dir.to_path_buf(),
            });
        }
        let mut tok = Self::from_file(&json)?;
        let config = read_json_object(&dir.join("tokenizer_config.json"))?;
        let map = read_json_object(&dir.join("special_tokens_map.json"))?;
        tok.special = special_tokens(&config, &map);
        tok.chat_templates = chat_templates(dir, &config)?;
        tok.apply_bos_eos_rule(&config, &dir.join("tokenizer_config.json"))?;
        Ok(tok)
    }

    /// Loads `path` as a service's `--tokenizer` names it: a model folder
    /// ([`Self::from_model_dir`]), or a `tokenizer.json` file — with its
    /// folder's `tokenizer_config.json` rules when one lies beside it
    /// (a model folder's `tokenizer.json` given by its path), else bare
    /// ([`Self::from_file`], e.g. the bundled `models/tokenizer.json`).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        if path.is_dir() {
            return Self::from_model_dir(path);
        }
        match path.parent() {
            Some(dir)
                if path.file_name().is_some_and(|n| n == "tokenizer.json")
                    && dir.join("tokenizer_config.json").is_file() =>
            {
                Self::from_model_dir(dir)
            }
            _ => Self::from_file(path),
        }
    }

    /// Rebuilds the post-processor from `add_bos_token`/`add_eos_token` for
    /// the Llama-family classes, as their transformers fast tokenizer does.
    fn apply_bos_eos_rule(
        &mut self,
        config: &serde_json::Map<String, serde_json::Value>,
        config_path: &Path,
    ) -> Result<(), TokenizerError> {
        let Some(class) = config.get("tokenizer_class").and_then(|c| c.as_str()) else {
            return Ok(());
        };
        let base = class.strip_suffix("Fast").unwrap_or(class);
        let Some(&(_, bos_default, eos_default)) =
            BOS_EOS_RULE_CLASSES.iter().find(|(name, ..)| *name == base)
        else {
            return Ok(());
        };
        let flag = |key: &str, default: bool| {
            config
                .get(key)
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(default)
        };
        let (add_bos, add_eos) = (
            flag("add_bos_token", bos_default),
            flag("add_eos_token", eos_default),
        );
        let token = |t: &Option<String>| -> Option<(String, u32)> {
            let t = t.as_ref()?;
            Some((t.clone(), self.inner.token_to_id(t)?))
        };
        // transformers refuses a flag without its token; keep tokenizer.json's
        // own post-processor then rather than fail to load.
        let bos = if add_bos {
            match token(&self.special.bos) {
                Some(b) => Some(b),
                None => return Ok(()),
            }
        } else {
            None
        };
        let eos = if add_eos {
            match token(&self.special.eos) {
                Some(e) => Some(e),
                None => return Ok(()),
            }
        } else {
            None
        };
        let piece = |t: &str, type_id: u32| format!("{t}:{type_id}");
        let mut single = Vec::new();
        let mut pair = Vec::new();
        for (seq, type_id) in [("$A", 0u32), ("$B", 1)] {
            let part: Vec<String> = bos
                .iter()
                .map(|(t, _)| piece(t, type_id))
                .chain([piece(seq, type_id)])
                .chain(eos.iter().map(|(t, _)| piece(t, type_id)))
                .collect();
            if seq == "$A" {
                single = part.clone();
            }
            pair.extend(part);
        }
        let mut specials: Vec<(String, u32)> = bos.into_iter().chain(eos).collect();
        specials.dedup();
        let bad = |e: String| TokenizerError::Config {
            path: config_path.to_path_buf(),
            message: format!("cannot build the add_bos_token/add_eos_token post-processor: {e}"),
        };
        let processor = tokenizers::processors::template::TemplateProcessing::builder()
            .try_single(single)
            .map_err(bad)?
            .try_pair(pair)
            .map_err(bad)?
            .special_tokens(specials)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        self.inner.with_post_processor(Some(processor));
        Ok(())
    }

    /// Encodes a prompt exactly as transformers' `AutoTokenizer` does
    /// (`tokenizer(text)["input_ids"]`, `add_special_tokens=True`): the
    /// post-processor adds what the model expects, e.g. Llama's BOS.
    ///
    /// For a tokenizer loaded with [`Self::from_file`] the post-processor is
    /// the bare `tokenizer.json`'s; for the bundled byte-level tokenizer it
    /// adds nothing, so this equals [`Self::encode`]. Text that is already a
    /// rendered chat template (which holds its own BOS) is encoded with
    /// [`Self::encode`], as `apply_chat_template` does.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The declared special-token strings (all empty for a tokenizer from
    /// [`Self::from_file`]).
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// The chat templates, in declaration order (none for a tokenizer from
    /// [`Self::from_file`]).
    pub fn chat_templates(&self) -> &[ChatTemplateSource] {
        &self.chat_templates
    }

    /// The chat template named `name`; with `None`, the one named
    /// `"default"`, else the only one.
    pub fn chat_template(&self, name: Option<&str>) -> Option<&ChatTemplateSource> {
        match name {
            Some(n) => self.chat_templates.iter().find(|t| t.name == n),
            None => self.chat_templates.iter().find(|t| t.name == "default").or(
                match self.chat_templates.as_slice() {
                    [only] => Some(only),
                    _ => None,
                },
            ),
        }
    }

    /// Encodes `text` into token ids without adding any special tokens (no
    /// BOS/EOS, no post-processor template tokens).
    ///
    /// For the byte-level BPE tokenizers this crate targets,
    /// `decode(&encode(text)?)? == text` for every `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes `ids` into text.
    ///
    /// Special tokens are NOT skipped: `<|endoftext|>` decodes to the literal
    /// text `<|endoftext|>`. Callers that must not show it (such as the stop
    /// logic in [`crate::speculative::stop`]) keep the EOS id out of what they decode.
    /// Byte sequences that are not valid UTF-8 (e.g. a multi-byte character
    /// cut short) decode to U+FFFD replacement characters.
    ///
    /// Errors: [`TokenizerError::UnknownId`] when an id has no token (instead
    /// of silently dropping it, as the underlying library would).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// True when `id` is a byte-fallback token (`<0xHH>`) that this
    /// tokenizer's decoder turns into a raw byte: its text, and that of the
    /// byte tokens next to it, is settled only once a token that is not a
    /// byte follows (see [`IncrementalDecoder`]).
    pub fn is_byte_token(&self, id: u32) -> bool {
        self.byte_tokens.binary_search(&id).is_ok()
    }

    /// [`TokenizerError::UnknownId`] for the first id of `ids` that has no
    /// token in the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), TokenizerError> {
        match ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            Some(&id) => Err(TokenizerError::UnknownId {
                id,
                vocab_size: self.vocab_size(),
            }),
            None => Ok(()),
        }
    }

    /// The number of tokens in the vocabulary, added tokens (such as
    /// `<|endoftext|>`) included and counted once.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of the token spelled exactly `token` (in the tokenizer's own
    /// spelling, e.g. `Ġthe` for " the" in byte-level BPE), if it exists.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// One past the largest id of the vocabulary (added tokens included):
    /// the LM-head rows this tokenizer can use. Rows from here on (a padded
    /// head's) have no token.
    pub fn id_limit(&self) -> usize {
        self.inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&id| id as usize + 1)
    }

    /// The end-of-text id: the first of `<|endoftext|>`, `</s>`,
    /// `<|end_of_text|>`, `<eos>` that is in the vocabulary, or `None`.
    pub fn eos_id(&self) -> Option<u32> {
        EOS_CANDIDATES.iter().find_map(|t| self.token_id(t))
    }

    /// A stable 16-hex-digit FNV-1a 64-bit digest of the vocabulary (every
    /// `token -> id` pair, added tokens included, sorted by id then token).
    ///
    /// Two services compare fingerprints to check they share one vocabulary.
    /// Invariants: it depends only on the vocabulary, not on load order, the
    /// process or the platform; it does not cover merges, normalizer or
    /// pre-tokenizer settings.
    pub fn fingerprint(&self) -> String {
        let mut pairs: Vec<(u32, String)> = self
            .inner
            .get_vocab(true)
            .into_iter()
            .map(|(token, id)| (id, token))
            .collect();
        pairs.sort_unstable();
        let mut hash = Fnv1a64::new();
        for (id, token) in &pairs {
            hash.write(&id.to_le_bytes());
            // The length makes the encoding unambiguous ("ab"+"c" vs "a"+"bc").
            hash.write(&(token.len() as u64).to_le_bytes());
            hash.write(token.as_bytes());
        }
        format!("{:016x}", hash.0)
    }
}

/// The tokenizer a model uses when none is named (a service's or `duo`'s
/// `--tokenizer` left out), for the model at `model` (a folder or an
/// `.onnx` file in one): the model's folder when it holds a
/// `tokenizer.json` (loaded by [`Tokenizer::load`] with its
/// `tokenizer_config.json` rules); for the bundled pair's layout
/// (`MODELS/target`, `MODELS/draft` beside `MODELS/tokenizer.json`), that
/// shared file.
///
/// Errors: [`TokenizerError::NoTokenizerJson`] for any other folder
/// without a `tokenizer.json`: a user's model never silently gets another
/// model's tokenizer.
pub fn model_tokenizer(model: &Path) -> Result<PathBuf, TokenizerError> {
    let dir = if model.is_dir() {
        model
    } else {
        model
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    };
    if dir.join("tokenizer.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    let bundled_layout = dir
        .file_name()
        .is_some_and(|n| n == "target" || n == "draft");
    if bundled_layout
        && let Some(shared) = dir.parent().map(|p| p.join("tokenizer.json"))
        && shared.is_file()
    {
        return Ok(shared);
    }
    Err(TokenizerError::NoTokenizerJson {
        dir: dir.to_path_buf(),
    })
}

/// Reads a JSON object file; a missing file is an empty object.
/// The sorted ids of the `<0xHH>` tokens when the tokenizer's decoder (or
/// one step of its sequence, found in its serialized form so that any
/// nesting counts) is `ByteFallback`; empty otherwise. Computed once, at
/// load: the detokenizer asks for every token it streams.
fn byte_fallback_ids(inner: &tokenizers::Tokenizer) -> Vec<u32> {
    let byte_fallback = inner.get_decoder().is_some_and(|d| {
        serde_json::to_string(d).is_ok_and(|json| json.contains("\"ByteFallback\""))
    });
    if !byte_fallback {
        return Vec::new();
    }
    let mut ids: Vec<u32> = inner
        .get_vocab(true)
        .into_iter()
        .filter(|(t, _)| {
            t.len() == 6
                && t.starts_with("<0x")
                && t.ends_with('>')
                && t[3..5].bytes().all(|b| b.is_ascii_hexdigit())
        })
        .map(|(_, id)| id)
        .collect();
    ids.sort_unstable();
    ids
}

fn read_json_object(
    path: &Path,
) -> Result<serde_json::Map<String, serde_json::Value>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(serde_json::Map::new()),
        Err(e) => {
            return Err(TokenizerError::Config {
                path: path.to_path_buf(),
                message: e.to_string(),
            });
        }
    };
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(TokenizerError::Config {
            path: path.to_path_buf(),
            message: "not a JSON object".into(),
        }),
        Err(e) => Err(TokenizerError::Config {
            path: path.to_path_buf(),
            message: format!("invalid JSON: {e}"),
        }),
    }
}

/// A special token as transformers stores it: a string, or an AddedToken
/// object `{"content": ..., ...}`.
fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// The special tokens of `tokenizer_config.json`, each overridden by
/// `special_tokens_map.json`'s (which transformers applies last).
fn special_tokens(
    config: &serde_json::Map<String, serde_json::Value>,
    map: &serde_json::Map<String, serde_json::Value>,
) -> SpecialTokens {
    let mut named = BTreeMap::new();
    let mut additional = Vec::new();
    for source in [config, map] {
        for (key, value) in source {
            if key == "additional_special_tokens" {
                if let Some(items) = value.as_array() {
                    additional = items.iter().filter_map(token_content).collect();
                }
            } else if key.ends_with("_token") && !key.starts_with("add_") {
                match token_content(value) {
                    Some(t) => {
                        named.insert(key.clone(), t);
                    }
                    None if value.is_null() => {
                        named.remove(key);
                    }
                    None => {}
                }
            }
        }
    }
    SpecialTokens {
        bos: named.get("bos_token").cloned(),
        eos: named.get("eos_token").cloned(),
        unk: named.get("unk_token").cloned(),
        pad: named.get("pad_token").cloned(),
        named,
        additional,
    }
}

/// The chat templates of a model folder: `tokenizer_config.json`'s
/// `chat_template`, else `chat_template.jinja` and
/// `additional_chat_templates/*.jinja` (sorted by name).
fn chat_templates(
    dir: &Path,
    config: &serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<ChatTemplateSource>, TokenizerError> {
    let config_path = dir.join("tokenizer_config.json");
    let bad = |message: String| TokenizerError::Config {
        path: config_path.clone(),
        message,
    };
    match config.get("chat_template") {
        Some(serde_json::Value::String(source)) => {
            return Ok(vec![ChatTemplateSource {
                name: "default".into(),
                source: source.clone(),
            }]);
        }
        Some(serde_json::Value::Array(items)) => {
            return items
                .iter()
                .map(|item| {
                    let name = item.get("name").and_then(|n| n.as_str());
                    let source = item.get("template").and_then(|t| t.as_str());
                    match (name, source) {
                        (Some(name), Some(source)) => Ok(ChatTemplateSource {
                            name: name.into(),
                            source: source.into(),
                        }),
                        _ => Err(bad(format!(
                            "a chat_template list entry must be {{\"name\": ..., \"template\": ...}}, got {item}"
                        ))),
                    }
                })
                .collect();
        }
        Some(serde_json::Value::Null) | None => {}
        Some(other) => {
            return Err(bad(format!(
                "chat_template must be a string or a list of {{name, template}}, got {other}"
            )));
        }
    }
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| TokenizerError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    };
    let mut out = Vec::new();
    let main = dir.join("chat_template.jinja");
    if main.is_file() {
        out.push(ChatTemplateSource {
            name: "default".into(),
            source: read(&main)?,
        });
    }
    if let Ok(entries) = std::fs::read_dir(dir.join("additional_chat_templates")) {
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "jinja"))
            .collect();
        paths.sort();
        for path in paths {
            if let Some(name) = path.file_stem().and_then(|n| n.to_str()) {
                out.push(ChatTemplateSource {
                    name: name.into(),
                    source: read(&path)?,
                });
            }
        }
    }
    Ok(out)
}

/// FNV-1a, 64-bit (http://www.isthe.com/chongo/tech/comp/fnv/).
struct Fnv1a64(u64);

impl Fnv1a64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Self {
        Self(Self::OFFSET_BASIS)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }
}

/// Streaming detokenizer: feed it token ids one at a time, get back text
/// chunks as soon as they are settled.
///
/// Uses the prefix-offset / read-offset technique of Hugging Face
/// text-generation-inference: `tokens[prefix_offset..read_offset]` is context
/// that was already emitted, `tokens[read_offset..]` is pending. Each push
/// decodes the context alone and context + settled pending tokens, and
/// emits the difference when it does not end with U+FFFD (an incomplete
/// UTF-8 sequence).
///
/// A token's text is *settled* once no later token can change it. Two
/// things make it unsettled: a UTF-8 character whose bytes continue in the
/// next token (byte-level BPE: the decode ends with U+FFFD), and a run of
/// byte-fallback tokens (`<0xHH>`, [`Tokenizer::is_byte_token`]), which the
/// decoder turns into text as one group — `<0xC3><0xA9>` is "é", but
/// `<0xC3><0xA9><0xC3>` is three U+FFFD — so the run's text is held until a
/// token that is not a byte ends it (or [`finish`](Self::finish)). Both
/// offsets only move to settled positions, so a window never starts or ends
/// inside a byte run, and the context's text is always a prefix of the
/// window's.
///
/// Invariants:
/// - no chunk returned by [`push`](Self::push) ends inside a UTF-8 character
///   or a multi-token glyph, and no later token changes it;
/// - the concatenation of all chunks from `push` and a last
///   [`finish`](Self::finish) equals `tokenizer.decode(all pushed tokens)`
///   (tested on byte-level BPE and byte-fallback tokenizers over random id
///   sequences, for every split);
/// - `prefix_offset <= read_offset <= tokens.len()`.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// An empty decoder (no tokens pushed yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// All tokens pushed so far, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Appends `token` and returns the text it settles: possibly empty
    /// (e.g. the first bytes of a multi-byte character, or a byte-fallback
    /// token), possibly covering earlier tokens that were held back.
    ///
    /// Errors: [`TokenizerError::UnknownId`] when `token` is not in the
    /// vocabulary; the token is then not recorded.
    pub fn push(&mut self, tok: &Tokenizer, token: u32) -> Result<String, TokenizerError> {
        self.tokens.push(token);
        let result = self.emit(tok, false);
        if result.is_err() {
            self.tokens.pop();
        }
        result
    }

    /// Returns the text still held back (e.g. an incomplete UTF-8 sequence at
    /// the end, decoded with U+FFFD replacement characters, or an open run
    /// of byte tokens). After it the decoder holds nothing back; further
    /// pushes continue the stream, but what `finish` released is final: a
    /// character or byte run it cut is not mended by later tokens.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        self.emit(tok, true)
    }

    /// The end of the settled tokens: all of them when `force`, else all but
    /// a trailing run of byte-fallback tokens.
    fn settled_end(&self, tok: &Tokenizer, force: bool) -> usize {
        if force {
            return self.tokens.len();
        }
        let open_run = self
            .tokens
            .iter()
            .rev()
            .take_while(|&&t| tok.is_byte_token(t))
            .count();
        self.tokens.len() - open_run
    }

    /// Emits the text of `tokens[read_offset..end]` (`end` from
    /// [`Self::settled_end`]), unless it is incomplete and `force` is false.
    fn emit(&mut self, tok: &Tokenizer, force: bool) -> Result<String, TokenizerError> {
        let end = self.settled_end(tok, force);
        if end <= self.read_offset {
            // Check the id now: an unknown id must be refused at its push.
            tok.check_ids(
                self.tokens
                    .last()
                    .map(std::slice::from_ref)
                    .unwrap_or_default(),
            )?;
            return Ok(String::new());
        }
        // `get` never fails given the offsets invariant; it just avoids panics.
        let window = self.tokens.get(self.prefix_offset..end).unwrap_or_default();
        let read = self.read_offset.saturating_sub(self.prefix_offset);
        let prefix_text = tok.decode(window.get(..read).unwrap_or_default())?;
        let new_text = tok.decode(window)?;
        let complete = new_text.len() > prefix_text.len() && !new_text.ends_with('\u{FFFD}');
        if !(complete || force) {
            return Ok(String::new());
        }
        let chunk = match new_text.strip_prefix(prefix_text.as_str()) {
            Some(rest) => rest.to_string(),
            None => {
                // Not reached by any tokenizer tested (see the invariants);
                // say so rather than lose text silently.
                tracing::warn!(
                    prefix = %prefix_text,
                    window = %new_text,
                    "detokenizer: the context's text is not a prefix of the window's"
                );
                new_text
                    .char_indices()
                    .map(|(i, _)| i)
                    .find(|&i| i >= prefix_text.len())
                    .and_then(|i| new_text.get(i..))
                    .unwrap_or("")
                    .to_string()
            }
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = end;
        Ok(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKENIZER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tokenizer.json");
    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/fixtures");

    fn load() -> Tokenizer {
        match Tokenizer::from_file(TOKENIZER) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    /// Streams `ids` one token at a time; returns the chunks (finish last).
    fn stream(tok: &Tokenizer, ids: &[u32]) -> anyhow::Result<Vec<String>> {
        let mut dec = IncrementalDecoder::new();
        let mut chunks = Vec::new();
        for &id in ids {
            chunks.push(dec.push(tok, id)?);
        }
        chunks.push(dec.finish(tok)?);
        Ok(chunks)
    }

    #[test]
    fn round_trip_ascii_and_non_ascii() -> anyhow::Result<()> {
        let tok = load();
        for text in [
            "To be, or not to be: that is the question.",
            "  leading spaces, tabs\tand\nnewlines\n\n",
            "café – naïve — 東京 🙂",
            "",
        ] {
            let ids = tok.encode(text)?;
            assert_eq!(tok.decode(&ids)?, text, "ids {ids:?}");
        }
        Ok(())
    }

    /// Reference ids from the Python `tokenizers` package (0.23.3) on the
    /// bundled tokenizer.json: `Tokenizer.from_file(p).encode(s,
    /// add_special_tokens=False).ids`. Regenerate them if the file changes.
    #[test]
    fn ids_match_python_tokenizers() -> anyhow::Result<()> {
        let tok = load();
        assert_eq!(
            tok.encode("To be, or not to be: that is the question.")?,
            [
                409, 305, 12, 530, 324, 290, 305, 26, 330, 326, 268, 653, 1942, 14
            ]
        );
        assert_eq!(
            tok.encode("café – naïve — 東京 🙂")?,
            [
                67, 65, 70, 128, 103, 221, 159, 223, 242, 284, 65, 128, 108, 298, 221, 159, 223,
                243, 221, 163, 252, 110, 161, 119, 106, 221, 173, 254, 248, 225
            ]
        );
        Ok(())
    }

    #[test]
    fn vocabulary_and_special_tokens() -> anyhow::Result<()> {
        let tok = load();
        assert_eq!(tok.vocab_size(), 2048);
        let eos = tok.eos_id();
        assert!(eos.is_some());
        assert_eq!(eos, tok.token_id("<|endoftext|>"));
        assert_eq!(tok.token_id("no such token, surely"), None);
        // No special tokens are added, and the special token is recognised.
        let ids = tok.encode("hello")?;
        assert!(!ids.iter().any(|&i| Some(i) == eos));
        assert_eq!(
            tok.encode("<|endoftext|>")?,
            eos.into_iter().collect::<Vec<_>>()
        );
        // Special tokens are not skipped when decoding.
        let mut with_eos = ids.clone();
        with_eos.extend(eos);
        assert_eq!(tok.decode(&with_eos)?, "hello<|endoftext|>");
        Ok(())
    }

    #[test]
    fn fingerprint_is_stable_hex() {
        let a = load().fingerprint();
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, load().fingerprint());
    }

    #[test]
    fn fnv1a64_reference_values() {
        let hash = |s: &str| {
            let mut h = Fnv1a64::new();
            h.write(s.as_bytes());
            h.0
        };
        assert_eq!(hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn missing_file_error_names_path_and_fix() {
        let err = match Tokenizer::from_file("/nonexistent/dir/tokenizer.json") {
            Ok(_) => panic!("loading a missing file succeeded"),
            Err(e) => e,
        };
        assert!(matches!(err, TokenizerError::NotFound { .. }));
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/dir/tokenizer.json"), "{msg}");
        assert!(msg.contains("python models/make.py"), "{msg}");
    }

    #[test]
    fn invalid_file_is_a_parse_error() -> anyhow::Result<()> {
        let path =
            std::env::temp_dir().join(format!("duo-bad-tokenizer-{}.json", std::process::id()));
        std::fs::write(&path, "{ not json")?;
        let result = Tokenizer::from_file(&path);
        std::fs::remove_file(&path)?;
        assert!(matches!(result, Err(TokenizerError::Parse { .. })));
        Ok(())
    }

    #[test]
    fn unknown_id_is_an_error() {
        let tok = load();
        assert!(matches!(
            tok.decode(&[1, 999_999]),
            Err(TokenizerError::UnknownId { id: 999_999, .. })
        ));
        let mut dec = IncrementalDecoder::new();
        assert!(dec.push(&tok, 999_999).is_err());
        assert!(dec.tokens().is_empty());
    }

    #[test]
    fn streaming_never_splits_characters() -> anyhow::Result<()> {
        let tok = load();
        // The emoji's 4 UTF-8 bytes must span several tokens for this test to
        // mean anything.
        assert!(tok.encode("🙂")?.len() > 1);
        for text in [
            "café – naïve — 東京 🙂",
            "🙂🙂 and 👩‍👩‍👧 families, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢!",
            "Now is the winter of our discontent\nMade glorious summer.",
        ] {
            let ids = tok.encode(text)?;
            let chunks = stream(&tok, &ids)?;
            for c in &chunks {
                assert!(!c.contains('\u{FFFD}'), "chunk {c:?} of {text:?}");
            }
            assert_eq!(chunks.concat(), tok.decode(&ids)?);
            assert_eq!(chunks.concat(), text);
            assert_eq!(chunks.last().map(String::as_str), Some(""));
            if !text.is_ascii() {
                // Some token completed no character: its text was held back.
                assert!(chunks.iter().rev().skip(1).any(String::is_empty));
            }
        }
        Ok(())
    }

    #[test]
    fn streaming_releases_incomplete_tail_at_finish() -> anyhow::Result<()> {
        let tok = load();
        let ids = tok.encode("ok 🙂")?;
        let cut = &ids[..ids.len() - 1];
        let chunks = stream(&tok, cut)?;
        let full = tok.decode(cut)?;
        assert!(full.ends_with('\u{FFFD}'));
        assert_eq!(chunks.concat(), full);
        // Only the last chunk (from finish) carries replacement characters.
        let (last, rest) = chunks.split_last().ok_or(anyhow::anyhow!("no chunks"))?;
        assert!(last.contains('\u{FFFD}'));
        assert!(rest.iter().all(|c| !c.contains('\u{FFFD}')));
        Ok(())
    }

    #[test]
    fn streaming_continues_after_finish() -> anyhow::Result<()> {
        let tok = load();
        let ids = tok.encode("good morrow, 🙂 friend")?;
        let mut dec = IncrementalDecoder::new();
        let mut out = String::new();
        for (i, &id) in ids.iter().enumerate() {
            out += &dec.push(&tok, id)?;
            if i == 2 {
                out += &dec.finish(&tok)?;
            }
        }
        out += &dec.finish(&tok)?;
        assert_eq!(out, "good morrow, 🙂 friend");
        assert_eq!(dec.finish(&tok)?, "");
        Ok(())
    }

    /// Collects `(text, ids)` pairs from every JSON object holding a string
    /// `prompt` (or `text`) and an integer array `ids`, as in the `greedy`
    /// cases of models/fixtures/{draft,target}.json.
    fn collect_cases(v: &serde_json::Value, out: &mut Vec<(String, Vec<u32>)>) {
        match v {
            serde_json::Value::Object(map) => {
                let text = map.get("prompt").or_else(|| map.get("text"));
                let ids = map.get("ids").and_then(|ids| {
                    ids.as_array()?
                        .iter()
                        .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                        .collect::<Option<Vec<u32>>>()
                });
                if let (Some(serde_json::Value::String(text)), Some(ids)) = (text, ids) {
                    out.push((text.clone(), ids));
                }
                map.values().for_each(|x| collect_cases(x, out));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|x| collect_cases(x, out)),
            _ => {}
        }
    }

    #[test]
    fn ids_match_fixtures_when_present() -> anyhow::Result<()> {
        let Ok(dir) = std::fs::read_dir(FIXTURES) else {
            eprintln!("no {FIXTURES}: skipping the fixture comparison");
            return Ok(());
        };
        let tok = load();
        let mut cases = Vec::new();
        let mut files = 0;
        for entry in dir {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let value: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
                files += 1;
                collect_cases(&value, &mut cases);
            }
        }
        eprintln!("{} fixture cases", cases.len());
        if files > 0 {
            assert!(
                !cases.is_empty(),
                "no prompt/ids pairs in {FIXTURES}/*.json"
            );
        }
        for (text, ids) in cases {
            assert_eq!(tok.encode(&text)?, ids, "text {text:?}");
            assert_eq!(tok.decode(&ids)?, text);
        }
        Ok(())
    }
}
