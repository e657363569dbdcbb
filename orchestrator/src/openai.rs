//! OpenAI-compatible HTTP API on the orchestrator: `POST /v1/completions`
//! (unary or server-sent events), `POST /v1/chat/completions` (a simple,
//! configurable chat template) and `GET /v1/models`.
//!
//! A thin translation layer: every request becomes a `duo.v1`
//! `GenerateRequest` and runs through the same [`Orchestrator::run`] as the
//! gRPC API, so validation, cancellation (a closed connection stops the
//! generation and frees both sessions) and limits are shared.
//!
//! Every request field is either honoured or refused by name: a body is
//! read field by field ([`Fields`]), an option this server cannot honour
//! (`logit_bias`, `tools`, `best_of` > 1, ...) is a 400 whose error object
//! names it in `param`, and a field nobody knows is a 400 "Unrecognized
//! request argument supplied", as OpenAI answers. The table of options is in
//! docs/reliability.md.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use duo_rpc::pb::{self, generate_request};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::{MAX_STOP_SEQUENCES, Orchestrator, Output};

/// The model name clients see.
pub const MODEL_ID: &str = "duo";

pub fn router(orch: Orchestrator) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(orch)
}

/// Unknown paths get OpenAI's error object, not an empty body.
async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "unknown path {}: this server serves POST /v1/completions, POST /v1/chat/completions, GET /v1/models and GET /metrics",
            uri.path()
        ),
        "invalid_request_error",
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
        "invalid_request_error",
    )
}

/// An error in OpenAI's shape with the matching HTTP status; `param` names
/// the request field at fault, as OpenAI's errors do.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
}

/// Seconds a client is told to wait before retrying a 429 or 503.
const RETRY_AFTER_SECS: &str = "1";

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>, kind: &'static str) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
        }
    }

    /// OpenAI's error object.
    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": null}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        resp
    }
}

/// A generation's error as the client should see it. `chat`: the prompt is
/// `messages`, not `prompt`.
fn status_error(s: Status, chat: bool) -> ApiError {
    let (code, kind) = match s.code() {
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error"),
        // The services disagree (e.g. tokenizers): the deployment's
        // fault, not the request's.
        Code::FailedPrecondition => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
        Code::Cancelled | Code::DeadlineExceeded => (StatusCode::REQUEST_TIMEOUT, "timeout"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
    };
    // Name the fields as this API spells them.
    let message = s.message().replace("max_new_tokens", "max_tokens");
    let param = (code == StatusCode::BAD_REQUEST)
        .then(|| param_in(&message, chat))
        .flatten();
    ApiError {
        status: code,
        message,
        kind,
        param,
    }
}

/// The request field a validation message from the generation path is
/// about (the first that the message names, most specific first).
fn param_in(message: &str, chat: bool) -> Option<String> {
    let prompt = if chat { "messages" } else { "prompt" };
    [
        ("max_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("stop sequence", "stop"),
        ("gamma", "gamma"),
        ("max_branches", "max_branches"),
        ("token id", prompt),
        ("prompt", prompt),
    ]
    .into_iter()
    .find(|(needle, _)| message.contains(needle))
    .map(|(_, param)| param.to_string())
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg, "invalid_request_error")
}

/// A 400 naming the request field `param`.
fn refuse(param: impl Into<String>, msg: impl Into<String>) -> ApiError {
    ApiError {
        param: Some(param.into()),
        ..bad(msg)
    }
}

/// A JSON object of the request read field by field: each field is taken
/// once (null counts as absent, a wrong type is a 400 naming the field), and
/// whatever no one took is refused by [`Fields::finish`] as an unrecognized
/// argument, as OpenAI refuses unknown parameters.
struct Fields {
    map: Map<String, Value>,
    /// Where the object sits in the request, prefixed to the names in
    /// errors: `""` for the body, `"messages.[2]."` for a message
    /// (OpenAI's own spelling of such paths).
    at: String,
}

impl Fields {
    /// The request body.
    fn body(body: Result<Json<Value>, JsonRejection>) -> Result<Self, ApiError> {
        let Json(v) = body.map_err(|e| bad(format!("invalid JSON body: {}", e.body_text())))?;
        match v {
            Value::Object(map) => Ok(Fields {
                map,
                at: String::new(),
            }),
            _ => Err(bad("the request body must be a JSON object")),
        }
    }

    /// An object inside the request, found at `path`.
    fn nested(v: Value, path: &str) -> Result<Self, ApiError> {
        match v {
            Value::Object(map) => Ok(Fields {
                map,
                at: format!("{path}."),
            }),
            _ => Err(refuse(path, format!("{path} must be an object"))),
        }
    }

    /// The full name of field `key`.
    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.at)
    }

    /// The field's value; `None` when absent or null.
    fn raw(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    /// The field as a `T`; `None` when absent or null.
    fn get<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>, ApiError> {
        let Some(v) = self.raw(key) else {
            return Ok(None);
        };
        serde_json::from_value(v).map(Some).map_err(|e| {
            let name = self.name(key);
            refuse(&name, format!("invalid value for {name}: {e}"))
        })
    }

    /// A field that must be absent, null or `ok`; anything else is refused
    /// with `why`.
    fn only(&mut self, key: &str, ok: impl Fn(&Value) -> bool, why: &str) -> Result<(), ApiError> {
        match self.raw(key) {
            Some(v) if !ok(&v) => {
                let name = self.name(key);
                Err(refuse(
                    &name,
                    format!("{name} = {v} is not supported: {why}"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Refuses the first field that no one took.
    fn finish(self) -> Result<(), ApiError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => {
                let name = self.name(k);
                Err(refuse(
                    &name,
                    format!("Unrecognized request argument supplied: {name}"),
                ))
            }
        }
    }
}

fn is_zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

/// The fields shared by completions and chat completions.
struct Common {
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    stream: bool,
    stop: Vec<String>,
    seed: Option<u64>,
    // Extensions: the speculative settings.
    mode: pb::Mode,
    gamma: Option<u32>,
    max_branches: Option<u32>,
    top_k: Option<u32>,
    greedy_drafts: bool,
}

fn common(f: &mut Fields) -> Result<Common, ApiError> {
    if let Some(m) = f.get::<String>("model")?
        && m != MODEL_ID
        && !m.is_empty()
    {
        return Err(refuse(
            "model",
            format!("unknown model {m:?}: this server serves {MODEL_ID:?}"),
        ));
    }
    f.only(
        "n",
        |v| v.as_u64() == Some(1),
        "this server returns one choice per request (n = 1)",
    )?;
    for key in ["presence_penalty", "frequency_penalty"] {
        f.only(
            key,
            is_zero,
            "penalties are not applied; only 0 is accepted",
        )?;
    }
    f.only(
        "logit_bias",
        is_empty,
        "logit biases are not applied; only an empty object is accepted",
    )?;
    // Harmless: an end-user id for OpenAI's abuse monitoring; not used.
    f.get::<String>("user")?;
    let stream = f.get::<bool>("stream")?.unwrap_or(false);
    if let Some(v) = f.raw("stream_options") {
        if !stream {
            return Err(refuse(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ));
        }
        // Usage is always on the final chunk; nothing to change.
        let mut o = Fields::nested(v, "stream_options")?;
        o.get::<bool>("include_usage")?;
        o.get::<bool>("include_obfuscation")?;
        o.finish()?;
    }
    let stop = match f.raw("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(v)) => v
            .into_iter()
            .map(|s| match s {
                Value::String(s) => Ok(s),
                _ => Err(refuse("stop", "stop must be a string or a list of strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(refuse("stop", "stop must be a string or a list of strings"));
        }
    };
    if stop.len() > MAX_STOP_SEQUENCES {
        return Err(refuse(
            "stop",
            format!(
                "{} stop sequences given; at most {MAX_STOP_SEQUENCES} are allowed",
                stop.len()
            ),
        ));
    }
    // OpenAI's seed is a (possibly negative) integer: any 64 bits will do.
    let seed = match f.raw("seed") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(|s| s as u64))
                .ok_or_else(|| refuse("seed", format!("seed must be an integer, got {v}")))?,
        ),
    };
    let max_tokens = f.get::<u32>("max_tokens")?;
    let max_tokens = f.get::<u32>("max_completion_tokens")?.or(max_tokens);
    let mode = match f.get::<String>("mode")?.as_deref() {
        None | Some("duodecoding") => pb::Mode::Duodecoding,
        Some("speculative") => pb::Mode::Speculative,
        Some("autoregressive") => pb::Mode::Autoregressive,
        Some(other) => {
            return Err(refuse(
                "mode",
                format!("unknown mode {other:?}: use duodecoding, speculative or autoregressive"),
            ));
        }
    };
    Ok(Common {
        max_tokens,
        temperature: f.get("temperature")?,
        top_p: f.get("top_p")?,
        stream,
        stop,
        seed,
        mode,
        gamma: f.get("gamma")?,
        max_branches: f.get("max_branches")?,
        top_k: f.get("top_k")?,
        greedy_drafts: f.get("greedy_drafts")?.unwrap_or(false),
    })
}

fn to_request(
    prompt: generate_request::Prompt,
    c: &Common,
    stop: Vec<String>,
    logprobs: bool,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(prompt),
        max_new_tokens: c.max_tokens.unwrap_or(16),
        // OpenAI's default temperature is 1.
        temperature: c.temperature.unwrap_or(1.0),
        top_k: c.top_k.unwrap_or(0),
        top_p: c.top_p,
        seed: c.seed.unwrap_or_else(rand_seed),
        stop,
        mode: c.mode as i32,
        gamma: c.gamma,
        max_branches: c.max_branches,
        logprobs,
        greedy_drafts: c.greedy_drafts,
    }
}

/// A seed for requests that give none (OpenAI sampling is unseeded by default).
fn rand_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// `prompt` as OpenAI's API takes it: a string, or a list of token ids; a
/// list of one of these (as the `openai` SDK may send them).
fn completion_prompt(p: Value) -> Result<generate_request::Prompt, ApiError> {
    let as_ids = |v: &[Value]| -> Option<Vec<u32>> {
        v.iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    match p {
        Value::String(s) => Ok(generate_request::Prompt::Text(s)),
        Value::Array(v) if v.is_empty() => Err(refuse("prompt", "the prompt is empty")),
        Value::Array(mut v) if v.len() == 1 && (v[0].is_string() || v[0].is_array()) => {
            completion_prompt(v.remove(0))
        }
        Value::Array(v) if v.iter().all(Value::is_number) => as_ids(&v)
            .map(|ids| generate_request::Prompt::TokenIds(pb::TokenIds { ids }))
            .ok_or_else(|| refuse("prompt", "token ids must be non-negative integers")),
        _ => Err(refuse(
            "prompt",
            "prompt must be a string, a list of one string, or a list of token ids (batches are not supported)",
        )),
    }
}

fn finish_reason(f: i32) -> &'static str {
    match pb::FinishReason::try_from(f) {
        Ok(pb::FinishReason::Length) => "length",
        _ => "stop",
    }
}

fn created() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn stats_json(s: &pb::Stats) -> Value {
    json!({
        "mode": pb::Mode::try_from(s.mode).map(|m| m.as_str_name()).unwrap_or(""),
        "rounds": s.rounds,
        "drafted": s.drafted,
        "accepted": s.accepted,
        "mean_accepted": s.mean_accepted,
        "ttft_ms": s.ttft_ms,
        "total_ms": s.total_ms,
        "tokens_per_s": s.tokens_per_s,
        "gamma_mean": s.gamma_mean,
        "draft_worker": s.draft_worker,
        "target_idle_ms": s.target_idle_ms,
        "draft_idle_ms": s.draft_idle_ms,
    })
}

/// OpenAI's `usage` object for a generation's stats.
fn usage(s: &pb::Stats) -> Value {
    json!({"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens, "total_tokens": s.prompt_tokens + s.new_tokens})
}

/// finish_reason, usage and duo stats of a stream chunk: set on the final
/// chunk only, null before.
fn final_fields(f: Option<&pb::Final>) -> (Value, Value, Value) {
    match f {
        Some(f) => {
            let s = f.stats.clone().unwrap_or_default();
            (
                Value::from(finish_reason(f.finish_reason)),
                usage(&s),
                stats_json(&s),
            )
        }
        None => (Value::Null, Value::Null, Value::Null),
    }
}

/// How a generation's output is shaped for the client.
#[derive(Clone)]
struct Reply {
    /// Chat completion objects (else text completions).
    chat: bool,
    /// The generated tokens' log-probabilities under the target.
    logprobs: bool,
    /// Completions with `echo`: the prompt's text, put before the output.
    echo: Option<String>,
}

/// The emitted tokens' log-probabilities (the target's, of the sampled
/// token; no alternatives), in the completions or the chat shape.
fn logprobs_json(orch: &Orchestrator, chat: bool, ids: &[u32], lps: &[f32]) -> Value {
    let tokens = ids
        .iter()
        .map(|&t| orch.0.tokenizer.decode(&[t]).unwrap_or_default());
    if chat {
        let content: Vec<Value> = tokens
            .zip(lps)
            .map(|(s, lp)| json!({"token": s, "logprob": lp, "bytes": s.as_bytes(), "top_logprobs": []}))
            .collect();
        json!({"content": content, "refusal": null})
    } else {
        let tokens: Vec<String> = tokens.collect();
        json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": null, "text_offset": null})
    }
}

/// One streamed chunk.
fn chunk_json(orch: &Orchestrator, id: &str, c: &pb::GenerateChunk, r: &Reply) -> Value {
    let (finish, usage, stats) = final_fields(c.r#final.as_ref());
    let logprobs = if r.logprobs {
        logprobs_json(orch, r.chat, &c.token_ids, &c.logprobs)
    } else {
        Value::Null
    };
    let (object, choice) = if r.chat {
        (
            "chat.completion.chunk",
            json!({"index": 0, "delta": {"role": "assistant", "content": c.text}, "logprobs": logprobs, "finish_reason": finish}),
        )
    } else {
        (
            "text_completion",
            json!({"text": c.text, "index": 0, "finish_reason": finish, "logprobs": logprobs}),
        )
    };
    json!({
        "id": id, "object": object, "created": created(), "model": MODEL_ID,
        "choices": [choice], "usage": usage, "duo": stats,
    })
}

/// A whole (unary) response.
fn whole_json(orch: &Orchestrator, id: &str, g: &pb::GenerateResponse, r: &Reply) -> Value {
    let s = g.stats.clone().unwrap_or_default();
    let finish = finish_reason(g.finish_reason);
    let logprobs = if r.logprobs {
        logprobs_json(orch, r.chat, &g.token_ids, &g.logprobs)
    } else {
        Value::Null
    };
    let (object, choice) = if r.chat {
        (
            "chat.completion",
            json!({"index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": logprobs, "finish_reason": finish}),
        )
    } else {
        let text = format!("{}{}", r.echo.as_deref().unwrap_or(""), g.text);
        (
            "text_completion",
            json!({"text": text, "index": 0, "finish_reason": finish, "logprobs": logprobs}),
        )
    };
    json!({
        "id": id, "object": object, "created": created(), "model": MODEL_ID,
        "choices": [choice], "usage": usage(&s), "duo": stats_json(&s),
    })
}

/// Runs a request: unary JSON, or SSE chunks.
async fn respond(
    orch: Orchestrator,
    req: pb::GenerateRequest,
    stream: bool,
    reply: Reply,
) -> Result<Response, ApiError> {
    let id = format!(
        "{}-{:x}",
        if reply.chat { "chatcmpl" } else { "cmpl" },
        rand_seed()
    );
    let chat = reply.chat;
    if !stream {
        let (alive, _alive) = mpsc::channel(1);
        let (g, worker) = orch
            .run(req, Output::Unary(alive))
            .await
            .map_err(|s| status_error(s, chat))?;
        let resp = pb::GenerateResponse {
            text: g.text,
            token_ids: g.tokens,
            logprobs: g.logprobs,
            finish_reason: duo_rpc::convert::finish_to_pb(g.finish_reason) as i32,
            stats: Some(duo_rpc::convert::stats_to_pb(&g.stats, &worker)),
        };
        return Ok(Json(whole_json(&orch, &id, &resp, &reply)).into_response());
    }
    // Nothing is sent before the first chunk: an error known by then
    // (invalid, overloaded, target down) gets its own status, not a 200
    // with an error event.
    let mut rx = orch.spawn_stream(req);
    let first = match rx.recv().await {
        Some(Ok(first)) => first,
        Some(Err(s)) => return Err(status_error(s, chat)),
        None => {
            return Err(status_error(
                Status::internal("the generation ended without a message"),
                chat,
            ));
        }
    };
    // `echo`: the prompt leads the first chunk's text.
    let mut echo = reply.echo.clone();
    let events = tokio_stream::once(Ok(first))
        .chain(ReceiverStream::new(rx))
        .map(move |item| -> Result<Event, Infallible> {
            Ok(match item {
                Ok(mut c) => {
                    if let Some(e) = echo.take() {
                        c.text.insert_str(0, &e);
                    }
                    Event::default().data(chunk_json(&orch, &id, &c, &reply).to_string())
                }
                Err(s) => Event::default().data(status_error(s, chat).body().to_string()),
            })
        })
        .chain(tokio_stream::once(Ok(Event::default().data("[DONE]"))));
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn completions(
    State(orch): State<Orchestrator>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let mut f = Fields::body(body)?;
    let prompt = match f.raw("prompt") {
        Some(p) => completion_prompt(p)?,
        None => return Err(refuse("prompt", "prompt is required")),
    };
    let c = common(&mut f)?;
    let echo = f.get::<bool>("echo")?.unwrap_or(false);
    f.only(
        "suffix",
        is_empty,
        "this server only appends to the prompt (no insertion)",
    )?;
    f.only(
        "best_of",
        |v| v.as_u64() == Some(1),
        "this server generates one candidate per request (best_of = 1)",
    )?;
    let logprobs = f.get::<u32>("logprobs")?;
    if let Some(n) = logprobs
        && n > 1
    {
        return Err(refuse(
            "logprobs",
            format!(
                "logprobs = {n} is not supported: top-{n} alternatives are not computed; use 0 or 1 (the log-probability of each generated token)"
            ),
        ));
    }
    if echo && logprobs.is_some() {
        return Err(refuse(
            "echo",
            "echo together with logprobs is not supported: the prompt tokens' log-probabilities are not computed",
        ));
    }
    f.finish()?;
    let echo = echo.then(|| match &prompt {
        generate_request::Prompt::Text(t) => t.clone(),
        generate_request::Prompt::TokenIds(ids) => {
            orch.0.tokenizer.decode(&ids.ids).unwrap_or_default()
        }
    });
    let stop = c.stop.clone();
    let req = to_request(prompt, &c, stop, logprobs.is_some());
    let reply = Reply {
        chat: false,
        logprobs: logprobs.is_some(),
        echo,
    };
    respond(orch, req, c.stream, reply).await
}

/// Chat roles the template renders; `developer` is spoken as `system`.
const ROLES: &str = "system, developer, user or assistant";

/// One chat message, rendered by the template.
fn chat_message(t: &ChatTemplate, i: usize, m: Value) -> Result<String, ApiError> {
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
fn chat_stops(user: Vec<String>, template: Vec<String>) -> Result<Vec<String>, ApiError> {
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

async fn chat_completions(
    State(orch): State<Orchestrator>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
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
    let mut prompt = String::new();
    for (i, m) in messages.into_iter().enumerate() {
        prompt.push_str(&chat_message(template, i, m)?);
    }
    prompt.push_str(&template.assistant_prefix());
    let c = common(&mut f)?;
    let logprobs = f.get::<bool>("logprobs")?.unwrap_or(false);
    f.only(
        "top_logprobs",
        is_zero,
        "alternatives are not computed; use logprobs: true for the log-probability of each generated token",
    )?;
    let no_tools = "this server does not call tools or functions";
    for key in ["tools", "functions"] {
        f.only(key, is_empty, no_tools)?;
    }
    for key in ["tool_choice", "function_call"] {
        f.only(key, |v| v == "none", no_tools)?;
    }
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
    // End the assistant's turn where the template would start the next one.
    let stop = chat_stops(c.stop.clone(), template.stops())?;
    let req = to_request(generate_request::Prompt::Text(prompt), &c, stop, logprobs);
    let reply = Reply {
        chat: true,
        logprobs,
        echo: None,
    };
    respond(orch, req, c.stream, reply).await
}

fn model_object() -> Value {
    json!({"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "duodecoding"})
}

async fn models(State(_): State<Orchestrator>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object()]}))
}

async fn model(
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    if id == MODEL_ID {
        Ok(Json(model_object()))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the model {id:?} does not exist: this server serves {MODEL_ID:?}"),
            "invalid_request_error",
        ))
    }
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
