//! target-service: the GPU target worker. Holds the target model (ONNX
//! Runtime with the CUDA execution provider, or CPU) and one KV cache per
//! session; verifies drafts next to the logits.
//!
//! A session is one bidirectional `Target/Session` stream: `OpenTarget`
//! (sampling settings and seed: the session's random draws happen here),
//! then `Verify` requests. Closing the stream frees the session.

mod batcher;
pub mod devices;
pub mod kv_budget;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use clap::Parser;
use duo_core::engine::Verifier;
use duo_core::runtime::{BatchItem, Device, ModelOptions};
use duo_core::sampling::{Distribution, Rng, SamplingParams, rng_from_seed};
use duo_rpc::convert::proposals_from_pb;
use duo_rpc::pb::target_server::{Target, TargetServer};
use duo_rpc::pb::{self, target_reply, target_request};
use duo_rpc::serve::{CommonArgs, SessionArgs, SessionLimiter, reflection_v1, reflection_v1alpha};
use duo_rpc::status::engine_status;
use duo_rpc::worker::{LoadedWorker, next_or_close};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "target-service",
    version,
    about = "DuoDecoding GPU target worker"
)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Target model: folder with model.onnx (+ config.json) or an .onnx file.
    #[arg(long, env = "DUO_TARGET_MODEL")]
    pub model: PathBuf,
    /// The tokenizer shared with the draft (its fingerprint is checked per
    /// session): a tokenizer.json or a model folder. Default: the model
    /// folder's own tokenizer.json (with its tokenizer_config.json), or the
    /// bundled pair's models/tokenizer.json beside models/target.
    #[arg(long, env = "DUO_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda` and the onnxruntime-gpu library).
    #[arg(long, env = "DUO_DEVICE", default_value = "cpu")]
    pub device: Device,
    /// ONNX Runtime intra-op threads.
    #[arg(long, env = "DUO_THREADS", default_value_t = 1)]
    pub threads: usize,
    #[command(flatten)]
    pub sessions: SessionArgs,
    /// Pin model work to this CPU core (e.g. keep target and draft workers
    /// on separate cores of one host); unset = no pinning.
    #[arg(long, env = "DUO_CPU_CORE")]
    pub cpu_core: Option<usize>,
    /// ONNX Runtime library (default: $ORT_DYLIB_PATH, else the build's .ort/).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Memory for the sessions' KV caches, in MiB: each session reserves
    /// what its cache can grow to when it opens, and is refused with
    /// RESOURCE_EXHAUSTED when that does not fit. Default: 80% of the
    /// memory free after the model loaded (GPU memory on CUDA, RAM on CPU).
    #[arg(long, env = "DUO_KV_BUDGET_MIB")]
    pub kv_budget_mib: Option<u64>,
    /// Most sessions' rounds run as one batched forward (1 = no batching).
    #[arg(long, env = "DUO_MAX_BATCH", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch: u64,
    /// Most fed tokens per batched forward, padding included (sessions ×
    /// the longest feed); a single round always runs, however long.
    #[arg(long, env = "DUO_MAX_BATCH_TOKENS", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch_tokens: u64,
    /// Longest wait, in microseconds, for the sessions of the previous batch
    /// to send their next round before a forward runs without them (and
    /// never over a quarter of the last forward's time; a lone session
    /// never waits). 0 = never wait.
    #[arg(long, env = "DUO_BATCH_WAIT_US", default_value_t = 5000)]
    pub batch_wait_us: u64,
}

#[derive(Clone)]
struct TargetService {
    loaded: Arc<OnceLock<LoadedWorker>>,
    kv: Arc<OnceLock<kv_budget::KvBudget>>,
    limiter: SessionLimiter,
    ttl: Option<std::time::Duration>,
    batcher: batcher::Batcher,
}

/// One generation's target state.
struct TargetSession {
    verifier: Verifier,
    sampling: SamplingParams,
    rng: Rng,
    logprobs: bool,
    /// This session's share of the KV budget, released with the session.
    _kv: kv_budget::Reservation,
    /// The session's place with the batcher, which learns when it ends.
    ticket: batcher::Ticket,
}

/// What a call gets before the model is loaded.
fn still_loading() -> Status {
    Status::unavailable("target-service is still loading its model")
}

impl TargetService {
    fn loaded(&self) -> Result<&LoadedWorker, Status> {
        self.loaded.get().ok_or_else(still_loading)
    }

    /// One verification round of session `s`: its forward through the
    /// batcher (with whatever other sessions' rounds are waiting), then the
    /// judging on a blocking thread. The session comes back unless the
    /// scheduler or the judging task failed.
    async fn round(
        &self,
        s: TargetSession,
        v: pb::Verify,
        proposals: Vec<Distribution>,
    ) -> Result<(TargetSession, Result<pb::TargetReply, Status>), Status> {
        let (mut s, forward) = self.batcher.forward(s, v).await?;
        let judged = tokio::task::spawn_blocking(move || {
            let res =
                forward.and_then(|f| f.judge(&s.sampling, &proposals, &mut s.rng, s.logprobs));
            (s, res)
        })
        .await
        .map_err(|e| Status::internal(format!("verification task failed: {e}")))?;
        let (s, res) = judged;
        if let Ok(v) = &res {
            metrics::counter!("duo_target_verifies_total").increment(1);
            metrics::counter!("duo_target_fed_tokens_total").increment(v.fed as u64);
            metrics::histogram!("duo_target_verify_seconds").record(v.secs);
        }
        let reply = res.map_err(engine_status).map(|v| pb::TargetReply {
            kind: Some(target_reply::Kind::Verdict(pb::Verdict {
                accepted: v.verdict.accepted as u32,
                next: v.verdict.next,
                logprobs: v.logprobs,
                fed: v.fed as u32,
                secs: v.secs,
            })),
        });
        Ok((s, reply))
    }

    fn worker_info(&self, loaded: &LoadedWorker) -> pb::WorkerInfo {
        pb::WorkerInfo {
            sessions_open: self.limiter.open_count() as u32,
            ..loaded.info.clone()
        }
    }
}

fn open_session(
    svc: &TargetService,
    loaded: &LoadedWorker,
    open: &pb::OpenTarget,
) -> Result<(TargetSession, pb::TargetReply), Status> {
    loaded.check_caller(open.vocab_size, &open.tokenizer_fingerprint)?;
    let sampling = duo_rpc::convert::sampling_from_pb(open.temperature, open.top_k, open.top_p)?;
    let kv = svc
        .kv
        .get()
        .ok_or_else(still_loading)?
        .reserve(open.max_context)?;
    let lm = loaded.lm();
    let session = TargetSession {
        verifier: Verifier::new(&lm).map_err(engine_status)?,
        sampling,
        rng: rng_from_seed(open.seed),
        logprobs: open.logprobs,
        _kv: kv,
        ticket: svc.batcher.ticket(),
    };
    Ok((
        session,
        pb::TargetReply {
            kind: Some(target_reply::Kind::Opened(svc.worker_info(loaded))),
        },
    ))
}

/// Checks a `Verify` from the wire and returns the tail's proposals (empty
/// for a deterministic draft), before any forward runs: a malformed request
/// costs nothing and leaves the session's cache as it was.
fn check_verify(v: &pb::Verify, vocab: usize) -> Result<Vec<Distribution>, Status> {
    if v.feed.is_empty() {
        return Err(Status::invalid_argument(
            "Verify.feed is empty: feed at least one token",
        ));
    }
    if v.tail_len as usize >= v.feed.len() {
        return Err(Status::invalid_argument(format!(
            "Verify.tail_len {} must be smaller than the {} fed tokens",
            v.tail_len,
            v.feed.len()
        )));
    }
    if let Some(&t) = v.feed.iter().find(|&&t| t as usize >= vocab) {
        return Err(Status::invalid_argument(format!(
            "token id {t} is outside the vocabulary (size {vocab})"
        )));
    }
    if v.proposals.is_empty() {
        return Ok(Vec::new());
    }
    let tail = &v.feed[v.feed.len() - v.tail_len as usize..];
    proposals_from_pb(&v.proposals, tail, vocab)
        .map_err(|e| Status::invalid_argument(format!("Verify.proposals: {e}")))
}

#[tonic::async_trait]
impl Target for TargetService {
    type SessionStream = ReceiverStream<Result<pb::TargetReply, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::TargetRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.loaded()?;
        let slot = self.limiter.open("target-service").await?;
        metrics::counter!("duo_target_sessions_total").increment(1);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let svc = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(loaded) = svc.loaded() else { return };
            let vocab = loaded.vocab_size() as usize;
            let mut session: Option<TargetSession> = None;
            while let Some(msg) = next_or_close(&mut inbound, svc.ttl, &tx, "target-service").await
            {
                let reply = match msg.kind {
                    None => Err(Status::invalid_argument(
                        "empty TargetRequest: set open or verify",
                    )),
                    Some(target_request::Kind::Open(open)) => {
                        // A re-open replaces the session: free its cache
                        // and reservation first.
                        session = None;
                        open_session(&svc, loaded, &open).map(|(s, r)| {
                            session = Some(s);
                            r
                        })
                    }
                    Some(target_request::Kind::Verify(v)) => {
                        match (session.take(), check_verify(&v, vocab)) {
                            (None, _) => {
                                Err(Status::failed_precondition("send OpenTarget before Verify"))
                            }
                            (Some(s), Err(e)) => {
                                session = Some(s);
                                Err(e)
                            }
                            (Some(s), Ok(proposals)) => match svc.round(s, v, proposals).await {
                                Ok((s, res)) => {
                                    session = Some(s);
                                    res
                                }
                                Err(e) => Err(e),
                            },
                        }
                    }
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
            tracing::debug!("target session closed");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn describe(
        &self,
        _: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::WorkerInfo>, Status> {
        let loaded = self.loaded()?;
        Ok(Response::new(self.worker_info(loaded)))
    }
}

/// Tokens of the warm-up prefill (fewer when the model's context is short).
const WARM_UP_PREFILL: usize = 128;
/// Tokens of the warm-up verification block (a round's γ + 1 at most).
const WARM_UP_BLOCK: usize = 17;

/// Runs what a session runs (a prefill, a verification block, a rollback,
/// a batched forward) once on a throw-away sequence, so the device's one-time costs (kernel
/// selection, allocator growth, CUDA graph capture) are paid before health
/// says SERVING, not by the first request. Returns its wall time.
fn warm_up(worker: &LoadedWorker) -> Result<f64, String> {
    let start = std::time::Instant::now();
    let mut lm = worker.lm();
    let ctx = lm
        .info()
        .context_len
        .unwrap_or(WARM_UP_PREFILL + WARM_UP_BLOCK);
    let block = WARM_UP_BLOCK.min(ctx / 2).max(1);
    let prefill = WARM_UP_PREFILL.min(ctx - block).max(1);
    let fail = |e: duo_core::runtime::RuntimeError| format!("warm-up forward failed: {e}");
    let mut seq = lm.sequence().map_err(fail)?;
    lm.extend_last(&mut seq, &vec![0; prefill], 1)
        .map_err(fail)?;
    lm.extend(&mut seq, &vec![0; block]).map_err(fail)?;
    seq.truncate(prefill).map_err(fail)?;
    // A batch of two (the cache stacking and the per-session cuts).
    let mut other = lm.sequence().map_err(fail)?;
    let (one, many) = ([0], vec![0; block]);
    lm.extend_batch(&mut [
        BatchItem {
            seq: &mut seq,
            tokens: &one,
            rows: 1,
        },
        BatchItem {
            seq: &mut other,
            tokens: &many,
            rows: block,
        },
    ])
    .map_err(fail)?;
    Ok(start.elapsed().as_secs_f64())
}

/// Warns (naming the model) when the target's logits depend on how many
/// tokens share a forward, as a dynamically quantized int8 export's do: a
/// 4-token block against 4 single steps on a short dummy context
/// ([`duo_core::engine::warn_if_batch_dependent`]; a few small forwards).
/// The speculative modes are then not bit-lossless for this model.
fn check_batch_dependence(worker: &LoadedWorker) -> Result<(), String> {
    let mut lm = worker.lm();
    duo_core::engine::warn_if_batch_dependent(&mut lm)
        .map(|_| ())
        .map_err(|e| format!("batch-dependence check failed: {e}"))
}

/// The `target-service` command: serves `args` until SIGTERM or Ctrl-C.
pub fn main(args: &Args) -> std::process::ExitCode {
    duo_rpc::serve::run_main("target-service", &args.common, |listener| {
        serve(args.clone(), listener, duo_rpc::serve::shutdown_signal())
    })
}

/// Serves on `listener` until `shutdown` resolves (then drains and returns).
pub async fn serve(
    args: Args,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let life = duo_rpc::serve::start_common(&args.common, shutdown).await?;
    let stop_rx = life.stop.clone();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_not_serving::<TargetServer<TargetService>>()
        .await;
    let loaded = Arc::new(OnceLock::new());
    let limits = batcher::BatchLimits {
        max_sessions: usize::try_from(args.max_batch).unwrap_or(usize::MAX),
        max_tokens: usize::try_from(args.max_batch_tokens).unwrap_or(usize::MAX),
        max_wait: std::time::Duration::from_micros(args.batch_wait_us),
    };
    let batcher = batcher::Batcher::start(Arc::clone(&loaded), limits, args.cpu_core)
        .map_err(|e| format!("starting the batching thread: {e}"))?;
    let svc = TargetService {
        loaded,
        kv: Arc::new(OnceLock::new()),
        limiter: args.sessions.limiter("duo_target_sessions_open"),
        ttl: args.sessions.ttl(),
        batcher,
    };
    tracing::info!(listen = ?listener.local_addr().ok(), device = %args.device, "target-service listening (loading model)");
    let loader = {
        let svc = svc.clone();
        let model = args.model.clone();
        let tok_path = args.tokenizer.clone();
        let opts = ModelOptions {
            device: args.device,
            intra_threads: args.threads,
            ort_lib: args.ort_lib.clone(),
        };
        let max = args.sessions.max_sessions;
        let budget_mib = args.kv_budget_mib;
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let devices = devices::describe(opts.device)?;
            let worker =
                LoadedWorker::load("target", &model, tok_path.as_deref(), &opts, devices, max)?;
            let warm_secs = warm_up(&worker)?;
            check_batch_dependence(&worker)?;
            let budget = match budget_mib {
                Some(mib) => mib << 20,
                None => kv_budget::measured_default(opts.device).ok_or_else(|| {
                    format!(
                        "could not measure the free memory of {}: pass --kv-budget-mib",
                        opts.device
                    )
                })?,
            };
            let info = worker.lm().info().clone();
            tracing::info!(
                provider = info.provider,
                devices = ?worker.info.devices,
                warm_up_ms = warm_secs * 1e3,
                kv_budget_mib = budget >> 20,
                kv_bytes_per_token = kv_budget::bytes_per_token(&info),
                "target model loaded and warmed up"
            );
            let _ = svc.kv.set(kv_budget::KvBudget::new(budget, &info));
            let _ = svc.loaded.set(worker);
            Ok(())
        })
    };
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1(pb::target_server::SERVICE_NAME)?)
        .add_service(reflection_v1alpha(pb::target_server::SERVICE_NAME)?)
        .add_service(
            TargetServer::new(svc.clone()).max_decoding_message_size(args.common.max_message_bytes),
        )
        .serve_with_incoming_shutdown(
            duo_rpc::serve::incoming(listener),
            duo_rpc::serve::stopped(&stop_rx),
        );
    let mut server = std::pin::pin!(server);
    tokio::select! {
        res = &mut server => return res.map_err(|e| format!("server: {e}")),
        loaded = loader => {
            loaded.map_err(|e| format!("loading task: {e}"))??;
        }
    }
    duo_rpc::serve::serve_until_draining(
        health_reporter.clone(),
        <TargetServer<TargetService> as tonic::server::NamedService>::NAME,
        &life.draining,
    )
    .await;
    tracing::info!("target-service serving");
    server.await.map_err(|e| format!("server: {e}"))?;
    health_reporter
        .set_not_serving::<TargetServer<TargetService>>()
        .await;
    Ok(())
}
