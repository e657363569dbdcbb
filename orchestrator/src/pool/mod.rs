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
//!
//! This module holds the pool and placement; `worker` one worker's state
//! and load, `probe` discovery and health probing.

mod probe;
mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use duo_rpc::pb;
use tokio::sync::Notify;
use tokio::time::Instant;
use tonic::Status;

use worker::{HEALTHY, INCOMPATIBLE, UNHEALTHY, UNKNOWN, state_name};
pub use worker::{Lease, Worker};

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

/// The draft workers this orchestrator knows, and where generations go.
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
    /// The target's LM-head rows, once learned (0 before): a draft whose
    /// head differs by more than padding is incompatible.
    target_rows: std::sync::atomic::AtomicU32,
}

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
            target_rows: std::sync::atomic::AtomicU32::new(0),
        }))
    }

    /// Remembers the target's LM-head rows (its `ModelInfo`), against which
    /// every probe checks a draft's (they may differ by padding only,
    /// [`duo_core::engine::MAX_VOCAB_PADDING`] rows at most).
    pub fn set_target_vocab_rows(&self, rows: u32) {
        self.target_rows.store(rows, Ordering::Relaxed);
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
}
