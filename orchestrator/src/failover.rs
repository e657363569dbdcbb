//! [`PooledDraft`]: a generation's draft side on the worker pool. It holds
//! one session on one worker (affinity); when that session fails — the
//! worker died, hung past the draft timeout, or refused — it re-homes the
//! session on another healthy worker (the core's loop re-sends the whole
//! committed context), or tells the loop to go on target-only until one is
//! free. Drafts only propose, so none of this changes the output.

use std::sync::Arc;
use std::time::Duration;

use duo_core::engine::{DraftJob, DraftSide, DraftTree, EngineError, ErrorKind, Recovery};
use duo_rpc::pb;
use duo_rpc::status::engine_status;
use tokio::runtime::Handle;
use tonic::Status;

use crate::pool::{DraftPool, Lease};
use crate::remote::{RemoteDraft, Side};

pub struct PooledDraft {
    pool: Arc<DraftPool>,
    open: pb::OpenDraft,
    handle: Handle,
    /// Longest wait for one draft tree.
    timeout: Duration,
    current: Option<(RemoteDraft, Lease)>,
    /// Workers this generation used, in order.
    pub workers: Vec<String>,
    /// The first error that was not a worker failure (a refused request).
    pub refused: Option<EngineError>,
}

impl PooledDraft {
    /// Opens a session on the pool's least-loaded healthy worker; waits in
    /// the pool's queue when all are full (RESOURCE_EXHAUSTED after). With
    /// no healthy worker, the draft starts detached: the loop runs
    /// target-only and re-homes as soon as a worker is healthy.
    pub async fn open(
        pool: Arc<DraftPool>,
        open: pb::OpenDraft,
        timeout: Duration,
    ) -> Result<Self, Status> {
        let first = pool.acquire().await?;
        let mut this = Self {
            pool,
            open,
            handle: Handle::current(),
            timeout,
            current: None,
            workers: Vec::new(),
            refused: None,
        };
        let mut tried = Vec::new();
        if let Some(lease) = first {
            this.current = this.open_on(lease, &mut tried).await;
        }
        if this.current.is_none() {
            this.current = this.open_elsewhere(&tried).await;
        }
        if this.current.is_none()
            && let Some(e) = this.refused.take()
        {
            return Err(engine_status(e));
        }
        Ok(this)
    }

    /// Opens the session on `lease`'s worker; on failure marks the worker
    /// and adds it to `tried`.
    async fn open_on(
        &mut self,
        lease: Lease,
        tried: &mut Vec<String>,
    ) -> Option<(RemoteDraft, Lease)> {
        let w = Arc::clone(&lease.worker);
        let side = Side::draft(&w.address);
        let opened = tokio::time::timeout(
            self.pool.config().probe_timeout,
            RemoteDraft::open(
                w.client.clone(),
                side.clone(),
                self.open.clone(),
                self.timeout,
            ),
        )
        .await
        .unwrap_or_else(|_| Err(side.unavailable("opening the draft session timed out")));
        match opened {
            Ok((d, _)) => {
                self.workers.push(w.address.clone());
                Some((d, lease))
            }
            Err(e) => {
                tried.push(w.address.clone());
                match e.kind() {
                    ErrorKind::ResourceExhausted => self.pool.mark_full(&w),
                    ErrorKind::InvalidArgument | ErrorKind::FailedPrecondition => {
                        self.pool.mark_unhealthy(&w, &e.to_string());
                        self.refused.get_or_insert(e);
                    }
                    _ => self.pool.mark_unhealthy(&w, &e.to_string()),
                }
                None
            }
        }
    }

    /// Tries the other healthy workers with room, without queueing.
    async fn open_elsewhere(&mut self, exclude: &[String]) -> Option<(RemoteDraft, Lease)> {
        let mut tried = exclude.to_vec();
        while let Some(lease) = self.pool.try_acquire(&tried) {
            if let Some(opened) = self.open_on(lease, &mut tried).await {
                return Some(opened);
            }
        }
        None
    }

    fn detached() -> EngineError {
        EngineError::unavailable("draft-service", "no draft worker session")
    }
}

impl DraftSide for PooledDraft {
    fn attached(&self) -> bool {
        self.current.is_some()
    }

    fn context_len(&self) -> Option<usize> {
        self.current.as_ref().and_then(|(d, _)| d.context_len())
    }

    fn submit(&mut self, job: DraftJob) -> Result<(), EngineError> {
        match &mut self.current {
            Some((d, _)) => d.submit(job),
            None => Err(Self::detached()),
        }
    }

    fn collect(&mut self) -> Result<DraftTree, EngineError> {
        match &mut self.current {
            Some((d, _)) => d.collect(),
            None => Err(Self::detached()),
        }
    }

    fn recover(&mut self) -> Recovery {
        let mut exclude = Vec::new();
        if let Some((mut d, lease)) = self.current.take() {
            let why = d
                .failure
                .take()
                .unwrap_or_else(|| "session failed".to_string());
            self.pool.mark_unhealthy(&lease.worker, &why);
            exclude.push(lease.worker.address.clone());
            metrics::counter!("duo_orchestrator_draft_failovers_total").increment(1);
        }
        let handle = self.handle.clone();
        self.current = handle.block_on(self.open_elsewhere(&exclude));
        if self.current.is_some() {
            tracing::info!(worker = ?self.workers.last(), "draft session re-homed");
            Recovery::Ready
        } else {
            // Nobody free now: have the workers probed soon, so one that
            // starts serving is taken up within a few rounds.
            self.pool.request_probe();
            Recovery::Later
        }
    }
}
