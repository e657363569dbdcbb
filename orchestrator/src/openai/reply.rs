//! A generation's output in OpenAI's shapes: one JSON object (unary) or
//! server-sent events (streaming), for completions and chat completions.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use duo_rpc::pb;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::MODEL_ID;
use super::error::{ApiError, status_error};
use super::request::rand_seed;
use crate::Orchestrator;
use crate::generate::Output;

pub(super) fn finish_reason(f: i32) -> &'static str {
    match pb::FinishReason::try_from(f) {
        Ok(pb::FinishReason::Length) => "length",
        _ => "stop",
    }
}

pub(super) fn created() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn stats_json(s: &pb::Stats) -> Value {
    json!({
        "mode": duo_rpc::convert::mode_from_pb(s.mode)
            .map(|m| m.to_string())
            .unwrap_or_default(),
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
pub(super) fn usage(s: &pb::Stats) -> Value {
    json!({"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens, "total_tokens": s.prompt_tokens + s.new_tokens})
}

/// How a generation's output is shaped for the client.
#[derive(Clone)]
pub(super) struct Reply {
    /// Chat completion objects (else text completions).
    pub(super) chat: bool,
    /// The generated tokens' log-probabilities under the target.
    pub(super) logprobs: bool,
    /// Completions with `echo`: the prompt's text, put before the output.
    pub(super) echo: Option<String>,
    /// Streams end with a chunk carrying `usage` and no choices (OpenAI's
    /// `stream_options.include_usage`); without it no chunk has `usage`.
    pub(super) include_usage: bool,
}

/// The emitted tokens' log-probabilities (the target's, of the sampled
/// token; no alternatives), in the completions or the chat shape.
pub(super) fn logprobs_json(orch: &Orchestrator, chat: bool, ids: &[u32], lps: &[f32]) -> Value {
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

/// One streamed chunk; `first`: the stream's first (a chat delta names
/// its role there only, as OpenAI's do). The final chunk carries
/// `finish_reason` and the `duo` stats; `usage` rides on a chunk of its own
/// ([`usage_chunk_json`]), or `null` here when the client asked for it.
pub(super) fn chunk_json(
    orch: &Orchestrator,
    id: &str,
    c: &pb::GenerateChunk,
    r: &Reply,
    first: bool,
) -> Value {
    let (finish, stats) = match c.r#final.as_ref() {
        Some(f) => (
            Value::from(finish_reason(f.finish_reason)),
            stats_json(&f.stats.clone().unwrap_or_default()),
        ),
        None => (Value::Null, Value::Null),
    };
    let logprobs = if r.logprobs {
        logprobs_json(orch, r.chat, &c.token_ids, &c.logprobs)
    } else {
        Value::Null
    };
    let (object, choice) = if r.chat {
        let mut delta = serde_json::Map::new();
        if first {
            delta.insert("role".into(), "assistant".into());
        }
        if !c.text.is_empty() || first {
            delta.insert("content".into(), c.text.clone().into());
        }
        (
            "chat.completion.chunk",
            json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}),
        )
    } else {
        (
            "text_completion",
            json!({"text": c.text, "index": 0, "finish_reason": finish, "logprobs": logprobs}),
        )
    };
    let mut chunk = json!({
        "id": id, "object": object, "created": created(), "model": MODEL_ID,
        "choices": [choice], "duo": stats,
    });
    if r.include_usage {
        chunk["usage"] = Value::Null;
    }
    chunk
}

/// The last chunk of a stream whose client asked for usage
/// (`stream_options.include_usage`): no choices, the generation's usage.
pub(super) fn usage_chunk_json(id: &str, r: &Reply, stats: &pb::Stats) -> Value {
    let object = if r.chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    json!({
        "id": id, "object": object, "created": created(), "model": MODEL_ID,
        "choices": [], "usage": usage(stats),
    })
}

/// A chunk worth sending: it ends the stream, brings text, or brings the
/// log-probabilities of tokens whose text is still held back (a possible
/// stop sequence). Text held back and then cut by a stop sequence sends
/// nothing.
fn worth_sending(c: &pb::GenerateChunk, r: &Reply) -> bool {
    c.r#final.is_some() || !c.text.is_empty() || (r.logprobs && !c.token_ids.is_empty())
}

/// A whole (unary) response.
pub(super) fn whole_json(
    orch: &Orchestrator,
    id: &str,
    g: &pb::GenerateResponse,
    r: &Reply,
) -> Value {
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
pub(super) async fn respond(
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
    let mut sent_first = false;
    let events = tokio_stream::once(Ok(first))
        .chain(ReceiverStream::new(rx))
        .map(move |item| -> Vec<Result<Event, Infallible>> {
            let event = |v: Value| Ok(Event::default().data(v.to_string()));
            match item {
                Ok(mut c) => {
                    if let Some(e) = echo.take() {
                        c.text.insert_str(0, &e);
                    }
                    if !worth_sending(&c, &reply) {
                        return Vec::new();
                    }
                    let first = !sent_first;
                    sent_first = true;
                    let mut events = vec![event(chunk_json(&orch, &id, &c, &reply, first))];
                    if reply.include_usage
                        && let Some(f) = &c.r#final
                    {
                        let stats = f.stats.clone().unwrap_or_default();
                        events.push(event(usage_chunk_json(&id, &reply, &stats)));
                    }
                    events
                }
                Err(s) => vec![event(status_error(s, chat).body())],
            }
        });
    let events = futures_util::StreamExt::flat_map(events, futures_util::stream::iter)
        .chain(tokio_stream::once(Ok(Event::default().data("[DONE]"))));
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}
