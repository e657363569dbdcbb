//! Errors as the client sees them: the core's [`EngineError`] and a
//! target-service failure, each as one gRPC [`Status`] (the HTTP API maps
//! these statuses on in `openai::error`).

use duo_core::engine::EngineError;
use tonic::Status;

/// A generation's error: INVALID_ARGUMENT, UNAVAILABLE naming the side,
/// CANCELLED, else INTERNAL.
pub(crate) fn engine_status(e: EngineError) -> Status {
    match e {
        EngineError::Invalid(m) => Status::invalid_argument(m),
        EngineError::Unavailable(side, m) => {
            Status::unavailable(format!("{side} unavailable: {m}"))
        }
        EngineError::Cancelled => Status::cancelled("generation cancelled"),
        other => Status::internal(other.to_string()),
    }
}

/// A target failure as the client should see it: the target's own status
/// for bad input, else UNAVAILABLE saying where the target was expected.
pub(crate) fn target_status(address: &str, s: Status) -> Status {
    match s.code() {
        tonic::Code::InvalidArgument
        | tonic::Code::FailedPrecondition
        | tonic::Code::ResourceExhausted => s,
        _ => Status::unavailable(format!(
            "target-service unavailable at {address}: {}; the orchestrator reconnects when it is back, retry then",
            s.message()
        )),
    }
}
