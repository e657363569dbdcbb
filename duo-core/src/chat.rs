//! Chat templates: rendering a model's `chat_template` (Jinja, from its
//! `tokenizer_config.json`) as transformers' `apply_chat_template` does.
//!
//! [`ChatTemplate`] compiles one template with [`minijinja`] in the
//! environment transformers builds: `trim_blocks` and `lstrip_blocks` on,
//! loop controls (`break`/`continue`), a `tojson` filter that writes what
//! Python's `json.dumps(..., ensure_ascii=False)` writes (keys in their
//! given order), `raise_exception(msg)` (an error, [`ChatError::Raised`]),
//! `strftime_now(fmt)` (UTC), Python string/dict/list methods
//! (`.strip()`, `.startswith()`, `.items()`, ...; minijinja-contrib's
//! `pycompat`), and `{% generation %}` blocks rendered as plain content.
//! A render sees `messages`, `add_generation_prompt`, `tools`, `documents`
//! (`none` unless given), every declared special token (`bos_token`,
//! `eos_token`, ..., `additional_special_tokens`) and any extra variables.
//!
//! [`render_chat`] picks the template as transformers does (a named one
//! when asked, else `tool_use` when tools are given and it exists, else
//! `default`) and renders it. The rendered text already holds the
//! template's special tokens: encode it with
//! [`Tokenizer::encode`](crate::tokenizer::Tokenizer::encode) (no special
//! tokens added), as `apply_chat_template(tokenize=True)` does.

use std::fmt::Write as _;
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ObjectExt, ObjectRepr, Value, ValueKind};
use minijinja::{Environment, ErrorKind};

use crate::tokenizer::{SpecialTokens, Tokenizer};

/// Errors of choosing, compiling or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The tokenizer declares no chat template.
    #[error(
        "the model declares no chat template (no `chat_template` in tokenizer_config.json, no \
         chat_template.jinja): send a plain prompt instead of messages, or add a template"
    )]
    NoTemplate,
    /// No template of the requested name (or no `default` among several).
    #[error("no chat template named {name:?}; the model has: {available}")]
    UnknownTemplate {
        /// The name asked for.
        name: String,
        /// The names the model declares, comma-separated.
        available: String,
    },
    /// The template is not valid Jinja (for this engine).
    #[error("chat template {name:?} does not compile: {message}")]
    Syntax {
        /// The template's name.
        name: String,
        /// The engine's message.
        message: String,
    },
    /// The template called `raise_exception(message)`: the conversation is
    /// not one it accepts (e.g. roles that do not alternate).
    #[error("chat template {name:?} rejected the conversation: {message}")]
    Raised {
        /// The template's name.
        name: String,
        /// The template's own message.
        message: String,
    },
    /// Rendering failed otherwise (e.g. a method the engine lacks).
    #[error("chat template {name:?} failed to render: {message}")]
    Render {
        /// The template's name.
        name: String,
        /// The engine's message.
        message: String,
    },
    /// A message or tool given as JSON is malformed.
    #[error("invalid chat input: {0}")]
    Input(String),
}

/// A JSON value whose objects keep their keys in the given order (as
/// Python dicts do), so that `tojson` in a template writes tools and
/// arguments as transformers does. Parse text with [`JsonValue::parse`]
/// (or serde) to keep the text's order; from a [`serde_json::Value`] the
/// order is that map's.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum JsonValue {
    /// `null` (Python `None`).
    #[default]
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number.
    Number(serde_json::Number),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<JsonValue>),
    /// An object, keys in order, each once.
    Object(Vec<(String, JsonValue)>),
}

impl JsonValue {
    /// Parses JSON text, keeping object keys in the text's order (a repeated
    /// key keeps its first place and its last value, as Python's `json`).
    pub fn parse(text: &str) -> Result<Self, ChatError> {
        serde_json::from_str(text).map_err(|e| ChatError::Input(format!("invalid JSON: {e}")))
    }

    /// The value of `key` when this is an object.
    pub fn get(&self, key: &str) -> Option<&JsonValue> {
        match self {
            JsonValue::Object(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string, when this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            JsonValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// This value for a template.
    fn to_template_value(&self) -> Value {
        match self {
            JsonValue::Null => Value::from(()),
            JsonValue::Bool(b) => Value::from(*b),
            JsonValue::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Value::from(i)
                } else if let Some(u) = n.as_u64() {
                    Value::from(u)
                } else {
                    Value::from(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            JsonValue::String(s) => Value::from(s.as_str()),
            JsonValue::Array(items) => Value::from(
                items
                    .iter()
                    .map(Self::to_template_value)
                    .collect::<Vec<_>>(),
            ),
            JsonValue::Object(entries) => Value::from_object(OrderedMap(
                entries
                    .iter()
                    .map(|(k, v)| (Value::from(k.as_str()), v.to_template_value()))
                    .collect(),
            )),
        }
    }
}

impl From<serde_json::Value> for JsonValue {
    fn from(v: serde_json::Value) -> Self {
        match v {
            serde_json::Value::Null => JsonValue::Null,
            serde_json::Value::Bool(b) => JsonValue::Bool(b),
            serde_json::Value::Number(n) => JsonValue::Number(n),
            serde_json::Value::String(s) => JsonValue::String(s),
            serde_json::Value::Array(a) => {
                JsonValue::Array(a.into_iter().map(Into::into).collect())
            }
            serde_json::Value::Object(o) => {
                JsonValue::Object(o.into_iter().map(|(k, v)| (k, v.into())).collect())
            }
        }
    }
}

impl From<&str> for JsonValue {
    fn from(s: &str) -> Self {
        JsonValue::String(s.to_owned())
    }
}

impl From<String> for JsonValue {
    fn from(s: String) -> Self {
        JsonValue::String(s)
    }
}

impl<'de> serde::Deserialize<'de> for JsonValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = JsonValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<JsonValue, E> {
                Ok(JsonValue::Null)
            }
            fn visit_none<E>(self) -> Result<JsonValue, E> {
                Ok(JsonValue::Null)
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<JsonValue, D::Error> {
                serde::Deserialize::deserialize(d)
            }
            fn visit_bool<E>(self, b: bool) -> Result<JsonValue, E> {
                Ok(JsonValue::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<JsonValue, E> {
                Ok(JsonValue::Number(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<JsonValue, E> {
                Ok(JsonValue::Number(n.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<JsonValue, E> {
                serde_json::Number::from_f64(n)
                    .map(JsonValue::Number)
                    .ok_or_else(|| E::custom("a non-finite number"))
            }
            fn visit_str<E>(self, s: &str) -> Result<JsonValue, E> {
                Ok(JsonValue::String(s.to_owned()))
            }
            fn visit_string<E>(self, s: String) -> Result<JsonValue, E> {
                Ok(JsonValue::String(s))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<JsonValue, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(JsonValue::Array(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<JsonValue, A::Error> {
                let mut entries: Vec<(String, JsonValue)> = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, JsonValue>()? {
                    match entries.iter_mut().find(|(k, _)| *k == key) {
                        Some(slot) => slot.1 = value,
                        None => entries.push((key, value)),
                    }
                }
                Ok(JsonValue::Object(entries))
            }
        }
        d.deserialize_any(Visit)
    }
}

impl serde::Serialize for JsonValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            JsonValue::Null => s.serialize_unit(),
            JsonValue::Bool(b) => s.serialize_bool(*b),
            JsonValue::Number(n) => n.serialize(s),
            JsonValue::String(v) => s.serialize_str(v),
            JsonValue::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            JsonValue::Object(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

/// One chat message as a template sees it: `role`, `content` (a string
/// usually; `null` or a list of parts where the template expects that),
/// `tool_calls` when present, and any other fields (`name`,
/// `tool_call_id`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: String,
    /// The message text (or `Null`, or a list of content parts).
    pub content: JsonValue,
    /// The assistant's tool calls (OpenAI shape), if any.
    pub tool_calls: Option<JsonValue>,
    /// Other fields, passed through in order.
    pub extra: Vec<(String, JsonValue)>,
}

impl ChatMessage {
    /// A message of `role` with text `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: JsonValue::String(content.into()),
            tool_calls: None,
            extra: Vec::new(),
        }
    }

    /// Reads a message from a JSON object (`{"role": ..., "content": ...,
    /// ...}`; `content` may be absent or null).
    pub fn from_json(v: JsonValue) -> Result<Self, ChatError> {
        let JsonValue::Object(entries) = v else {
            return Err(ChatError::Input(
                "a chat message must be a JSON object".into(),
            ));
        };
        let mut role = None;
        let mut content = JsonValue::Null;
        let mut tool_calls = None;
        let mut extra = Vec::new();
        for (k, v) in entries {
            match k.as_str() {
                "role" => match v {
                    JsonValue::String(r) => role = Some(r),
                    other => {
                        return Err(ChatError::Input(format!(
                            "a message's role must be a string, got {other:?}"
                        )));
                    }
                },
                "content" => content = v,
                "tool_calls" if v != JsonValue::Null => tool_calls = Some(v),
                _ => extra.push((k, v)),
            }
        }
        let role = role.ok_or_else(|| ChatError::Input("a chat message has no role".into()))?;
        Ok(Self {
            role,
            content,
            tool_calls,
            extra,
        })
    }

    fn to_template_value(&self) -> Value {
        let mut entries = vec![
            (Value::from("role"), Value::from(self.role.as_str())),
            (Value::from("content"), self.content.to_template_value()),
        ];
        if let Some(calls) = &self.tool_calls {
            entries.push((Value::from("tool_calls"), calls.to_template_value()));
        }
        for (k, v) in &self.extra {
            entries.push((Value::from(k.as_str()), v.to_template_value()));
        }
        Value::from_object(OrderedMap(entries))
    }
}

impl<'de> serde::Deserialize<'de> for ChatMessage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = JsonValue::deserialize(d)?;
        ChatMessage::from_json(v).map_err(serde::de::Error::custom)
    }
}

/// What a render needs besides the messages.
#[derive(Debug, Clone, Default)]
pub struct ChatOptions {
    /// End with the template's assistant header, so the model answers
    /// (`add_generation_prompt`; true to generate a reply).
    pub add_generation_prompt: bool,
    /// Tool (function) schemas, OpenAI shape; the template's `tools`.
    pub tools: Option<Vec<JsonValue>>,
    /// Retrieval documents; the template's `documents`.
    pub documents: Option<Vec<JsonValue>>,
    /// Render the template of this name ([`render_chat`]; e.g. `tool_use`).
    pub template: Option<String>,
    /// Further template variables (e.g. `enable_thinking`), set last.
    pub extra: Vec<(String, JsonValue)>,
}

impl ChatOptions {
    /// Options with `add_generation_prompt` set (what a server sends).
    pub fn generation() -> Self {
        Self {
            add_generation_prompt: true,
            ..Self::default()
        }
    }
}

/// A compiled chat template with the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    name: String,
    specials: Vec<(String, Value)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The name the template is registered under in its environment.
const TEMPLATE: &str = "chat";

impl ChatTemplate {
    /// Compiles `source` (named `name` in errors), to be rendered with
    /// `special`'s tokens as `bos_token`, `eos_token`, ....
    ///
    /// Errors: [`ChatError::Syntax`] when it does not compile.
    pub fn new(name: &str, source: &str, special: &SpecialTokens) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| ChatError::Syntax {
                name: name.into(),
                message: e.to_string(),
            })?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE, strip_generation_tags(source))
            .map_err(|e| ChatError::Syntax {
                name: name.into(),
                message: describe(&e),
            })?;
        let mut specials: Vec<(String, Value)> = special
            .named
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        specials.push((
            "additional_special_tokens".into(),
            Value::from(
                special
                    .additional
                    .iter()
                    .map(|t| Value::from(t.as_str()))
                    .collect::<Vec<_>>(),
            ),
        ));
        Ok(Self {
            env,
            name: name.into(),
            specials,
        })
    }

    /// The tokenizer's template `name` (with `None`, its `default` or only
    /// one), with the tokenizer's special tokens.
    ///
    /// Errors: [`ChatError::NoTemplate`], [`ChatError::UnknownTemplate`],
    /// [`ChatError::Syntax`].
    pub fn from_tokenizer(tok: &Tokenizer, name: Option<&str>) -> Result<Self, ChatError> {
        if tok.chat_templates().is_empty() {
            return Err(ChatError::NoTemplate);
        }
        let Some(t) = tok.chat_template(name) else {
            return Err(ChatError::UnknownTemplate {
                name: name.unwrap_or("default").into(),
                available: template_names(tok),
            });
        };
        Self::new(&t.name, &t.source, tok.special_tokens())
    }

    /// The template's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renders `messages` with `opts` (its `template` field is not used
    /// here: this is one template).
    ///
    /// Errors: [`ChatError::Raised`] with the template's message when it
    /// calls `raise_exception`; [`ChatError::Render`] otherwise.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        opts: &ChatOptions,
    ) -> Result<String, ChatError> {
        let list = |items: &Option<Vec<JsonValue>>| match items {
            Some(items) => Value::from(
                items
                    .iter()
                    .map(JsonValue::to_template_value)
                    .collect::<Vec<_>>(),
            ),
            None => Value::from(()),
        };
        let mut ctx: Vec<(String, Value)> = self.specials.clone();
        ctx.push((
            "messages".into(),
            Value::from(
                messages
                    .iter()
                    .map(ChatMessage::to_template_value)
                    .collect::<Vec<_>>(),
            ),
        ));
        ctx.push(("tools".into(), list(&opts.tools)));
        ctx.push(("documents".into(), list(&opts.documents)));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(opts.add_generation_prompt),
        ));
        for (k, v) in &opts.extra {
            ctx.push((k.clone(), v.to_template_value()));
        }
        let ctx = Value::from_object(OrderedMap(
            ctx.into_iter().map(|(k, v)| (Value::from(k), v)).collect(),
        ));
        let template = self
            .env
            .get_template(TEMPLATE)
            .map_err(|e| ChatError::Render {
                name: self.name.clone(),
                message: describe(&e),
            })?;
        template.render(ctx).map_err(|e| match raised_message(&e) {
            Some(message) => ChatError::Raised {
                name: self.name.clone(),
                message,
            },
            None => ChatError::Render {
                name: self.name.clone(),
                message: describe(&e),
            },
        })
    }
}

/// Renders `messages` with the tokenizer's chat template, chosen as
/// transformers chooses it: `opts.template` when set; else, when tools are
/// given and a `tool_use` template exists, that one; else `default` (or
/// the only template).
pub fn render_chat(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    opts: &ChatOptions,
) -> Result<String, ChatError> {
    let name = match &opts.template {
        Some(name) => Some(name.as_str()),
        None if opts.tools.is_some() && tok.chat_template(Some("tool_use")).is_some() => {
            Some("tool_use")
        }
        None => None,
    };
    ChatTemplate::from_tokenizer(tok, name)?.render(messages, opts)
}

fn template_names(tok: &Tokenizer) -> String {
    tok.chat_templates()
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An engine error with its cause chain, on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

/// The error `raise_exception` returns: found again in the render error's
/// cause chain to tell a template's refusal from an engine failure.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(Raised(message)),
    )
}

fn raised_message(e: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Raised>() {
            return Some(r.0.clone());
        }
        source = s.source();
    }
    None
}

/// `{% generation %}` / `{% endgeneration %}` (transformers' assistant-mask
/// extension) become `{% if true %}` / `{% endif %}`, keeping their
/// whitespace control: the content renders as it would in transformers.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, trail) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[body.len() - 1..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => {
                let _ = write!(out, "{{%{lead} if true {trail}%}}");
            }
            "endgeneration" => {
                let _ = write!(out, "{{%{lead} endif {trail}%}}");
            }
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// A map that keeps its keys in insertion order (Python dict order).
#[derive(Debug)]
struct OrderedMap(Vec<(Value, Value)>);

impl Object for OrderedMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.mapped_enumerator(|this| Box::new(this.0.iter().map(|(k, _)| k.clone())))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, each settable by keyword.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            (None, Some(s)) => Some(s.to_owned()),
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .unwrap_or_default();
            match parts.as_slice() {
                [a, b] => (a.clone(), b.clone()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ));
                }
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let mut w = PyJson {
        out: String::new(),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    w.value(value, 0)?;
    Ok(w.out)
}

/// A writer of Python's `json.dumps` output.
struct PyJson {
    out: String,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn newline(&mut self, depth: usize) {
        if let Some(ind) = &self.indent {
            self.out.push('\n');
            for _ in 0..depth {
                self.out.push_str(ind);
            }
        }
    }

    fn value(&mut self, v: &Value, depth: usize) -> Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::Undefined => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: an undefined value is not JSON serializable",
                ));
            }
            ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    let _ = write!(self.out, "{v}");
                } else {
                    let f = f64::try_from(v.clone())?;
                    self.out.push_str(&python_float(f));
                }
            }
            ValueKind::String => {
                let s = v
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string());
                self.string(&s);
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                if keys.is_empty() {
                    self.out.push_str("{}");
                    return Ok(());
                }
                self.out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        let sep = self.item_sep.clone();
                        self.out.push_str(&sep);
                    }
                    self.newline(depth + 1);
                    match k.as_str() {
                        Some(s) => self.string(s),
                        None => self.string(&k.to_string()),
                    }
                    let sep = self.key_sep.clone();
                    self.out.push_str(&sep);
                    self.value(&v.get_item(k)?, depth + 1)?;
                }
                self.newline(depth);
                self.out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    self.out.push_str("[]");
                    return Ok(());
                }
                self.out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        let sep = self.item_sep.clone();
                        self.out.push_str(&sep);
                    }
                    self.newline(depth + 1);
                    self.value(item, depth + 1)?;
                }
                self.newline(depth);
                self.out.push(']');
            }
            _ => {
                let s = v.to_string();
                self.string(&s);
            }
        }
        Ok(())
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        let _ = write!(self.out, "\\u{u:04x}");
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// Python's `repr(float)` (what `json.dumps` writes): the shortest
/// round-trip digits, positional for exponents -4..16, else `d.ddde+XX`.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-5".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let s = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            let (a, b) = digits.split_at(point as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{s}")
    } else {
        let (first, more) = digits.split_at(1);
        let frac = if more.is_empty() {
            String::new()
        } else {
            format!(".{more}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

/// transformers' `strftime_now(format)`: the current time (UTC here) in
/// C `strftime` format (`%Y %m %d %H %M %S %y %j %b %B %a %A %e %I %p %%`).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(&format, secs)
}

fn strftime(format: &str, unix: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (h, mi, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{y}"),
            Some('y') => write!(out, "{:02}", y.rem_euclid(100)),
            Some('m') => write!(out, "{m:02}"),
            Some('d') => write!(out, "{d:02}"),
            Some('e') => write!(out, "{d:2}"),
            Some('j') => write!(out, "{yday:03}"),
            Some('H') => write!(out, "{h:02}"),
            Some('I') => write!(out, "{:02}", if h % 12 == 0 { 12 } else { h % 12 }),
            Some('p') => write!(out, "{}", if h < 12 { "AM" } else { "PM" }),
            Some('M') => write!(out, "{mi:02}"),
            Some('S') => write!(out, "{s:02}"),
            Some('b') => write!(out, "{}", &month[..3]),
            Some('B') => write!(out, "{month}"),
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[ChatMessage], opts: &ChatOptions) -> String {
        let special = SpecialTokens {
            bos: Some("<s>".into()),
            named: [("bos_token".to_owned(), "<s>".to_owned())].into(),
            ..SpecialTokens::default()
        };
        ChatTemplate::new("t", source, &special)
            .and_then(|t| t.render(messages, opts))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn python_floats() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345.0, "123456789012345.0"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (0.0, "0.0"),
        ] {
            assert_eq!(python_float(f), want, "{f}");
        }
    }

    #[test]
    fn tojson_is_python_json_dumps() -> Result<(), ChatError> {
        let tool = JsonValue::parse(r#"{"z": 1, "a": [1.5, "é\n\"", null, true], "m": {}}"#)?;
        let opts = ChatOptions {
            tools: Some(vec![tool]),
            ..ChatOptions::default()
        };
        let out = render("{{ tools[0] | tojson }}", &[], &opts);
        assert_eq!(out, r#"{"z": 1, "a": [1.5, "é\n\"", null, true], "m": {}}"#);
        let out = render(
            "{{ tools[0] | tojson(indent=2, sort_keys=true) }}",
            &[],
            &opts,
        );
        assert_eq!(
            out,
            "{\n  \"a\": [\n    1.5,\n    \"é\\n\\\"\",\n    null,\n    true\n  ],\n  \"m\": {},\n  \"z\": 1\n}"
        );
        Ok(())
    }

    #[test]
    fn python_methods_whitespace_and_generation_blocks() {
        let msgs = [ChatMessage::new("user", "  Hi  ")];
        let src = "{% for m in messages %}\n  {% if m.role.startswith('us') %}\n[{{ m.content.strip() }}]\n  {% endif %}\n{% endfor %}\n{% generation %}{{ bos_token }}{% endgeneration %}";
        assert_eq!(render(src, &msgs, &ChatOptions::default()), "[Hi]\n<s>");
    }

    #[test]
    fn raise_exception_is_a_raised_error() {
        let t = ChatTemplate::new(
            "t",
            "{{ raise_exception('roles must alternate') }}",
            &SpecialTokens::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let err = t.render(&[], &ChatOptions::default()).unwrap_err();
        assert!(
            matches!(&err, ChatError::Raised { message, .. } if message == "roles must alternate"),
            "{err}"
        );
        let err = ChatTemplate::new("t", "{% if %}", &SpecialTokens::default()).unwrap_err();
        assert!(matches!(err, ChatError::Syntax { .. }), "{err}");
    }

    #[test]
    fn strftime_formats_a_known_date() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        assert_eq!(
            strftime("%d %b %Y, %A %H:%M:%S %j %%", 1_709_211_909),
            "29 Feb 2024, Thursday 13:05:09 060 %"
        );
    }

    #[test]
    fn messages_from_json_keep_extra_fields() -> Result<(), ChatError> {
        let m = ChatMessage::from_json(JsonValue::parse(
            r#"{"role": "tool", "content": null, "tool_call_id": "x"}"#,
        )?)?;
        assert_eq!(m.role, "tool");
        assert_eq!(m.content, JsonValue::Null);
        assert_eq!(m.extra, [("tool_call_id".to_owned(), JsonValue::from("x"))]);
        assert!(ChatMessage::from_json(JsonValue::parse(r#"{"content": "x"}"#)?).is_err());
        Ok(())
    }
}
