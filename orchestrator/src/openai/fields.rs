//! A request body read field by field: every field taken once, refused by
//! name when it cannot be honoured, and any field left over refused as
//! unrecognized.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::{ApiError, bad, refuse};

/// A JSON object of the request read field by field: each field is taken
/// once (null counts as absent, a wrong type is a 400 naming the field), and
/// whatever no one took is refused by [`Fields::finish`] as an unrecognized
/// argument, as OpenAI refuses unknown parameters.
pub(super) struct Fields {
    map: Map<String, Value>,
    /// Where the object sits in the request, prefixed to the names in
    /// errors: `""` for the body, `"messages.[2]."` for a message
    /// (OpenAI's own spelling of such paths).
    at: String,
}

impl Fields {
    /// The request body.
    pub(super) fn body(body: Result<Json<Value>, JsonRejection>) -> Result<Self, ApiError> {
        let Json(v) = body.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    e.status(),
                    format!(
                        "the request body is larger than this server's limit of {} bytes: \
                         send a shorter prompt",
                        super::BODY_LIMIT
                    ),
                    "invalid_request_error",
                )
            } else {
                bad(format!("invalid JSON body: {}", e.body_text()))
            }
        })?;
        match v {
            Value::Object(map) => Ok(Fields {
                map,
                at: String::new(),
            }),
            _ => Err(bad("the request body must be a JSON object")),
        }
    }

    /// An object inside the request, found at `path`.
    pub(super) fn nested(v: Value, path: &str) -> Result<Self, ApiError> {
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
    pub(super) fn raw(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    /// The field as a `T`; `None` when absent or null.
    pub(super) fn get<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>, ApiError> {
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
    pub(super) fn only(
        &mut self,
        key: &str,
        ok: impl Fn(&Value) -> bool,
        why: &str,
    ) -> Result<(), ApiError> {
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
    pub(super) fn finish(self) -> Result<(), ApiError> {
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

pub(super) fn is_zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}

pub(super) fn is_empty(v: &Value) -> bool {
    match v {
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}
