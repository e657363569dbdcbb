//! The target's scheduler: continuous batching across sessions.
//!
//! Every session's verification round is queued here instead of taking the
//! model for itself. One thread owns the model's forwards: whenever the
//! model is free it takes the round that waited longest and every other
//! round queued by then, within [`BatchLimits`], and runs them as one
//! batched forward ([`duo_core::engine::forward_batch`]: contexts of
//! different lengths stacked, fed tokens padded, padding masked). A memory-
//! bound target (a GPU, or the gpu-like stand-in) reads its weights once for
//! the whole batch instead of once per session.
//!
//! Sessions are driven from elsewhere (the orchestrator sends each round
//! when the previous verdict is back), so two sessions whose rounds arrive
//! out of phase would take turns forever, one forward each, unless the
//! scheduler lets them line up: when the model frees up, the sessions of
//! the batch that just ran are expected back within a round trip, and the
//! scheduler waits for them — at most [`BatchLimits::max_wait`], and never
//! longer than a quarter of the forward that just ran — before it runs
//! without them.
//!
//! Invariants:
//! - A lone session never waits for company: the scheduler waits only for
//!   sessions of the previous batch that are still open and not yet back,
//!   and never for the round that is waiting.
//! - Rounds are served in arrival order: one that does not fit the current
//!   batch goes first in the next.
//! - Each round's result is its solo forward's up to float rounding
//!   (`CausalLm::extend_batch`), and each round gets its own error: a bad
//!   round or a failing forward does not fail the others.
//! - A round nobody waits for any more (its reply receiver dropped, e.g.
//!   its task aborted at shutdown) is dropped unrun, freeing its session's
//!   cache and KV reservation.
//!
//! Judging the logits (distributions, verification) happens after the
//! forward, on the session's side, so the next batch's forward need not
//! wait for it.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use duo_core::engine::{Forward, VerifyBlock, forward_batch};
use duo_core::runtime::RuntimeError;
use duo_rpc::pb;
use duo_rpc::worker::LoadedWorker;
use tokio::sync::oneshot;
use tonic::Status;

use crate::TargetSession;

/// How much one batched forward may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Sessions per forward (1 = no batching).
    pub max_sessions: usize,
    /// Fed tokens per forward counting padding (sessions × the longest
    /// feed). A single round always runs, however long (a prefill).
    pub max_tokens: usize,
    /// Longest wait for the sessions of the previous batch to come back
    /// (see the module docs); zero = never wait.
    pub max_wait: Duration,
}

impl BatchLimits {
    /// Whether a batch of `sessions` rounds whose longest feed is `longest`
    /// tokens fits.
    fn fits(&self, sessions: usize, longest: usize) -> bool {
        sessions <= self.max_sessions && sessions * longest <= self.max_tokens
    }
}

/// What reaches the scheduling thread.
enum Msg {
    /// A round to run.
    Round(Box<Job>),
    /// A session ended: it will send no more rounds.
    Closed(SessionId),
}

/// A session's number with the scheduler, unique for the process's life.
pub(crate) type SessionId = u64;

/// Held by a session: tells the scheduler when the session ends (dropped).
pub(crate) struct Ticket {
    id: SessionId,
    queue: Sender<Msg>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let _ = self.queue.send(Msg::Closed(self.id));
    }
}

/// One session's round, waiting for the model.
struct Job {
    id: SessionId,
    session: TargetSession,
    verify: pb::Verify,
    since: Instant,
    reply: oneshot::Sender<Done>,
}

/// A round handed back: the session, and its forward (not yet judged).
pub(crate) type Done = (TargetSession, Result<Forward, RuntimeError>);

/// The queue in front of the model; see the module docs. Cloning shares it.
#[derive(Clone)]
pub(crate) struct Batcher {
    queue: Sender<Msg>,
    next_id: Arc<AtomicU64>,
}

impl Batcher {
    /// Starts the scheduling thread for the model in `loaded` (set once the
    /// model has loaded; rounds arrive only after that), pinned to
    /// `cpu_core` when given. The thread ends when the last clone of the
    /// returned batcher is dropped.
    pub(crate) fn start(
        loaded: Arc<OnceLock<LoadedWorker>>,
        limits: BatchLimits,
        cpu_core: Option<usize>,
    ) -> std::io::Result<Self> {
        let (queue, rx) = channel();
        std::thread::Builder::new()
            .name("target-batcher".into())
            .spawn(move || {
                if let Some(core) = cpu_core {
                    duo_core::engine::pin_current_thread(core);
                }
                schedule(&loaded, limits, &rx);
            })?;
        Ok(Self {
            queue,
            next_id: Arc::new(AtomicU64::new(0)),
        })
    }

    /// A ticket for a new session; the session holds it for its life.
    pub(crate) fn ticket(&self) -> Ticket {
        Ticket {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            queue: self.queue.clone(),
        }
    }

    /// Queues `verify` (already checked) for `session` and waits for its
    /// forward; the session comes back with the result.
    pub(crate) async fn forward(
        &self,
        session: TargetSession,
        verify: pb::Verify,
    ) -> Result<Done, Status> {
        let (reply, done) = oneshot::channel();
        let job = Job {
            id: session.ticket.id,
            session,
            verify,
            since: Instant::now(),
            reply,
        };
        self.queue
            .send(Msg::Round(Box::new(job)))
            .map_err(|_| Status::internal("the target's scheduler has stopped"))?;
        done.await
            .map_err(|_| Status::internal("the target's scheduler dropped the round"))
    }
}

/// The scheduling loop: one batch per iteration, until every sender is gone.
fn schedule(loaded: &OnceLock<LoadedWorker>, limits: BatchLimits, rx: &Receiver<Msg>) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    // Sessions of the last batch not back yet, and how long it took.
    let mut expected: HashSet<SessionId> = HashSet::new();
    let mut last_forward = Duration::ZERO;
    loop {
        while waiting.is_empty() {
            match rx.recv() {
                Ok(msg) => receive(msg, &mut waiting, &mut expected),
                Err(_) => return,
            }
        }
        for msg in rx.try_iter() {
            receive(msg, &mut waiting, &mut expected);
        }
        let wait = limits.max_wait.min(last_forward / 4);
        let deadline = Instant::now() + wait;
        while !expected.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(msg) => receive(msg, &mut waiting, &mut expected),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        let batch = take_batch(&mut waiting, limits);
        expected = batch.iter().map(|job| job.id).collect();
        let Some(worker) = loaded.get() else {
            for job in batch {
                let err = RuntimeError::Invalid("the target model is not loaded".into());
                let _ = job.reply.send((job.session, Err(err)));
            }
            continue;
        };
        let start = Instant::now();
        run_batch(worker, batch);
        last_forward = start.elapsed();
    }
}

/// Files one message: a round joins the queue (its session is back), a
/// closed session is expected no more.
fn receive(msg: Msg, waiting: &mut VecDeque<Job>, expected: &mut HashSet<SessionId>) {
    match msg {
        Msg::Round(job) => {
            expected.remove(&job.id);
            waiting.push_back(*job);
        }
        Msg::Closed(id) => {
            expected.remove(&id);
        }
    }
}

/// Takes the next batch from `waiting` in arrival order: the first round
/// always, then every later one that fits `limits`; rounds that do not fit
/// stay, in order, for the next batch. Rounds whose session went away are
/// dropped.
fn take_batch(waiting: &mut VecDeque<Job>, limits: BatchLimits) -> Vec<Job> {
    waiting.retain(|job| !job.reply.is_closed());
    let mut batch: Vec<Job> = Vec::new();
    let mut longest = 0;
    let mut rest = VecDeque::with_capacity(waiting.len());
    for job in waiting.drain(..) {
        let feed = job.verify.feed.len();
        if batch.is_empty() || limits.fits(batch.len() + 1, longest.max(feed)) {
            longest = longest.max(feed);
            batch.push(job);
        } else {
            rest.push_back(job);
        }
    }
    *waiting = rest;
    batch
}

/// Runs `batch` as one forward and hands every round back.
fn run_batch(worker: &LoadedWorker, mut batch: Vec<Job>) {
    let start = Instant::now();
    for job in &batch {
        metrics::histogram!("duo_target_queue_wait_seconds")
            .record(start.duration_since(job.since).as_secs_f64());
    }
    let fed: usize = batch.iter().map(|j| j.verify.feed.len()).sum();
    let longest = batch.iter().map(|j| j.verify.feed.len()).max().unwrap_or(0);
    let results = {
        let mut lm = worker.lm();
        let before = lm.host_traffic();
        let mut blocks: Vec<VerifyBlock<'_>> = batch
            .iter_mut()
            .map(|job| {
                let feed = &job.verify.feed;
                // check_verify guaranteed tail_len < feed.len().
                let at = feed.len().saturating_sub(job.verify.tail_len as usize);
                VerifyBlock {
                    verifier: &mut job.session.verifier,
                    keep: job.verify.keep as usize,
                    feed,
                    tail: &feed[at..],
                    since: job.since,
                }
            })
            .collect();
        let results = forward_batch(&mut lm, &mut blocks);
        let after = lm.host_traffic();
        metrics::counter!("duo_target_host_bytes_total", "direction" => "to_device")
            .increment(after.to_device_bytes - before.to_device_bytes);
        metrics::counter!("duo_target_host_bytes_total", "direction" => "to_host")
            .increment(after.to_host_bytes - before.to_host_bytes);
        metrics::counter!("duo_target_forwards_total").increment(after.forwards - before.forwards);
        results
    };
    metrics::histogram!("duo_target_batch_sessions").record(batch.len() as f64);
    metrics::histogram!("duo_target_batch_tokens").record(fed as f64);
    metrics::histogram!("duo_target_batch_padded_tokens").record((batch.len() * longest) as f64);
    metrics::histogram!("duo_target_forward_seconds").record(start.elapsed().as_secs_f64());
    tracing::debug!(
        sessions = batch.len(),
        fed,
        padded = batch.len() * longest,
        ms = start.elapsed().as_secs_f64() * 1e3,
        "batched forward"
    );
    for (job, result) in batch.into_iter().zip(results) {
        let _ = job.reply.send((job.session, result));
    }
}

#[cfg(test)]
mod tests {
    use super::BatchLimits;

    #[test]
    fn limits_bound_sessions_and_padded_tokens() {
        let l = BatchLimits {
            max_sessions: 4,
            max_tokens: 64,
            max_wait: std::time::Duration::ZERO,
        };
        assert!(l.fits(4, 16));
        assert!(!l.fits(5, 1));
        assert!(!l.fits(3, 22));
        assert!(l.fits(1, 64));
    }
}
