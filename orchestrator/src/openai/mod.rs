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
//! read field by field ([`fields::Fields`]), an option this server cannot honour
//! (`logit_bias`, `tools`, `best_of` > 1, ...) is a 400 whose error object
//! names it in `param`, and a field nobody knows is a 400 "Unrecognized
//! request argument supplied", as OpenAI answers. The table of options is in
//! docs/reliability.md.

mod chat;
mod completions;
mod error;
mod fields;
mod reply;
mod request;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::Orchestrator;
pub use chat::ChatTemplate;
use error::ApiError;

/// The model name clients see.
pub const MODEL_ID: &str = "duo";

/// The largest request body the OpenAI endpoints read (2 MiB); a larger
/// one is answered 413 with this limit named.
pub(super) const BODY_LIMIT: usize = 2 << 20;

pub fn router(orch: Orchestrator) -> Router {
    Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
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
        Err(ApiError::model_not_found(&id, None))
    }
}
