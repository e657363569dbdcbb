//! What the draft and target workers share: loading the model with its
//! `WorkerInfo`, checking a caller's tokenizer, and reading session
//! streams (a runtime error becomes a status through
//! [`crate::status::engine_status`]).

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use duo_core::engine::{check_folder_tokenizer, fit_to_tokenizer};
use duo_core::runtime::{CausalLm, ModelOptions};
use duo_core::tokenizer::{Tokenizer, model_tokenizer};
use tonic::{Status, Streaming};

use crate::convert::model_to_pb;
use crate::pb;

/// A worker's loaded model and how it describes itself.
pub struct LoadedWorker {
    lm: Mutex<CausalLm>,
    pub info: pb::WorkerInfo,
}

impl LoadedWorker {
    /// Loads the tokenizer (for its fingerprint) and the model, and fits
    /// the model to the tokenizer ([`fit_to_tokenizer`]: a tokenizer that
    /// is not the model's is refused; a padded LM head's extra rows are cut
    /// off). `tokenizer` is a `tokenizer.json` or a model folder
    /// ([`Tokenizer::load`]); `None`: the model folder's own
    /// ([`model_tokenizer`]; an error for a folder without one).
    pub fn load(
        role: &str,
        model: &Path,
        tokenizer: Option<&Path>,
        opts: &ModelOptions,
        devices: Vec<String>,
        max_sessions: usize,
    ) -> Result<Self, String> {
        let tok_path = match tokenizer {
            Some(p) => p.to_path_buf(),
            None => model_tokenizer(model).map_err(|e| e.to_string())?,
        };
        let tok = Tokenizer::load(&tok_path).map_err(|e| e.to_string())?;
        let mut lm = CausalLm::load(model, opts).map_err(|e| e.to_string())?;
        check_folder_tokenizer(model, &tok).map_err(|e| e.to_string())?;
        fit_to_tokenizer(&mut lm, &tok).map_err(|e| e.to_string())?;
        tracing::info!(
            role,
            tokenizer = %tok_path.display(),
            fingerprint = %tok.fingerprint(),
            vocab = lm.info().vocab_size,
            lm_head_rows = lm.info().padded_vocab_size,
            eos_token_ids = ?lm.info().eos_token_ids,
            "tokenizer loaded"
        );
        let info = pb::WorkerInfo {
            role: role.into(),
            model: Some(model_to_pb(lm.info())),
            tokenizer_fingerprint: tok.fingerprint(),
            devices,
            sessions_open: 0,
            max_sessions: max_sessions as u32,
            version: env!("CARGO_PKG_VERSION").into(),
        };
        Ok(Self {
            lm: Mutex::new(lm),
            info,
        })
    }

    /// The model, for one call at a time (a poisoned lock is recovered: the
    /// model holds no per-call state).
    pub fn lm(&self) -> MutexGuard<'_, CausalLm> {
        self.lm.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn vocab_size(&self) -> u32 {
        self.info.model.as_ref().map_or(0, |m| m.vocab_size)
    }

    /// FAILED_PRECONDITION unless the caller's vocabulary and tokenizer
    /// fingerprint equal this worker's (mixing vocabularies corrupts output).
    /// The vocabularies are the ids in use: a worker whose LM head is padded
    /// beyond the shared tokenizer uses the tokenizer's ids, as its peer
    /// does (see `ModelInfo.padded_vocab_size`).
    pub fn check_caller(&self, vocab_size: u32, fingerprint: &str) -> Result<(), Status> {
        let ours = self.vocab_size();
        if vocab_size != ours || fingerprint != self.info.tokenizer_fingerprint {
            return Err(Status::failed_precondition(format!(
                "incompatible {} worker: it has vocabulary {ours} / tokenizer {} but the caller has {vocab_size} / {fingerprint}; draft and target must share one tokenizer",
                self.info.role, self.info.tokenizer_fingerprint
            )));
        }
        Ok(())
    }
}

/// What a session stream yielded.
pub enum Next<T> {
    Message(T),
    /// The client closed the stream or went away.
    Closed,
    /// Nothing arrived for the session's time-to-live.
    Idle(Duration),
}

/// The next request of a session stream, waiting at most `ttl`.
pub async fn next_request<T>(inbound: &mut Streaming<T>, ttl: Option<Duration>) -> Next<T> {
    let next = async {
        match inbound.message().await {
            Ok(Some(m)) => Next::Message(m),
            _ => Next::Closed,
        }
    };
    match ttl {
        Some(ttl) => tokio::time::timeout(ttl, next)
            .await
            .unwrap_or(Next::Idle(ttl)),
        None => next.await,
    }
}

/// The next request of a session, or `None` when the session is over:
/// the client left, or it sent nothing for `ttl` (then it is told so with
/// DEADLINE_EXCEEDED before the session closes).
pub async fn next_or_close<T, R>(
    inbound: &mut Streaming<T>,
    ttl: Option<Duration>,
    replies: &tokio::sync::mpsc::Sender<Result<R, Status>>,
    role: &str,
) -> Option<T> {
    match next_request(inbound, ttl).await {
        Next::Message(m) => Some(m),
        Next::Closed => None,
        Next::Idle(ttl) => {
            tracing::info!("closing an idle {role} session");
            let _ = replies.send(Err(idle_status(role, ttl))).await;
            None
        }
    }
}

/// The status that ends an idle session.
pub fn idle_status(role: &str, ttl: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "{role} session closed: nothing arrived for {} s (its time-to-live, --session-ttl-s)",
        ttl.as_secs()
    ))
}
