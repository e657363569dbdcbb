//! Errors in OpenAI's shape: the error object with its HTTP status, and a
//! generation's gRPC status mapped onto it.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tonic::{Code, Status};

/// An error in OpenAI's shape with the matching HTTP status; `param` names
/// the request field at fault, as OpenAI's errors do.
pub(super) struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    /// OpenAI's machine-readable `code` (e.g. `model_not_found`), if any.
    code: Option<&'static str>,
}

/// Seconds a client is told to wait before retrying a 429 or 503.
const RETRY_AFTER_SECS: &str = "1";

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>, kind: &'static str) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// A request for a model this server does not serve: 404
    /// `model_not_found`, as OpenAI answers it (for `GET /v1/models/{id}`
    /// and for a request body's `model` alike).
    pub(super) fn model_not_found(model: &str, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "unknown model {model:?}: the model does not exist on this server, which serves {:?}",
                super::MODEL_ID
            ),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: Some("model_not_found"),
        }
    }

    /// OpenAI's error object.
    pub(super) fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
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
pub(super) fn status_error(s: Status, chat: bool) -> ApiError {
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
        code: None,
    }
}

/// The request field a validation message from the generation path is
/// about (the first that the message names, most specific first).
pub(super) fn param_in(message: &str, chat: bool) -> Option<String> {
    let prompt = if chat { "messages" } else { "prompt" };
    [
        ("max_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("stop sequence", "stop"),
        ("gamma", "gamma"),
        ("max_branches", "max_branches"),
        ("max_hedges", "max_hedges"),
        ("token id", prompt),
        ("prompt", prompt),
    ]
    .into_iter()
    .find(|(needle, _)| message.contains(needle))
    .map(|(_, param)| param.to_string())
}

pub(super) fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg, "invalid_request_error")
}

/// A 400 naming the request field `param`.
pub(super) fn refuse(param: impl Into<String>, msg: impl Into<String>) -> ApiError {
    ApiError {
        param: Some(param.into()),
        ..bad(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_openai_errors_once() {
        let cases = [
            (Code::InvalidArgument, 400, "invalid_request_error"),
            (Code::FailedPrecondition, 500, "server_error"),
            (Code::ResourceExhausted, 429, "rate_limit_error"),
            (Code::Unavailable, 503, "service_unavailable"),
            (Code::DeadlineExceeded, 408, "timeout"),
            (Code::Cancelled, 408, "timeout"),
            (Code::Internal, 500, "server_error"),
            (Code::Unknown, 500, "server_error"),
        ];
        for (code, http, kind) in cases {
            let e = status_error(Status::new(code, "the side's words"), false);
            assert_eq!((e.status.as_u16(), e.kind), (http, kind), "{code:?}");
            assert_eq!(e.message, "the side's words");
        }
    }

    #[test]
    fn a_bad_request_names_the_field_as_this_api_spells_it() {
        let e = status_error(
            Status::invalid_argument("max_new_tokens must be at least 1"),
            true,
        );
        assert_eq!(e.message, "max_tokens must be at least 1");
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = status_error(Status::invalid_argument("the prompt is empty"), true);
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = status_error(Status::resource_exhausted("the prompt is long"), false);
        assert_eq!(e.param, None, "only a 400 names a field");
    }

    #[test]
    fn overload_and_unavailability_say_when_to_retry() {
        for (code, retry) in [
            (Code::ResourceExhausted, true),
            (Code::Unavailable, true),
            (Code::InvalidArgument, false),
        ] {
            let resp = status_error(Status::new(code, "x"), false).into_response();
            assert_eq!(
                resp.headers()
                    .get(axum::http::header::RETRY_AFTER)
                    .is_some(),
                retry,
                "{code:?}"
            );
        }
    }
}
