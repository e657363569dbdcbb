//! orchestrator: the public gRPC endpoint. Owns the tokenizer, opens one
//! session on the target-service and one on a draft-service per generation,
//! and runs the core's speculative loop across both (the same loop the
//! in-process engine runs), streaming verified text to the client.
//!
//! Modules, by role:
//!
//! - `args`: the command-line flags.
//! - `server`: `main`, building the state, serving gRPC and HTTP.
//! - `service`: the shared state and the `duo.v1.Generation` gRPC calls.
//! - `validate`: a request to the core's parameters, checked.
//! - `limits`: the model limits, learned from the target.
//! - `generate`: one generation: admission, the loop, its output.
//! - `health`: the orchestrator's own health.
//! - [`openai`]: the OpenAI-compatible HTTP API.
//! - [`pool`]: the draft worker pool; `failover`: a generation's draft
//!   moving between workers; `remote`: the core's two seams over gRPC (a
//!   worker's status read back as the core's error kind, once). Errors
//!   reach clients through `duo_rpc::status::engine_status` (gRPC) and
//!   `openai::error::status_error` (HTTP).
//! - `telemetry`: the Prometheus metrics; `hold`: a test seam.

mod args;
mod failover;
mod generate;
mod health;
mod hold;
mod limits;
pub mod openai;
pub mod pool;
mod remote;
mod server;
mod service;
mod telemetry;
mod validate;

pub use args::Args;
pub use hold::HoldGate;
pub use server::{Seams, main, serve, serve_with};
pub use service::Orchestrator;
