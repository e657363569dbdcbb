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
use crate::up::{Ports, Service, service_port};

/// The local deployments' metrics ports start this far above `--port`.
const METRICS_PORT_OFFSET: u16 = 50;

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
    /// Round-trip times (ms) to add on the links in --rtt-links, one
    /// deployment each, after one with none (delaying proxies on loopback:
    /// what the split across hosts costs).
    #[arg(long, value_delimiter = ',')]
    rtt_ms: Vec<f64>,
    /// The links --rtt-ms delays, each in turn: `draft` (orchestrator ↔
    /// draft workers), `target` (orchestrator ↔ target).
    #[arg(long, value_delimiter = ',', default_value = "draft,target")]
    rtt_links: Vec<RttLink>,
    /// Measure this running orchestrator instead (then --drafts is ignored).
    #[arg(long)]
    endpoint: Option<String>,
    /// Write the results (JSON) here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// A link of the orchestrator's that `--rtt-ms` delays.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum RttLink {
    Draft,
    Target,
}

#[derive(Serialize)]
struct Point {
    drafts: Option<usize>,
    /// Round-trip time added on the draft and the target links (ms).
    draft_rtt_ms: f64,
    target_rtt_ms: f64,
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
    /// Every generation that differs: where, and the target's top-2 logit
    /// gap there (a divergence is legitimate only at a near-tie,
    /// `speculative::verify::NEAR_TIE_GAP`).
    divergences: Vec<Divergence>,
    /// How the workers batched during this point (local deployments).
    #[serde(skip_serializing_if = "Option::is_none")]
    batching: Option<Batching>,
}

/// The target, loaded in this process on the first divergence, to measure
/// how close the call was there.
#[derive(Default)]
struct Judge(Option<duo_core::engine::Engine>);

impl Judge {
    fn gap(&mut self, models: &crate::ModelArgs, context: &[u32]) -> anyhow::Result<f32> {
        if self.0.is_none() {
            let cfg = models.config_for(false)?;
            self.0 = Some(duo_core::engine::Engine::load(&cfg)?);
        }
        match self.0.as_mut() {
            Some(engine) => Ok(engine.target_top2_gap(context)?),
            None => anyhow::bail!("the target did not load"),
        }
    }
}

/// A greedy generation that differs from the autoregressive reference.
#[derive(Serialize, Debug, Clone)]
struct Divergence {
    prompt: usize,
    position: usize,
    top2_gap: f32,
    near_tie: bool,
}

/// How the draft workers and the target batched over one point: means over
/// its steps and forwards, from the services' metrics (the difference of
/// two scrapes).
#[derive(Serialize, Debug, Clone, Copy, Default)]
struct Batching {
    draft_steps: f64,
    draft_rows_per_step: f64,
    draft_sessions_per_step: f64,
    draft_step_ms: f64,
    /// Mean wait of a draft step for the model (queueing behind others).
    draft_queue_wait_ms: f64,
    target_forwards: f64,
    target_sessions_per_forward: f64,
    target_forward_ms: f64,
}

/// The metrics ports to scrape: the target's, then each draft worker's.
struct Scrape {
    target: u16,
    drafts: Vec<u16>,
}

/// Sums and counts of the histograms [`Batching`] is made of.
#[derive(Clone, Copy, Default)]
struct Totals {
    draft_rows: (f64, f64),
    draft_sessions: (f64, f64),
    draft_step: (f64, f64),
    draft_wait: (f64, f64),
    target_sessions: (f64, f64),
    target_forward: (f64, f64),
}

impl Scrape {
    fn totals(&self) -> anyhow::Result<Totals> {
        let mut t = Totals::default();
        for &port in &self.drafts {
            let text = get_metrics(port)?;
            add(&mut t.draft_rows, histogram(&text, "duo_draft_step_rows"));
            add(
                &mut t.draft_sessions,
                histogram(&text, "duo_draft_step_sessions"),
            );
            add(
                &mut t.draft_step,
                histogram(&text, "duo_draft_step_seconds"),
            );
            add(
                &mut t.draft_wait,
                histogram(&text, "duo_draft_queue_wait_seconds"),
            );
        }
        let text = get_metrics(self.target)?;
        t.target_sessions = histogram(&text, "duo_target_batch_sessions");
        t.target_forward = histogram(&text, "duo_target_forward_seconds");
        Ok(t)
    }
}

fn add(a: &mut (f64, f64), b: (f64, f64)) {
    a.0 += b.0;
    a.1 += b.1;
}

impl Batching {
    fn between(a: &Totals, b: &Totals) -> Self {
        let mean = |x: (f64, f64), y: (f64, f64)| {
            let n = y.1 - x.1;
            if n > 0.0 { (y.0 - x.0) / n } else { 0.0 }
        };
        Self {
            draft_steps: b.draft_step.1 - a.draft_step.1,
            draft_rows_per_step: mean(a.draft_rows, b.draft_rows),
            draft_sessions_per_step: mean(a.draft_sessions, b.draft_sessions),
            draft_step_ms: mean(a.draft_step, b.draft_step) * 1e3,
            draft_queue_wait_ms: mean(a.draft_wait, b.draft_wait) * 1e3,
            target_forwards: b.target_forward.1 - a.target_forward.1,
            target_sessions_per_forward: mean(a.target_sessions, b.target_sessions),
            target_forward_ms: mean(a.target_forward, b.target_forward) * 1e3,
        }
    }
}

/// `GET /metrics` from a service on loopback.
fn get_metrics(port: u16) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("metrics on port {port}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// A Prometheus histogram's (sum, count), over all its label sets.
fn histogram(text: &str, name: &str) -> (f64, f64) {
    let total = |suffix: &str| -> f64 {
        let full = format!("{name}{suffix}");
        text.lines()
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                let metric = key.split('{').next()?;
                (metric == full)
                    .then(|| value.parse::<f64>().ok())
                    .flatten()
            })
            .sum()
    };
    (total("_sum"), total("_count"))
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
        draft_rtt_ms: 0.0,
        target_rtt_ms: 0.0,
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
        divergences: all
            .iter()
            .filter(|(i, t, _, _)| reference.get(*i) != Some(t))
            .map(|(i, t, _, _)| {
                let want = reference.get(*i).map_or(&[][..], Vec::as_slice);
                let position = t.iter().zip(want).take_while(|(a, b)| a == b).count();
                (*i, position)
            })
            .map(|(prompt, position)| Divergence {
                prompt,
                position,
                top2_gap: f32::NAN,
                near_tie: false,
            })
            .collect(),
        batching: None,
    })
}

/// All points against one orchestrator.
fn sweep(
    a: &LoadArgs,
    endpoint: &str,
    prompts: &[Vec<u32>],
    drafts: Option<usize>,
    max_batch: Option<u64>,
    scrape: Option<&Scrape>,
    judge: &mut Judge,
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
            let before = scrape.map(Scrape::totals).transpose()?;
            let mut p = measure(endpoint, prompts, &reference, &params, clients, a.requests)?;
            for d in &mut p.divergences {
                let mut ctx = prompts[d.prompt].clone();
                ctx.extend_from_slice(
                    &reference[d.prompt][..d.position.min(reference[d.prompt].len())],
                );
                d.top2_gap = judge.gap(&a.models, &ctx)?;
                d.near_tie = d.top2_gap < duo_core::speculative::verify::NEAR_TIE_GAP;
                eprintln!(
                    "    prompt {}: diverged from autoregressive at token {} (target top-2 gap {:.2e}{})",
                    d.prompt,
                    d.position,
                    d.top2_gap,
                    if d.near_tie {
                        ", a near-tie"
                    } else {
                        ": NOT a near-tie"
                    }
                );
            }
            if let (Some(s), Some(before)) = (scrape, before) {
                p.batching = Some(Batching::between(&before, &s.totals()?));
            }
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
            if let Some(b) = &p.batching {
                eprintln!(
                    "    draft: {:.0} steps, {:.1} rows and {:.2} sessions per step, {:.2} ms per step, queue wait {:.2} ms; target: {:.0} forwards, {:.2} sessions per forward, {:.1} ms each",
                    b.draft_steps,
                    b.draft_rows_per_step,
                    b.draft_sessions_per_step,
                    b.draft_step_ms,
                    b.draft_queue_wait_ms,
                    b.target_forwards,
                    b.target_sessions_per_forward,
                    b.target_forward_ms
                );
            }
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
    let mut judge = Judge::default();
    match &a.endpoint {
        Some(e) => points.extend(sweep(&a, e, &prompts, None, None, None, &mut judge)?),
        None => {
            // (draft RTT, target RTT) per deployment: none, then each link.
            let mut rtts = vec![(0.0, 0.0)];
            for &link in &a.rtt_links {
                for &ms in a.rtt_ms.iter().filter(|&&ms| ms > 0.0) {
                    rtts.push(match link {
                        RttLink::Draft => (ms, 0.0),
                        RttLink::Target => (0.0, ms),
                    });
                }
            }
            for &(draft_rtt, target_rtt) in &rtts {
                for &batch in &a.max_batch {
                    for &d in &a.drafts {
                        let flags = ["--max-batch".to_string(), batch.to_string()];
                        let ms = |x: f64| std::time::Duration::from_secs_f64(x / 1e3);
                        let ports = Ports {
                            grpc: a.port,
                            http: None,
                            metrics: Some(a.port + METRICS_PORT_OFFSET),
                            draft_rtt: ms(draft_rtt),
                            target_rtt: ms(target_rtt),
                        };
                        let dep = crate::up::start(&a.models, &ports, d, false, &flags)?;
                        let base = a.port + METRICS_PORT_OFFSET;
                        let scrape = Scrape {
                            target: service_port(base, Service::Target),
                            drafts: (0..d)
                                .map(|i| service_port(base, Service::Draft(i)))
                                .collect(),
                        };
                        if draft_rtt > 0.0 || target_rtt > 0.0 {
                            eprintln!(
                                "added RTT: draft link {draft_rtt} ms, target link {target_rtt} ms"
                            );
                        }
                        let mut got = sweep(
                            &a,
                            &dep.endpoint,
                            &prompts,
                            Some(d),
                            Some(batch),
                            Some(&scrape),
                            &mut judge,
                        )?;
                        for p in &mut got {
                            p.draft_rtt_ms = draft_rtt;
                            p.target_rtt_ms = target_rtt;
                        }
                        points.extend(got);
                    }
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
