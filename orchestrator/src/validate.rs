//! Request validation, before any queue: a `GenerateRequest` becomes the
//! core's prompt ids and [`GenerateParams`], checked against the model
//! limits, or INVALID_ARGUMENT naming what to fix. The HTTP API
//! ([`crate::openai`]) goes through the same checks.

use duo_core::engine::driver::{self, GenerateParams, Limits};
use duo_core::sampling::SamplingParams;
use duo_rpc::convert::mode_from_pb;
use duo_rpc::pb::{self, generate_request};
use duo_rpc::status::engine_status;
use tonic::Status;

use crate::service::Orchestrator;

/// Most stop sequences per request, and their longest length in bytes.
pub(crate) const MAX_STOP_SEQUENCES: usize = 16;
const MAX_STOP_BYTES: usize = 256;

impl Orchestrator {
    /// Turns a request into the core's parameters and prompt ids.
    fn parse(&self, req: &pb::GenerateRequest) -> Result<(Vec<u32>, GenerateParams), Status> {
        let prompt = match &req.prompt {
            Some(generate_request::Prompt::Text(t)) => {
                if t.is_empty() {
                    return Err(Status::invalid_argument(
                        "the prompt is empty: give text or token ids",
                    ));
                }
                if t.len() > self.0.max_prompt_bytes {
                    return Err(Status::invalid_argument(format!(
                        "the prompt is {} bytes; at most {} are accepted (--max-prompt-bytes): shorten it",
                        t.len(),
                        self.0.max_prompt_bytes
                    )));
                }
                // As transformers encodes it (a BOS where the model's
                // tokenizer adds one).
                self.0
                    .tokenizer
                    .encode_prompt(t)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?
            }
            Some(generate_request::Prompt::TokenIds(ids)) => ids.ids.clone(),
            None => {
                return Err(Status::invalid_argument(
                    "no prompt: set `text` or `token_ids`",
                ));
            }
        };
        let mode = mode_from_pb(req.mode).map_err(Status::invalid_argument)?;
        // The limit is on the caller's sequences: the chat template's own
        // end of turn, which the HTTP chat endpoint adds, does not count.
        let template = self.0.chat_template.stops();
        let given = req.stop.iter().filter(|s| !template.contains(s)).count();
        if given > MAX_STOP_SEQUENCES {
            return Err(Status::invalid_argument(format!(
                "{given} stop sequences given; at most {MAX_STOP_SEQUENCES} are allowed"
            )));
        }
        if let Some(s) = req.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(Status::invalid_argument(format!(
                "a stop sequence of {} bytes is too long (at most {MAX_STOP_BYTES})",
                s.len()
            )));
        }
        let top_p = req.top_p.unwrap_or(1.0);
        let params = GenerateParams {
            max_new_tokens: req.max_new_tokens as usize,
            sampling: SamplingParams {
                temperature: req.temperature,
                top_k: req.top_k as usize,
                top_p,
            },
            seed: req.seed,
            stop: req.stop.clone(),
            mode,
            gamma: req.gamma.map(|g| g as usize),
            max_branches: req.max_branches.map_or(4, |b| b as usize),
            max_hedges: req.max_hedges.map(|h| h as usize),
            logprobs: req.logprobs,
            greedy_drafts: req.greedy_drafts,
        };
        Ok((prompt, params))
    }

    /// Validates a request without running it.
    pub(crate) async fn check(
        &self,
        req: &pb::GenerateRequest,
    ) -> Result<(Vec<u32>, GenerateParams, Limits), Status> {
        let limits = self.limits().await?;
        let (prompt, params) = self.parse(req)?;
        driver::validate(&prompt, &params, &limits).map_err(engine_status)?;
        Ok((prompt, params, limits))
    }
}
