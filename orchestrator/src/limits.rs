//! The model limits, learned from the target-service: its `Describe`
//! (refused when its tokenizer is not ours), the context, vocabulary and
//! end-of-text ids it reports, and how much KV cache one generation asks
//! the target for.

use std::sync::Mutex;

use duo_core::engine::driver::{self, GenerateParams, Limits};
use duo_core::speculative::budget::BudgetController;
use duo_rpc::pb;
use duo_rpc::status::engine_status;
use tonic::Status;

use crate::remote::Side;
use crate::service::{Orchestrator, State};

impl Orchestrator {
    /// Model limits, learned from the target on first use.
    pub(crate) async fn limits(&self) -> Result<Limits, Status> {
        if let Some(l) = self
            .0
            .limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(l);
        }
        let info = self.describe_target().await?;
        Ok(self.remember_limits(&info))
    }

    /// The target's `Describe`, refused when its tokenizer differs from ours.
    pub(crate) async fn describe_target(&self) -> Result<pb::WorkerInfo, Status> {
        let info = self
            .0
            .target
            .clone()
            .describe(pb::DescribeRequest {})
            .await
            .map_err(|s| engine_status(Side::target(&self.0.target_address).error(&s)))?
            .into_inner();
        check_worker(&self.0, &info)?;
        Ok(info)
    }

    /// Learns (or refreshes) the model limits from the target's info.
    pub(crate) fn remember_limits(&self, info: &pb::WorkerInfo) -> Limits {
        let model = info.model.clone().unwrap_or_default();
        let limits = Limits {
            context_len: if model.context_len == 0 {
                driver::DEFAULT_CONTEXT_LEN
            } else {
                model.context_len as usize
            },
            vocab_size: model.vocab_size as usize,
            // Every end id the target declares (generation_config.json's
            // list: e.g. an instruct model's end of turn), else the
            // tokenizer's end-of-text token.
            eos: if model.eos_token_ids.is_empty() {
                self.0.tokenizer.eos_id().into_iter().collect()
            } else {
                model.eos_token_ids.clone()
            },
        };
        self.0
            .pool
            .set_target_vocab_rows(model.padded_vocab_size.max(model.vocab_size));
        *self.0.limits.lock().unwrap_or_else(|p| p.into_inner()) = Some(limits.clone());
        limits
    }
}

/// The most tokens the target's cache holds for this generation: the prompt,
/// every token it may generate, and the longest unverified tail the budget
/// may draft beyond them, within the models' context.
pub(crate) fn session_max_context(
    prompt: &[u32],
    params: &GenerateParams,
    limits: &Limits,
    budget: &Mutex<BudgetController>,
) -> u32 {
    let tail = budget
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .config()
        .max_gamma;
    let tokens = (prompt.len() + params.max_new_tokens + tail).min(limits.context_len);
    u32::try_from(tokens).unwrap_or(u32::MAX)
}

/// Refuses a worker whose vocabulary or tokenizer differs from ours.
fn check_worker(st: &State, info: &pb::WorkerInfo) -> Result<(), Status> {
    let vocab = info.model.as_ref().map_or(0, |m| m.vocab_size as usize);
    if info.tokenizer_fingerprint != st.fingerprint || vocab < st.tokenizer.vocab_size() {
        return Err(Status::failed_precondition(format!(
            "incompatible {} worker: vocabulary {vocab}, tokenizer {}; the orchestrator's tokenizer has {} tokens, fingerprint {}. Draft, target and orchestrator must share one tokenizer.json",
            info.role,
            info.tokenizer_fingerprint,
            st.tokenizer.vocab_size(),
            st.fingerprint
        )));
    }
    Ok(())
}
