//! Running decoder-only ONNX models step by step with their KV cache.
//!
//! - [`env`]: loading the ONNX Runtime library.
//! - [`discover`]: what a model is before it runs: which ONNX file a path
//!   names, what its config files declare, what its graph says.
//! - [`model`]: [`CausalLm`], a model in the Hugging Face Optimum convention
//!   whose shape (layers, KV heads, head dim, KV dtype, vocabulary) is
//!   discovered from the graph.
//! - [`edit`]: the cache's structural edits and the logits-row selection,
//!   run as small graphs on the model's own device, and the binding code
//!   every run goes through (the cache never leaves the device).
//! - [`kv`]: [`Sequence`] (one context and its cache: append, truncate) and
//!   [`Branches`] (k continuations forked from one sequence, run as a batch).
//! - [`step`]: the forwards a drafter runs ([`Forwards`]), on the model
//!   itself or moved to a scheduler's thread ([`StepClient`]) that runs
//!   several drafters' steps as one forward ([`run_steps`]).

pub mod discover;
pub mod edit;
pub mod env;
pub mod kv;
pub mod model;
pub mod step;

pub use kv::{Branches, Sequence};
pub use model::{
    BatchItem, BatchPart, CausalLm, Device, HostTraffic, Logits, ModelInfo, ModelOptions,
};
pub use step::{Forwards, Step, StepClient, StepResult, run_steps};

/// Errors of the model runtime. Messages say what is missing and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The ONNX Runtime shared library could not be loaded.
    #[error("{0}")]
    Library(String),
    /// The model file is missing or unreadable.
    #[error("model not found: {0}")]
    ModelMissing(String),
    /// The model's inputs/outputs do not follow the decoder-only KV-cache convention.
    #[error("model {path} is not a decoder-only ONNX model with a KV cache: {reason}")]
    Incompatible { path: String, reason: String },
    /// The requested execution provider could not be used.
    #[error("execution provider {provider} unavailable: {reason}")]
    Provider { provider: String, reason: String },
    /// A call that breaks the runtime's contract (e.g. empty input, too long a context).
    #[error("invalid model call: {0}")]
    Invalid(String),
    /// The block's tail cannot be verified against its proposals (e.g. one
    /// distribution too few, or a drafted token its proposal rules out).
    #[error(transparent)]
    Verify(#[from] crate::speculative::verify::VerifyError),
    /// ONNX Runtime failed while running the model.
    #[error("ONNX Runtime: {0}")]
    Ort(String),
}

impl From<ort::Error> for RuntimeError {
    fn from(e: ort::Error) -> Self {
        RuntimeError::Ort(e.to_string())
    }
}
