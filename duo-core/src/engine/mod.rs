//! The in-process engine: the bundled (or any) draft/target pair in one
//! process, the target on the calling thread and the draft on its own
//! thread, each optionally pinned to its own core.
//!
//! The speculative loop itself is [`session::run`]; this module only
//! provides local implementations of its two seams.

pub mod drafter;
pub mod session;
pub mod verifier;

use std::path::{Path, PathBuf};
use std::sync::mpsc;

pub use drafter::{DraftJob, DraftTree, Drafter, proposal};
pub use session::{
    DraftSide, GenerateParams, Generation, Limits, Mode, Recovery, Stats, TargetSide,
};
pub use verifier::{Forward, TargetVerdict, Verifier};

use crate::runtime::{CausalLm, Device, ModelOptions, RuntimeError};
use crate::sampling::{Distribution, Rng, SamplingParams, draft_rng, rng_from_seed};
use crate::spec::budget::{BudgetConfig, BudgetController};
use crate::spec::round::RoundError;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Errors of a generation.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be served as given; the message says what to fix.
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("speculative protocol error: {0}")]
    Protocol(#[from] RoundError),
    /// A side (draft worker, remote service) went away.
    #[error("{0} unavailable: {1}")]
    Unavailable(&'static str, String),
    /// The consumer stopped listening.
    #[error("generation cancelled")]
    Cancelled,
}

/// Where the models are and how to run them.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub target: PathBuf,
    pub draft: PathBuf,
    pub tokenizer: PathBuf,
    pub target_threads: usize,
    pub draft_threads: usize,
    pub target_device: Device,
    /// Pin the target to core 0 and the draft to core 1 (when there are two).
    pub pin_cores: bool,
    pub ort_lib: Option<PathBuf>,
    pub budget: BudgetConfig,
}

impl EngineConfig {
    /// The bundled pair under `models_dir` (`target/`, `draft/`, `tokenizer.json`).
    pub fn bundled(models_dir: &Path) -> Self {
        Self {
            target: models_dir.join("target"),
            draft: models_dir.join("draft"),
            tokenizer: models_dir.join("tokenizer.json"),
            target_threads: 1,
            draft_threads: 1,
            target_device: Device::Cpu,
            pin_cores: false,
            ort_lib: None,
            budget: BudgetConfig::default(),
        }
    }
}

/// Draft and target models plus the shared tokenizer, in one process.
pub struct Engine {
    target: CausalLm,
    draft: CausalLm,
    tokenizer: Tokenizer,
    budget: BudgetController,
    limits: Limits,
    pin_cores: bool,
}

impl Engine {
    pub fn load(cfg: &EngineConfig) -> Result<Self, EngineError> {
        let tokenizer = Tokenizer::from_file(&cfg.tokenizer)?;
        let target = CausalLm::load(
            &cfg.target,
            &ModelOptions {
                device: cfg.target_device,
                intra_threads: cfg.target_threads,
                ort_lib: cfg.ort_lib.clone(),
            },
        )?;
        let draft = CausalLm::load(
            &cfg.draft,
            &ModelOptions {
                device: Device::Cpu,
                intra_threads: cfg.draft_threads,
                ort_lib: cfg.ort_lib.clone(),
            },
        )?;
        let limits = check_pair(&target, &draft, &tokenizer)?;
        if cfg.pin_cores {
            cores(); // read the core list before any thread is pinned
        }
        Ok(Self {
            target,
            draft,
            tokenizer,
            budget: BudgetController::new(cfg.budget),
            limits,
            pin_cores: cfg.pin_cores,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn target(&self) -> &CausalLm {
        &self.target
    }

    pub fn draft(&self) -> &CausalLm {
        &self.draft
    }

    /// The target's top-1 minus top-2 logit after `context` (how close a
    /// call was: divergences between modes are legitimate only at near-ties).
    pub fn target_top2_gap(&mut self, context: &[u32]) -> Result<f32, EngineError> {
        let mut seq = self.target.sequence()?;
        let logits = self.target.extend_last(&mut seq, context, 1)?;
        let mut row = logits.last().to_vec();
        row.sort_unstable_by(|a, b| b.total_cmp(a));
        Ok(row.first().copied().unwrap_or(0.0) - row.get(1).copied().unwrap_or(0.0))
    }

    /// Generates from `prompt` token ids; `sink` receives text and token ids
    /// as they are verified (return `false` to cancel).
    pub fn generate(
        &mut self,
        prompt: Vec<u32>,
        params: &GenerateParams,
        sink: &mut session::Sink<'_>,
    ) -> Result<Generation, EngineError> {
        session::validate(&prompt, params, &self.limits)?;
        let mut target = LocalTarget {
            verifier: Verifier::new(&self.target)?,
            lm: &mut self.target,
            sampling: params.sampling,
            rng: rng_from_seed(params.seed),
            logprobs: params.logprobs,
        };
        if self.pin_cores {
            pin_current_thread(0);
        }
        if params.mode == Mode::Autoregressive {
            return session::run(
                &mut target,
                None,
                &self.tokenizer,
                &self.limits,
                &mut self.budget,
                prompt,
                params,
                sink,
            );
        }
        let mut drafter = Drafter::new(&self.draft)?;
        if !params.greedy_drafts {
            drafter = drafter.with_sampling(params.sampling, draft_rng(params.seed));
        }
        let draft_context = self.draft.info().context_len;
        let draft_lm = &mut self.draft;
        let pin = self.pin_cores;
        let (tokenizer, limits, budget) = (&self.tokenizer, &self.limits, &mut self.budget);
        std::thread::scope(|s| {
            let (job_tx, job_rx) = mpsc::channel::<DraftJob>();
            let (tree_tx, tree_rx) = mpsc::channel::<Result<DraftTree, RuntimeError>>();
            s.spawn(move || {
                if pin {
                    pin_current_thread(1);
                }
                let mut drafter = drafter;
                for job in job_rx {
                    if tree_tx.send(drafter.draft(draft_lm, &job)).is_err() {
                        break;
                    }
                }
            });
            let mut draft = ThreadDraft {
                jobs: job_tx,
                trees: tree_rx,
                context_len: draft_context,
            };
            session::run(
                &mut target,
                Some(&mut draft),
                tokenizer,
                limits,
                budget,
                prompt,
                params,
                sink,
            )
            // Dropping `draft` closes the job channel: the draft thread ends.
        })
    }
}

/// Checks that draft and target can work together.
pub fn check_pair(
    target: &CausalLm,
    draft: &CausalLm,
    tokenizer: &Tokenizer,
) -> Result<Limits, EngineError> {
    let (t, d) = (target.info(), draft.info());
    if t.vocab_size != d.vocab_size {
        return Err(EngineError::Invalid(format!(
            "draft vocabulary ({}) differs from the target's ({}): the pair must share one tokenizer",
            d.vocab_size, t.vocab_size
        )));
    }
    if tokenizer.vocab_size() > t.vocab_size {
        return Err(EngineError::Invalid(format!(
            "tokenizer has {} tokens but the models only {}",
            tokenizer.vocab_size(),
            t.vocab_size
        )));
    }
    let context_len = t.context_len.unwrap_or(session::DEFAULT_CONTEXT_LEN);
    Ok(Limits {
        context_len,
        vocab_size: t.vocab_size,
        eos: t.eos_token_id.or(tokenizer.eos_id()),
    })
}

/// The machine's cores, read once: after a thread is pinned, the affinity
/// mask it reports shrinks to that core, so later lookups would see one core.
fn cores() -> &'static [core_affinity::CoreId] {
    static CORES: std::sync::OnceLock<Vec<core_affinity::CoreId>> = std::sync::OnceLock::new();
    CORES.get_or_init(|| core_affinity::get_core_ids().unwrap_or_default())
}

/// Pins the calling thread to `core` (modulo the core count); best effort.
/// A thread already pinned there makes no system call (the services call
/// this once per round on pooled threads).
pub fn pin_current_thread(core: usize) {
    thread_local! {
        static PINNED: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }
    let ids = cores();
    if ids.is_empty() {
        return;
    }
    let core = core % ids.len();
    if PINNED.get() != Some(core) {
        core_affinity::set_for_current(ids[core]);
        PINNED.set(Some(core));
    }
}

/// The target on the calling thread.
struct LocalTarget<'a> {
    lm: &'a mut CausalLm,
    verifier: Verifier,
    sampling: SamplingParams,
    rng: Rng,
    logprobs: bool,
}

impl TargetSide for LocalTarget<'_> {
    fn verify(
        &mut self,
        keep: usize,
        feed: &[u32],
        tail: &[u32],
        proposals: &[Distribution],
    ) -> Result<TargetVerdict, EngineError> {
        Ok(self.verifier.verify(
            self.lm,
            keep,
            feed,
            tail,
            proposals,
            &self.sampling,
            &mut self.rng,
            self.logprobs,
        )?)
    }
}

/// The draft on its own thread, reached by channels.
struct ThreadDraft {
    jobs: mpsc::Sender<DraftJob>,
    trees: mpsc::Receiver<Result<DraftTree, RuntimeError>>,
    /// The draft model's context, if declared.
    context_len: Option<usize>,
}

impl DraftSide for ThreadDraft {
    fn context_len(&self) -> Option<usize> {
        self.context_len
    }

    fn submit(&mut self, job: DraftJob) -> Result<(), EngineError> {
        self.jobs
            .send(job)
            .map_err(|_| EngineError::Unavailable("draft worker", "its thread ended".into()))
    }

    fn collect(&mut self) -> Result<DraftTree, EngineError> {
        match self.trees.recv() {
            Ok(r) => Ok(r?),
            Err(_) => Err(EngineError::Unavailable(
                "draft worker",
                "its thread ended".into(),
            )),
        }
    }
}
