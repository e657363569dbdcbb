//! The draft worker pool: which draft-service a generation's draft session
//! goes to.
//!
//! - **Membership.** Workers come from a static list and from DNS names
//!   (`host:port`, one name resolving to many addresses: compose `--scale`
//!   replicas, Kubernetes headless services), re-resolved every discovery
//!   interval. An address that leaves DNS leaves the pool; sessions already
//!   on it finish there.
//! - **Health.** Every health interval each worker is probed with
//!   `grpc.health.v1` Check (`duo.v1.Draft`), then `Describe` for its load
//!   and tokenizer. Unhealthy workers leave the rotation and come back when
//!   a probe succeeds. A session that fails marks its worker unhealthy at
//!   once, so other generations stop trying it before the next probe.
//! - **Placement.** A new generation goes to the healthy worker with the
//!   lowest load ÷ capacity (load: this orchestrator's sessions there, or the
//!   worker's own count when higher, as other orchestrators share it).
//! - **Backpressure.** When every healthy worker is full, generations wait
//!   in a bounded queue, then get RESOURCE_EXHAUSTED. With no healthy worker
//!   at all they run target-only: slower, same output.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use duo_rpc::pb::{self, draft_client::DraftClient};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tonic::Status;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// The health service name draft workers report under.
const DRAFT_SERVICE: &str = "duo.v1.Draft";

pub type ResolveFuture<'a> =
    Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Turns a `host:port` name into addresses.
pub trait Resolver: Send + Sync + 'static {
    fn resolve<'a>(&'a self, name: &'a str) -> ResolveFuture<'a>;
}

/// The system resolver (getaddrinfo, through tokio).
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move { Ok(tokio::net::lookup_host(name).await?.collect()) })
    }
}

/// How the pool finds, probes and fills its workers.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Worker addresses (`host:port` or a URL).
    pub static_addrs: Vec<String>,
    /// DNS names (`host:port`) whose addresses are all workers.
    pub dns_names: Vec<String>,
    pub discovery_interval: Duration,
    pub health_interval: Duration,
    /// Bound on one probe (Check + Describe) and on opening a session.
    pub probe_timeout: Duration,
    /// Generations that may wait when every healthy worker is full.
    pub queue: usize,
    pub queue_timeout: Duration,
    /// The orchestrator's tokenizer fingerprint: workers with another are
    /// kept out of the rotation.
    pub fingerprint: String,
}

const UNKNOWN: u8 = 0;
const HEALTHY: u8 = 1;
const UNHEALTHY: u8 = 2;
/// Serving, but with another tokenizer: never in the rotation.
const INCOMPATIBLE: u8 = 3;

fn state_name(s: u8) -> &'static str {
    match s {
        HEALTHY => "healthy",
        UNHEALTHY => "unhealthy",
        INCOMPATIBLE => "incompatible",
        _ => "unknown",
    }
}

/// One draft worker.
pub struct Worker {
    pub address: String,
    source: String,
    pub(crate) client: DraftClient<Channel>,
    health: HealthClient<Channel>,
    state: AtomicU8,
    /// This orchestrator's sessions on the worker now.
    active: AtomicUsize,
    /// Sessions open and capacity, as the worker last reported (0 = unknown).
    reported_open: AtomicU32,
    /// Our sessions there that ended since that report (so a freed slot is
    /// reused at once, not after the next probe).
    closed_since_report: AtomicU32,
    capacity: AtomicU32,
    placed: AtomicU64,
}

impl Worker {
    fn new(address: String, source: String) -> Result<Self, String> {
        let channel = crate::endpoint(&address)?.connect_lazy();
        Ok(Self {
            address,
            source,
            client: DraftClient::new(channel.clone()),
            health: HealthClient::new(channel),
            state: AtomicU8::new(UNKNOWN),
            active: AtomicUsize::new(0),
            reported_open: AtomicU32::new(0),
            closed_since_report: AtomicU32::new(0),
            capacity: AtomicU32::new(0),
            placed: AtomicU64::new(0),
        })
    }

    fn state(&self) -> u8 {
        self.state.load(Ordering::Relaxed)
    }

    /// (sessions in use, capacity); capacity 0 = unknown (no limit known).
    fn load(&self) -> (usize, usize) {
        let reported = self
            .reported_open
            .load(Ordering::Relaxed)
            .saturating_sub(self.closed_since_report.load(Ordering::Relaxed));
        let used = self.active.load(Ordering::Relaxed).max(reported as usize);
        (used, self.capacity.load(Ordering::Relaxed) as usize)
    }

    fn has_room(&self) -> bool {
        let (used, cap) = self.load();
        cap == 0 || used < cap
    }

    /// Load ÷ capacity, for ordering.
    fn fill(&self) -> f64 {
        let (used, cap) = self.load();
        used as f64 / cap.max(1) as f64
    }
}

/// A place on a worker, held for as long as a draft session lives there.
pub struct Lease {
    pub worker: Arc<Worker>,
    pool: Arc<DraftPool>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.worker.active.fetch_sub(1, Ordering::Relaxed);
        self.worker
            .closed_since_report
            .fetch_add(1, Ordering::Relaxed);
        self.pool.freed.notify_waiters();
    }
}

enum Pick {
    Lease(Lease),
    /// Healthy workers exist, all full.
    AllFull(usize),
    NoneHealthy,
}

/// Counts a queued generation for as long as it waits.
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("duo_orchestrator_draft_queue_waiting").decrement(1.0);
    }
}

pub struct DraftPool {
    cfg: PoolConfig,
    workers: RwLock<Vec<Arc<Worker>>>,
    freed: Notify,
    waiting: AtomicUsize,
    resolver: Arc<dyn Resolver>,
    /// Why the last incompatible worker was refused.
    incompatible: RwLock<String>,
    /// A generation without a draft asked for a probe now (see
    /// [`Self::request_probe`]).
    probe_wanted: Notify,
}

/// Least time between two probes that generations without a draft ask for
/// (on top of the periodic `--health-interval-ms` ones).
const REQUESTED_PROBE_INTERVAL: Duration = Duration::from_millis(100);

impl DraftPool {
    /// A pool with the static workers (not probed yet).
    pub fn new(cfg: PoolConfig, resolver: Arc<dyn Resolver>) -> Result<Arc<Self>, String> {
        let workers = cfg
            .static_addrs
            .iter()
            .filter(|a| !a.is_empty())
            .map(|a| Worker::new(a.clone(), "static".into()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Self {
            cfg,
            workers: RwLock::new(workers),
            freed: Notify::new(),
            waiting: AtomicUsize::new(0),
            resolver,
            incompatible: RwLock::new(String::new()),
            probe_wanted: Notify::new(),
        }))
    }

    /// True when the pool can ever have workers.
    pub fn configured(&self) -> bool {
        !self.cfg.static_addrs.is_empty() || !self.cfg.dns_names.is_empty()
    }

    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    fn snapshot(&self) -> Vec<Arc<Worker>> {
        self.workers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Workers in the rotation now.
    pub fn healthy_count(&self) -> usize {
        self.snapshot()
            .iter()
            .filter(|w| w.state() == HEALTHY)
            .count()
    }

    /// Takes a place on the least-filled healthy worker with room, not in
    /// `exclude`.
    fn pick(self: &Arc<Self>, exclude: &[String]) -> Pick {
        let workers = self.snapshot();
        let healthy: Vec<_> = workers
            .iter()
            .filter(|w| w.state() == HEALTHY && !exclude.contains(&w.address))
            .collect();
        if healthy.is_empty() {
            return Pick::NoneHealthy;
        }
        let best = healthy.iter().filter(|w| w.has_room()).min_by(|a, b| {
            // Least filled; among equals, the one given fewest sessions
            // so far (round-robin when idle).
            a.fill().total_cmp(&b.fill()).then_with(|| {
                a.placed
                    .load(Ordering::Relaxed)
                    .cmp(&b.placed.load(Ordering::Relaxed))
            })
        });
        match best {
            Some(w) => {
                w.active.fetch_add(1, Ordering::Relaxed);
                w.placed.fetch_add(1, Ordering::Relaxed);
                Pick::Lease(Lease {
                    worker: Arc::clone(w),
                    pool: Arc::clone(self),
                })
            }
            None => Pick::AllFull(healthy.len()),
        }
    }

    /// A place for a new generation: `Ok(None)` when no worker is healthy
    /// (the generation runs target-only); when all healthy workers are
    /// full, waits in the queue, then RESOURCE_EXHAUSTED.
    pub async fn acquire(self: &Arc<Self>) -> Result<Option<Lease>, Status> {
        if self.snapshot().iter().any(|w| w.state() == UNKNOWN) {
            // Just discovered (or just started): probe before deciding.
            self.probe_all(true).await;
        }
        let deadline = Instant::now() + self.cfg.queue_timeout;
        let mut queued = None;
        loop {
            let freed = self.freed.notified();
            match self.pick(&[]) {
                Pick::Lease(l) => return Ok(Some(l)),
                Pick::NoneHealthy => {
                    let workers = self.snapshot();
                    if !workers.is_empty() && workers.iter().all(|w| w.state() == INCOMPATIBLE) {
                        // A misconfiguration, not an outage: say so.
                        let why = self.incompatible.read().unwrap_or_else(|p| p.into_inner());
                        return Err(Status::failed_precondition(why.clone()));
                    }
                    return Ok(None);
                }
                Pick::AllFull(n) => {
                    if queued.is_none() {
                        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.cfg.queue {
                            self.waiting.fetch_sub(1, Ordering::Relaxed);
                            return Err(self.full(n));
                        }
                        metrics::gauge!("duo_orchestrator_draft_queue_waiting").increment(1.0);
                        queued = Some(Queued(&self.waiting));
                    }
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(self.full(n));
                    }
                }
            }
        }
    }

    fn full(&self, healthy: usize) -> Status {
        metrics::counter!("duo_orchestrator_draft_queue_rejected_total").increment(1);
        Status::resource_exhausted(format!(
            "all {healthy} draft workers are at capacity and {} generations are already queued (waited up to {} ms): retry later, or add draft workers",
            self.cfg.queue,
            self.cfg.queue_timeout.as_millis()
        ))
    }

    /// A place right now (no queue), for a failover: not on `exclude`.
    pub fn try_acquire(self: &Arc<Self>, exclude: &[String]) -> Option<Lease> {
        match self.pick(exclude) {
            Pick::Lease(l) => Some(l),
            _ => None,
        }
    }

    /// Takes a worker out of the rotation until a probe succeeds.
    pub fn mark_unhealthy(&self, w: &Worker, why: &str) {
        if w.state.swap(UNHEALTHY, Ordering::Relaxed) != UNHEALTHY {
            tracing::warn!(worker = %w.address, "draft worker out of rotation: {why}");
            self.publish();
        }
    }

    /// Records that a worker refused a session for lack of room.
    pub fn mark_full(&self, w: &Worker) {
        let (used, _) = w.load();
        w.capacity.store(used.max(1) as u32, Ordering::Relaxed);
    }

    /// The pool as the Info call reports it.
    pub fn states(&self) -> Vec<pb::DraftWorkerState> {
        self.snapshot()
            .iter()
            .map(|w| pb::DraftWorkerState {
                address: w.address.clone(),
                state: state_name(w.state()).into(),
                active: w.active.load(Ordering::Relaxed) as u32,
                sessions_open: w.reported_open.load(Ordering::Relaxed),
                max_sessions: w.capacity.load(Ordering::Relaxed),
                sessions_placed: w.placed.load(Ordering::Relaxed),
                source: w.source.clone(),
            })
            .collect()
    }

    /// `Describe` of every healthy worker (for the Info call).
    pub async fn describe_healthy(&self) -> Vec<pb::WorkerInfo> {
        let healthy: Vec<_> = self
            .snapshot()
            .into_iter()
            .filter(|w| w.state() == HEALTHY)
            .collect();
        let calls = healthy.iter().map(|w| async move {
            tokio::time::timeout(
                self.cfg.probe_timeout,
                w.client.clone().describe(pb::DescribeRequest {}),
            )
            .await
        });
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .filter_map(|r| r.ok()?.ok().map(|r| r.into_inner()))
            .collect()
    }

    /// Pool gauges for /metrics.
    fn publish(&self) {
        let workers = self.snapshot();
        for state in [HEALTHY, UNHEALTHY, UNKNOWN, INCOMPATIBLE] {
            let n = workers.iter().filter(|w| w.state() == state).count();
            metrics::gauge!("duo_orchestrator_draft_workers", "state" => state_name(state))
                .set(n as f64);
        }
        for w in &workers {
            let labels = [("worker", w.address.clone())];
            metrics::gauge!("duo_orchestrator_draft_worker_healthy", &labels)
                .set(f64::from(u8::from(w.state() == HEALTHY)));
            metrics::gauge!("duo_orchestrator_draft_worker_active", &labels)
                .set(w.active.load(Ordering::Relaxed) as f64);
        }
    }

    /// Asks the pool's task for a probe of every worker soon (at most every
    /// [`REQUESTED_PROBE_INTERVAL`]): a generation running without a draft
    /// calls this each round, so it takes up a worker within a few rounds
    /// of one serving, not at the next periodic probe.
    pub fn request_probe(&self) {
        self.probe_wanted.notify_one();
    }

    /// Probes every worker (or only those not probed yet) at once.
    pub async fn probe_all(&self, only_unknown: bool) {
        let workers: Vec<_> = self
            .snapshot()
            .into_iter()
            .filter(|w| !only_unknown || w.state() == UNKNOWN)
            .collect();
        let probes = workers.iter().map(|w| self.probe(w));
        futures_util::future::join_all(probes).await;
        // New states and loads may have made room: queued generations look
        // again (a freed session is only seen in the worker's next report).
        self.freed.notify_waiters();
        self.publish();
    }

    /// One probe: updates the worker's state and reported load.
    async fn probe(&self, w: &Worker) {
        let checked = tokio::time::timeout(self.cfg.probe_timeout, async {
            let status = w
                .health
                .clone()
                .check(HealthCheckRequest {
                    service: DRAFT_SERVICE.into(),
                })
                .await
                .map_err(|s| s.message().to_string())?
                .into_inner()
                .status;
            if status != ServingStatus::Serving as i32 {
                return Err("not serving yet".to_string());
            }
            let info = w
                .client
                .clone()
                .describe(pb::DescribeRequest {})
                .await
                .map_err(|s| s.message().to_string())?
                .into_inner();
            if info.tokenizer_fingerprint != self.cfg.fingerprint {
                return Err(format!(
                    "incompatible draft worker {}: its tokenizer ({}) differs from the orchestrator's ({}); draft, target and orchestrator must share one tokenizer.json",
                    w.address, info.tokenizer_fingerprint, self.cfg.fingerprint
                ));
            }
            Ok(info)
        })
        .await
        .unwrap_or_else(|_| Err("health probe timed out".into()));
        let new = match &checked {
            Ok(info) => {
                w.reported_open.store(info.sessions_open, Ordering::Relaxed);
                w.closed_since_report.store(0, Ordering::Relaxed);
                w.capacity.store(info.max_sessions, Ordering::Relaxed);
                HEALTHY
            }
            Err(why) if why.starts_with("incompatible") => {
                why.clone_into(&mut self.incompatible.write().unwrap_or_else(|p| p.into_inner()));
                INCOMPATIBLE
            }
            Err(_) => UNHEALTHY,
        };
        let old = w.state.swap(new, Ordering::Relaxed);
        if old != new {
            match &checked {
                Ok(_) => tracing::info!(worker = %w.address, "draft worker healthy: in rotation"),
                Err(why) => {
                    tracing::warn!(worker = %w.address, "draft worker unhealthy: {why}")
                }
            }
        }
    }

    /// Re-resolves the DNS names: adds new addresses, drops vanished ones
    /// (a failed lookup changes nothing).
    pub async fn discover(&self) {
        for name in &self.cfg.dns_names {
            let addrs = match self.resolver.resolve(name).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(%name, "draft discovery lookup failed: {e}");
                    continue;
                }
            };
            let source = format!("dns:{name}");
            let wanted: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
            let mut workers = self.workers.write().unwrap_or_else(|p| p.into_inner());
            let before = workers.len();
            workers.retain(|w| w.source != source || wanted.contains(&w.address));
            let removed = before - workers.len();
            let mut added = 0;
            for a in wanted {
                if !workers.iter().any(|w| w.address == a) {
                    match Worker::new(a, source.clone()) {
                        Ok(w) => {
                            workers.push(Arc::new(w));
                            added += 1;
                        }
                        Err(e) => tracing::warn!("draft discovery: {e}"),
                    }
                }
            }
            if added + removed > 0 {
                tracing::info!(%name, added, removed, total = workers.len(), "draft workers discovered");
            }
        }
    }

    /// Runs discovery and health probes until `stop` turns true.
    pub fn spawn_tasks(self: &Arc<Self>, stop: watch::Receiver<bool>) {
        let pool = Arc::clone(self);
        let stopped = duo_rpc::serve::stopped(&stop);
        tokio::spawn(async move {
            let mut discovery = tokio::time::interval(pool.cfg.discovery_interval);
            let mut health = tokio::time::interval(pool.cfg.health_interval);
            discovery.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tokio::pin!(stopped);
            let mut last_requested = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = discovery.tick(), if !pool.cfg.dns_names.is_empty() => {
                        pool.discover().await;
                        pool.probe_all(true).await;
                    }
                    _ = health.tick() => pool.probe_all(false).await,
                    _ = pool.probe_wanted.notified() => {
                        tokio::time::sleep_until(last_requested + REQUESTED_PROBE_INTERVAL).await;
                        last_requested = tokio::time::Instant::now();
                        pool.probe_all(false).await;
                    }
                }
            }
        });
    }
}
