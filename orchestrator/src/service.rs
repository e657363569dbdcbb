//! The `duo.v1.Generation` gRPC service: the orchestrator's shared state and
//! the three calls (`Generate`, `GenerateStream`, `Info`). A generation
//! itself runs in [`crate::generate`]; requests are checked in
//! [`crate::validate`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use duo_core::engine::driver::Limits;
use duo_core::speculative::budget::BudgetController;
use duo_core::tokenizer::Tokenizer;
use duo_rpc::convert::{finish_to_pb, stats_to_pb};
use duo_rpc::pb;
use duo_rpc::pb::generation_server::Generation as GenerationApi;
use duo_rpc::pb::target_client::TargetClient;
use duo_rpc::serve::SessionLimiter;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::generate::Output;
use crate::hold::HoldGate;
use crate::openai;
use crate::pool::DraftPool;

/// What every request shares, built once by [`crate::serve_with`].
pub(crate) struct State {
    pub(crate) tokenizer: Tokenizer,
    pub(crate) fingerprint: String,
    pub(crate) target: TargetClient<Channel>,
    pub(crate) target_address: String,
    pub(crate) pool: Arc<DraftPool>,
    pub(crate) draft_timeout: Duration,
    pub(crate) target_timeout: Duration,
    pub(crate) max_prompt_bytes: usize,
    /// The model limits, once learned from the target ([`crate::limits`]).
    pub(crate) limits: Mutex<Option<Limits>>,
    /// The seed of every generation's cost estimates: each generation
    /// adapts its own copy and folds it back in when it ends
    /// (`BudgetController::absorb`).
    pub(crate) budget: Mutex<BudgetController>,
    pub(crate) limiter: SessionLimiter,
    pub(crate) chat_template: openai::ChatTemplate,
    pub(crate) hold: Arc<HoldGate>,
}

/// The orchestrator: a cheap handle on its [`State`], served over gRPC
/// (this module) and HTTP ([`crate::openai`]).
#[derive(Clone)]
pub struct Orchestrator(pub(crate) Arc<State>);

#[tonic::async_trait]
impl GenerationApi for Orchestrator {
    type GenerateStreamStream = ReceiverStream<Result<pb::GenerateChunk, Status>>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let (alive, _alive) = mpsc::channel(1);
        let (g, worker) = self.run(request.into_inner(), Output::Unary(alive)).await?;
        Ok(Response::new(pb::GenerateResponse {
            text: g.text,
            token_ids: g.tokens,
            logprobs: g.logprobs,
            finish_reason: finish_to_pb(g.finish_reason) as i32,
            stats: Some(stats_to_pb(&g.stats, &worker)),
        }))
    }

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        Ok(Response::new(ReceiverStream::new(
            self.spawn_stream(request.into_inner()),
        )))
    }

    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let st = &self.0;
        let target = self.describe_target().await?;
        let limits = self.remember_limits(&target);
        let drafts = st.pool.describe_healthy().await;
        Ok(Response::new(pb::InfoResponse {
            target: Some(target),
            drafts,
            vocab_size: limits.vocab_size as u32,
            tokenizer_fingerprint: st.fingerprint.clone(),
            capabilities: vec![
                "mode:duodecoding".into(),
                "mode:speculative".into(),
                "mode:autoregressive".into(),
                "sampling:temperature,top_k,top_p,seed".into(),
                "stop_sequences".into(),
                "logprobs".into(),
                "streaming".into(),
            ],
            context_len: limits.context_len as u32,
            draft_pool: st.pool.states(),
        }))
    }
}
