//! OpenAI-compatible HTTP API on the orchestrator: `POST /v1/completions`
//! (unary or server-sent events), `POST /v1/chat/completions` (a simple,
//! configurable chat template) and `GET /v1/models`.
//!
//! A thin translation layer: every request becomes a `duo.v1`
//! `GenerateRequest` and runs through the same [`Orchestrator::run`] as the
//! gRPC API, so validation, cancellation (a closed connection stops the
//! generation and frees both sessions) and limits are shared.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use duo_rpc::pb::{self, generate_request};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::{Orchestrator, Output};

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
    ApiError(
        StatusCode::NOT_FOUND,
        format!(
            "unknown path {}: this server serves POST /v1/completions, POST /v1/chat/completions, GET /v1/models and GET /metrics",
            uri.path()
        ),
        "invalid_request_error",
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
        "invalid_request_error",
    )
}

/// An error in OpenAI's shape with the matching HTTP status.
struct ApiError(StatusCode, String, &'static str);

/// Seconds a client is told to wait before retrying a 429 or 503.
const RETRY_AFTER_SECS: &str = "1";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"message": self.1, "type": self.2, "param": null, "code": null}});
        let mut resp = (self.0, Json(body)).into_response();
        if matches!(
            self.0,
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

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
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
        ApiError(code, message, kind)
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into(), "invalid_request_error")
}

/// `prompt` and `stop` accept a string or a list, as in OpenAI's API.
/// (`Many` first: an untagged `One(Value)` would take a list too.)
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    Many(Vec<T>),
    One(T),
}

/// The fields shared by completions and chat completions.
#[derive(Deserialize, Default)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stop: Option<OneOrMany<String>>,
    seed: Option<u64>,
    // Extensions: the speculative settings.
    mode: Option<String>,
    gamma: Option<u32>,
    max_branches: Option<u32>,
    top_k: Option<u32>,
    #[serde(default)]
    greedy_drafts: bool,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: OneOrMany<Value>,
    #[serde(default)]
    logprobs: Option<u32>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Value,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(flatten)]
    common: Common,
}

fn to_request(
    prompt: generate_request::Prompt,
    c: &Common,
    logprobs: bool,
) -> Result<pb::GenerateRequest, ApiError> {
    if c.n.unwrap_or(1) != 1 {
        return Err(bad("only n = 1 is supported"));
    }
    if let Some(m) = &c.model
        && m != MODEL_ID
        && !m.is_empty()
    {
        return Err(bad(format!(
            "unknown model {m:?}: this server serves {MODEL_ID:?}"
        )));
    }
    let mode = match c.mode.as_deref() {
        None | Some("duodecoding") => pb::Mode::Duodecoding,
        Some("speculative") => pb::Mode::Speculative,
        Some("autoregressive") => pb::Mode::Autoregressive,
        Some(other) => {
            return Err(bad(format!(
                "unknown mode {other:?}: use duodecoding, speculative or autoregressive"
            )));
        }
    };
    Ok(pb::GenerateRequest {
        prompt: Some(prompt),
        max_new_tokens: c.max_completion_tokens.or(c.max_tokens).unwrap_or(16),
        // OpenAI's default temperature is 1.
        temperature: c.temperature.unwrap_or(1.0),
        top_k: c.top_k.unwrap_or(0),
        top_p: c.top_p,
        seed: c.seed.unwrap_or_else(rand_seed),
        stop: match &c.stop {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        },
        mode: mode as i32,
        gamma: c.gamma,
        max_branches: c.max_branches,
        logprobs,
        greedy_drafts: c.greedy_drafts,
    })
}

/// A seed for requests that give none (OpenAI sampling is unseeded by default).
fn rand_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn completion_prompt(p: OneOrMany<Value>) -> Result<generate_request::Prompt, ApiError> {
    let as_ids = |v: &[Value]| -> Option<Vec<u32>> {
        v.iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    match p {
        OneOrMany::One(Value::String(s)) => Ok(generate_request::Prompt::Text(s)),
        OneOrMany::Many(v) if v.len() == 1 && v[0].is_string() => Ok(
            generate_request::Prompt::Text(v[0].as_str().unwrap_or_default().to_string()),
        ),
        OneOrMany::Many(v) if !v.is_empty() && v.iter().all(Value::is_number) => as_ids(&v)
            .map(|ids| generate_request::Prompt::TokenIds(pb::TokenIds { ids }))
            .ok_or_else(|| bad("token ids must be non-negative integers")),
        OneOrMany::Many(v) if v.is_empty() => Err(bad("the prompt is empty")),
        _ => Err(bad(
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

fn logprobs_json(orch: &Orchestrator, ids: &[u32], lps: &[f32]) -> Value {
    let tokens: Vec<String> = ids
        .iter()
        .map(|&t| orch.0.tokenizer.decode(&[t]).unwrap_or_default())
        .collect();
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": null, "text_offset": null})
}

/// Runs a request: unary JSON, or SSE chunks built by `chunk`.
async fn respond(
    orch: Orchestrator,
    req: pb::GenerateRequest,
    stream: bool,
    object: &'static str,
    chunk: fn(&Orchestrator, &str, &pb::GenerateChunk, bool) -> Value,
    whole: fn(&Orchestrator, &str, &pb::GenerateResponse, bool) -> Value,
) -> Result<Response, ApiError> {
    let id = format!(
        "{}-{:x}",
        if object == "chat" { "chatcmpl" } else { "cmpl" },
        rand_seed()
    );
    let logprobs = req.logprobs;
    if !stream {
        let (alive, _alive) = mpsc::channel(1);
        let (g, worker) = orch.run(req, Output::Unary(alive)).await?;
        let resp = pb::GenerateResponse {
            text: g.text,
            token_ids: g.tokens,
            logprobs: g.logprobs,
            finish_reason: duo_rpc::convert::finish_to_pb(g.finish_reason) as i32,
            stats: Some(duo_rpc::convert::stats_to_pb(&g.stats, &worker)),
        };
        return Ok(Json(whole(&orch, &id, &resp, logprobs)).into_response());
    }
    // Nothing is sent before the first chunk: an error known by then
    // (invalid, overloaded, target down) gets its own status, not a 200
    // with an error event.
    let mut rx = orch.spawn_stream(req);
    let first = match rx.recv().await {
        Some(Ok(first)) => first,
        Some(Err(s)) => return Err(s.into()),
        None => return Err(Status::internal("the generation ended without a message").into()),
    };
    let events = tokio_stream::once(Ok(first))
        .chain(ReceiverStream::new(rx))
        .map(move |item| -> Result<Event, Infallible> {
            Ok(match item {
                Ok(c) => Event::default().data(chunk(&orch, &id, &c, logprobs).to_string()),
                Err(s) => {
                    let e = ApiError::from(s);
                    Event::default()
                        .data(json!({"error": {"message": e.1, "type": e.2}}).to_string())
                }
            })
        })
        .chain(tokio_stream::once(Ok(Event::default().data("[DONE]"))));
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn completions(
    State(orch): State<Orchestrator>,
    body: Result<Json<CompletionRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(r) = body.map_err(|e| bad(format!("invalid JSON body: {}", e.body_text())))?;
    let prompt = completion_prompt(r.prompt)?;
    let req = to_request(prompt, &r.common, r.logprobs.is_some())?;
    respond(
        orch,
        req,
        r.common.stream,
        "text_completion",
        completion_chunk,
        completion_whole,
    )
    .await
}

fn completion_chunk(orch: &Orchestrator, id: &str, c: &pb::GenerateChunk, logprobs: bool) -> Value {
    let (finish, usage, stats) = final_fields(c.r#final.as_ref());
    json!({
        "id": id, "object": "text_completion", "created": created(), "model": MODEL_ID,
        "choices": [{"text": c.text, "index": 0, "finish_reason": finish,
                     "logprobs": if logprobs { logprobs_json(orch, &c.token_ids, &c.logprobs) } else { Value::Null }}],
        "usage": usage, "duo": stats,
    })
}

fn completion_whole(
    orch: &Orchestrator,
    id: &str,
    r: &pb::GenerateResponse,
    logprobs: bool,
) -> Value {
    let s = r.stats.clone().unwrap_or_default();
    json!({
        "id": id, "object": "text_completion", "created": created(), "model": MODEL_ID,
        "choices": [{"text": r.text, "index": 0, "finish_reason": finish_reason(r.finish_reason),
                     "logprobs": if logprobs { logprobs_json(orch, &r.token_ids, &r.logprobs) } else { Value::Null }}],
        "usage": usage(&s),
        "duo": stats_json(&s),
    })
}

async fn chat_completions(
    State(orch): State<Orchestrator>,
    body: Result<Json<ChatRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(r) = body.map_err(|e| bad(format!("invalid JSON body: {}", e.body_text())))?;
    if r.messages.is_empty() {
        return Err(bad("messages is empty"));
    }
    let mut prompt = String::new();
    for m in &r.messages {
        let content = match &m.content {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            _ => {
                return Err(bad(
                    "message content must be a string or a list of text parts",
                ));
            }
        };
        prompt.push_str(&orch.0.chat_template.render(&m.role, &content));
    }
    prompt.push_str(&orch.0.chat_template.assistant_prefix());
    let mut common = r.common;
    // End the assistant's turn where the template would start the next one.
    let mut stop = match common.stop.take() {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    stop.extend(orch.0.chat_template.stops());
    common.stop = Some(OneOrMany::Many(stop));
    let req = to_request(
        generate_request::Prompt::Text(prompt),
        &common,
        r.logprobs.unwrap_or(false),
    )?;
    respond(orch, req, common.stream, "chat", chat_chunk, chat_whole).await
}

fn chat_chunk(_: &Orchestrator, id: &str, c: &pb::GenerateChunk, _logprobs: bool) -> Value {
    let (finish, usage, stats) = final_fields(c.r#final.as_ref());
    json!({
        "id": id, "object": "chat.completion.chunk", "created": created(), "model": MODEL_ID,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": c.text}, "finish_reason": finish}],
        "usage": usage, "duo": stats,
    })
}

fn chat_whole(_: &Orchestrator, id: &str, r: &pb::GenerateResponse, _logprobs: bool) -> Value {
    let s = r.stats.clone().unwrap_or_default();
    json!({
        "id": id, "object": "chat.completion", "created": created(), "model": MODEL_ID,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": finish_reason(r.finish_reason)}],
        "usage": usage(&s),
        "duo": stats_json(&s),
    })
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
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("the model {id:?} does not exist: this server serves {MODEL_ID:?}"),
            "invalid_request_error",
        ))
    }
}

/// How chat messages become a prompt: each message is
/// `{ROLE}.\n{content}\n\n` with the role upper-cased (the play-script form
/// the bundled Shakespeare model knows), then `{ASSISTANT}.\n` opens the
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
            other => other.to_uppercase(),
        }
    }

    pub fn render(&self, role: &str, content: &str) -> String {
        format!("{}.\n{}\n\n", self.speaker(role), content.trim())
    }

    pub fn assistant_prefix(&self) -> String {
        format!("{}.\n", self.speaker("assistant"))
    }

    pub fn stops(&self) -> Vec<String> {
        vec!["\n\n".into()]
    }
}
