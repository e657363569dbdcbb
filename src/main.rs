//! `duo`: generate text and benchmark decoding modes in one process.

mod bench;
mod client;
mod delay;
mod load;
mod runtime_sweep;
mod up;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use duo_core::engine::{Engine, EngineConfig, GenerateParams, Mode};
use duo_core::runtime::Device;
use duo_core::sampling::SamplingParams;
use duo_core::speculative::budget::BudgetConfig;

#[derive(Parser)]
#[command(
    name = "duo",
    version,
    about = "DuoDecoding: speculative decoding with a CPU draft and a GPU target, in one process"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream a completion from the model pair; prints a stats line at the end.
    Generate(GenerateArgs),
    /// Compare autoregressive, speculative and duodecoding on Spec-Bench prompts.
    Bench(bench::BenchArgs),
    /// Start target-service, draft-service and orchestrator locally (Ctrl-C stops them).
    Up(up::UpArgs),
    /// Greedy autoregressive tokens/s of each model through the Rust runtime
    /// (the same loop the model card times with Python onnxruntime); with
    /// `--sampling`, the cost of logits processing and sampling per row.
    BenchRuntime(RuntimeBenchArgs),
    /// Throughput and latency under concurrent clients against a running
    /// orchestrator (see docs/benchmark.md).
    BenchLoad(load::LoadArgs),
    /// Run the draft-service (the same flags as its own binary).
    DraftService(draft_service::Args),
    /// Run the target-service (the same flags as its own binary).
    TargetService(target_service::Args),
    /// Run the orchestrator (the same flags as its own binary).
    Orchestrator(orchestrator::Args),
    /// Ask a service's gRPC health endpoint; exit 0 when it is SERVING
    /// (for container health checks).
    Health(client::HealthArgs),
}

#[derive(Args)]
struct RuntimeBenchArgs {
    #[command(flatten)]
    models: ModelArgs,
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Runs per model; the best is reported (as in the model card).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Time logits processing and sampling (`SamplingParams::distribution`
    /// then `Distribution::sample`) on synthetic logit rows instead; no
    /// model is loaded.
    #[arg(long)]
    sampling: bool,
    /// Vocabulary size of the synthetic rows (with --sampling).
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    /// Temperature (with --sampling); 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Top-p (with --sampling); 1 = off.
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Top-k (with --sampling); 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Time the target's forwards against context instead: ms per forward
    /// of each --blocks size on a past of each of these lengths (e.g.
    /// 128,1024,2048), on --device, with host bytes per step and cache-edit
    /// costs (`scripts/ort_iobinding_loop.py` measures the same in Python).
    #[arg(long, value_delimiter = ',')]
    contexts: Vec<usize>,
    /// New tokens per timed forward (with --contexts).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8])]
    blocks: Vec<usize>,
    /// Timed forwards per point (with --contexts); the median is reported.
    #[arg(long, default_value_t = 30)]
    reps: usize,
}

/// Where the models are and how to run them.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Folder with target/, draft/ and tokenizer.json. Default: the first
    /// that holds a tokenizer.json of `models/` next to the duo binary (or
    /// up to two folders above it, as in cargo's target/release), `./models`,
    /// and the checkout the binary was built from.
    #[arg(long, env = "DUO_MODELS")]
    pub models: Option<PathBuf>,
    /// Target model (folder or .onnx); default: MODELS/target.
    #[arg(long)]
    pub target: Option<PathBuf>,
    /// Draft model (folder or .onnx); default: MODELS/draft.
    #[arg(long)]
    pub draft: Option<PathBuf>,
    /// The tokenizer: a tokenizer.json or a model folder. Default: the
    /// target's folder's own tokenizer.json (with its tokenizer_config.json:
    /// BOS rules, chat template), or MODELS/tokenizer.json for the bundled
    /// pair; a folder without one is an error.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Target device: cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    #[arg(long, default_value_t = 1)]
    pub target_threads: usize,
    #[arg(long, default_value_t = 1)]
    pub draft_threads: usize,
    /// Don't pin the target and draft threads to separate cores.
    #[arg(long)]
    pub no_pin: bool,
    /// ONNX Runtime library (default: $ORT_DYLIB_PATH, else the build's .ort/).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Cost regime: `small` runs the models as they are; `gpu-like` runs
    /// their stand-ins, which decode bit for bit like them but cost like a
    /// 7B target on a GPU beside a CPU draft (built on first use; see
    /// docs/benchmark.md).
    #[arg(long, env = "DUO_REGIME", default_value = "small")]
    pub regime: Regime,
    /// Where the gpu-like stand-ins are kept (default: MODELS/gpu-like,
    /// git-ignored).
    #[arg(long, env = "DUO_REGIME_CACHE")]
    pub regime_cache: Option<PathBuf>,
}

/// How tokens are drawn, for `generate` and `bench`.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// How the draft picks tokens at temperature > 0.
    #[arg(long, value_enum, default_value = "sampled")]
    pub draft_sampling: DraftSampling,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }

    pub fn greedy_drafts(&self) -> bool {
        self.draft_sampling == DraftSampling::Greedy
    }
}

/// How the draft picks its tokens at temperature > 0 (both are lossless).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DraftSampling {
    /// Sample from the draft's own processed distribution q and send q:
    /// the target accepts with min(1, p/q).
    Sampled,
    /// The draft's most likely tokens (a point mass): accepted with p(x).
    Greedy,
}

/// What the models' costs look like; see [`ModelArgs::regime`].
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Regime {
    /// The models as they are: a 3M target and a 0.5M draft, both on CPU.
    Small,
    /// Exact stand-ins with a GPU target's cost structure (duo_core::gpu_like).
    GpuLike,
}

/// Where the models folder is looked for when --models is not given, in
/// order (see [`ModelArgs::models`]).
fn model_dir_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(bin_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from))
    {
        out.extend(bin_dir.ancestors().take(3).map(|d| d.join("models")));
    }
    out.push(PathBuf::from("models"));
    out.push(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models"
    )));
    out
}

/// The first of `candidates` that holds a tokenizer.json, or an error that
/// lists where it looked.
fn find_models(candidates: &[PathBuf]) -> anyhow::Result<PathBuf> {
    candidates
        .iter()
        .find(|d| d.join("tokenizer.json").is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no models folder (target/, draft/, tokenizer.json) found; looked in {}: pass --models DIR or set DUO_MODELS",
                candidates
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

impl ModelArgs {
    /// The models folder: --models (or DUO_MODELS), else the first place of
    /// [`model_dir_candidates`] that holds the models.
    pub fn models_dir(&self) -> anyhow::Result<PathBuf> {
        match &self.models {
            Some(dir) => Ok(dir.clone()),
            None => find_models(&model_dir_candidates()),
        }
    }

    /// The engine configuration; in the gpu-like regime the target and
    /// draft are the stand-ins, built into the cache when missing.
    pub fn config(&self) -> anyhow::Result<EngineConfig> {
        self.config_for(true)
    }

    /// [`Self::config`]; without `with_draft` (autoregressive only) the
    /// draft is not loaded, and need not exist.
    pub fn config_for(&self, with_draft: bool) -> anyhow::Result<EngineConfig> {
        // The models folder is needed only for what is not given explicitly.
        let dir = self.models_dir();
        let part = |given: &Option<PathBuf>, name: &str| -> anyhow::Result<PathBuf> {
            match (given, &dir) {
                (Some(p), _) => Ok(p.clone()),
                (None, Ok(d)) => Ok(d.join(name)),
                (None, Err(e)) => Err(anyhow::anyhow!("{e:#}")),
            }
        };
        let mut cfg = EngineConfig::bundled(Path::new(""));
        cfg.target = part(&self.target, "target")?;
        cfg.with_draft = with_draft || self.regime == Regime::GpuLike;
        cfg.draft = match part(&self.draft, "draft") {
            Ok(d) => d,
            Err(_) if !cfg.with_draft => PathBuf::new(),
            Err(e) => return Err(e),
        };
        // The target's own tokenizer unless one is named (the bundled
        // pair's is MODELS/tokenizer.json).
        cfg.tokenizer = match &self.tokenizer {
            Some(t) => t.clone(),
            None => {
                // A missing model is reported as such, not as a folder
                // without a tokenizer.
                duo_core::runtime::model::resolve_model_file(&cfg.target)?;
                duo_core::tokenizer::model_tokenizer(&cfg.target)?
            }
        };
        if self.regime == Regime::GpuLike {
            let cache = self
                .regime_cache
                .clone()
                .map_or_else(|| part(&None, "gpu-like"), Ok)?;
            let pair = duo_core::gpu_like::gpu_like_pair(&cfg.target, &cfg.draft, &cache)
                .context("making the gpu-like stand-ins")?;
            if pair.built {
                eprintln!("built the gpu-like stand-ins in {}", cache.display());
            }
            cfg.target = pair.target;
            cfg.draft = pair.draft;
        }
        cfg.target_device = self.device;
        cfg.target_threads = self.target_threads;
        cfg.draft_threads = self.draft_threads;
        cfg.pin_cores = !self.no_pin;
        cfg.ort_lib = self.ort_lib.clone();
        cfg.budget = BudgetConfig::default();
        Ok(cfg)
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// The prompt text.
    prompt: String,
    /// Treat the prompt as one user message of a chat: render it with the
    /// model's chat template (tokenizer_config.json), as transformers'
    /// `apply_chat_template(add_generation_prompt=True)` does; a model
    /// without one (the bundled pair) gets the play-script prompt of
    /// /v1/chat/completions.
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    models: ModelArgs,
    /// duodecoding, speculative or autoregressive.
    #[arg(long, default_value = "duodecoding")]
    mode: Mode,
    #[arg(long, short = 'n', default_value_t = 128)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop sequence (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Fixed draft budget γ (default: chosen by the budget controller; 4 for speculative).
    #[arg(long)]
    gamma: Option<usize>,
    /// Most draft branches per round (1 = single sequence).
    #[arg(long, default_value_t = 4)]
    max_branches: usize,
    /// Most hedges per duodecoding round (0 = no hedged drafting): drafts
    /// ready for the likely corrections inside the pending tail. Default:
    /// up to 4 while the target verifies a tail for about one token's cost
    /// (measured), else none.
    #[arg(long)]
    max_hedges: Option<usize>,
    /// Print one JSON object to stdout at the end (text, token_ids,
    /// finish_reason, stats) instead of streaming the text.
    #[arg(long)]
    json: bool,
    /// Keep only the prompt's last tokens that fit the context with
    /// --max-new-tokens (what `duo bench` does with long prompts); without
    /// it a prompt that does not fit is refused, as the server refuses it.
    #[arg(long)]
    cut_prompt: bool,
    /// Also print the generated token ids (stderr, after the stats line).
    #[arg(long)]
    ids: bool,
    /// Stream from a running orchestrator (e.g. 127.0.0.1:50051) instead of in-process models.
    #[arg(long, env = "DUO_ENDPOINT")]
    endpoint: Option<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The services set up their own logging and runtime.
    let command = match cli.command {
        Command::DraftService(a) => return draft_service::main(&a),
        Command::TargetService(a) => return target_service::main(&a),
        Command::Orchestrator(a) => return orchestrator::main(&a),
        Command::Health(a) => return client::health(&a),
        other => other,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let res = match command {
        Command::Generate(a) => generate(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchLoad(a) => load::run(a),
        Command::Up(a) => up::run(a),
        Command::BenchRuntime(a) => bench_runtime(a),
        Command::DraftService(_)
        | Command::TargetService(_)
        | Command::Orchestrator(_)
        | Command::Health(_) => Ok(()),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The prompt's ids: as transformers encodes it (`encode_prompt`: a BOS
/// where the model's tokenizer adds one), or with `chat` as one user
/// message rendered by the model's chat template (encoded without adding
/// special tokens again), else the play-script prompt (with its stop
/// sequences, which are returned).
fn prompt_ids(
    tok: &duo_core::tokenizer::Tokenizer,
    prompt: &str,
    chat: bool,
) -> anyhow::Result<(Vec<u32>, Vec<String>)> {
    use duo_core::chat::{ChatMessage, ChatOptions, render_chat};
    if !chat {
        return Ok((tok.encode_prompt(prompt)?, Vec::new()));
    }
    if tok.chat_templates().is_empty() {
        let t = orchestrator::openai::ChatTemplate {
            assistant_name: "Assistant".into(),
        };
        let text = t.render("user", prompt) + &t.assistant_prefix();
        return Ok((tok.encode_prompt(&text)?, t.stops()));
    }
    let text = render_chat(
        tok,
        &[ChatMessage::new("user", prompt)],
        &ChatOptions::generation(),
    )?;
    Ok((tok.encode(&text)?, Vec::new()))
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let mut params = GenerateParams {
        max_new_tokens: a.max_new_tokens,
        sampling: a.sampling.params(),
        seed: a.seed,
        stop: a.stop.clone(),
        mode: a.mode,
        gamma: a.gamma,
        max_branches: a.max_branches,
        max_hedges: a.max_hedges,
        logprobs: false,
        greedy_drafts: a.sampling.greedy_drafts(),
    };
    // With --json, stdout gets one JSON object at the end (text, token ids,
    // finish reason, stats) and nothing else; otherwise the prompt and the
    // text as it is verified, and a stats line on stderr.
    let mut out = std::io::stdout();
    if !a.json && !a.chat {
        print!("{}", a.prompt);
    }
    let stream = !a.json;
    let mut show = |text: &str| {
        if stream {
            let _ = write!(out, "{text}");
            let _ = out.flush();
        }
    };
    // The prompt's last tokens that fit, when asked to cut it.
    let cut = |ids: Vec<u32>, context: usize| -> Vec<u32> {
        let room = context.saturating_sub(a.max_new_tokens);
        if a.cut_prompt && ids.len() > room {
            eprintln!(
                "(prompt cut from the left: {} of {} tokens kept)",
                room,
                ids.len()
            );
            ids[ids.len() - room..].to_vec()
        } else {
            ids
        }
    };
    let g = match &a.endpoint {
        Some(endpoint) => {
            let mut remote = client::Remote::connect(endpoint)?;
            let prompt = if a.cut_prompt || a.chat {
                // Encoded here, with the local tokenizer (the server's must
                // be the same).
                let info = remote.info()?;
                let tok =
                    duo_core::tokenizer::Tokenizer::load(&a.models.config_for(false)?.tokenizer)?;
                let (ids, stops) = prompt_ids(&tok, &a.prompt, a.chat)?;
                params.stop.extend(stops);
                client::Prompt::Ids(cut(ids, info.context_len as usize))
            } else {
                client::Prompt::Text(a.prompt.clone())
            };
            remote.generate(prompt, &params, show)?
        }
        None => {
            let cfg = a.models.config_for(a.mode != Mode::Autoregressive)?;
            let mut engine = Engine::load(&cfg).context("loading the models")?;
            let (ids, stops) = prompt_ids(engine.tokenizer(), &a.prompt, a.chat)?;
            params.stop.extend(stops);
            let prompt = cut(ids, engine.limits().context_len);
            engine.generate(prompt, &params, &mut |text, _, _| {
                show(text);
                true
            })?
        }
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "text": g.text,
                "token_ids": g.tokens,
                "finish_reason": g.finish_reason,
                "stats": g.stats,
            })
        );
    } else {
        println!();
        eprintln!("{}", stats_line(&g));
        if a.ids {
            eprintln!("token ids: {:?}", g.tokens);
        }
    }
    Ok(())
}

/// One human line of a generation's stats.
pub fn stats_line(g: &duo_core::engine::Generation) -> String {
    let s = &g.stats;
    format!(
        "[{}] {} tokens in {:.1} ms ({:.1} tok/s), TTFT {:.1} ms, {} rounds, {:.2} tokens/round, drafted {} accepted {}, gamma {:.1}, k {:?}, hedge hits {}/{}, single-token rounds {}, idle target {:.0}% draft {:.0}%, finish {:?}",
        s.mode,
        s.new_tokens,
        s.total_ms,
        s.tokens_per_s,
        s.ttft_ms,
        s.rounds,
        s.mean_accepted,
        s.drafted,
        s.accepted,
        s.gamma_mean,
        s.k_hist,
        s.hedge_hits,
        s.hedges,
        s.single_token_rounds,
        100.0 * s.target_idle_ms / s.total_ms.max(1e-9),
        100.0 * s.draft_idle_ms / s.total_ms.max(1e-9),
        g.finish_reason,
    )
}

/// Greedy decoding loop straight on the runtime: prefill the card's first
/// fixture prompt, then one token per forward. With `--sampling`, the
/// sampling benchmark instead ([`bench::sampling`]).
fn bench_runtime(a: RuntimeBenchArgs) -> anyhow::Result<()> {
    use duo_core::runtime::{CausalLm, ModelOptions};
    if a.sampling {
        let params = SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
        };
        return bench::sampling(&params, a.vocab);
    }
    let cfg = a.models.config()?;
    if !a.contexts.is_empty() {
        let opts = ModelOptions {
            device: cfg.target_device,
            intra_threads: a.models.target_threads,
            ort_lib: cfg.ort_lib.clone(),
        };
        let mut lm = CausalLm::load(&cfg.target, &opts)?;
        let report = runtime_sweep::sweep(&mut lm, &a.contexts, &a.blocks, a.reps)?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(a.models.models_dir()?.join("fixtures/target.json"))
            .context("reading the fixture prompt")?,
    )?;
    let prompt: Vec<u32> = serde_json::from_value(fixture["greedy"][0]["ids"].clone())?;
    let card: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(a.models.models_dir()?.join("results.json")).unwrap_or_default(),
    )
    .unwrap_or_default();
    let mut report = serde_json::Map::new();
    for (name, path, device) in [
        ("target", &cfg.target, cfg.target_device),
        ("draft", &cfg.draft, duo_core::runtime::Device::Cpu),
    ] {
        let opts = ModelOptions {
            device,
            intra_threads: 1,
            ort_lib: cfg.ort_lib.clone(),
        };
        let mut lm = CausalLm::load(path, &opts)?;
        let mut best = 0f64;
        for _ in 0..a.runs.max(1) {
            let start = std::time::Instant::now();
            let mut seq = lm.sequence()?;
            let mut logits = lm.extend(&mut seq, &prompt)?;
            for _ in 1..a.new_tokens {
                let t = duo_core::sampling::argmax(logits.last());
                logits = lm.extend(&mut seq, &[t])?;
            }
            best = best.max(a.new_tokens as f64 / start.elapsed().as_secs_f64());
        }
        // Forward cost at past 128 (as in the model card): +1 and +8 tokens.
        let mut costs = serde_json::Map::new();
        for block in [1usize, 8] {
            let ms = bench::forward_ms(&mut lm, 128, block, 50, 350)?;
            costs.insert(format!("+{block}_ms"), ms.into());
        }
        // k branches from one 128-token context, 4 greedy steps each: one
        // batched forward per step vs k sequences run one after another.
        for k in [2usize, 4] {
            let mut base = lm.sequence()?;
            lm.extend(&mut base, &vec![1; 128])?;
            let (mut batched, mut sequential) = (Vec::new(), Vec::new());
            for rep in 0..60 {
                let start = std::time::Instant::now();
                let mut br = base.fork(k)?;
                let mut toks: Vec<u32> = (0..k as u32).map(|j| 3 + j).collect();
                for _ in 0..4 {
                    let l = lm.extend_branches(&mut br, &toks)?;
                    toks = (0..k)
                        .map(|j| duo_core::sampling::argmax(l.row(j)))
                        .collect();
                }
                let b = start.elapsed().as_secs_f64() * 1e3;
                let start = std::time::Instant::now();
                for j in 0..k as u32 {
                    base.truncate(128)?;
                    let mut t = 3 + j;
                    for _ in 0..4 {
                        let l = lm.extend(&mut base, &[t])?;
                        t = duo_core::sampling::argmax(l.last());
                    }
                }
                base.truncate(128)?;
                let q = start.elapsed().as_secs_f64() * 1e3;
                if rep >= 10 {
                    batched.push(b);
                    sequential.push(q);
                }
            }
            batched.sort_by(f64::total_cmp);
            sequential.sort_by(f64::total_cmp);
            let (b, q) = (batched[batched.len() / 2], sequential[sequential.len() / 2]);
            eprintln!(
                "{name}: {k} branches x 4 steps: batched {b:.2} ms, sequential {q:.2} ms ({:.2}x)",
                q / b
            );
            costs.insert(format!("branches{k}x4_batched_ms"), b.into());
            costs.insert(format!("branches{k}x4_sequential_ms"), q.into());
        }
        let python = card[name]["python_ort_ar_tokens_per_s"].as_f64();
        eprintln!(
            "{name}: Rust runtime {best:.0} tokens/s; Python onnxruntime (model card) {}",
            python.map_or("n/a".into(), |p| format!(
                "{p:.0} tokens/s ({:.2}x)",
                best / p
            ))
        );
        report.insert(
            name.into(),
            serde_json::json!({"rust_tokens_per_s": best, "python_tokens_per_s": python,
                "rust_over_python": python.map(|p| best / p), "forward_ms_past128": costs}),
        );
    }
    let t1 = report["target"]["forward_ms_past128"]["+1_ms"]
        .as_f64()
        .unwrap_or(0.0);
    let d1 = report["draft"]["forward_ms_past128"]["+1_ms"]
        .as_f64()
        .unwrap_or(1.0);
    eprintln!(
        "forward at past 128 (median): target/draft cost per token {:.2}x",
        t1 / d1
    );
    report.insert("target_over_draft_1token".into(), (t1 / d1).into());
    println!("{}", serde_json::Value::Object(report));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_models_folder_is_the_first_candidate_holding_a_tokenizer() {
        let root = std::env::temp_dir().join(format!("duo-models-{}", std::process::id()));
        let (empty, full) = (root.join("empty"), root.join("full"));
        std::fs::create_dir_all(&empty).unwrap();
        std::fs::create_dir_all(&full).unwrap();
        std::fs::write(full.join("tokenizer.json"), "{}").unwrap();
        let found = find_models(&[root.join("missing"), empty.clone(), full.clone()]).unwrap();
        assert_eq!(found, full);
        let err = find_models(&[root.join("missing"), empty.clone()]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("--models") && msg.contains(&empty.display().to_string()),
            "{msg}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
