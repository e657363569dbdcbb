//! `duo bench`: the three modes on the same prompts, in one process, greedy.
//! The last line of output is one JSON object (see the README). Also the
//! sampling benchmark of `duo bench-runtime --sampling` ([`sampling`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use duo_core::engine::{Engine, GenerateParams, Generation, Mode};
use duo_core::tokenizer::Tokenizer;
use serde::Serialize;
use serde_json::json;

use crate::ModelArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// JSON-lines prompt files (prompt in `turns[0]`); default: the bundled Spec-Bench files.
    #[arg(long)]
    prompts: Vec<PathBuf>,
    /// Prompts taken from each category (file order).
    #[arg(long, default_value_t = 6)]
    per_category: usize,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// γ for speculative mode; several (`4,6,8`) run SpS at each, and the
    /// fastest is the `best_sps` baseline (`duo_over_best_sps`); the first
    /// is `duo_over_sps`'s.
    #[arg(long, value_delimiter = ',', default_values_t = [duo_core::engine::driver::DEFAULT_SPS_GAMMA, 6, 8])]
    sps_gamma: Vec<usize>,
    /// Fixed γ for duodecoding (default: the budget controller decides).
    #[arg(long)]
    duo_gamma: Option<usize>,
    #[arg(long, default_value_t = 4)]
    max_branches: usize,
    /// Most hedges per duodecoding round (0 = no hedged drafting; default:
    /// up to 4 while the target's verification is flat, measured).
    #[arg(long)]
    max_hedges: Option<usize>,
    /// Sampling (temperature 0 = greedy: then the modes' outputs are
    /// checked for identity; at T > 0 they are samples and are not).
    #[command(flatten)]
    sampling: crate::SamplingArgs,
    /// Skip the 2-thread autoregressive reference.
    #[arg(long)]
    no_ar2: bool,
    /// Write the full results (JSON) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write a bar chart (SVG) here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Also run the modes through a running orchestrator (e.g. 127.0.0.1:50051)
    /// and report `grpc_over_embedded`.
    #[arg(long)]
    endpoint: Option<String>,
}

pub(crate) struct Prompt {
    pub category: String,
    pub ids: Vec<u32>,
    pub cut: bool,
}

#[derive(Default, Serialize, Clone)]
struct ModeTotals {
    tokens: usize,
    total_ms: f64,
    ttft_ms_sum: f64,
    rounds: usize,
    drafted: usize,
    accepted: usize,
    target_busy_ms: f64,
    target_idle_ms: f64,
    draft_busy_ms: f64,
    draft_idle_ms: f64,
    gamma_sum: f64,
    runs: usize,
    k_rounds: std::collections::BTreeMap<usize, usize>,
    draft_wire_bytes: usize,
    hedges: usize,
    hedge_hits: usize,
    single_token_rounds: usize,
    round_kinds: std::collections::BTreeMap<&'static str, duo_core::engine::driver::KindCount>,
}

impl ModeTotals {
    fn add(&mut self, g: &Generation) {
        let s = &g.stats;
        self.tokens += s.new_tokens;
        self.total_ms += s.total_ms;
        self.ttft_ms_sum += s.ttft_ms;
        self.rounds += s.rounds;
        self.drafted += s.drafted;
        self.accepted += s.accepted;
        self.target_busy_ms += s.target_busy_ms;
        self.target_idle_ms += s.target_idle_ms;
        self.draft_busy_ms += s.draft_busy_ms;
        self.draft_idle_ms += s.draft_idle_ms;
        self.gamma_sum += s.gamma_mean;
        self.draft_wire_bytes += s.draft_wire_bytes;
        self.runs += 1;
        for (k, n) in &s.k_hist {
            *self.k_rounds.entry(*k).or_default() += n;
        }
        self.hedges += s.hedges;
        self.hedge_hits += s.hedge_hits;
        self.single_token_rounds += s.single_token_rounds;
        for (kind, c) in &s.round_kinds {
            let e = self.round_kinds.entry(kind.as_str()).or_default();
            e.rounds += c.rounds;
            e.tokens += c.tokens;
        }
    }
    /// Rounds that committed one token, over all rounds.
    fn single_token_fraction(&self) -> f64 {
        self.single_token_rounds as f64 / self.rounds.max(1) as f64
    }
    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / (self.total_ms / 1e3).max(1e-9)
    }
    fn ttft_ms(&self) -> f64 {
        self.ttft_ms_sum / self.runs.max(1) as f64
    }
    fn mean_accepted(&self) -> f64 {
        self.tokens as f64 / self.rounds.max(1) as f64
    }
    fn wire_bytes_per_round(&self) -> f64 {
        self.draft_wire_bytes as f64 / self.rounds.max(1) as f64
    }
    fn summary(&self) -> serde_json::Value {
        json!({
            "tokens_per_s": self.tokens_per_s(),
            "ttft_ms": self.ttft_ms(),
            "mean_accepted": self.mean_accepted(),
            "tokens": self.tokens,
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.accepted as f64 / self.drafted.max(1) as f64,
            "target_idle_fraction": self.target_idle_ms / self.total_ms.max(1e-9),
            "draft_idle_fraction": self.draft_idle_ms / self.total_ms.max(1e-9),
            "target_ms_per_round": self.target_busy_ms / self.rounds.max(1) as f64,
            "draft_ms_per_round": self.draft_busy_ms / self.rounds.max(1) as f64,
            "gamma_mean": self.gamma_sum / self.runs.max(1) as f64,
            "k_rounds": self.k_rounds,
            "draft_wire_bytes_per_round": self.wire_bytes_per_round(),
            "hedges": self.hedges,
            "hedge_hits": self.hedge_hits,
            "single_token_round_fraction": self.single_token_fraction(),
            "tokens_per_round_by_kind": self.round_kinds.iter().map(|(k, c)| {
                (k.to_string(), json!({"rounds": c.rounds, "tokens_per_round": c.tokens as f64 / c.rounds.max(1) as f64}))
            }).collect::<serde_json::Map<_, _>>(),
        })
    }
}

fn load_prompts(args: &BenchArgs, engine: &Engine) -> anyhow::Result<Vec<Prompt>> {
    let budget = engine
        .limits()
        .context_len
        .saturating_sub(args.max_new_tokens);
    if budget == 0 {
        bail!(
            "max_new_tokens {} leaves no room for a prompt in the context",
            args.max_new_tokens
        );
    }
    read_prompts(&args.prompts, args.per_category, engine.tokenizer(), budget)
}

/// Prompts from JSON-lines files (default: the bundled Spec-Bench), at most
/// `per_category` per category, each cut to its last `budget` tokens.
pub(crate) fn read_prompts(
    files: &[PathBuf],
    per_category: usize,
    tokenizer: &Tokenizer,
    budget: usize,
) -> anyhow::Result<Vec<Prompt>> {
    let files: Vec<PathBuf> = if files.is_empty() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/spec-bench");
        let mut f: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        f.sort();
        f
    } else {
        files.to_vec()
    };
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let mut taken = std::collections::HashMap::<String, usize>::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", file.display(), n + 1))?;
            let Some(prompt) = v["turns"][0].as_str() else {
                bail!("{}:{}: no turns[0] string", file.display(), n + 1);
            };
            let category = v["category"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| {
                    file.file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default()
                });
            let count = taken.entry(category.clone()).or_default();
            if *count >= per_category {
                continue;
            }
            *count += 1;
            let mut ids = tokenizer.encode_prompt(prompt)?;
            let cut = ids.len() > budget;
            if cut {
                ids.drain(..ids.len() - budget);
            }
            if !ids.is_empty() {
                out.push(Prompt { category, ids, cut });
            }
        }
    }
    if out.is_empty() {
        bail!("no prompts found");
    }
    Ok(out)
}

/// One mode of the comparison: speculative mode runs once per γ asked for.
#[derive(Clone, Copy)]
struct Run {
    mode: Mode,
    /// Speculative mode's γ.
    sps_gamma: usize,
}

impl Run {
    fn label(&self) -> String {
        match self.mode {
            Mode::Speculative => format!("sps γ={}", self.sps_gamma),
            m => m.to_string(),
        }
    }
}

/// The runs: autoregressive, speculative at each γ, duodecoding (last).
fn runs(args: &BenchArgs) -> Vec<Run> {
    let first = first_sps_gamma(args);
    let mut runs = vec![Run {
        mode: Mode::Autoregressive,
        sps_gamma: first,
    }];
    runs.extend(args.sps_gamma.iter().map(|&g| Run {
        mode: Mode::Speculative,
        sps_gamma: g,
    }));
    runs.push(Run {
        mode: Mode::Duodecoding,
        sps_gamma: first,
    });
    runs
}

fn first_sps_gamma(args: &BenchArgs) -> usize {
    args.sps_gamma
        .first()
        .copied()
        .unwrap_or(duo_core::engine::driver::DEFAULT_SPS_GAMMA)
}

fn params(args: &BenchArgs, mode: Mode) -> GenerateParams {
    run_params(
        args,
        Run {
            mode,
            sps_gamma: first_sps_gamma(args),
        },
    )
}

fn run_params(args: &BenchArgs, run: Run) -> GenerateParams {
    let mode = run.mode;
    GenerateParams {
        max_new_tokens: args.max_new_tokens,
        mode,
        gamma: match mode {
            Mode::Speculative => Some(run.sps_gamma),
            Mode::Duodecoding => args.duo_gamma,
            Mode::Autoregressive => None,
        },
        max_branches: args.max_branches,
        max_hedges: args.max_hedges,
        sampling: args.sampling.params(),
        greedy_drafts: args.sampling.greedy_drafts(),
        ..GenerateParams::default()
    }
}

/// Median forward costs at a 128-token past, one intra-op thread each:
/// what sets the speculative ceiling of a regime (see docs/benchmark.md).
pub(crate) fn cost_structure(
    cfg: &duo_core::engine::EngineConfig,
) -> anyhow::Result<serde_json::Value> {
    use duo_core::runtime::{CausalLm, ModelOptions};
    let opts = ModelOptions {
        intra_threads: 1,
        ort_lib: cfg.ort_lib.clone(),
        ..ModelOptions::default()
    };
    let median_ms = |lm: &mut CausalLm, tokens: usize| forward_ms(lm, 128, tokens, 5, 20);
    let target_opts = ModelOptions {
        device: cfg.target_device,
        ..opts.clone()
    };
    let mut target = CausalLm::load(&cfg.target, &target_opts)?;
    let t1 = median_ms(&mut target, 1)?;
    let t8 = median_ms(&mut target, 8)?;
    let t16 = median_ms(&mut target, 16)?;
    drop(target);
    let mut draft = CausalLm::load(&cfg.draft, &opts)?;
    let d1 = median_ms(&mut draft, 1)?;
    let d8 = median_ms(&mut draft, 8)?;
    Ok(json!({
        "target_step_ms": t1,
        "verify8_over_1": t8 / t1,
        "verify16_over_1": t16 / t1,
        "draft_step_ms": d1,
        "draft8_over_1": d8 / d1,
        "target_over_draft_step": t1 / d1,
    }))
}

/// Median milliseconds of one forward of `tokens` new tokens after a
/// `past`-token past (the model card's measure uses 128): `reps` timed runs
/// after `warmup` untimed ones, the past truncated back each time.
pub(crate) fn forward_ms(
    lm: &mut duo_core::runtime::CausalLm,
    past: usize,
    tokens: usize,
    warmup: usize,
    reps: usize,
) -> anyhow::Result<f64> {
    let mut seq = lm.sequence()?;
    lm.extend_last(&mut seq, &vec![1; past], 1)?;
    let mut times = Vec::new();
    for rep in 0..warmup + reps.max(1) {
        let start = std::time::Instant::now();
        lm.extend(&mut seq, &vec![2; tokens])?;
        if rep >= warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        seq.truncate(past)?;
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let cfg = args.models.config()?;
    let regime = args.models.regime;
    let costs = cost_structure(&cfg)?;
    eprintln!("regime {regime:?}: cost structure {costs}");
    // A GPU target can't borrow the CPU's cores: in the gpu-like regime the
    // target's core stands for the GPU, and AR runs on it alone.
    let no_ar2 = args.no_ar2 || regime == crate::Regime::GpuLike;
    // The 2-thread reference runs first, before any thread is pinned to a core.
    let mut ar2 = ModeTotals::default();
    let mut engine = Engine::load(&cfg).context("loading the models")?;
    let prompts = load_prompts(&args, &engine)?;
    let cut = prompts.iter().filter(|p| p.cut).count();
    eprintln!(
        "{} prompts ({} cut from the left to fit the {}-token context with {} new tokens)",
        prompts.len(),
        cut,
        engine.limits().context_len,
        args.max_new_tokens
    );
    if !no_ar2 {
        let mut cfg2 = cfg.clone();
        cfg2.target_threads = 2;
        cfg2.pin_cores = false;
        let mut e2 = Engine::load(&cfg2)?;
        let p = params(&args, Mode::Autoregressive);
        e2.generate(prompts[0].ids.clone(), &p, &mut |_, _, _| true)?;
        for pr in &prompts {
            ar2.add(&e2.generate(pr.ids.clone(), &p, &mut |_, _, _| true)?);
        }
        eprintln!(
            "autoregressive, target on 2 threads: {:.1} tok/s",
            ar2.tokens_per_s()
        );
    }
    let modes = [Mode::Autoregressive, Mode::Speculative, Mode::Duodecoding];
    let runs = runs(&args);
    // Warm-up (also warms the budget controller's estimates).
    for r in &runs {
        engine.generate(
            prompts[0].ids.clone(),
            &run_params(&args, *r),
            &mut |_, _, _| true,
        )?;
    }
    let mut totals: Vec<ModeTotals> = vec![ModeTotals::default(); runs.len()];
    let mut per_category: std::collections::BTreeMap<String, Vec<ModeTotals>> = Default::default();
    let (mut divergences, mut near_ties) = (0usize, 0usize);
    let mut divergence_notes = Vec::new();
    let mut ar_outputs: Vec<Vec<u32>> = Vec::new();
    for (i, pr) in prompts.iter().enumerate() {
        let mut outs: Vec<Generation> = Vec::new();
        for (mi, r) in runs.iter().enumerate() {
            let g = engine.generate(pr.ids.clone(), &run_params(&args, *r), &mut |_, _, _| true)?;
            totals[mi].add(&g);
            per_category
                .entry(pr.category.clone())
                .or_insert_with(|| vec![ModeTotals::default(); runs.len()])[mi]
                .add(&g);
            outs.push(g);
        }
        ar_outputs.push(outs[0].tokens.clone());
        // Greedy outputs must be identical across modes; samples differ.
        let greedy = args.sampling.params().is_greedy();
        for (mi, g) in outs.iter().enumerate().skip(1) {
            if greedy && g.tokens != outs[0].tokens {
                divergences += 1;
                let at = g
                    .tokens
                    .iter()
                    .zip(&outs[0].tokens)
                    .take_while(|(a, b)| a == b)
                    .count();
                let mut ctx = pr.ids.clone();
                ctx.extend_from_slice(&outs[0].tokens[..at.min(outs[0].tokens.len())]);
                let gap = engine.target_top2_gap(&ctx)?;
                if gap < duo_core::speculative::verify::NEAR_TIE_GAP {
                    near_ties += 1;
                }
                divergence_notes.push(
                    json!({"prompt": i, "mode": runs[mi].label(), "position": at, "top2_gap": gap}),
                );
                eprintln!(
                    "prompt {i}: {} diverged from autoregressive at token {at} (target top-2 gap {gap:.2e})",
                    runs[mi].label()
                );
            }
        }
        let duo_g = &outs[outs.len() - 1];
        let sps_line: Vec<String> = outs[1..outs.len() - 1]
            .iter()
            .zip(&runs[1..])
            .map(|(g, r)| format!("{} {:>6.1}", r.label(), g.stats.tokens_per_s))
            .collect();
        eprintln!(
            "[{}/{}] {:<15} ar {:>6.1}  {}  duo {:>6.1} tok/s  (τ duo {:.2}, hedge hits {}/{})",
            i + 1,
            prompts.len(),
            pr.category,
            outs[0].stats.tokens_per_s,
            sps_line.join("  "),
            duo_g.stats.tokens_per_s,
            duo_g.stats.mean_accepted,
            duo_g.stats.hedge_hits,
            duo_g.stats.hedges,
        );
    }
    let grpc = match &args.endpoint {
        Some(endpoint) => Some(run_grpc(endpoint, &args, &prompts, &ar_outputs, &modes)?),
        None => None,
    };
    let (ar, sps, duo) = (&totals[0], &totals[1], &totals[totals.len() - 1]);
    let sps_all = &totals[1..totals.len() - 1];
    let (best_i, best_sps) = sps_all
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.tokens_per_s().total_cmp(&b.1.tokens_per_s()))
        .unwrap_or((0, sps));
    let best_sps_gamma = args.sps_gamma.get(best_i).copied();
    let ar_ms_per_token = ar.total_ms / ar.tokens.max(1) as f64;
    let duo_target_ms_per_round = duo.target_busy_ms / duo.rounds.max(1) as f64;
    let limit = duo.mean_accepted() * ar_ms_per_token / duo_target_ms_per_round.max(1e-9);
    let duo_over_ar = duo.tokens_per_s() / ar.tokens_per_s();
    let report = json!({
        "machine": machine(),
        "regime": regime,
        "baseline": baseline_note(regime),
        "cost_structure": costs,
        "prompts": prompts.len(),
        "prompts_cut_to_fit": cut,
        "context_len": engine.limits().context_len,
        "max_new_tokens": args.max_new_tokens,
        "sps_gamma": args.sps_gamma,
        "best_sps_gamma": best_sps_gamma,
        "duo_gamma": args.duo_gamma,
        "max_branches": args.max_branches,
        "max_hedges": args.max_hedges,
        "modes": {
            "autoregressive": ar.summary(),
            "speculative": sps.summary(),
            "speculative_by_gamma": args.sps_gamma.iter().zip(sps_all).map(|(g, t)| (g.to_string(), t.summary())).collect::<serde_json::Map<_, _>>(),
            "duodecoding": duo.summary(),
            "ar_2threads": if no_ar2 { serde_json::Value::Null } else { ar2.summary() },
        },
        "per_category": per_category.iter().map(|(c, t)| (c.clone(), json!({
            "ar_tokens_per_s": t[0].tokens_per_s(),
            "sps_tokens_per_s": t[1].tokens_per_s(),
            "best_sps_tokens_per_s": t[1..t.len() - 1].iter().map(ModeTotals::tokens_per_s).fold(0.0, f64::max),
            "duo_tokens_per_s": t[t.len() - 1].tokens_per_s(),
            "duo_mean_accepted": t[t.len() - 1].mean_accepted(),
        }))).collect::<serde_json::Map<_, _>>(),
        "divergences": divergence_notes,
        "grpc": grpc.as_ref().map(|(t, identical)| json!({
            "endpoint": args.endpoint,
            "autoregressive": t[0].summary(),
            "speculative": t[1].summary(),
            "duodecoding": t[2].summary(),
            "identical_to_in_process_autoregressive": identical,
        })),
    });
    let headline = json!({
        "duo_over_ar": duo_over_ar,
        "duo_over_sps": duo.tokens_per_s() / sps.tokens_per_s(),
        "duo_over_best_sps": duo.tokens_per_s() / best_sps.tokens_per_s(),
        "best_sps_gamma": best_sps_gamma,
        "best_sps_tokens_per_s": best_sps.tokens_per_s(),
        "ttft_duo_over_best_sps": duo.ttft_ms() / best_sps.ttft_ms().max(1e-9),
        "duo_single_token_round_fraction": duo.single_token_fraction(),
        "duo_hedges": duo.hedges,
        "duo_hedge_hits": duo.hedge_hits,
        "ttft_duo_over_sps": duo.ttft_ms() / sps.ttft_ms().max(1e-9),
        "limit_duo_over_ar": limit,
        "fraction_of_limit": duo_over_ar / limit.max(1e-9),
        "mean_accepted": duo.mean_accepted(),
        "sps_mean_accepted": sps.mean_accepted(),
        "identical": args.sampling.params().is_greedy().then_some(divergences == 0),
        "temperature": args.sampling.temperature,
        "draft_sampling": args.sampling.draft_sampling,
        "duo_acceptance_rate": duo.accepted as f64 / duo.drafted.max(1) as f64,
        "sps_acceptance_rate": sps.accepted as f64 / sps.drafted.max(1) as f64,
        "duo_wire_bytes_per_round": duo.wire_bytes_per_round(),
        "sps_wire_bytes_per_round": sps.wire_bytes_per_round(),
        "near_tie_divergences": near_ties,
        "hard_divergences": divergences - near_ties,
        "ar_tokens_per_s": ar.tokens_per_s(),
        "sps_tokens_per_s": sps.tokens_per_s(),
        "duo_tokens_per_s": duo.tokens_per_s(),
        "ar_2threads_tokens_per_s": if no_ar2 { serde_json::Value::Null } else { json!(ar2.tokens_per_s()) },
        "duo_target_idle_fraction": duo.target_idle_ms / duo.total_ms.max(1e-9),
        "duo_draft_idle_fraction": duo.draft_idle_ms / duo.total_ms.max(1e-9),
        "prompts": prompts.len(),
        "regime": regime,
        "target_step_ms": costs["target_step_ms"],
        "draft_step_ms": costs["draft_step_ms"],
        "verify8_over_1": costs["verify8_over_1"],
    });
    let mut headline = headline;
    if let Some((t, identical)) = &grpc {
        headline["grpc_over_embedded"] = json!(t[2].tokens_per_s() / duo.tokens_per_s());
        headline["grpc_duo_over_ar"] = json!(t[2].tokens_per_s() / t[0].tokens_per_s());
        headline["grpc_identical"] = json!(identical);
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = &args.out {
        let mut full = report.clone();
        full["headline"] = headline.clone();
        std::fs::write(path, serde_json::to_string_pretty(&full)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(
            path,
            svg(
                &[("AR", ar), ("SpS", sps), ("Duo", duo)],
                if no_ar2 { None } else { Some(&ar2) },
            ),
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", serde_json::to_string(&headline)?);
    Ok(())
}

/// What the autoregressive baseline stands for in `regime`.
fn baseline_note(regime: crate::Regime) -> &'static str {
    match regime {
        crate::Regime::Small => {
            "small: target and draft on one CPU core each; autoregressive runs the target on one core, ar_2threads on both (the fastest plain baseline on this pair)"
        }
        crate::Regime::GpuLike => {
            "gpu-like: the target's core stands for the GPU and the other core for the CPU; autoregressive runs the target on its core alone (a GPU target can't borrow the CPU's cores), so there is no 2-thread row"
        }
    }
}

pub(crate) fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::fs::read_to_string("/proc/cpuinfo").map(|s| s.matches("processor\t").count()).unwrap_or(0),
    })
}

/// Two bar charts side by side: tokens/s and TTFT per mode.
fn svg(modes: &[(&str, &ModeTotals)], ar2: Option<&ModeTotals>) -> String {
    let mut bars: Vec<(String, f64, f64)> = modes
        .iter()
        .map(|(n, t)| (n.to_string(), t.tokens_per_s(), t.ttft_ms()))
        .collect();
    if let Some(t) = ar2 {
        bars.push(("AR 2 thr".into(), t.tokens_per_s(), t.ttft_ms()));
    }
    let (w, h, pad) = (640.0, 300.0, 40.0);
    let panel = (w - 3.0 * pad) / 2.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (pi, (title, pick)) in [
        ("tokens/s (higher is better)", 0usize),
        ("TTFT ms (lower is better)", 1),
    ]
    .iter()
    .enumerate()
    {
        let x0 = pad + pi as f64 * (panel + pad);
        let vals: Vec<f64> = bars
            .iter()
            .map(|b| if *pick == 0 { b.1 } else { b.2 })
            .collect();
        let max = vals.iter().copied().fold(1e-9, f64::max);
        s += &format!(
            "<text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-weight=\"bold\">{title}</text>\n",
            x0 + panel / 2.0
        );
        let bw = panel / bars.len() as f64;
        for (i, (b, v)) in bars.iter().zip(&vals).enumerate() {
            let bh = (h - 2.5 * pad) * v / max;
            let x = x0 + i as f64 * bw + bw * 0.15;
            let y = h - pad - bh;
            let color = ["#888", "#4a7fc1", "#d9822b", "#bbb"][i.min(3)];
            s += &format!(
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{color}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{v:.1}</text>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
                bw * 0.7,
                x + bw * 0.35,
                y - 4.0,
                x + bw * 0.35,
                h - pad + 16.0,
                b.0
            );
        }
    }
    s + "</svg>\n"
}

/// The three modes through a running orchestrator; returns per-mode totals
/// and whether every output equalled the in-process autoregressive one.
fn run_grpc(
    endpoint: &str,
    args: &BenchArgs,
    prompts: &[Prompt],
    ar_outputs: &[Vec<u32>],
    modes: &[Mode; 3],
) -> anyhow::Result<(Vec<ModeTotals>, bool)> {
    let mut remote = crate::client::Remote::connect(endpoint)?;
    for m in modes {
        remote.generate(
            crate::client::Prompt::Ids(prompts[0].ids.clone()),
            &params(args, *m),
            |_| {},
        )?;
    }
    let mut totals = vec![ModeTotals::default(); 3];
    let mut identical = true;
    for (i, pr) in prompts.iter().enumerate() {
        for (mi, m) in modes.iter().enumerate() {
            let g = remote.generate(
                crate::client::Prompt::Ids(pr.ids.clone()),
                &params(args, *m),
                |_| {},
            )?;
            if args.sampling.params().is_greedy() && g.tokens != ar_outputs[i] {
                identical = false;
                eprintln!("prompt {i}: {m} over gRPC differs from in-process autoregressive");
            }
            totals[mi].add(&g);
        }
        eprintln!(
            "[grpc {}/{}] ar {:>6.1}  sps {:>6.1}  duo {:>6.1} tok/s",
            i + 1,
            prompts.len(),
            totals[0].tokens_per_s(),
            totals[1].tokens_per_s(),
            totals[2].tokens_per_s()
        );
    }
    Ok((totals, identical))
}

/// Settings of the sampling benchmark (`duo bench-runtime --sampling`).
mod sampling_setup {
    /// Distinct synthetic rows, cycled (fresh rows, as a model's logits are).
    pub const ROWS: usize = 64;
    /// Untimed calls before the timed ones.
    pub const WARMUP: usize = 100;
    /// Timed `distribution` + `sample` calls.
    pub const TIMED: usize = 2000;
    /// The rows are standard normal logits, all scaled by one factor chosen
    /// so that their softmax at temperature 1 has this entropy on average
    /// (a language model's next-token entropy is typically a few nats).
    pub const ENTROPY_NATS: f64 = 3.0;
    /// Seed of the synthetic rows and of the sampling RNG.
    pub const SEED: u64 = 0x5eed;
}

/// `duo bench-runtime --sampling`: milliseconds per row of
/// [`duo_core::sampling::SamplingParams::distribution`] followed by
/// [`duo_core::sampling::Distribution::sample`] on synthetic logit rows
/// (see [`sampling_setup`]). Prints one JSON object as its last line.
pub(crate) fn sampling(
    params: &duo_core::sampling::SamplingParams,
    vocab: usize,
) -> anyhow::Result<()> {
    use sampling_setup::{ENTROPY_NATS, ROWS, SEED, TIMED, WARMUP};
    params.validate()?;
    if vocab == 0 {
        bail!("--vocab must be at least 1");
    }
    let normals = normals(SEED, ROWS * vocab);
    let scale = scale_for_entropy(&normals, vocab, ENTROPY_NATS);
    let rows: Vec<Vec<f32>> = normals
        .chunks_exact(vocab)
        .map(|r| r.iter().map(|&g| (g * scale) as f32).collect())
        .collect();
    let entropy = mean_entropy(&normals, vocab, scale);
    let mut rng = duo_core::sampling::rng_from_seed(SEED);
    let mut support = 0usize;
    for row in rows.iter().cycle().take(WARMUP) {
        std::hint::black_box(params.distribution(row).sample(&mut rng));
    }
    let start = std::time::Instant::now();
    for row in rows.iter().cycle().take(TIMED) {
        let d = params.distribution(std::hint::black_box(row));
        support += d.entries().len();
        std::hint::black_box(d.sample(&mut rng));
    }
    let ms_per_row = start.elapsed().as_secs_f64() * 1e3 / TIMED as f64;
    eprintln!(
        "sampling: {ms_per_row:.4} ms per row (vocab {vocab}, temperature {}, top_p {}, top_k {}; \
         normal logits x {scale:.3}, softmax entropy {entropy:.2} nats at temperature 1; \
         mean support {:.1} tokens)",
        params.temperature,
        params.top_p,
        params.top_k,
        support as f64 / TIMED as f64
    );
    println!(
        "{}",
        json!({
            "bench": "sampling",
            "ms_per_row": ms_per_row,
            "vocab": vocab,
            "temperature": f32_json(params.temperature),
            "top_p": f32_json(params.top_p),
            "top_k": params.top_k,
            "rows": TIMED,
            "distinct_rows": ROWS,
            "logits": "standard normal x logit_scale",
            "logit_scale": scale,
            "entropy_nats_t1": entropy,
            "mean_support": support as f64 / TIMED as f64,
            "machine": machine(),
        })
    );
    Ok(())
}

/// `n` standard normal draws from `seed` (SplitMix64 and Box-Muller): the
/// same rows on every run and platform, without an RNG crate.
fn normals(seed: u64, n: usize) -> Vec<f64> {
    let mut state = seed;
    let mut uniform = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // (0, 1]: the logarithm below stays finite.
        ((z >> 11) + 1) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        })
        .collect()
}

/// Entropy in nats of softmax(`logits`) at temperature 1.
fn entropy_t1(logits: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = logits.clone().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = logits.clone().map(|l| (l - max).exp()).sum();
    -logits
        .map(|l| (l - max).exp() / z)
        .filter(|&p| p > 0.0)
        .map(|p| p * p.ln())
        .sum::<f64>()
}

/// Mean entropy (nats, temperature 1) of softmax(`s` x row) over the rows
/// of `g` (`vocab` values each).
fn mean_entropy(g: &[f64], vocab: usize, s: f64) -> f64 {
    let rows = g.chunks_exact(vocab);
    let n = rows.len().max(1) as f64;
    rows.map(|r| entropy_t1(r.iter().map(|&x| f64::from((x * s) as f32))))
        .sum::<f64>()
        / n
}

/// The factor `s` for which softmax(`s` x row) has `nats` of entropy on
/// average over the rows of `g` (bisection; the entropy falls as `s`
/// grows). 0 when `nats` is at least ln(vocab), which only the uniform
/// distribution reaches.
fn scale_for_entropy(g: &[f64], vocab: usize, nats: f64) -> f64 {
    let (mut lo, mut hi) = (0.0, 64.0);
    if mean_entropy(g, vocab, lo) <= nats {
        return 0.0;
    }
    for _ in 0..30 {
        let mid = 0.5 * (lo + hi);
        if mean_entropy(g, vocab, mid) > nats {
            lo = mid
        } else {
            hi = mid
        }
    }
    0.5 * (lo + hi)
}

/// `x` in JSON as it was written (0.7, not 0.699999988).
fn f32_json(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}
