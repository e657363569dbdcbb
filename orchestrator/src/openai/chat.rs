//! `POST /v1/chat/completions`: messages rendered into one prompt. A model
//! whose tokenizer declares a chat template (`tokenizer_config.json`'s
//! `chat_template`, read when the orchestrator's `--tokenizer` is the model
//! folder) gets it rendered as transformers' `apply_chat_template` does
//! (with `add_generation_prompt`, and the request's `tools`), encoded
//! without adding special tokens again; the reply ends at the model's
//! end-of-text ids. Otherwise (the bundled pair, which has no template) the
//! play-script [`ChatTemplate`] renders it and also ends the assistant's turn.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, State};
use axum::http::StatusCode;
use axum::response::Response;
use duo_core::chat::{ChatError, ChatMessage, ChatOptions, JsonValue, render_chat};
use duo_rpc::pb::{self, generate_request};
use serde_json::{Map, Value, json};

use super::error::{ApiError, refuse};
use super::fields::{Fields, is_empty, is_zero};
use super::reply::{Reply, respond};
use super::request::{common, to_request};
use crate::Orchestrator;

/// Chat roles the template renders; `developer` is spoken as `system`.
const ROLES: &str = "system, developer, user or assistant";

/// One chat message, rendered by the template.
pub(super) fn chat_message(t: &ChatTemplate, i: usize, m: Value) -> Result<String, ApiError> {
    let at = format!("messages.[{i}]");
    let mut f = Fields::nested(m, &at)?;
    let role = f
        .get::<String>("role")?
        .ok_or_else(|| refuse(format!("{at}.role"), format!("{at}.role is required")))?;
    match role.as_str() {
        "system" | "developer" | "user" | "assistant" => {}
        "tool" | "function" => {
            return Err(refuse(
                format!("{at}.role"),
                format!(
                    "{at}.role = {role:?} is not supported: this server does not call tools or functions"
                ),
            ));
        }
        other => {
            return Err(refuse(
                format!("{at}.role"),
                format!("{at}.role = {other:?} is not a known role: use {ROLES}"),
            ));
        }
    }
    // Tool calls and results first: an assistant's call has no content.
    let no_tools = "this server does not call tools or functions";
    for key in ["tool_calls", "annotations"] {
        f.only(key, is_empty, no_tools)?;
    }
    f.only("function_call", |_| false, no_tools)?;
    for key in ["tool_call_id", "audio", "refusal"] {
        f.only(key, |_| false, "only text messages are supported")?;
    }
    let content = match f.raw("content") {
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.into_iter().enumerate() {
                let pat = format!("{at}.content.[{j}]");
                let mut p = Fields::nested(p, &pat)?;
                match p.get::<String>("type")?.as_deref() {
                    Some("text") => {}
                    Some(other) => {
                        return Err(refuse(
                            format!("{pat}.type"),
                            format!(
                                "{pat}.type = {other:?} is not supported: this model reads text only (parts of type \"text\")"
                            ),
                        ));
                    }
                    None => {
                        return Err(refuse(
                            format!("{pat}.type"),
                            format!("{pat}.type is required"),
                        ));
                    }
                }
                let part = p.get::<String>("text")?.ok_or_else(|| {
                    refuse(format!("{pat}.text"), format!("{pat}.text is required"))
                })?;
                p.finish()?;
                text.push_str(&part);
            }
            text
        }
        None => {
            return Err(refuse(
                format!("{at}.content"),
                format!("{at}.content is required (a string or a list of text parts)"),
            ));
        }
        Some(_) => {
            return Err(refuse(
                format!("{at}.content"),
                format!("{at}.content must be a string or a list of text parts"),
            ));
        }
    };
    // OpenAI's participant name: the speaker in the play script.
    let name = f.get::<String>("name")?;
    if let Some(n) = &name
        && (n.is_empty()
            || n.chars().count() > 64
            || !n
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, ' ' | '_' | '-')))
    {
        return Err(refuse(
            format!("{at}.name"),
            format!("{at}.name must be 1 to 64 letters, digits, spaces, '_' or '-', got {n:?}"),
        ));
    }
    f.finish()?;
    Ok(t.render_as(name.as_deref(), &role, &content))
}

/// The chat request's stop sequences: the user's, then the template's end
/// of turn unless a user sequence makes it redundant. A sequence that is a
/// prefix of another ends the generation at the same place whenever the
/// longer one would (it completes no later and starts at the same place),
/// so the template's own sequence is left out when a user sequence is a
/// prefix of it (`"\n"` or `"\n\n"` for the blank line); duplicates go too.
pub(super) fn chat_stops(
    user: Vec<String>,
    template: Vec<String>,
) -> Result<Vec<String>, ApiError> {
    let mut stop: Vec<String> = Vec::with_capacity(user.len() + template.len());
    for s in user {
        if !stop.contains(&s) {
            stop.push(s);
        }
    }
    for t in template {
        if !stop
            .iter()
            .any(|s| !s.is_empty() && t.starts_with(s.as_str()))
        {
            stop.push(t);
        }
    }
    // The orchestrator's limit counts the caller's sequences only, not the
    // template's end of turn added here.
    Ok(stop)
}

/// `POST /v1/chat/completions`: the chat rendered by the model's template,
/// generated as a completion (streamed as chat chunks when asked).
pub(super) async fn chat_completions(
    State(orch): State<Orchestrator>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    // The body is read once and parsed twice: as the `Json` extractor
    // parses it (content type and all), and keeping every object's keys in
    // their order, as a template's `tojson` writes the tools (Python dicts
    // keep theirs).
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, super::BODY_LIMIT)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "cannot read the request body (at most {} bytes): {e}",
                    super::BODY_LIMIT
                ),
                "invalid_request_error",
            )
        })?;
    let ordered: Option<JsonValue> = serde_json::from_slice(&bytes).ok();
    let body: Result<Json<Value>, JsonRejection> = Json::from_request(
        axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes)),
        &(),
    )
    .await;
    let mut f = Fields::body(body)?;
    let messages = match f.raw("messages") {
        Some(Value::Array(m)) if m.is_empty() => {
            return Err(refuse("messages", "messages is empty"));
        }
        Some(Value::Array(m)) => m,
        Some(_) => return Err(refuse("messages", "messages must be a list of messages")),
        None => return Err(refuse("messages", "messages is required")),
    };
    let template = &orch.0.chat_template;
    // The model's own chat template, when its tokenizer declares one.
    let own_template = !orch.0.tokenizer.chat_templates().is_empty();
    let mut prompt = String::new();
    let mut model_messages = Vec::new();
    if own_template {
        let in_order = match ordered.as_ref().and_then(|o| o.get("messages")) {
            Some(JsonValue::Array(m)) if m.len() == messages.len() => m.clone(),
            _ => messages.into_iter().map(JsonValue::from).collect(),
        };
        for (i, m) in in_order.into_iter().enumerate() {
            model_messages.push(template_message(i, m)?);
        }
    } else {
        for (i, m) in messages.into_iter().enumerate() {
            prompt.push_str(&chat_message(template, i, m)?);
        }
        prompt.push_str(&template.assistant_prefix());
    }
    let c = common(&mut f)?;
    let logprobs = f.get::<bool>("logprobs")?.unwrap_or(false);
    f.only(
        "top_logprobs",
        is_zero,
        "alternatives are not computed; use logprobs: true for the log-probability of each generated token",
    )?;
    let no_tools = "this server does not call tools or functions";
    // A model template renders `tools` (its reply is text: tool calls are
    // not parsed out of it); the play script has no place for them.
    let tools = if own_template {
        match f.raw("tools") {
            None | Some(Value::Null) => None,
            Some(Value::Array(t)) if t.is_empty() => None,
            Some(Value::Array(t)) => match ordered.as_ref().and_then(|o| o.get("tools")) {
                Some(JsonValue::Array(in_order)) => Some(in_order.clone()),
                _ => Some(t.into_iter().map(JsonValue::from).collect::<Vec<_>>()),
            },
            Some(_) => return Err(refuse("tools", "tools must be a list of tool objects")),
        }
    } else {
        f.only("tools", is_empty, no_tools)?;
        None
    };
    f.only("functions", is_empty, no_tools)?;
    let tool_choice = if tools.is_some() {
        "the model chooses whether to answer with a tool call (\"auto\") or not (\"none\")"
    } else {
        no_tools
    };
    f.only(
        "tool_choice",
        |v| v == "none" || (tools.is_some() && v == "auto"),
        tool_choice,
    )?;
    f.only("function_call", |v| v == "none", no_tools)?;
    // Harmless: there are no tools to call in parallel.
    f.get::<bool>("parallel_tool_calls")?;
    f.only(
        "response_format",
        |v| *v == json!({"type": "text"}),
        "only {\"type\": \"text\"} (no JSON mode or schemas)",
    )?;
    f.only(
        "store",
        |v| v.as_bool() == Some(false),
        "completions are not stored (store: false)",
    )?;
    // Harmless: tags for stored completions, which are not stored.
    f.get::<Map<String, Value>>("metadata")?;
    // Harmless: an end-user id (as `user`) and prompt-cache hints (there is
    // no prompt cache across requests here).
    for key in [
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
    ] {
        f.get::<String>(key)?;
    }
    f.only(
        "service_tier",
        |v| v == "auto" || v == "default",
        "one tier (\"auto\" or \"default\")",
    )?;
    f.only(
        "modalities",
        |v| v.as_array().is_some_and(|m| m.iter().all(|m| m == "text")),
        "text output only ([\"text\"])",
    )?;
    for key in [
        "audio",
        "prediction",
        "reasoning_effort",
        "verbosity",
        "web_search_options",
    ] {
        f.only(key, |_| false, "not available on this server")?;
    }
    f.finish()?;
    let req = if own_template {
        let ids = render_model_chat(&orch, &model_messages, tools)?;
        // The model's end-of-text ids (its end of turn among them) end the
        // reply: only the caller's stop sequences are added.
        to_request(
            generate_request::Prompt::TokenIds(pb::TokenIds { ids }),
            &c,
            c.stop.clone(),
            logprobs,
        )
    } else {
        // End the assistant's turn where the template would start the next one.
        let stop = chat_stops(c.stop.clone(), template.stops())?;
        to_request(generate_request::Prompt::Text(prompt), &c, stop, logprobs)
    };
    let reply = Reply {
        chat: true,
        logprobs,
        echo: None,
        include_usage: c.include_usage,
    };
    respond(orch, req, c.stream, reply).await
}

/// One chat message for the model's own template: an object with a string
/// `role` (OpenAI's `developer` is given as `system`, which templates
/// know), `content` as a string, a list of text parts (joined) or null, and
/// any other fields (`name`, `tool_calls`, `tool_call_id`, ...) passed to
/// the template as they are, keys in the request's order. Which roles and
/// orders a conversation may have is the template's to say (its
/// `raise_exception` is a 400).
fn template_message(i: usize, m: JsonValue) -> Result<ChatMessage, ApiError> {
    let at = format!("messages.[{i}]");
    let JsonValue::Object(mut fields) = m else {
        return Err(refuse(at.clone(), format!("{at} must be an object")));
    };
    for (k, v) in &mut fields {
        match (k.as_str(), &*v) {
            ("role", JsonValue::String(r)) if r == "developer" => {
                *v = JsonValue::String("system".into());
            }
            ("role", JsonValue::String(_)) => {}
            ("role", _) => {
                return Err(refuse(
                    format!("{at}.role"),
                    format!("{at}.role must be a string"),
                ));
            }
            ("content", JsonValue::Array(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    let pat = format!("{at}.content.[{j}]");
                    match (p.get("type").and_then(JsonValue::as_str), p.get("text")) {
                        (Some("text"), Some(JsonValue::String(t))) => text.push_str(t),
                        (Some("text"), _) => {
                            return Err(refuse(
                                format!("{pat}.text"),
                                format!("{pat}.text is required"),
                            ));
                        }
                        (other, _) => {
                            return Err(refuse(
                                format!("{pat}.type"),
                                format!(
                                    "{pat}.type = {other:?} is not supported: this model reads text only (parts of type \"text\")"
                                ),
                            ));
                        }
                    }
                }
                *v = JsonValue::String(text);
            }
            ("content", JsonValue::String(_) | JsonValue::Null) => {}
            ("content", _) => {
                return Err(refuse(
                    format!("{at}.content"),
                    format!("{at}.content must be a string, a list of text parts or null"),
                ));
            }
            _ => {}
        }
    }
    if !fields.iter().any(|(k, _)| k == "role") {
        return Err(refuse(
            format!("{at}.role"),
            format!("{at}.role is required"),
        ));
    }
    ChatMessage::from_json(JsonValue::Object(fields)).map_err(|e| refuse(at, e.to_string()))
}

/// Renders `messages` with the model's chat template (as transformers'
/// `apply_chat_template(..., add_generation_prompt=True, tools=tools)`)
/// and encodes the text without adding special tokens (the template wrote
/// its own, BOS included). A conversation the template refuses
/// (`raise_exception`) is a 400 with the template's message; a template
/// this server cannot compile is its own fault (500).
fn render_model_chat(
    orch: &Orchestrator,
    messages: &[ChatMessage],
    tools: Option<Vec<JsonValue>>,
) -> Result<Vec<u32>, ApiError> {
    let tok = &orch.0.tokenizer;
    let opts = ChatOptions {
        tools,
        ..ChatOptions::generation()
    };
    let text = render_chat(tok, messages, &opts).map_err(|e| match e {
        ChatError::Raised { .. } | ChatError::Render { .. } | ChatError::Input(_) => {
            refuse("messages", e.to_string())
        }
        ChatError::NoTemplate | ChatError::UnknownTemplate { .. } | ChatError::Syntax { .. } => {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
                "server_error",
            )
        }
    })?;
    if text.len() > orch.0.max_prompt_bytes {
        return Err(refuse(
            "messages",
            format!(
                "the rendered conversation is {} bytes; at most {} are accepted (--max-prompt-bytes): shorten it",
                text.len(),
                orch.0.max_prompt_bytes
            ),
        ));
    }
    tok.encode(&text)
        .map_err(|e| refuse("messages", e.to_string()))
}

/// How chat messages become a prompt: each message is
/// `{SPEAKER}.\n{content}\n\n`, the speaker being the message's `name` or
/// its role, upper-cased (the play-script form the bundled Shakespeare model
/// knows; `developer` speaks as `SYSTEM`), then `{ASSISTANT}.\n` opens the
/// reply; generation stops at the next blank line. The assistant's speaker
/// name is configurable (`--chat-assistant-name`).
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    pub assistant_name: String,
}

impl ChatTemplate {
    fn speaker(&self, role: &str) -> String {
        match role {
            "assistant" => self.assistant_name.to_uppercase(),
            "developer" => "SYSTEM".into(),
            other => other.to_uppercase(),
        }
    }

    pub fn render(&self, role: &str, content: &str) -> String {
        self.render_as(None, role, content)
    }

    /// A message spoken by `name` when given, else by its role.
    pub fn render_as(&self, name: Option<&str>, role: &str, content: &str) -> String {
        let speaker = name.map_or_else(|| self.speaker(role), str::to_uppercase);
        format!("{speaker}.\n{}\n\n", content.trim())
    }

    pub fn assistant_prefix(&self) -> String {
        format!("{}.\n", self.speaker("assistant"))
    }

    pub fn stops(&self) -> Vec<String> {
        vec!["\n\n".into()]
    }
}
