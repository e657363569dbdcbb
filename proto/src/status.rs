//! Errors on the wire: the one mapping between the core's [`ErrorKind`]s
//! and gRPC codes, both ways, and the one way an [`EngineError`] (or a
//! `RuntimeError`, through it) becomes a [`Status`]. The workers answer
//! with it, the orchestrator answers its clients with it, and the
//! orchestrator reads its workers' statuses back with [`remote_kind`]; the
//! HTTP API maps the resulting statuses on (`orchestrator::openai::error`).

use duo_core::engine::{EngineError, ErrorKind};
use tonic::{Code, Status};

/// The gRPC code of a kind of failure.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The kind of failure a remote side's status means. What a service says
/// on purpose about a request or its session keeps its kind: the request
/// is invalid, the deployment does not fit, the side is out of room, the
/// session's time-to-live ran out. Anything else means the side is
/// unavailable: UNAVAILABLE itself, and the INTERNAL, UNKNOWN or CANCELLED
/// that a dropped connection surfaces as (a worker that failed
/// internally is, to this generation, as good as gone).
pub fn remote_kind(code: Code) -> ErrorKind {
    match code {
        Code::InvalidArgument => ErrorKind::InvalidArgument,
        Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        Code::ResourceExhausted => ErrorKind::ResourceExhausted,
        Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
        _ => ErrorKind::Unavailable,
    }
}

/// An error as the caller sees it: the code of its kind
/// ([`EngineError::kind`]) and [`EngineError::client_message`] (a refusal
/// in the refuser's own words, an unavailable side named).
pub fn engine_status(e: impl Into<EngineError>) -> Status {
    let e = e.into();
    Status::new(code(e.kind()), e.client_message())
}

#[cfg(test)]
mod tests {
    use duo_core::runtime::RuntimeError;
    use duo_core::speculative::verify::VerifyError;

    use super::*;

    const KINDS: [ErrorKind; 7] = [
        ErrorKind::InvalidArgument,
        ErrorKind::FailedPrecondition,
        ErrorKind::ResourceExhausted,
        ErrorKind::Unavailable,
        ErrorKind::DeadlineExceeded,
        ErrorKind::Cancelled,
        ErrorKind::Internal,
    ];

    #[test]
    fn what_a_side_says_on_purpose_keeps_its_kind_and_a_broken_side_is_unavailable() {
        for kind in KINDS {
            let back = remote_kind(code(kind));
            match kind {
                ErrorKind::Cancelled | ErrorKind::Internal => {
                    assert_eq!(back, ErrorKind::Unavailable, "{kind:?}")
                }
                _ => assert_eq!(back, kind, "{kind:?}"),
            }
        }
        for c in [
            Code::Unknown,
            Code::Aborted,
            Code::DataLoss,
            Code::Unimplemented,
        ] {
            assert_eq!(remote_kind(c), ErrorKind::Unavailable, "{c:?}");
        }
    }

    #[test]
    fn engine_errors_become_statuses_of_their_kind() {
        let cases: [(EngineError, Code, &str); 7] = [
            (
                EngineError::Invalid("max_new_tokens must be at least 1".into()),
                Code::InvalidArgument,
                "max_new_tokens must be at least 1",
            ),
            (
                EngineError::Side {
                    side: "target-service",
                    kind: ErrorKind::ResourceExhausted,
                    message: "the target's KV cache budget is full".into(),
                },
                Code::ResourceExhausted,
                "the target's KV cache budget is full",
            ),
            (
                EngineError::Side {
                    side: "target-service",
                    kind: ErrorKind::DeadlineExceeded,
                    message: "session closed: nothing arrived for 1 s".into(),
                },
                Code::DeadlineExceeded,
                "session closed: nothing arrived for 1 s",
            ),
            (
                EngineError::unavailable("draft worker", "its thread ended"),
                Code::Unavailable,
                "draft worker unavailable: its thread ended",
            ),
            (
                EngineError::Cancelled,
                Code::Cancelled,
                "generation cancelled",
            ),
            (
                RuntimeError::Ort("out of memory".into()).into(),
                Code::Internal,
                "ONNX Runtime: out of memory",
            ),
            (
                RuntimeError::from(VerifyError::ImpossibleDraft {
                    position: 0,
                    token: 3,
                })
                .into(),
                Code::InvalidArgument,
                "draft token 3 at position 0 has zero probability under its proposal",
            ),
        ];
        for (e, code, message) in cases {
            let s = engine_status(e);
            assert_eq!((s.code(), s.message()), (code, message));
        }
        // A worker's runtime error goes the same way.
        let s = engine_status(RuntimeError::Invalid("empty input".into()));
        assert_eq!(
            (s.code(), s.message()),
            (Code::InvalidArgument, "empty input")
        );
    }
}
