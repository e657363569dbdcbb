//! Finding and probing the workers: DNS discovery, health probes (periodic
//! and on request), and the pool's gauges.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use duo_rpc::pb;
use tokio::sync::watch;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

use super::DraftPool;
use super::worker::{HEALTHY, INCOMPATIBLE, UNHEALTHY, UNKNOWN, Worker, state_name};

/// The health service name draft workers report under.
const DRAFT_SERVICE: &str = "duo.v1.Draft";

/// Least time between two probes that generations without a draft ask for
/// (on top of the periodic `--health-interval-ms` ones).
const REQUESTED_PROBE_INTERVAL: Duration = Duration::from_millis(100);

impl DraftPool {
    /// Pool gauges for /metrics.
    pub(super) fn publish(&self) {
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
            // One tokenizer, and LM heads that differ by padding rows only
            // (as llama.cpp and vLLM check a speculative pair).
            let target_rows = self.target_rows.load(Ordering::Relaxed) as usize;
            let rows = info
                .model
                .as_ref()
                .map_or(0, |m| m.padded_vocab_size.max(m.vocab_size)) as usize;
            let padding = duo_core::engine::MAX_VOCAB_PADDING;
            if target_rows > 0 && rows.abs_diff(target_rows) > padding {
                return Err(format!(
                    "incompatible draft worker {}: its vocabulary ({rows} rows) differs from the target's ({target_rows}) by more than padding (at most {padding} extra rows); draft, target and orchestrator must share one tokenizer.json",
                    w.address
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
