//! `duo bench-load`: throughput and latency with concurrent clients, for
//! each number of draft workers. Starts a local deployment per worker count
//! (as `duo up` does), or measures a running orchestrator (`--endpoint`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use duo_core::engine::{GenerateParams, Mode};
use duo_core::tokenizer::Tokenizer;
use serde::Serialize;
use serde_json::json;

use crate::ModelArgs;
use crate::bench::{machine, read_prompts};
use crate::client::{Prompt, Remote};

#[derive(Args)]
pub struct LoadArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// Concurrent clients to try, in turn.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    clients: Vec<usize>,
    /// Draft worker counts to try, in turn (one local deployment each).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    drafts: Vec<usize>,
    /// The target's batch limits to try, in turn (target-service
    /// `--max-batch`; 1 = no batching), one local deployment each.
    #[arg(long, value_delimiter = ',', default_value = "8")]
    max_batch: Vec<u64>,
    /// Modes to compare at each point.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "duodecoding,autoregressive"
    )]
    modes: Vec<Mode>,
    /// Generations per client at each point.
    #[arg(long, default_value_t = 6)]
    requests: usize,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Prompts taken from each Spec-Bench category.
    #[arg(long, default_value_t = 4)]
    per_category: usize,
    /// First port of the local deployments.
    #[arg(long, default_value_t = 50151)]
    port: u16,
    /// Measure this running orchestrator instead (then --drafts is ignored).
    #[arg(long)]
    endpoint: Option<String>,
    /// Write the results (JSON) here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Serialize)]
struct Point {
    drafts: Option<usize>,
    /// The target's `--max-batch` (None: a running orchestrator's).
    max_batch: Option<u64>,
    mode: Mode,
    clients: usize,
    requests: usize,
    tokens: usize,
    wall_s: f64,
    tokens_per_s: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    /// Generations whose tokens equal the autoregressive reference.
    identical: usize,
}

/// One generation: (prompt index, tokens, latency ms, TTFT ms).
type Sample = (usize, Vec<u32>, f64, f64);

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One measurement: `clients` threads, each running `requests` generations.
fn measure(
    endpoint: &str,
    prompts: &[Vec<u32>],
    reference: &[Vec<u32>],
    params: &GenerateParams,
    clients: usize,
    requests: usize,
) -> anyhow::Result<Point> {
    let start = Instant::now();
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || -> anyhow::Result<Vec<Sample>> {
                    let mut remote = Remote::connect(endpoint)?;
                    let mut out = Vec::new();
                    for r in 0..requests {
                        let i = (c * requests + r) % prompts.len();
                        let t0 = Instant::now();
                        let g = remote.generate(Prompt::Ids(prompts[i].clone()), params, |_| {})?;
                        out.push((
                            i,
                            g.tokens,
                            t0.elapsed().as_secs_f64() * 1e3,
                            g.stats.ttft_ms,
                        ));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a client thread panicked"))?
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let wall_s = start.elapsed().as_secs_f64();
    let all: Vec<_> = results.into_iter().flatten().collect();
    let tokens: usize = all.iter().map(|(_, t, _, _)| t.len()).sum();
    let identical = all
        .iter()
        .filter(|(i, t, _, _)| reference.get(*i) == Some(t))
        .count();
    let mut lat: Vec<f64> = all.iter().map(|x| x.2).collect();
    let mut ttft: Vec<f64> = all.iter().map(|x| x.3).collect();
    lat.sort_by(f64::total_cmp);
    ttft.sort_by(f64::total_cmp);
    Ok(Point {
        drafts: None,
        max_batch: None,
        mode: params.mode,
        clients,
        requests: all.len(),
        tokens,
        wall_s,
        tokens_per_s: tokens as f64 / wall_s.max(1e-9),
        latency_p50_ms: percentile(&lat, 0.5),
        latency_p99_ms: percentile(&lat, 0.99),
        ttft_p50_ms: percentile(&ttft, 0.5),
        ttft_p99_ms: percentile(&ttft, 0.99),
        identical,
    })
}

/// All points against one orchestrator.
fn sweep(
    a: &LoadArgs,
    endpoint: &str,
    prompts: &[Vec<u32>],
    drafts: Option<usize>,
    max_batch: Option<u64>,
) -> anyhow::Result<Vec<Point>> {
    let base = GenerateParams {
        max_new_tokens: a.max_new_tokens,
        ..GenerateParams::default()
    };
    // The greedy reference every mode must reproduce.
    let mut remote = Remote::connect(endpoint)?;
    let ar = GenerateParams {
        mode: Mode::Autoregressive,
        ..base.clone()
    };
    let reference = prompts
        .iter()
        .map(|p| Ok(remote.generate(Prompt::Ids(p.clone()), &ar, |_| {})?.tokens))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut points = Vec::new();
    for &clients in &a.clients {
        for &mode in &a.modes {
            let params = GenerateParams {
                mode,
                ..base.clone()
            };
            let mut p = measure(endpoint, prompts, &reference, &params, clients, a.requests)?;
            p.drafts = drafts;
            p.max_batch = max_batch;
            eprintln!(
                "drafts {:>2} batch {:>2} {:>14} clients {clients}: {:7.1} tok/s, p50 {:7.1} ms, p99 {:7.1} ms, identical {}/{}",
                drafts.map_or("-".into(), |d| d.to_string()),
                max_batch.map_or("-".into(), |d| d.to_string()),
                mode.to_string(),
                p.tokens_per_s,
                p.latency_p50_ms,
                p.latency_p99_ms,
                p.identical,
                p.requests
            );
            points.push(p);
        }
    }
    Ok(points)
}

pub fn run(a: LoadArgs) -> anyhow::Result<()> {
    if a.clients.contains(&0) || a.requests == 0 || a.max_batch.contains(&0) {
        bail!("--clients, --requests and --max-batch must be at least 1");
    }
    let cfg = a.models.config()?;
    let tok = Tokenizer::from_file(&cfg.tokenizer)
        .with_context(|| format!("loading {}", cfg.tokenizer.display()))?;
    // The bundled target's context is 512 tokens.
    let budget = 512usize.saturating_sub(a.max_new_tokens);
    let prompts: Vec<Vec<u32>> = read_prompts(&[], a.per_category, &tok, budget)?
        .into_iter()
        .map(|p| p.ids)
        .collect();
    let mut points = Vec::new();
    match &a.endpoint {
        Some(e) => points.extend(sweep(&a, e, &prompts, None, None)?),
        None => {
            for &batch in &a.max_batch {
                for &d in &a.drafts {
                    let flags = ["--max-batch".to_string(), batch.to_string()];
                    let dep = crate::up::start(&a.models, a.port, d, None, false, &flags)?;
                    points.extend(sweep(&a, &dep.endpoint, &prompts, Some(d), Some(batch))?);
                }
            }
        }
    }
    let result = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": machine(),
        "max_new_tokens": a.max_new_tokens,
        "prompts": prompts.len(),
        "points": points,
    });
    let text = serde_json::to_string_pretty(&result)?;
    match &a.out {
        Some(p) => std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?,
        None => println!("{text}"),
    }
    Ok(())
}
