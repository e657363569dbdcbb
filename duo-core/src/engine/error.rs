//! A generation's errors and what kind of failure each is.
//!
//! [`EngineError`] keeps what went wrong where: a bad request, the local
//! runtime or tokenizer, a broken round protocol, the consumer leaving, or
//! a side — a draft or target worker — that failed or refused, with the
//! [`ErrorKind`] that side gave. Every error has one kind
//! ([`EngineError::kind`]); the services turn kinds into gRPC codes in one
//! place (`duo_rpc::status`), and the core knows nothing of gRPC.

use crate::runtime::RuntimeError;
use crate::speculative::round::RoundError;
use crate::tokenizer::TokenizerError;

/// What kind of failure an error is: who is at fault and whether retrying
/// can help. The kinds are gRPC's status codes that the services use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request cannot be served as given.
    InvalidArgument,
    /// The deployment does not fit together (e.g. draft and target
    /// tokenizers differ): not the request's fault.
    FailedPrecondition,
    /// Out of room now (sessions, KV cache): retry later.
    ResourceExhausted,
    /// A side cannot be reached or went away: retry later.
    Unavailable,
    /// Something took longer than it was allowed.
    DeadlineExceeded,
    /// The caller went away.
    Cancelled,
    /// A bug or an unexpected failure.
    Internal,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorKind::InvalidArgument => "refused the request",
            ErrorKind::FailedPrecondition => "does not fit this deployment",
            ErrorKind::ResourceExhausted => "is out of room",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::DeadlineExceeded => "timed out",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "failed",
        })
    }
}

/// Errors of a generation.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be served as given; the message says what to fix.
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("speculative protocol error: {0}")]
    Protocol(#[from] RoundError),
    /// A side of the generation (a draft or target worker, the draft
    /// thread) failed or refused: which side, the kind of failure it gave,
    /// and its message.
    #[error("{side} {kind}: {message}")]
    Side {
        side: &'static str,
        kind: ErrorKind,
        message: String,
    },
    /// The consumer stopped listening.
    #[error("generation cancelled")]
    Cancelled,
}

impl EngineError {
    /// `side` cannot be reached or went away.
    pub fn unavailable(side: &'static str, message: impl Into<String>) -> Self {
        EngineError::Side {
            side,
            kind: ErrorKind::Unavailable,
            message: message.into(),
        }
    }

    /// The kind of failure: a side's own; the request's fault for a bad
    /// request, a model call that breaks the runtime's contract and a tail
    /// that cannot be verified; [`ErrorKind::Internal`] for anything else
    /// that fails locally.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Invalid(_)
            | EngineError::Runtime(RuntimeError::Invalid(_) | RuntimeError::Verify(_)) => {
                ErrorKind::InvalidArgument
            }
            EngineError::Side { kind, .. } => *kind,
            EngineError::Cancelled => ErrorKind::Cancelled,
            EngineError::Runtime(_) | EngineError::Tokenizer(_) | EngineError::Protocol(_) => {
                ErrorKind::Internal
            }
        }
    }

    /// What a client is told: a request refused by this process or by a
    /// side, in the words of whoever refused it (a side's message as that
    /// side gave it); anything else as it displays (an unavailable side
    /// named).
    pub fn client_message(&self) -> String {
        match self {
            EngineError::Invalid(m) | EngineError::Runtime(RuntimeError::Invalid(m)) => m.clone(),
            EngineError::Side { kind, message, .. } if *kind != ErrorKind::Unavailable => {
                message.clone()
            }
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::speculative::verify::VerifyError;

    #[test]
    fn every_error_has_its_kind() {
        let verify = RuntimeError::from(VerifyError::ImpossibleDraft {
            position: 1,
            token: 7,
        });
        let cases = [
            (EngineError::Invalid("x".into()), ErrorKind::InvalidArgument),
            (
                EngineError::Runtime(RuntimeError::Invalid("x".into())),
                ErrorKind::InvalidArgument,
            ),
            (EngineError::Runtime(verify), ErrorKind::InvalidArgument),
            (
                EngineError::Runtime(RuntimeError::Ort("x".into())),
                ErrorKind::Internal,
            ),
            (
                EngineError::Protocol(RoundError::EmptyBranch),
                ErrorKind::Internal,
            ),
            (EngineError::Cancelled, ErrorKind::Cancelled),
            (
                EngineError::unavailable("draft", "gone"),
                ErrorKind::Unavailable,
            ),
            (
                EngineError::Side {
                    side: "target-service",
                    kind: ErrorKind::ResourceExhausted,
                    message: "full".into(),
                },
                ErrorKind::ResourceExhausted,
            ),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e}");
        }
    }

    #[test]
    fn clients_read_refusals_in_the_refusers_words_and_unavailable_sides_named() {
        let refused = EngineError::Side {
            side: "target-service",
            kind: ErrorKind::ResourceExhausted,
            message: "the target's KV cache budget is full".into(),
        };
        assert_eq!(
            refused.client_message(),
            "the target's KV cache budget is full"
        );
        assert_eq!(
            refused.to_string(),
            "target-service is out of room: the target's KV cache budget is full"
        );
        let gone = EngineError::unavailable("draft worker", "its thread ended");
        assert_eq!(
            gone.client_message(),
            "draft worker unavailable: its thread ended"
        );
        assert_eq!(EngineError::Invalid("bad".into()).client_message(), "bad");
        let verify = EngineError::Runtime(
            VerifyError::ProposalLength {
                expected: 2,
                got: 1,
            }
            .into(),
        );
        assert_eq!(
            verify.client_message(),
            "expected 2 proposal distributions (one per draft token), got 1"
        );
        assert_eq!(
            EngineError::Cancelled.client_message(),
            "generation cancelled"
        );
    }
}
