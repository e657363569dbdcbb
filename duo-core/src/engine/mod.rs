//! The in-process engine: the bundled (or any) draft/target pair in one
//! process, the target on the calling thread and the draft on its own
//! thread, each optionally pinned to its own core.
//!
//! The speculative loop itself is [`driver::run`]; this module only
//! provides local implementations of its two seams.

pub mod drafter;
pub mod driver;
mod error;
mod rounds;
pub mod verifier;

use std::path::{Path, PathBuf};
use std::sync::mpsc;

pub use drafter::{DraftJob, DraftTree, Drafter, proposal};
pub use driver::{
    DraftSide, GenerateParams, Generation, Limits, Mode, Recovery, Stats, TargetSide,
};
pub use error::{EngineError, ErrorKind};
pub use verifier::{Forward, TargetVerdict, Verifier, VerifyBlock, forward_batch};

use crate::runtime::{CausalLm, Device, ModelOptions, RuntimeError};
use crate::sampling::{Distribution, Rng, SamplingParams, draft_rng, rng_from_seed};
use crate::speculative::budget::{BudgetConfig, BudgetController};
use crate::tokenizer::Tokenizer;

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
    /// Load the draft (false: autoregressive generations only, and the
    /// draft is neither loaded nor checked).
    pub with_draft: bool,
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
            with_draft: true,
        }
    }
}

/// Draft and target models plus the shared tokenizer, in one process.
pub struct Engine {
    target: CausalLm,
    /// `None` when loaded without one ([`EngineConfig::with_draft`]).
    draft: Option<CausalLm>,
    tokenizer: Tokenizer,
    budget: BudgetController,
    limits: Limits,
    pin_cores: bool,
}

impl Engine {
    /// Loads the tokenizer ([`Tokenizer::load`]: a `tokenizer.json` or a
    /// model folder), the target and (unless [`EngineConfig::with_draft`]
    /// is off) the draft, and checks that they fit together
    /// ([`fit_to_tokenizer`], [`check_pair`]). A target whose logits
    /// depend on the batch shape gets a warning
    /// ([`warn_if_batch_dependent`]).
    pub fn load(cfg: &EngineConfig) -> Result<Self, EngineError> {
        let tokenizer = Tokenizer::load(&cfg.tokenizer)?;
        let mut target = CausalLm::load(
            &cfg.target,
            &ModelOptions {
                device: cfg.target_device,
                intra_threads: cfg.target_threads,
                ort_lib: cfg.ort_lib.clone(),
            },
        )?;
        check_folder_tokenizer(&cfg.target, &tokenizer)?;
        fit_to_tokenizer(&mut target, &tokenizer)?;
        warn_if_batch_dependent(&mut target)?;
        let draft = if cfg.with_draft {
            let mut draft = CausalLm::load(
                &cfg.draft,
                &ModelOptions {
                    device: Device::Cpu,
                    intra_threads: cfg.draft_threads,
                    ort_lib: cfg.ort_lib.clone(),
                },
            )?;
            check_folder_tokenizer(&cfg.draft, &tokenizer)?;
            fit_to_tokenizer(&mut draft, &tokenizer)?;
            check_pair(&target, &draft, &tokenizer)?;
            Some(draft)
        } else {
            None
        };
        let limits = target_limits(&target, &tokenizer);
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
        self.limits.clone()
    }

    pub fn target(&self) -> &CausalLm {
        &self.target
    }

    /// The draft, unless loaded without one.
    pub fn draft(&self) -> Option<&CausalLm> {
        self.draft.as_ref()
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
        sink: &mut driver::Sink<'_>,
    ) -> Result<Generation, EngineError> {
        driver::validate(&prompt, params, &self.limits)?;
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
            return driver::run(
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
        let Some(draft_lm) = self.draft.as_mut() else {
            return Err(EngineError::Invalid(format!(
                "mode {} needs a draft model, and this engine was loaded without one",
                params.mode
            )));
        };
        let mut drafter = Drafter::new(draft_lm)?;
        if !params.greedy_drafts {
            drafter = drafter.with_sampling(params.sampling, draft_rng(params.seed));
        }
        let draft_context = draft_lm.info().context_len;
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
            driver::run(
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

/// Most LM-head rows a draft and its target may differ by: padding rows
/// only, as llama.cpp and vLLM allow (Qwen2.5-7B has 152064 rows, 0.5B
/// 151936, for one tokenizer of 151665 ids).
pub const MAX_VOCAB_PADDING: usize = 128;

/// Fits a loaded model to the tokenizer it is served with. Refuses a
/// tokenizer that cannot be the model's — more ids than the LM head has
/// rows, or without one of the model's end-of-text ids — and restricts a
/// head padded beyond the tokenizer's ids to them
/// ([`CausalLm::restrict_vocab`]: the extra rows are never fed nor
/// sampled). A model whose head matches its tokenizer is unchanged.
pub fn fit_to_tokenizer(lm: &mut CausalLm, tokenizer: &Tokenizer) -> Result<(), EngineError> {
    let info = lm.info();
    let (ids, rows) = (tokenizer.id_limit(), info.padded_vocab_size);
    let path = info.path.display().to_string();
    if ids > rows {
        return Err(EngineError::Invalid(format!(
            "the tokenizer has {ids} token ids but the model {path} has only {rows} vocabulary \
             rows: it is not this model's tokenizer (use the tokenizer.json exported with the \
             model: leave --tokenizer out to take the one in the model's folder)"
        )));
    }
    if let Some(&eos) = info.eos_token_ids.iter().find(|&&e| e as usize >= ids) {
        return Err(EngineError::Invalid(format!(
            "the model {path} ends text with token id {eos}, which its tokenizer ({ids} ids) \
             does not have: it is not this model's tokenizer (use the tokenizer.json exported \
             with the model: leave --tokenizer out to take the one in the model's folder)"
        )));
    }
    if ids < rows {
        tracing::info!(
            model = %path,
            rows,
            tokenizer_ids = ids,
            "the LM head is padded beyond the tokenizer: its last rows are never sampled"
        );
        lm.restrict_vocab(ids)?;
    }
    Ok(())
}

/// Refuses a tokenizer that differs from the one in the model's own folder
/// (a `tokenizer.json` beside the model's `.onnx` file), when there is one:
/// the model was trained with that one.
pub fn check_folder_tokenizer(model: &Path, tokenizer: &Tokenizer) -> Result<(), EngineError> {
    let dir = if model.is_dir() {
        model
    } else {
        model.parent().unwrap_or(model)
    };
    let own = dir.join("tokenizer.json");
    if !own.is_file() {
        return Ok(());
    }
    let own_fp = Tokenizer::from_file(&own)?.fingerprint();
    if own_fp != tokenizer.fingerprint() {
        return Err(EngineError::Invalid(format!(
            "{} holds its own tokenizer.json (fingerprint {own_fp}), which differs from the \
             tokenizer in use (fingerprint {}): draft and target must share one tokenizer, the \
             models' own (leave --tokenizer out to use the model folder's)",
            dir.display(),
            tokenizer.fingerprint()
        )));
    }
    Ok(())
}

/// Checks that draft and target can work together, as llama.cpp and vLLM
/// check a speculative pair: one tokenizer (both fitted to it with
/// [`fit_to_tokenizer`]), and LM heads that differ by padding rows only
/// (at most [`MAX_VOCAB_PADDING`]). Returns the generation limits
/// ([`target_limits`]).
pub fn check_pair(
    target: &CausalLm,
    draft: &CausalLm,
    tokenizer: &Tokenizer,
) -> Result<Limits, EngineError> {
    let (t, d) = (target.info(), draft.info());
    let (tr, dr) = (t.padded_vocab_size, d.padded_vocab_size);
    if tr.abs_diff(dr) > MAX_VOCAB_PADDING || t.vocab_size != d.vocab_size {
        return Err(EngineError::Invalid(format!(
            "draft vocabulary ({dr} rows) differs from the target's ({tr}) by more than padding \
             (at most {MAX_VOCAB_PADDING} extra rows): the pair must share one tokenizer"
        )));
    }
    if tokenizer.id_limit() > t.vocab_size {
        return Err(EngineError::Invalid(format!(
            "tokenizer has {} tokens but the models only {}",
            tokenizer.id_limit(),
            t.vocab_size
        )));
    }
    Ok(target_limits(target, tokenizer))
}

/// The generation limits of `target` served with `tokenizer`: its context
/// (or [`driver::DEFAULT_CONTEXT_LEN`]), the ids in use, and every
/// end-of-text id of the model (else the tokenizer's end-of-text token).
pub fn target_limits(target: &CausalLm, tokenizer: &Tokenizer) -> Limits {
    let t = target.info();
    let eos = if t.eos_token_ids.is_empty() {
        tokenizer.eos_id().into_iter().collect()
    } else {
        t.eos_token_ids.clone()
    };
    Limits {
        context_len: t.context_len.unwrap_or(driver::DEFAULT_CONTEXT_LEN),
        vocab_size: t.vocab_size,
        eos,
    }
}

/// Runs [`CausalLm::batch_dependence`] and logs a warning when the model's
/// logits depend on how many tokens share a forward (a dynamically
/// quantized int8 export): the speculative modes then are not bit-lossless
/// for it. Returns what was measured.
pub fn warn_if_batch_dependent(
    lm: &mut CausalLm,
) -> Result<crate::runtime::model::BatchDependence, RuntimeError> {
    let start = std::time::Instant::now();
    let dep = lm.batch_dependence()?;
    tracing::debug!(
        model = %lm.info().path.display(),
        max_logit_difference = dep.max_abs_diff,
        tolerance = dep.tolerance,
        ms = start.elapsed().as_secs_f64() * 1e3,
        "batch-dependence check"
    );
    if dep.dependent() {
        tracing::warn!(
            model = %lm.info().path.display(),
            max_logit_difference = dep.max_abs_diff,
            tolerance = dep.tolerance,
            "this model's logits depend on the batch shape (a 4-token forward differs from 4 \
             single steps beyond rounding, as dynamically quantized int8 exports do): the \
             speculative modes are not bit-lossless for it (their output may differ from \
             autoregressive decoding at near-ties); use an fp32 or fp16 export for lossless \
             speculative decoding"
        );
    }
    Ok(dep)
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
            .map_err(|_| EngineError::unavailable("draft worker", "its thread ended"))
    }

    fn collect(&mut self) -> Result<DraftTree, EngineError> {
        match self.trees.recv() {
            Ok(r) => Ok(r?),
            Err(_) => Err(EngineError::unavailable("draft worker", "its thread ended")),
        }
    }
}
