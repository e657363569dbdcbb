//! `duo up`: the three services as local processes on loopback, with the
//! bundled pair; stops them on Ctrl-C (or after `--demo`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use crate::ModelArgs;
use crate::client::Remote;

#[derive(Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub models: ModelArgs,
    /// Orchestrator port; the target uses PORT+1, draft workers PORT+2...
    #[arg(long, default_value_t = 50051)]
    pub port: u16,
    /// Number of draft workers.
    #[arg(long, default_value_t = 1)]
    pub drafts: usize,
    /// Stream one generation of this prompt, then stop everything.
    #[arg(long)]
    pub demo: Option<String>,
    /// Tokens for --demo.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Also serve the OpenAI-compatible HTTP API on this port.
    #[arg(long)]
    pub http_port: Option<u16>,
    /// Serve each service's Prometheus metrics (GET /metrics): the
    /// orchestrator on this port, the target on PORT+1, draft workers on
    /// PORT+2...
    #[arg(long)]
    pub metrics_port: Option<u16>,
}

/// Where `duo up` puts the services: the orchestrator on `base`, the
/// target on `base + 1`, draft worker `i` on `base + 2 + i`.
pub fn service_port(base: u16, service: Service) -> u16 {
    match service {
        Service::Orchestrator => base,
        Service::Target => base + 1,
        Service::Draft(i) => base + 2 + i as u16,
    }
}

/// One of the services `duo up` starts.
#[derive(Debug, Clone, Copy)]
pub enum Service {
    Orchestrator,
    Target,
    Draft(usize),
}

/// Child processes, stopped (SIGTERM, then kill) when dropped.
pub struct Deployment {
    children: Vec<(String, Child)>,
    pub endpoint: String,
    /// The delaying proxies in front of the workers, if any.
    _proxies: Option<crate::delay::Proxies>,
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for (name, child) in &mut self.children {
            #[cfg(unix)]
            {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(child.id().to_string())
                    .status();
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("{name} did not stop in time: killed");
            }
        }
    }
}

fn spawn(name: &str, args: &[String], log: bool) -> anyhow::Result<(String, Child)> {
    // `duo` runs each service itself (`duo draft-service ...`).
    let mut cmd = Command::new(std::env::current_exe().context("locating the duo binary")?);
    cmd.arg(name);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env(
            "RUST_LOG",
            if log {
                "info,ort=warn"
            } else {
                "warn,ort=error"
            },
        );
    }
    let child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok((name.to_string(), child))
}

/// Starts target, draft workers and orchestrator; returns when the
/// orchestrator answers `Info` (the target is loaded and compatible) and
/// reports every draft worker healthy (loaded, serving, compatible): ready
/// means a first request drafts. `target_flags` go to target-service as
/// they are (e.g. `--max-batch 1`).
/// How `duo up` (and `duo bench-load`) start a deployment.
pub struct Ports {
    /// Orchestrator gRPC; the others follow ([`service_port`]).
    pub grpc: u16,
    pub http: Option<u16>,
    /// Metrics ports' base ([`service_port`]), if served.
    pub metrics: Option<u16>,
    /// Round-trip time added between the orchestrator and the draft
    /// workers, and between it and the target (delaying proxies on
    /// loopback, [`crate::delay`]; zero: a direct link).
    pub draft_rtt: Duration,
    pub target_rtt: Duration,
}

/// Refuses, before anything starts, ports that collide with each other or
/// that something else already holds, naming the service and the port.
fn check_ports(ports: &Ports, drafts: usize) -> anyhow::Result<()> {
    let mut wanted: Vec<(String, u16)> = vec![
        (
            "orchestrator (--port)".into(),
            service_port(ports.grpc, Service::Orchestrator),
        ),
        (
            "target-service (--port + 1)".into(),
            service_port(ports.grpc, Service::Target),
        ),
    ];
    wanted.extend((0..drafts).map(|i| {
        (
            format!("draft worker {i} (--port + {})", 2 + i),
            service_port(ports.grpc, Service::Draft(i)),
        )
    }));
    if let Some(h) = ports.http {
        wanted.push(("the OpenAI HTTP API (--http-port)".into(), h));
    }
    if let Some(m) = ports.metrics {
        wanted.push(("orchestrator metrics (--metrics-port)".into(), m));
        wanted.push(("target metrics (--metrics-port + 1)".into(), m + 1));
        wanted.extend((0..drafts).map(|i| (format!("draft worker {i} metrics"), m + 2 + i as u16)));
    }
    for (i, (who, port)) in wanted.iter().enumerate() {
        if let Some((other, _)) = wanted[..i].iter().find(|(_, p)| p == port) {
            bail!(
                "port {port} is wanted by both {other} and {who}: choose ports that do not overlap"
            );
        }
        if std::net::TcpListener::bind(("127.0.0.1", *port)).is_err() {
            bail!(
                "port {port} (for {who}) is already in use on 127.0.0.1: stop what holds it or choose another port"
            );
        }
    }
    Ok(())
}

/// The delaying proxies listen this far above the service they front.
const PROXY_PORT_OFFSET: u16 = 30;

pub fn start(
    m: &ModelArgs,
    ports: &Ports,
    drafts: usize,
    log: bool,
    target_flags: &[String],
) -> anyhow::Result<Deployment> {
    let cfg = m.config()?;
    let path = |p: &Path| p.display().to_string();
    let port = ports.grpc;
    check_ports(ports, drafts)?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let pinned_drafts = if cfg.pin_cores {
        // The target has core 0; draft worker i core 1 + i, while there is one.
        let fit = drafts.min(cores.saturating_sub(1));
        if fit < drafts {
            eprintln!(
                "warning: {drafts} draft worker(s) and the target on {cores} core(s): {} worker(s) get no core of their own and are left unpinned (they share cores with the others)",
                drafts - fit
            );
        }
        fit
    } else {
        0
    };
    let metrics = |service: Service| -> Vec<String> {
        ports.metrics.map_or_else(Vec::new, |base| {
            vec![
                "--metrics-listen".into(),
                format!("127.0.0.1:{}", service_port(base, service)),
            ]
        })
    };
    let mut children = Vec::new();
    let target_addr = format!("127.0.0.1:{}", service_port(port, Service::Target));
    let mut common = Vec::new();
    if let Some(lib) = &m.ort_lib {
        common.extend(["--ort-lib".to_string(), path(lib)]);
    }
    let mut t = vec![
        "--listen".into(),
        target_addr,
        "--model".into(),
        path(&cfg.target),
        "--tokenizer".into(),
        path(&cfg.tokenizer),
        "--device".into(),
        cfg.target_device.to_string(),
        "--threads".into(),
        cfg.target_threads.to_string(),
    ];
    if cfg.pin_cores {
        t.extend(["--cpu-core".into(), "0".into()]);
    }
    t.extend(common.clone());
    t.extend(metrics(Service::Target));
    t.extend(target_flags.iter().cloned());
    children.push(spawn("target-service", &t, log)?);
    for i in 0..drafts {
        let addr = format!("127.0.0.1:{}", service_port(port, Service::Draft(i)));
        let mut d = vec![
            "--listen".into(),
            addr,
            "--model".into(),
            path(&cfg.draft),
            "--tokenizer".into(),
            path(&cfg.tokenizer),
            "--threads".into(),
            cfg.draft_threads.to_string(),
        ];
        if i < pinned_drafts {
            // Draft workers take the cores after the target's.
            d.extend(["--cpu-core".into(), (1 + i).to_string()]);
        }
        d.extend(common.clone());
        d.extend(metrics(Service::Draft(i)));
        children.push(spawn("draft-service", &d, log)?);
    }
    // The orchestrator reaches each service directly, or through a
    // delaying proxy where its link has an added round-trip time.
    let delayed = !(ports.draft_rtt.is_zero() && ports.target_rtt.is_zero());
    let proxies = delayed.then(crate::delay::Proxies::new).transpose()?;
    let link = |service: Service, rtt: Duration| -> anyhow::Result<String> {
        let real = service_port(port, service);
        match &proxies {
            Some(proxies) if !rtt.is_zero() => {
                let front = real + PROXY_PORT_OFFSET;
                proxies.add(
                    ([127, 0, 0, 1], front).into(),
                    ([127, 0, 0, 1], real).into(),
                    rtt,
                )?;
                Ok(format!("http://127.0.0.1:{front}"))
            }
            _ => Ok(format!("http://127.0.0.1:{real}")),
        }
    };
    let endpoint = format!("127.0.0.1:{port}");
    let mut o = vec![
        "--listen".into(),
        endpoint.clone(),
        "--target".into(),
        link(Service::Target, ports.target_rtt)?,
        "--tokenizer".into(),
        path(&cfg.tokenizer),
    ];
    for i in 0..drafts {
        o.extend(["--draft".into(), link(Service::Draft(i), ports.draft_rtt)?]);
    }
    if let Some(h) = ports.http {
        o.extend(["--http-listen".into(), format!("127.0.0.1:{h}")]);
    }
    o.extend(metrics(Service::Orchestrator));
    children.push(spawn("orchestrator", &o, log)?);
    let mut dep = Deployment {
        children,
        endpoint,
        _proxies: proxies,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (name, child) in &mut dep.children {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{name} exited during start-up ({status}); run it by hand to see why");
            }
        }
        let info = Remote::connect(&dep.endpoint).and_then(|mut r| r.info());
        if let Ok(info) = &info
            && info.draft_pool.len() == drafts
            && info.draft_pool.iter().all(|w| w.state == "healthy")
        {
            return Ok(dep);
        }
        if Instant::now() > deadline {
            let waiting = match info {
                Ok(i) => i
                    .draft_pool
                    .iter()
                    .filter(|w| w.state != "healthy")
                    .map(|w| format!("{} {}", w.address, w.state))
                    .collect::<Vec<_>>()
                    .join(", "),
                Err(e) => format!("the orchestrator: {e}"),
            };
            bail!("the services did not become ready within 60 s (waiting for {waiting})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn run(a: UpArgs) -> anyhow::Result<()> {
    let ports = Ports {
        grpc: a.port,
        http: a.http_port,
        metrics: a.metrics_port,
        draft_rtt: Duration::ZERO,
        target_rtt: Duration::ZERO,
    };
    let dep = start(&a.models, &ports, a.drafts, a.demo.is_none(), &[])?;
    eprintln!(
        "orchestrator ready at {} (target on port {}, {} draft worker(s) from port {})",
        dep.endpoint,
        a.port + 1,
        a.drafts,
        a.port + 2
    );
    if let Some(h) = a.http_port {
        eprintln!("OpenAI-compatible API at http://127.0.0.1:{h}/v1");
    }
    if let Some(m) = a.metrics_port {
        eprintln!(
            "metrics at http://127.0.0.1:{m}/metrics (orchestrator), :{}/metrics (target), :{}/metrics... (draft workers)",
            service_port(m, Service::Target),
            service_port(m, Service::Draft(0))
        );
    }
    if let Some(prompt) = a.demo {
        let mut r = Remote::connect(&dep.endpoint)?;
        let params = duo_core::engine::GenerateParams {
            max_new_tokens: a.max_new_tokens,
            ..Default::default()
        };
        print!("{prompt}");
        let g = r.generate(crate::client::Prompt::Text(prompt), &params, |t| {
            use std::io::Write;
            print!("{t}");
            let _ = std::io::stdout().flush();
        })?;
        println!();
        eprintln!("{}", crate::stats_line(&g));
        eprintln!("stopping the services");
        return Ok(());
    }
    eprintln!("press Ctrl-C to stop");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Ctrl-C or SIGTERM: either way the services are stopped below.
    rt.block_on(duo_rpc::serve::shutdown_signal());
    eprintln!("stopping the services");
    drop(dep);
    Ok(())
}
