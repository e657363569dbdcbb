//! The fields completions and chat completions share, and the `duo.v1`
//! `GenerateRequest` they become.

use std::time::{SystemTime, UNIX_EPOCH};

use duo_rpc::pb::{self, generate_request};
use serde_json::Value;

use super::MODEL_ID;
use super::error::{ApiError, refuse};
use super::fields::{Fields, is_empty, is_zero};
use crate::validate::MAX_STOP_SEQUENCES;

/// The fields shared by completions and chat completions.
pub(super) struct Common {
    pub(super) max_tokens: Option<u32>,
    pub(super) temperature: Option<f32>,
    pub(super) top_p: Option<f32>,
    pub(super) stream: bool,
    /// `stream_options.include_usage`: a last chunk with `usage` and no
    /// choices, and `usage: null` on the others.
    pub(super) include_usage: bool,
    pub(super) stop: Vec<String>,
    pub(super) seed: Option<u64>,
    // Extensions: the speculative settings.
    pub(super) mode: pb::Mode,
    pub(super) gamma: Option<u32>,
    pub(super) max_branches: Option<u32>,
    pub(super) max_hedges: Option<u32>,
    pub(super) top_k: Option<u32>,
    pub(super) greedy_drafts: bool,
}

pub(super) fn common(f: &mut Fields) -> Result<Common, ApiError> {
    if let Some(m) = f.get::<String>("model")?
        && m != MODEL_ID
        && !m.is_empty()
    {
        return Err(ApiError::model_not_found(&m, Some("model")));
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
    let mut include_usage = false;
    if let Some(v) = f.raw("stream_options") {
        if !stream {
            return Err(refuse(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ));
        }
        let mut o = Fields::nested(v, "stream_options")?;
        include_usage = o.get::<bool>("include_usage")?.unwrap_or(false);
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
        include_usage,
        stop,
        seed,
        mode,
        gamma: f.get("gamma")?,
        max_branches: f.get("max_branches")?,
        max_hedges: f.get("max_hedges")?,
        top_k: f.get("top_k")?,
        greedy_drafts: f.get("greedy_drafts")?.unwrap_or(false),
    })
}

pub(super) fn to_request(
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
        max_hedges: c.max_hedges,
        logprobs,
        greedy_drafts: c.greedy_drafts,
    }
}

/// A seed for requests that give none (OpenAI sampling is unseeded by default).
pub(super) fn rand_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
