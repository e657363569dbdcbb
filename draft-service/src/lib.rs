//! draft-service: the CPU draft worker. Holds the draft model (ONNX Runtime,
//! CPU) and one KV cache per session; drafts token trees on request.
//!
//! A session is one bidirectional `Draft/Session` stream: `OpenDraft`, then
//! `DraftJob`s. Closing the stream frees the session.

mod scheduler;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use clap::Parser;
use duo_core::engine::driver::MAX_GAMMA;
use duo_core::engine::{DraftJob, Drafter};
use duo_core::runtime::{Device, ModelOptions};
use duo_core::sampling::draft_rng;
use duo_core::speculative::policy::{BranchPolicy, MAX_BRANCHES, MAX_HEDGES};
use duo_rpc::convert::{sync_from_pb, tree_to_pb};
use duo_rpc::pb::draft_server::{Draft, DraftServer};
use duo_rpc::pb::{self, draft_reply, draft_request};
use duo_rpc::serve::{CommonArgs, SessionArgs, SessionLimiter, reflection_v1, reflection_v1alpha};
use duo_rpc::status::engine_status;
use duo_rpc::worker::{LoadedWorker, next_or_close};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "draft-service",
    version,
    about = "DuoDecoding CPU draft worker"
)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Draft model: folder with model.onnx (+ config.json) or an .onnx file.
    #[arg(long, env = "DUO_DRAFT_MODEL")]
    pub model: PathBuf,
    /// The tokenizer shared with the target (its fingerprint is checked per
    /// session): a tokenizer.json or a model folder. Default: the model
    /// folder's own tokenizer.json (with its tokenizer_config.json), or the
    /// bundled pair's models/tokenizer.json beside models/draft.
    #[arg(long, env = "DUO_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
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
    /// Most batch rows per draft step, across sessions (each session's
    /// branches and hedges take a row each); 1 = sessions take turns. A
    /// single session's step always runs, however wide.
    #[arg(long, env = "DUO_MAX_STEP_ROWS", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_step_rows: u64,
    /// Most fed tokens per draft step, padding included (rows × the longest
    /// feed); a single session's step always runs, however long.
    #[arg(long, env = "DUO_MAX_STEP_TOKENS", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_step_tokens: u64,
    /// Longest wait, in microseconds, for the sessions of the previous step
    /// to send their next one before a step runs without them (never over
    /// the last step's time; a lone session never waits). 0 = never wait.
    #[arg(long, env = "DUO_STEP_WAIT_US", default_value_t = 2000)]
    pub step_wait_us: u64,
}

impl Args {
    fn step_limits(&self) -> scheduler::StepLimits {
        scheduler::StepLimits {
            max_rows: usize::try_from(self.max_step_rows).unwrap_or(usize::MAX),
            max_tokens: usize::try_from(self.max_step_tokens).unwrap_or(usize::MAX),
            max_wait: std::time::Duration::from_micros(self.step_wait_us),
        }
    }
}

#[derive(Clone)]
struct DraftService {
    loaded: Arc<OnceLock<LoadedWorker>>,
    /// Runs every session's drafting steps on the model, batched.
    scheduler: scheduler::Scheduler,
    limiter: SessionLimiter,
    ttl: Option<std::time::Duration>,
    cpu_core: Option<usize>,
}

impl DraftService {
    fn loaded(&self) -> Result<&LoadedWorker, Status> {
        self.loaded
            .get()
            .ok_or_else(|| Status::unavailable("draft-service is still loading its model"))
    }

    fn worker_info(&self, loaded: &LoadedWorker) -> pb::WorkerInfo {
        pb::WorkerInfo {
            sessions_open: self.limiter.open_count() as u32,
            ..loaded.info.clone()
        }
    }
}

/// Checks a job from the wire; the message says what to fix.
fn check_job(job: &pb::DraftJob, vocab: usize) -> Result<DraftJob, Status> {
    if !(1..=MAX_GAMMA as u32).contains(&job.gamma) {
        return Err(Status::invalid_argument(format!(
            "gamma must be in 1..={MAX_GAMMA}, got {}",
            job.gamma
        )));
    }
    if !(1..=MAX_BRANCHES as u32).contains(&job.max_branches) {
        return Err(Status::invalid_argument(format!(
            "max_branches must be in 1..={MAX_BRANCHES}, got {}",
            job.max_branches
        )));
    }
    if job.max_hedges as usize > MAX_HEDGES {
        return Err(Status::invalid_argument(format!(
            "max_hedges must be in 0..={MAX_HEDGES}, got {}",
            job.max_hedges
        )));
    }
    let sync = job.sync.as_ref().map(sync_from_pb).unwrap_or_default();
    if let Some(&t) = sync.append.iter().find(|&&t| t as usize >= vocab) {
        return Err(Status::invalid_argument(format!(
            "token id {t} is outside the vocabulary (size {vocab})"
        )));
    }
    Ok(DraftJob {
        sync,
        gamma: job.gamma as usize,
        policy: BranchPolicy::new(job.max_branches as usize),
        first_verified: job.first_verified,
        max_hedges: job.max_hedges as usize,
    })
}

#[tonic::async_trait]
impl Draft for DraftService {
    type SessionStream = ReceiverStream<Result<pb::DraftReply, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::DraftRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.loaded()?;
        let slot = self.limiter.open("draft-service").await?;
        metrics::counter!("duo_draft_sessions_total").increment(1);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let svc = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(loaded) = svc.loaded() else { return };
            let vocab = loaded.vocab_size() as usize;
            let mut drafter: Option<Drafter> = None;
            let mut session = Some(svc.scheduler.session());
            while let Some(msg) = next_or_close(&mut inbound, svc.ttl, &tx, "draft-service").await {
                let reply = match msg.kind {
                    None => Err(Status::invalid_argument(
                        "empty DraftRequest: set open or draft",
                    )),
                    Some(draft_request::Kind::Open(open)) => {
                        open_session(&svc, loaded, &open, &mut drafter)
                    }
                    Some(draft_request::Kind::Draft(job)) => {
                        match (drafter.take(), check_job(&job, vocab)) {
                            (None, _) => Err(Status::failed_precondition(
                                "send OpenDraft before drafting",
                            )),
                            (Some(d), Err(e)) => {
                                drafter = Some(d);
                                Err(e)
                            }
                            (Some(mut d), Ok(job)) => {
                                let cpu_core = svc.cpu_core;
                                let link = session.take();
                                let done = tokio::task::spawn_blocking(move || {
                                    if let Some(core) = cpu_core {
                                        duo_core::engine::pin_current_thread(core);
                                    }
                                    let res = match &link {
                                        Some(link) => {
                                            let drafting = link.job();
                                            d.draft(&mut drafting.forwards(), &job)
                                                .map_err(engine_status)
                                        }
                                        None => Err(Status::internal(
                                            "the draft session lost its scheduler link",
                                        )),
                                    };
                                    (d, link, res)
                                })
                                .await;
                                match done {
                                    Ok((d, link, res)) => {
                                        drafter = Some(d);
                                        session = link;
                                        if let Ok(tree) = &res {
                                            metrics::counter!("duo_draft_jobs_total").increment(1);
                                            metrics::counter!("duo_draft_tokens_total")
                                                .increment(tree.tokens() as u64);
                                            metrics::histogram!("duo_draft_job_seconds")
                                                .record(tree.secs);
                                        }
                                        res.map(|tree| pb::DraftReply {
                                            kind: Some(draft_reply::Kind::Tree(tree_to_pb(&tree))),
                                        })
                                    }
                                    Err(e) => {
                                        Err(Status::internal(format!("drafting task failed: {e}")))
                                    }
                                }
                            }
                        }
                    }
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
            tracing::debug!("draft session closed");
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

fn open_session(
    svc: &DraftService,
    loaded: &LoadedWorker,
    open: &pb::OpenDraft,
    drafter: &mut Option<Drafter>,
) -> Result<pb::DraftReply, Status> {
    loaded.check_caller(open.vocab_size, &open.tokenizer_fingerprint)?;
    let sampling = duo_rpc::convert::sampling_from_pb(open.temperature, open.top_k, open.top_p)?;
    let lm = loaded.lm();
    *drafter = Some(
        Drafter::new(&lm)
            .map_err(engine_status)?
            .with_sampling(sampling, draft_rng(open.seed)),
    );
    Ok(pb::DraftReply {
        kind: Some(draft_reply::Kind::Opened(svc.worker_info(loaded))),
    })
}

/// The `draft-service` command: serves `args` until SIGTERM or Ctrl-C.
pub fn main(args: &Args) -> std::process::ExitCode {
    duo_rpc::serve::run_main("draft-service", &args.common, |listener| {
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
        .set_not_serving::<DraftServer<DraftService>>()
        .await;
    let loaded = Arc::new(OnceLock::new());
    let scheduler =
        scheduler::Scheduler::start(Arc::clone(&loaded), args.step_limits(), args.cpu_core)
            .map_err(|e| format!("starting the draft scheduler thread: {e}"))?;
    let svc = DraftService {
        loaded,
        scheduler,
        limiter: args.sessions.limiter("duo_draft_sessions_open"),
        ttl: args.sessions.ttl(),
        cpu_core: args.cpu_core,
    };
    tracing::info!(listen = ?listener.local_addr().ok(), "draft-service listening (loading model)");
    let loader = {
        let svc = svc.clone();
        let args_model = args.model.clone();
        let tok_path = args.tokenizer.clone();
        let opts = ModelOptions {
            device: Device::Cpu,
            intra_threads: args.threads,
            ort_lib: args.ort_lib.clone(),
        };
        let max = args.sessions.max_sessions;
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let worker = LoadedWorker::load(
                "draft",
                &args_model,
                tok_path.as_deref(),
                &opts,
                vec!["cpu".into()],
                max,
            )?;
            let _ = svc.loaded.set(worker);
            Ok(())
        })
    };
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1(pb::draft_server::SERVICE_NAME)?)
        .add_service(reflection_v1alpha(pb::draft_server::SERVICE_NAME)?)
        .add_service(
            DraftServer::new(svc.clone()).max_decoding_message_size(args.common.max_message_bytes),
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
        <DraftServer<DraftService> as tonic::server::NamedService>::NAME,
        &life.draining,
    )
    .await;
    tracing::info!("draft-service serving");
    server.await.map_err(|e| format!("server: {e}"))?;
    health_reporter
        .set_not_serving::<DraftServer<DraftService>>()
        .await;
    Ok(())
}
