//! orchestrator: the public gRPC endpoint. Owns the tokenizer, opens one
//! session on the target-service and one on a draft-service per generation,
//! and runs the core's speculative loop across both (the same loop the
//! in-process engine runs), streaming verified text to the client.

mod failover;
mod hold;
pub mod openai;
pub mod pool;
mod remote;
mod telemetry;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use duo_core::engine::session::{self, GenerateParams, Limits};
use duo_core::engine::{DraftSide, EngineError, Generation, Mode};
use duo_core::sampling::SamplingParams;
use duo_core::spec::budget::{BudgetConfig, BudgetController};
use duo_core::tokenizer::Tokenizer;
use duo_rpc::convert::{finish_to_pb, mode_from_pb, stats_to_pb};
use duo_rpc::pb::generation_server::{Generation as GenerationApi, GenerationServer};
use duo_rpc::pb::target_client::TargetClient;
use duo_rpc::pb::{self, generate_request};
use duo_rpc::serve::{CommonArgs, SessionLimiter, reflection_v1, reflection_v1alpha};
use failover::PooledDraft;
pub use hold::HoldGate;
use pool::{DraftPool, PoolConfig, Resolver, SystemResolver};
use remote::RemoteTarget;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// Most stop sequences per request, and their longest length in bytes.
const MAX_STOP_SEQUENCES: usize = 16;
const MAX_STOP_BYTES: usize = 256;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "orchestrator",
    version,
    about = "DuoDecoding orchestrator: public gRPC endpoint"
)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    /// target-service address, e.g. http://127.0.0.1:50052.
    #[arg(long, env = "DUO_TARGET")]
    pub target: String,
    /// draft-service addresses (repeat, or comma-separate in the env var).
    #[arg(long = "draft", env = "DUO_DRAFTS", value_delimiter = ',')]
    pub drafts: Vec<String>,
    /// DNS names (`host:port`) whose addresses are all draft workers, e.g.
    /// a compose service scaled with `--scale draft=4` or a Kubernetes
    /// headless service; re-resolved every --discovery-interval-ms.
    #[arg(long = "draft-dns", env = "DUO_DRAFT_DNS", value_delimiter = ',')]
    pub draft_dns: Vec<String>,
    #[arg(long, env = "DUO_DISCOVERY_INTERVAL_MS", default_value_t = 5000)]
    pub discovery_interval_ms: u64,
    /// How often every draft worker and the target are probed.
    #[arg(long, env = "DUO_HEALTH_INTERVAL_MS", default_value_t = 1000)]
    pub health_interval_ms: u64,
    /// Generations that may wait for a draft worker when all are full;
    /// beyond, and after --draft-queue-timeout-ms, RESOURCE_EXHAUSTED.
    #[arg(long, env = "DUO_DRAFT_QUEUE", default_value_t = 64)]
    pub draft_queue: usize,
    #[arg(long, env = "DUO_DRAFT_QUEUE_TIMEOUT_MS", default_value_t = 5000)]
    pub draft_queue_timeout_ms: u64,
    /// Longest wait for one draft; a worker slower than this is failed
    /// over (the generation goes on, unchanged).
    #[arg(long, env = "DUO_DRAFT_TIMEOUT_MS", default_value_t = 2000)]
    pub draft_timeout_ms: u64,
    /// Longest wait for one verification; beyond, the generation fails
    /// with UNAVAILABLE.
    #[arg(long, env = "DUO_TARGET_TIMEOUT_MS", default_value_t = 30000)]
    pub target_timeout_ms: u64,
    /// tokenizer.json (must match the workers').
    #[arg(long, env = "DUO_TOKENIZER")]
    pub tokenizer: PathBuf,
    /// Most generations at once.
    #[arg(long, env = "DUO_MAX_GENERATIONS", default_value_t = 64)]
    pub max_generations: usize,
    /// Requests that may wait for a generation slot when all are taken;
    /// beyond, and after --generation-queue-timeout-ms, RESOURCE_EXHAUSTED.
    #[arg(long, env = "DUO_GENERATION_QUEUE", default_value_t = 64)]
    pub generation_queue: usize,
    #[arg(long, env = "DUO_GENERATION_QUEUE_TIMEOUT_MS", default_value_t = 5000)]
    pub generation_queue_timeout_ms: u64,
    /// Also serve the OpenAI-compatible HTTP API (/v1/completions,
    /// /v1/chat/completions, /v1/models) on this address.
    #[arg(long, env = "DUO_HTTP_LISTEN")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// Longest time an HTTP client may take to send a request's headers
    /// (from connecting, or from the previous response), and then its
    /// body; a slower client's connection is closed. 0 = no limit.
    #[arg(long, env = "DUO_HTTP_READ_TIMEOUT_MS", default_value_t = 10000)]
    pub http_read_timeout_ms: u64,
    /// Longest prompt text accepted (bytes; INVALID_ARGUMENT beyond).
    #[arg(long, env = "DUO_MAX_PROMPT_BYTES", default_value_t = 65536)]
    pub max_prompt_bytes: usize,
    /// Speaker name of the assistant in the chat template (see docs/openai.md).
    #[arg(long, env = "DUO_CHAT_ASSISTANT", default_value = "Assistant")]
    pub chat_assistant_name: String,
}

struct State {
    tokenizer: Tokenizer,
    fingerprint: String,
    target: TargetClient<Channel>,
    target_address: String,
    pool: Arc<DraftPool>,
    draft_timeout: Duration,
    target_timeout: Duration,
    max_prompt_bytes: usize,
    limits: Mutex<Option<Limits>>,
    budget: Mutex<BudgetController>,
    limiter: SessionLimiter,
    chat_template: openai::ChatTemplate,
    hold: Arc<HoldGate>,
}

#[derive(Clone)]
pub struct Orchestrator(Arc<State>);

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

fn engine_status(e: EngineError) -> Status {
    match e {
        EngineError::Invalid(m) => Status::invalid_argument(m),
        EngineError::Unavailable(side, m) => {
            Status::unavailable(format!("{side} unavailable: {m}"))
        }
        EngineError::Cancelled => Status::cancelled("generation cancelled"),
        other => Status::internal(other.to_string()),
    }
}

impl Orchestrator {
    /// Model limits, learned from the target on first use.
    async fn limits(&self) -> Result<Limits, Status> {
        if let Some(l) = *self.0.limits.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(l);
        }
        let info = self.describe_target().await?;
        Ok(self.remember_limits(&info))
    }

    /// The target's `Describe`, refused when its tokenizer differs from ours.
    async fn describe_target(&self) -> Result<pb::WorkerInfo, Status> {
        let info = self
            .0
            .target
            .clone()
            .describe(pb::DescribeRequest {})
            .await
            .map_err(|s| target_status(&self.0.target_address, s))?
            .into_inner();
        check_worker(&self.0, &info)?;
        Ok(info)
    }

    /// Learns (or refreshes) the model limits from the target's info.
    fn remember_limits(&self, info: &pb::WorkerInfo) -> Limits {
        let model = info.model.clone().unwrap_or_default();
        let limits = Limits {
            context_len: if model.context_len == 0 {
                session::DEFAULT_CONTEXT_LEN
            } else {
                model.context_len as usize
            },
            vocab_size: model.vocab_size as usize,
            eos: self.0.tokenizer.eos_id(),
        };
        *self.0.limits.lock().unwrap_or_else(|p| p.into_inner()) = Some(limits);
        limits
    }

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
                self.0
                    .tokenizer
                    .encode(t)
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
            logprobs: req.logprobs,
            greedy_drafts: req.greedy_drafts,
        };
        Ok((prompt, params))
    }

    /// Validates a request without running it.
    async fn check(
        &self,
        req: &pb::GenerateRequest,
    ) -> Result<(Vec<u32>, GenerateParams, Limits), Status> {
        let limits = self.limits().await?;
        let (prompt, params) = self.parse(req)?;
        session::validate(&prompt, &params, &limits).map_err(engine_status)?;
        Ok((prompt, params, limits))
    }

    /// Runs one generation. `out` receives the stream, or (unary) only
    /// signals liveness: when its receiver is dropped — the client went away
    /// or its deadline passed — the generation stops at the next round and
    /// both sessions are freed.
    async fn run(
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

    async fn run_inner(
        &self,
        req: pb::GenerateRequest,
        out: Output,
    ) -> Result<(Generation, String), Status> {
        // Validate first: a bad request is refused at once, never queued.
        let (prompt, params, limits) = self.check(&req).await?;
        let slot = self.0.limiter.open("orchestrator").await?;
        let st = &self.0;
        // The draft first: it may wait in the pool's queue, and the target
        // session should not sit idle (and count against the target's
        // limit) meanwhile.
        let draft = if params.mode == Mode::Autoregressive {
            None
        } else if !st.pool.configured() {
            return Err(Status::unavailable(
                "no draft worker configured: start a draft-service and pass --draft or --draft-dns, or use MODE_AUTOREGRESSIVE",
            ));
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
            Some(PooledDraft::open(st.pool.clone(), open, st.draft_timeout).await?)
        };
        let (target, _) = RemoteTarget::open(
            st.target.clone(),
            pb::OpenTarget {
                vocab_size: limits.vocab_size as u32,
                tokenizer_fingerprint: st.fingerprint.clone(),
                temperature: params.sampling.temperature,
                top_k: params.sampling.top_k as u32,
                top_p: params.sampling.top_p,
                seed: params.seed,
                logprobs: params.logprobs,
                max_context: session_max_context(&prompt, &params, &limits, &st.budget),
            },
            st.target_timeout,
        )
        .await
        .map_err(|s| target_status(&st.target_address, s))?;
        let budget = st.budget.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let this = self.clone();
        let started = Instant::now();
        let span = tracing::Span::current();
        let (gen_result, failure, budget, workers) = tokio::task::spawn_blocking(move || {
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
            let res = session::run(
                &mut target,
                draft.as_mut().map(|d| d as &mut dyn DraftSide),
                &st.tokenizer,
                &limits,
                &mut budget,
                prompt,
                &params,
                &mut sink,
            );
            let failure = target.failure.0.take();
            let workers = draft.map(|d| d.workers.join(",")).unwrap_or_default();
            (res, failure, budget, workers)
        })
        .await
        .map_err(|e| Status::internal(format!("generation task failed: {e}")))?;
        *st.budget.lock().unwrap_or_else(|p| p.into_inner()) = budget;
        match (gen_result, failure) {
            (Ok(g), _) => {
                telemetry::record_generation(&g);
                Ok((g, workers))
            }
            (Err(_), Some(s)) => Err(target_status(&st.target_address, s)),
            (Err(e), None) => Err(engine_status(e)),
        }
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

/// Records a request whose future was dropped before it finished (the
/// client left) as `CANCELLED`; `finished` is set once the request has
/// been recorded the normal way.
struct Abandoned {
    mode: Option<Mode>,
    finished: bool,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if !self.finished {
            telemetry::record_request(self.mode, &Err(Status::cancelled("the client left")));
        }
    }
}

/// A target failure as the client should see it: the target's own status
/// for bad input, else UNAVAILABLE saying where the target was expected.
/// The most tokens the target's cache holds for this generation: the prompt,
/// every token it may generate, and the longest unverified tail the budget
/// may draft beyond them, within the models' context.
fn session_max_context(
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

fn target_status(address: &str, s: Status) -> Status {
    match s.code() {
        tonic::Code::InvalidArgument
        | tonic::Code::FailedPrecondition
        | tonic::Code::ResourceExhausted => s,
        _ => Status::unavailable(format!(
            "target-service unavailable at {address}: {}; the orchestrator reconnects when it is back, retry then",
            s.message()
        )),
    }
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

pub(crate) fn endpoint(address: &str) -> Result<Endpoint, String> {
    let uri = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    Endpoint::from_shared(uri)
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(20))
        })
        .map_err(|e| format!("bad address {address:?}: {e}"))
}

/// The `orchestrator` command: serves `args` until SIGTERM or Ctrl-C.
pub fn main(args: &Args) -> std::process::ExitCode {
    duo_rpc::serve::run_main("orchestrator", &args.common, |listener| async move {
        let http = match args.http_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr} for HTTP: {e}"))?,
            ),
            None => None,
        };
        serve(
            args.clone(),
            listener,
            http,
            duo_rpc::serve::shutdown_signal(),
        )
        .await
    })
}

/// Serves gRPC on `listener` (and the OpenAI HTTP API on `http`, if given)
/// until `shutdown` resolves, then drains and returns.
pub async fn serve(
    args: Args,
    listener: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    serve_with(args, listener, http, shutdown, Seams::default()).await
}

/// What an embedding program (the end-to-end tests) may swap in.
pub struct Seams {
    /// Resolves `--draft-dns` names.
    pub resolver: Arc<dyn Resolver>,
    /// Holds generations after their first chunk while closed.
    pub hold: Arc<HoldGate>,
}

impl Default for Seams {
    fn default() -> Self {
        Self {
            resolver: Arc::new(SystemResolver),
            hold: Arc::default(),
        }
    }
}

/// [`serve`] with `seams`.
pub async fn serve_with(
    args: Args,
    listener: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    seams: Seams,
) -> Result<(), String> {
    let life = duo_rpc::serve::start_common(&args.common, shutdown).await?;
    let stop_rx = life.stop.clone();
    let stopped = duo_rpc::serve::stopped;
    let tokenizer = Tokenizer::from_file(&args.tokenizer).map_err(|e| e.to_string())?;
    let fingerprint = tokenizer.fingerprint();
    let ms = Duration::from_millis;
    let pool = DraftPool::new(
        PoolConfig {
            static_addrs: args.drafts.clone(),
            dns_names: args.draft_dns.clone(),
            discovery_interval: ms(args.discovery_interval_ms.max(100)),
            health_interval: ms(args.health_interval_ms.max(50)),
            probe_timeout: ms(args.health_interval_ms.clamp(500, 5000)),
            queue: args.draft_queue,
            queue_timeout: ms(args.draft_queue_timeout_ms),
            fingerprint: fingerprint.clone(),
        },
        seams.resolver,
    )?;
    pool.discover().await;
    pool.spawn_tasks(stop_rx.clone());
    let state = Arc::new(State {
        fingerprint,
        tokenizer,
        target: TargetClient::new(endpoint(&args.target)?.connect_lazy()),
        target_address: args.target.clone(),
        pool,
        draft_timeout: ms(args.draft_timeout_ms.max(1)),
        target_timeout: ms(args.target_timeout_ms.max(1)),
        max_prompt_bytes: args.max_prompt_bytes,
        limits: Mutex::new(None),
        budget: Mutex::new(BudgetController::new(BudgetConfig::default())),
        limiter: SessionLimiter::new(args.max_generations)
            .with_queue(args.generation_queue, ms(args.generation_queue_timeout_ms))
            .with_gauge("duo_orchestrator_generations_open")
            .with_waiting_gauge("duo_orchestrator_generation_queue_waiting")
            .with_unit("generations"),
        chat_template: openai::ChatTemplate {
            assistant_name: args.chat_assistant_name.clone(),
        },
        hold: seams.hold,
    });
    let svc = Orchestrator(state);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_not_serving::<GenerationServer<Orchestrator>>()
        .await;
    tracing::info!(listen = ?listener.local_addr().ok(), target = %args.target, drafts = ?args.drafts, draft_dns = ?args.draft_dns, "orchestrator listening");
    tokio::spawn(watch_health(
        svc.clone(),
        health_reporter.clone(),
        ms(args.health_interval_ms.max(50)),
        life.draining.clone(),
    ));
    if let Some(http) = http {
        tracing::info!(listen = ?http.local_addr().ok(), "OpenAI-compatible HTTP API listening (and /metrics)");
        let app = openai::router(svc.clone()).merge(duo_rpc::metrics::router());
        let stop = stopped(&stop_rx);
        // Slow clients (slowloris) are cut off; `axum::serve` has no bound.
        let read_timeout = (args.http_read_timeout_ms > 0).then(|| ms(args.http_read_timeout_ms));
        tokio::spawn(async move {
            // Nagle off, as for gRPC: streamed chunks leave at once.
            let http = axum::serve::ListenerExt::tap_io(http, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            duo_rpc::serve::serve_http(http, app, read_timeout, stop).await;
        });
    }
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1(pb::generation_server::SERVICE_NAME)?)
        .add_service(reflection_v1alpha(pb::generation_server::SERVICE_NAME)?)
        .add_service(
            GenerationServer::new(svc).max_decoding_message_size(args.common.max_message_bytes),
        )
        .serve_with_incoming_shutdown(duo_rpc::serve::incoming(listener), stopped(&stop_rx))
        .await
        .map_err(|e| format!("server: {e}"))?;
    health_reporter
        .set_not_serving::<GenerationServer<Orchestrator>>()
        .await;
    Ok(())
}

/// Keeps the orchestrator's health current: `duo.v1.Generation` (and the
/// server as a whole) is SERVING while the target answers and matches our
/// tokenizer, NOT_SERVING while it is down — probed every `interval`, with
/// backoff up to 2 s while down (the channel reconnects by itself);
/// `duo.v1.Draft` is SERVING while at least one draft worker is healthy
/// (without one, generations still run, target-only). Once `draining`
/// turns true everything is NOT_SERVING for good.
async fn watch_health(
    svc: Orchestrator,
    reporter: tonic_health::server::HealthReporter,
    interval: Duration,
    draining: tokio::sync::watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    let drained = duo_rpc::serve::stopped(&draining);
    tokio::pin!(drained);
    let mut up: Option<bool> = None;
    let mut drafts_up: Option<bool> = None;
    let mut delay = Duration::from_millis(100);
    loop {
        let probe = async {
            let info = svc.describe_target().await?;
            Ok::<_, Status>(svc.remember_limits(&info))
        };
        let res = tokio::select! {
            res = tokio::time::timeout(Duration::from_secs(5), probe) => {
                res.unwrap_or_else(|_| Err(Status::unavailable("health probe timed out")))
            }
            _ = &mut drained => return not_serving(&reporter).await,
        };
        let now_up = res.is_ok();
        if up != Some(now_up) {
            let status = if now_up {
                tracing::info!("target-service reachable: orchestrator serving");
                ServingStatus::Serving
            } else {
                let why = res
                    .as_ref()
                    .err()
                    .map(|s| s.message().to_string())
                    .unwrap_or_default();
                if res
                    .as_ref()
                    .is_err_and(|s| s.code() == tonic::Code::FailedPrecondition)
                {
                    tracing::error!("{why}");
                } else if up.is_some() {
                    tracing::warn!("target-service unreachable: not serving ({why})");
                }
                ServingStatus::NotServing
            };
            reporter
                .set_service_status(
                    <GenerationServer<Orchestrator> as tonic::server::NamedService>::NAME,
                    status,
                )
                .await;
            reporter.set_service_status("", status).await;
            metrics::gauge!("duo_orchestrator_target_up").set(f64::from(u8::from(now_up)));
            up = Some(now_up);
        }
        let d_up = svc.0.pool.healthy_count() > 0;
        if drafts_up != Some(d_up) {
            let status = if d_up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("duo.v1.Draft", status).await;
            drafts_up = Some(d_up);
        }
        let wait = if now_up {
            delay = Duration::from_millis(100);
            interval
        } else {
            let d = delay;
            delay = (delay * 2).min(Duration::from_secs(2));
            d
        };
        tokio::select! {
            _ = &mut drained => return not_serving(&reporter).await,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Every service of the orchestrator NOT_SERVING (draining).
async fn not_serving(reporter: &tonic_health::server::HealthReporter) {
    let name = <GenerationServer<Orchestrator> as tonic::server::NamedService>::NAME;
    for service in [name, "", "duo.v1.Draft"] {
        reporter
            .set_service_status(service, tonic_health::ServingStatus::NotServing)
            .await;
    }
}
