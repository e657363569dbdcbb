//! One draft worker: its channel, its health state and its load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use duo_rpc::pb::draft_client::DraftClient;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

use super::DraftPool;

pub(super) const UNKNOWN: u8 = 0;
pub(super) const HEALTHY: u8 = 1;
pub(super) const UNHEALTHY: u8 = 2;
/// Serving, but with another tokenizer: never in the rotation.
pub(super) const INCOMPATIBLE: u8 = 3;

pub(super) fn state_name(s: u8) -> &'static str {
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
    pub(super) source: String,
    pub(crate) client: DraftClient<Channel>,
    pub(super) health: HealthClient<Channel>,
    pub(super) state: AtomicU8,
    /// This orchestrator's sessions on the worker now.
    pub(super) active: AtomicUsize,
    /// Sessions open and capacity, as the worker last reported (0 = unknown).
    pub(super) reported_open: AtomicU32,
    /// Our sessions there that ended since that report (so a freed slot is
    /// reused at once, not after the next probe).
    pub(super) closed_since_report: AtomicU32,
    pub(super) capacity: AtomicU32,
    pub(super) placed: AtomicU64,
}

impl Worker {
    pub(super) fn new(address: String, source: String) -> Result<Self, String> {
        let channel = crate::remote::endpoint(&address)?.connect_lazy();
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

    pub(super) fn state(&self) -> u8 {
        self.state.load(Ordering::Relaxed)
    }

    /// (sessions in use, capacity); capacity 0 = unknown (no limit known).
    pub(super) fn load(&self) -> (usize, usize) {
        let reported = self
            .reported_open
            .load(Ordering::Relaxed)
            .saturating_sub(self.closed_since_report.load(Ordering::Relaxed));
        let used = self.active.load(Ordering::Relaxed).max(reported as usize);
        (used, self.capacity.load(Ordering::Relaxed) as usize)
    }

    pub(super) fn has_room(&self) -> bool {
        let (used, cap) = self.load();
        cap == 0 || used < cap
    }

    /// Load ÷ capacity, for ordering.
    pub(super) fn fill(&self) -> f64 {
        let (used, cap) = self.load();
        used as f64 / cap.max(1) as f64
    }
}

/// A place on a worker, held for as long as a draft session lives there.
pub struct Lease {
    pub worker: Arc<Worker>,
    pub(super) pool: Arc<DraftPool>,
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
