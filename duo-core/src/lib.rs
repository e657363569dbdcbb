//! DuoDecoding core.
//!
//! - [`runtime`]: ONNX Runtime provisioning and the decoder-only causal-LM
//!   runner (KV cache, rollback, branches).
//! - [`sampling`]: logits processing and seeded sampling.
//! - [`tokenizer`]: `tokenizer.json` loading and streaming detokenization.
//! - [`chat`]: rendering a model's chat template (`apply_chat_template`).
//! - [`speculative`]: the speculative algorithm as pure logic with no I/O:
//!   verification, the DuoDecoding round state machine, the drafting policy,
//!   the budget controller and termination.
//! - [`gpu_like`]: the gpu-like stand-in pair (exact logits, GPU-shaped costs).
//! - [`engine`]: the in-process engine that drives [`speculative`] over [`runtime`]
//!   in three modes (autoregressive, speculative, duodecoding).

pub mod chat;
pub mod engine;
pub mod gpu_like;
mod onnx_graph;
pub mod runtime;
pub mod sampling;
pub mod speculative;
pub mod stats;
pub mod tokenizer;
