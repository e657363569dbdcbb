//! The draft worker's scheduler: one thread owns the draft model and runs
//! the drafting steps of every session as batched forwards.
//!
//! A session drafts on its own thread (`Drafter::draft`, the same code as
//! in process) through a [`StepClient`]: each forward it asks for becomes a
//! [`Step`] queued here. Whenever the model is free, the scheduler takes
//! the step that waited longest and every other queued step that fits
//! [`StepLimits`], and runs them as one forward ([`run_steps`]: contexts of
//! different lengths stacked, fed tokens padded, padding masked). A CPU
//! step of 8 rows costs far less than 8 one-row steps, so one draft core
//! keeps up with several generations.
//!
//! Between two steps a session picks its next tokens (microseconds), so
//! the sessions of the step that just ran are expected back at once: the
//! scheduler waits for them — at most [`StepLimits::max_wait`], and never
//! longer than the step that just ran — before it runs without them. A
//! session that finished its job says so ([`Session::idle`]), and is not
//! waited for.
//!
//! A session drafting alone (no other session is in a job) runs its steps
//! on its own thread, under the model's lock, as it would without a
//! scheduler: no hop to the scheduling thread. As soon as a second session
//! starts a job, both go through the queue and share steps.
//!
//! Invariants:
//! - A lone session never waits for company, nor for a thread hop: it runs
//!   its steps itself, and the scheduler waits only for sessions of the
//!   previous step that are still drafting and not yet back, never for a
//!   step that is waiting.
//! - Steps are served in arrival order: one that does not fit the current
//!   batch goes first in the next, so no session's long tree starves the
//!   others (each step of a session is one forward of its rows, and its
//!   next step queues behind everyone who arrived meanwhile).
//! - Each step's logits are its solo forward's up to float rounding, and
//!   each step gets its own error.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use duo_core::runtime::{RuntimeError, Step, StepClient, StepResult, run_steps};
use duo_rpc::worker::LoadedWorker;

/// How much one batched draft step may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimits {
    /// Batch rows per forward (a session's branches and hedges each take
    /// one); a single step always runs, however wide.
    pub max_rows: usize,
    /// Fed tokens per forward counting padding (rows × the longest feed);
    /// a single step always runs, however long (a prompt's prefill).
    pub max_tokens: usize,
    /// Longest wait for the sessions of the previous step to come back
    /// (see the module docs); zero = never wait.
    pub max_wait: Duration,
}

impl StepLimits {
    /// Whether a batch of `rows` rows whose longest feed is `longest` fits.
    fn fits(&self, rows: usize, longest: usize) -> bool {
        rows <= self.max_rows && rows * longest <= self.max_tokens
    }
}

/// A session's number with the scheduler, unique for the process's life.
type SessionId = u64;

/// What reaches the scheduling thread.
enum Msg {
    /// A step to run.
    Step(Queued),
    /// A session has no step coming (its job is done, or it closed).
    Idle(SessionId),
}

/// One session's step, waiting for the model.
struct Queued {
    id: SessionId,
    step: Step,
    since: Instant,
    reply: SyncSender<(Step, StepResult)>,
}

/// The queue in front of the draft model; see the module docs. Cloning
/// shares it.
#[derive(Clone)]
pub(crate) struct Scheduler {
    queue: Sender<Msg>,
    next_id: Arc<AtomicU64>,
    shared: Arc<Shared>,
}

/// What sessions read without asking the scheduling thread.
struct Shared {
    loaded: Arc<OnceLock<LoadedWorker>>,
    /// Sessions in a job right now.
    drafting: AtomicUsize,
}

impl Scheduler {
    /// Starts the scheduling thread for the model in `loaded` (set once the
    /// model has loaded; steps arrive only after that), pinned to
    /// `cpu_core` when given. The thread ends when the last clone of the
    /// scheduler and of every [`Session`] is dropped.
    pub(crate) fn start(
        loaded: Arc<OnceLock<LoadedWorker>>,
        limits: StepLimits,
        cpu_core: Option<usize>,
    ) -> std::io::Result<Self> {
        let (queue, rx) = channel();
        let shared = Arc::new(Shared {
            loaded,
            drafting: AtomicUsize::new(0),
        });
        let thread = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("draft-scheduler".into())
            .spawn(move || {
                if let Some(core) = cpu_core {
                    duo_core::engine::pin_current_thread(core);
                }
                schedule(&thread.loaded, limits, &rx);
            })?;
        Ok(Self {
            queue,
            next_id: Arc::new(AtomicU64::new(0)),
            shared,
        })
    }

    /// A new session's handle; the session holds it for its life.
    pub(crate) fn session(&self) -> Session {
        Session {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            queue: self.queue.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

/// A session's link to the scheduler.
pub(crate) struct Session {
    id: SessionId,
    queue: Sender<Msg>,
    shared: Arc<Shared>,
}

impl Session {
    /// Starts a drafting job: its forwards run until the returned value is
    /// dropped, which tells the scheduler no step comes until the next job.
    pub(crate) fn job(&self) -> DraftingJob<'_> {
        self.shared.drafting.fetch_add(1, Ordering::SeqCst);
        DraftingJob { session: self }
    }
}

/// One drafting job of a session (see [`Session::job`]).
pub(crate) struct DraftingJob<'a> {
    session: &'a Session,
}

impl DraftingJob<'_> {
    /// The job's forwards: run here while this is the only job on the
    /// worker, else queued for the scheduler; blocks the calling thread for
    /// each (call from a blocking thread).
    pub(crate) fn forwards(
        &self,
    ) -> StepClient<impl FnMut(Step) -> Result<(Step, StepResult), RuntimeError> + '_> {
        let session = self.session;
        StepClient::new(move |step| {
            let alone = session.shared.drafting.load(Ordering::SeqCst) == 1;
            if alone && let Some(worker) = session.shared.loaded.get() {
                let mut steps = vec![step];
                let mut results = run_recorded(worker, &mut steps, &[0.0]);
                return match (steps.pop(), results.pop()) {
                    (Some(step), Some(result)) => Ok((step, result)),
                    _ => Err(RuntimeError::Invalid("a step went missing".into())),
                };
            }
            let (reply, back) = sync_channel(1);
            let queued = Queued {
                id: session.id,
                step,
                since: Instant::now(),
                reply,
            };
            session
                .queue
                .send(Msg::Step(queued))
                .map_err(|_| stopped())?;
            back.recv().map_err(|_| stopped())
        })
    }
}

impl Drop for DraftingJob<'_> {
    fn drop(&mut self) {
        self.session.shared.drafting.fetch_sub(1, Ordering::SeqCst);
        let _ = self.session.queue.send(Msg::Idle(self.session.id));
    }
}

fn stopped() -> RuntimeError {
    RuntimeError::Invalid("the draft worker's scheduler has stopped".into())
}

/// The scheduling loop: one batched step per iteration, until every sender
/// is gone.
fn schedule(loaded: &OnceLock<LoadedWorker>, limits: StepLimits, rx: &Receiver<Msg>) {
    let mut waiting: VecDeque<Queued> = VecDeque::new();
    // Sessions of the last step not back yet, and how long it took.
    let mut expected: HashSet<SessionId> = HashSet::new();
    let mut last_step = Duration::ZERO;
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
        let deadline = Instant::now() + limits.max_wait.min(last_step);
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
                let err = RuntimeError::Invalid("the draft model is not loaded".into());
                let _ = job.reply.send((job.step, Err(err)));
            }
            continue;
        };
        let start = Instant::now();
        run_batch(worker, batch);
        last_step = start.elapsed();
    }
}

/// Files one message: a step joins the queue (its session is back), an
/// idle session is expected no more.
fn receive(msg: Msg, waiting: &mut VecDeque<Queued>, expected: &mut HashSet<SessionId>) {
    match msg {
        Msg::Step(job) => {
            expected.remove(&job.id);
            waiting.push_back(job);
        }
        Msg::Idle(id) => {
            expected.remove(&id);
        }
    }
}

/// Takes the next batch from `waiting` in arrival order: the first step
/// always, then every later one of the same kind that fits `limits`; steps
/// that do not stay, in order, for the next batch.
///
/// Two kinds never share a forward: drafting steps (one token per row) and
/// catch-ups (a verdict's tokens fed at once). Padded to a catch-up's
/// length, every drafting row would pay for its positions: a CPU draft's
/// cost grows with the tokens it computes, padding included.
fn take_batch(waiting: &mut VecDeque<Queued>, limits: StepLimits) -> Vec<Queued> {
    let mut batch: Vec<Queued> = Vec::new();
    let (mut rows, mut longest) = (0, 0);
    let mut catch_up = None;
    let mut rest = VecDeque::with_capacity(waiting.len());
    for job in waiting.drain(..) {
        let (r, feed) = (job.step.batch_rows(), job.step.longest_feed());
        let kind = feed > 1;
        if batch.is_empty() || (catch_up == Some(kind) && limits.fits(rows + r, longest.max(feed)))
        {
            catch_up = Some(kind);
            rows += r;
            longest = longest.max(feed);
            batch.push(job);
        } else {
            rest.push_back(job);
        }
    }
    *waiting = rest;
    batch
}

/// Runs `batch` as one forward and hands every step back.
fn run_batch(worker: &LoadedWorker, batch: Vec<Queued>) {
    let start = Instant::now();
    let waited: Vec<f64> = batch
        .iter()
        .map(|q| start.duration_since(q.since).as_secs_f64())
        .collect();
    let (mut steps, replies): (Vec<Step>, Vec<_>) =
        batch.into_iter().map(|q| (q.step, q.reply)).unzip();
    let results = run_recorded(worker, &mut steps, &waited);
    for ((step, result), reply) in steps.into_iter().zip(results).zip(replies) {
        let _ = reply.send((step, result));
    }
}

/// Runs `steps` as one forward on the model (taking its lock) and records
/// the step's metrics; `waited` is each step's time in the queue.
fn run_recorded(worker: &LoadedWorker, steps: &mut [Step], waited: &[f64]) -> Vec<StepResult> {
    let start = Instant::now();
    for &w in waited {
        metrics::histogram!("duo_draft_queue_wait_seconds").record(w);
    }
    let rows: usize = steps.iter().map(Step::batch_rows).sum();
    let results = {
        let mut lm = worker.lm();
        run_steps(&mut lm, steps)
    };
    let secs = start.elapsed().as_secs_f64();
    metrics::histogram!("duo_draft_step_sessions").record(steps.len() as f64);
    metrics::histogram!("duo_draft_step_rows").record(rows as f64);
    metrics::histogram!("duo_draft_step_seconds").record(secs);
    tracing::trace!(sessions = steps.len(), rows, ms = secs * 1e3, "draft step");
    results
}

#[cfg(test)]
mod tests {
    use super::StepLimits;

    #[test]
    fn limits_bound_rows_and_padded_tokens() {
        let l = StepLimits {
            max_rows: 32,
            max_tokens: 256,
            max_wait: std::time::Duration::ZERO,
        };
        assert!(l.fits(32, 1));
        assert!(!l.fits(33, 1));
        assert!(!l.fits(3, 100));
        assert!(l.fits(1, 256));
    }
}
