//! One generation across the two services: admission (the generation
//! limiter, a draft session from the pool, a target session), the core's
//! loop ([`driver::run`]) on a blocking thread with the remote sides, and
//! its output to a unary or streaming client.

use std::time::Instant;

use duo_core::engine::driver::{self, GenerateParams, Limits};
use duo_core::engine::{DraftSide, Generation, Mode};
use duo_rpc::convert::{finish_to_pb, mode_from_pb, stats_to_pb};
use duo_rpc::pb;
use duo_rpc::status::engine_status;
use tokio::sync::mpsc;
use tonic::Status;

use crate::failover::PooledDraft;

/// How far a finished generation moves the shared budget seed toward its
/// own estimates (`BudgetController::absorb`): the seed is an average over
/// the last few generations.
const SEED_WEIGHT: f64 = 0.5;
use crate::limits::session_max_context;
use crate::remote::{RemoteTarget, Side};
use crate::service::Orchestrator;
use crate::telemetry::{self, Abandoned};

/// Where a generation's output goes.
pub(crate) enum Output {
    /// Chunks to a streaming client.
    Stream(mpsc::Sender<Result<pb::GenerateChunk, Status>>),
    /// A unary call: the receiver lives as long as the call.
    Unary(mpsc::Sender<()>),
}

impl Output {
    /// Whether the client is gone.
    fn is_closed(&self) -> bool {
        match self {
            Output::Stream(tx) => tx.is_closed(),
            Output::Unary(alive) => alive.is_closed(),
        }
    }
}

impl Orchestrator {
    /// Runs one generation. `out` receives the stream, or (unary) only
    /// signals liveness: when its receiver is dropped — the client went away
    /// or its deadline passed — the generation stops at the next round and
    /// both sessions are freed.
    pub(crate) async fn run(
        &self,
        req: pb::GenerateRequest,
        out: Output,
    ) -> Result<(Generation, String), Status> {
        use tracing::Instrument;
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mode = mode_from_pb(req.mode).ok();
        let span = tracing::info_span!("request", id, mode = ?mode);
        // Counted even when the caller drops this future (its client left).
        let mut abandoned = Abandoned {
            mode,
            finished: false,
        };
        let res = self.run_inner(req, out).instrument(span.clone()).await;
        abandoned.finished = true;
        if let Err(s) = &res {
            span.in_scope(|| tracing::info!(code = ?s.code(), "request failed: {}", s.message()));
        }
        telemetry::record_request(mode, &res);
        res
    }

    /// Admission, then the loop. The order matters: a bad request is
    /// refused before it takes a generation slot, and the draft session is
    /// opened before the target's (the draft may wait in the pool's queue;
    /// the target session must not sit idle, counted against the target's
    /// limit, meanwhile).
    async fn run_inner(
        &self,
        req: pb::GenerateRequest,
        out: Output,
    ) -> Result<(Generation, String), Status> {
        // Validate first: a bad request is refused at once, never queued.
        let (prompt, params, limits) = self.check(&req).await?;
        let slot = self.0.limiter.open("orchestrator").await?;
        let st = &self.0;
        let draft = self.open_draft(&params, &limits).await?;
        let target = self.open_target(&prompt, &params, &limits).await?;
        let budget = st.budget.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let this = self.clone();
        let started = Instant::now();
        let span = tracing::Span::current();
        let (gen_result, budget, workers) = tokio::task::spawn_blocking(move || {
            let _request = span.enter();
            let _slot = slot;
            let mut target = target;
            let mut budget = budget;
            let mut draft = draft;
            let st = &this.0;
            let mut last_emit: Option<Instant> = None;
            let mut first = true;
            let mut sink = |text: &str, ids: &[u32], logprobs: &[f32]| {
                telemetry::record_emission(&mut last_emit, started, ids.len());
                let alive = match &out {
                    Output::Stream(tx) => tx
                        .blocking_send(Ok(pb::GenerateChunk {
                            text: text.to_string(),
                            token_ids: ids.to_vec(),
                            logprobs: logprobs.to_vec(),
                            r#final: None,
                        }))
                        .is_ok(),
                    Output::Unary(_) => !out.is_closed(),
                };
                if alive && std::mem::take(&mut first) {
                    st.hold.pass(|| !out.is_closed());
                }
                alive
            };
            let res = driver::run(
                &mut target,
                draft.as_mut().map(|d| d as &mut dyn DraftSide),
                &st.tokenizer,
                &limits,
                &mut budget,
                prompt,
                &params,
                &mut sink,
            );
            let workers = draft.map(|d| d.workers.join(",")).unwrap_or_default();
            (res, budget, workers)
        })
        .await
        .map_err(|e| Status::internal(format!("generation task failed: {e}")))?;
        // This generation adapted its own copy (γ under the load it saw);
        // fold it into the seed the next generations start from.
        st.budget
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .absorb(&budget, SEED_WEIGHT);
        // A side's failure keeps its kind (e.g. the target's
        // RESOURCE_EXHAUSTED), see `remote::Side::error`.
        let g = gen_result.map_err(engine_status)?;
        telemetry::record_generation(&g);
        Ok((g, workers))
    }

    /// The generation's draft session: none in autoregressive mode; else a
    /// place from the pool (which may queue, or find no healthy worker: the
    /// generation then starts target-only), UNAVAILABLE when no draft
    /// worker is configured at all.
    async fn open_draft(
        &self,
        params: &GenerateParams,
        limits: &Limits,
    ) -> Result<Option<PooledDraft>, Status> {
        let st = &self.0;
        if params.mode == Mode::Autoregressive {
            Ok(None)
        } else if !st.pool.configured() {
            Err(Status::unavailable(
                "no draft worker configured: start a draft-service and pass --draft or --draft-dns, or use MODE_AUTOREGRESSIVE",
            ))
        } else {
            // Sampled drafting sends the draft the generation's settings and
            // its own seed; greedy drafts send temperature 0.
            let sampled = !params.greedy_drafts && !params.sampling.is_greedy();
            let open = pb::OpenDraft {
                vocab_size: limits.vocab_size as u32,
                tokenizer_fingerprint: st.fingerprint.clone(),
                temperature: if sampled {
                    params.sampling.temperature
                } else {
                    0.0
                },
                top_k: params.sampling.top_k as u32,
                top_p: params.sampling.top_p,
                seed: params.seed,
            };
            Ok(Some(
                PooledDraft::open(st.pool.clone(), open, st.draft_timeout).await?,
            ))
        }
    }

    /// The generation's target session, its KV cache sized by
    /// [`session_max_context`]; a refusal keeps the target's status, any
    /// other failure is UNAVAILABLE ([`Side::error`]).
    async fn open_target(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        limits: &Limits,
    ) -> Result<RemoteTarget, Status> {
        let st = &self.0;
        let (target, _) = RemoteTarget::open(
            st.target.clone(),
            Side::target(&st.target_address),
            pb::OpenTarget {
                vocab_size: limits.vocab_size as u32,
                tokenizer_fingerprint: st.fingerprint.clone(),
                temperature: params.sampling.temperature,
                top_k: params.sampling.top_k as u32,
                top_p: params.sampling.top_p,
                seed: params.seed,
                logprobs: params.logprobs,
                max_context: session_max_context(prompt, params, limits, &st.budget),
            },
            st.target_timeout,
        )
        .await
        .map_err(engine_status)?;
        Ok(target)
    }

    /// Runs `req` as a stream (gRPC `GenerateStream`, HTTP `stream: true`).
    /// Every stream ends with exactly one message after its text chunks:
    /// the final chunk, or the error. A client that leaves before its
    /// generation starts — while it waits for a generation slot, a draft
    /// worker or the target — gives its place up at once (counted as
    /// `CANCELLED`); one that leaves later stops its generation at the
    /// next round.
    pub(crate) fn spawn_stream(
        &self,
        req: pb::GenerateRequest,
    ) -> mpsc::Receiver<Result<pb::GenerateChunk, Status>> {
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            let last = tokio::select! {
                res = this.run(req, Output::Stream(tx.clone())) => res,
                () = tx.closed() => {
                    // (`run` counts the request as cancelled when dropped.)
                    metrics::counter!("duo_orchestrator_streams_total", "end" => "abandoned").increment(1);
                    return;
                }
            };
            let last = last.map(|(g, worker)| pb::GenerateChunk {
                text: String::new(),
                token_ids: Vec::new(),
                logprobs: Vec::new(),
                r#final: Some(pb::Final {
                    finish_reason: finish_to_pb(g.finish_reason) as i32,
                    stats: Some(stats_to_pb(&g.stats, &worker)),
                }),
            });
            let end = if last.is_ok() { "final" } else { "error" };
            metrics::counter!("duo_orchestrator_streams_total", "end" => end).increment(1);
            let _ = tx.send(last).await;
        });
        rx
    }
}
