//! `POST /v1/completions`.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::response::Response;
use duo_rpc::pb::{self, generate_request};
use serde_json::Value;

use super::error::{ApiError, refuse};
use super::fields::{Fields, is_empty};
use super::reply::{Reply, respond};
use super::request::{common, to_request};
use crate::Orchestrator;

/// `prompt` as OpenAI's API takes it: a string, or a list of token ids; a
/// list of one of these (as the `openai` SDK may send them).
pub(super) fn completion_prompt(p: Value) -> Result<generate_request::Prompt, ApiError> {
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

pub(super) async fn completions(
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
        include_usage: c.include_usage,
    };
    respond(orch, req, c.stream, reply).await
}
