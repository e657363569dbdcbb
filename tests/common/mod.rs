//! A local deployment for end-to-end tests: target-service, draft-service(s)
//! and orchestrator as real tonic servers on 127.0.0.1 ephemeral ports.
//!
//! Ports: a server is given port 0 and the address it bound is read back,
//! never a port picked first and bound later. In process, [`listener`]
//! binds and hands the bound listener to the service; a child process
//! ([`spawn_process`]) is given `--listen 127.0.0.1:0` ([`any_port`]) and
//! `--port-file`, and [`Process::addr`] is the address it wrote there.
//! [`free_port`] is only for an address a test must fix before its server
//! exists (an orchestrator configured for a worker started later, a worker
//! restarted on the same address); the ports it hands out are never handed
//! out again, nor bound by [`listener`], in this test binary.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use duo_rpc::pb::generation_client::GenerationClient;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Channel;

pub fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

pub struct Deployment {
    pub orchestrator: SocketAddr,
    /// The OpenAI-compatible HTTP API.
    pub http: SocketAddr,
    pub target: SocketAddr,
    pub drafts: Vec<SocketAddr>,
    stop: watch::Sender<bool>,
    /// Turns true when the deployment stops (for services added later).
    pub stop_rx: watch::Receiver<bool>,
    gate: Arc<orchestrator::HoldGate>,
}

impl Deployment {
    pub async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::new(channel(self.orchestrator).await)
    }

    /// From now on every generation pauses after its first chunk (see
    /// [`orchestrator::HoldGate`]) until [`Deployment::release`]: what a
    /// test needs to keep generations in flight, deterministically.
    pub fn hold(&self) {
        self.gate.close();
    }

    /// Held generations go on; new ones are no longer held.
    pub fn release(&self) {
        self.gate.open();
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.gate.open();
        let _ = self.stop.send(true);
    }
}

/// Starts `req` as a stream and reads its first chunk. With generations
/// held ([`Deployment::hold`]) the generation then stays in flight — its
/// slot and both sessions taken — until the hold is released or the stream
/// dropped. Returns the stream and the first chunk's token ids.
pub async fn held_stream(
    dep: &Deployment,
    req: duo_rpc::pb::GenerateRequest,
) -> (tonic::Streaming<duo_rpc::pb::GenerateChunk>, Vec<u32>) {
    assert!(
        dep.gate.is_closed(),
        "held_stream needs Deployment::hold first"
    );
    let mut s = dep
        .client()
        .await
        .generate_stream(req)
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    (s, first.token_ids)
}

pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A listener on a loopback port the system picked (port 0), never one of
/// the [`reserved`] ports; with its address.
async fn listener() -> (TcpListener, SocketAddr) {
    let l = bind_unreserved();
    l.set_nonblocking(true).unwrap();
    let l = TcpListener::from_std(l).unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// Ports a test may start (or restart) a server on by number: those
/// [`free_port`] handed out and those child processes reported.
fn reserved() -> std::sync::MutexGuard<'static, BTreeSet<u16>> {
    static RESERVED: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    RESERVED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Binds 127.0.0.1:0 until the system picks a port that is not
/// [`reserved`] (the ports it refused stay bound meanwhile, so each try
/// gets another).
fn bind_unreserved() -> std::net::TcpListener {
    let mut refused = Vec::new();
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        if !reserved().contains(&l.local_addr().unwrap().port()) {
            return l;
        }
        refused.push(l);
    }
}

/// Parses a service's flags as its binary would (defaults included).
fn parse<A: clap::Parser>(name: &str, flags: &[String]) -> A {
    A::try_parse_from(std::iter::once(name.to_string()).chain(flags.iter().cloned()))
        .unwrap_or_else(|e| panic!("{name} flags {flags:?}: {e}"))
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

/// Flags for a draft worker on `addr` with the bundled model.
pub fn draft_flags(addr: SocketAddr, tokenizer: &Path) -> Vec<String> {
    let m = models();
    vec![
        s("--listen"),
        s(addr),
        s("--model"),
        s(m.join("draft").display()),
        s("--tokenizer"),
        s(tokenizer.display()),
    ]
}

/// A draft worker in this process on an ephemeral port; stops with `stop`.
pub async fn spawn_draft(
    tokenizer: &Path,
    extra: &[String],
    stop: &watch::Receiver<bool>,
) -> SocketAddr {
    let (dl, d) = listener().await;
    let mut flags = draft_flags(d, tokenizer);
    flags.extend_from_slice(extra);
    tokio::spawn(draft_service::serve(
        parse("draft-service", &flags),
        dl,
        duo_rpc::serve::stopped(stop),
    ));
    d
}

/// How to start a deployment.
pub struct Setup {
    /// Each draft worker's tokenizer (normally the bundled one).
    pub draft_tokenizers: Vec<PathBuf>,
    /// Extra flags for every draft worker, the target and the orchestrator.
    pub draft_flags: Vec<String>,
    pub target_flags: Vec<String>,
    pub orchestrator_flags: Vec<String>,
    /// Draft workers the orchestrator finds by itself (e.g. through
    /// `--draft-dns`) instead of a static list.
    pub no_static_drafts: bool,
    pub resolver: Option<Arc<dyn orchestrator::pool::Resolver>>,
    /// Use a target already running there instead of starting one.
    pub external_target: Option<SocketAddr>,
    /// Don't wait for the draft workers to be probed healthy (a test that
    /// starts one later).
    pub drafts_start_later: bool,
}

impl Setup {
    /// `n` draft workers with the bundled tokenizer.
    pub fn drafts(n: usize) -> Self {
        Self {
            draft_tokenizers: vec![models().join("tokenizer.json"); n],
            draft_flags: Vec::new(),
            target_flags: Vec::new(),
            orchestrator_flags: Vec::new(),
            no_static_drafts: false,
            resolver: None,
            external_target: None,
            drafts_start_later: false,
        }
    }
}

/// Starts the three services; `draft_tokenizers` gives each draft worker's
/// tokenizer (normally the bundled one). Returns once the orchestrator
/// answers `Info`.
pub async fn start(draft_tokenizers: &[PathBuf]) -> Deployment {
    start_with(Setup {
        draft_tokenizers: draft_tokenizers.to_vec(),
        ..Setup::drafts(0)
    })
    .await
}

/// An orchestrator for a deployment's workers: `--target`, a `--draft` for
/// each of `static_drafts`, `--tokenizer`, then `flags`.
struct Orchestrator<'a> {
    target: SocketAddr,
    static_drafts: &'a [SocketAddr],
    tokenizer: &'a Path,
    flags: &'a [String],
    seams: orchestrator::Seams,
}

impl Orchestrator<'_> {
    /// Serves it in process (gRPC and HTTP on port 0) until `rx` turns
    /// true, and returns the deployment of it, `target` and `drafts` once
    /// it answers `Info`.
    async fn start(
        self,
        drafts: Vec<SocketAddr>,
        stop: watch::Sender<bool>,
        rx: watch::Receiver<bool>,
    ) -> Deployment {
        let (ol, orchestrator) = listener().await;
        let (hl, http) = listener().await;
        let mut o = vec![
            s("--listen"),
            s(orchestrator),
            s("--target"),
            format!("http://{}", self.target),
            s("--tokenizer"),
            s(self.tokenizer.display()),
            s("--http-listen"),
            s(http),
        ];
        for d in self.static_drafts {
            o.extend([s("--draft"), format!("http://{d}")]);
        }
        o.extend(self.flags.iter().cloned());
        let gate = self.seams.hold.clone();
        tokio::spawn(orchestrator::serve_with(
            parse("orchestrator", &o),
            ol,
            Some(hl),
            duo_rpc::serve::stopped(&rx),
            self.seams,
        ));
        let dep = Deployment {
            orchestrator,
            http,
            target: self.target,
            drafts,
            stop,
            stop_rx: rx,
            gate,
        };
        let client = dep.client().await;
        wait_until(60, "the orchestrator answers Info", || {
            let mut c = client.clone();
            async move { c.info(duo_rpc::pb::InfoRequest {}).await.is_ok() }
        })
        .await;
        dep
    }
}

/// Starts a deployment as `setup` says; returns once the orchestrator
/// answers `Info`.
pub async fn start_with(setup: Setup) -> Deployment {
    let m = models();
    let tok = m.join("tokenizer.json");
    let (stop, rx) = watch::channel(false);
    let target = match setup.external_target {
        Some(t) => t,
        None => {
            let (tl, target) = listener().await;
            let mut t = vec![
                s("--listen"),
                s(target),
                s("--model"),
                s(m.join("target").display()),
                s("--tokenizer"),
                s(tok.display()),
            ];
            t.extend(setup.target_flags.iter().cloned());
            tokio::spawn(target_service::serve(
                parse("target-service", &t),
                tl,
                duo_rpc::serve::stopped(&rx),
            ));
            target
        }
    };
    let mut drafts = Vec::new();
    for dt in &setup.draft_tokenizers {
        drafts.push(spawn_draft(dt, &setup.draft_flags, &rx).await);
    }
    let static_drafts: &[SocketAddr] = if setup.no_static_drafts { &[] } else { &drafts };
    let mut seams = orchestrator::Seams::default();
    if let Some(r) = setup.resolver {
        seams.resolver = r;
    }
    let orchestrator = Orchestrator {
        target,
        static_drafts,
        tokenizer: &tok,
        flags: &setup.orchestrator_flags,
        seams,
    };
    let dep = orchestrator.start(drafts.clone(), stop, rx).await;
    // Every draft worker probed after loading its model (a worker still
    // loading is out of the rotation, and generations would run
    // target-only).
    wait_until(60, "every draft worker probed", || async {
        if setup.drafts_start_later {
            return true;
        }
        let pool = pool(&dep).await;
        pool.iter()
            .all(|w| w.state == "healthy" || w.state == "incompatible")
    })
    .await;
    dep
}

/// Spec-Bench prompts as text, `per_category` from each category.
pub fn spec_bench(per_category: usize) -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/spec-bench");
    let mut out = Vec::new();
    for cat in [
        "qa",
        "rag",
        "summarization",
        "translation",
        "math_reasoning",
    ] {
        let text = std::fs::read_to_string(dir.join(format!("{cat}.jsonl"))).unwrap();
        for line in text.lines().take(per_category) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            out.push(v["turns"][0].as_str().unwrap().to_string());
        }
    }
    out
}

/// A service run as a child process of `duo` (killed when dropped), for
/// tests that kill and restart processes.
pub struct Process {
    child: std::process::Child,
    /// The address it listens on (the one it bound, when given port 0).
    pub addr: SocketAddr,
}

impl Process {
    /// Sends `signal` (e.g. "STOP", "CONT") with `kill -SIGNAL pid`.
    pub fn signal(&self, signal: &str) {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// SIGKILL: the process dies without draining, like a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// 127.0.0.1, port 0: the server picks a free port (see [`spawn_process`]).
pub fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A loopback address for a server that does not exist yet, for a test
/// that must fix the address first (a worker the orchestrator is told of
/// before it starts, or one restarted on the same address). Bound, then
/// released: a server that can bind port 0 ([`any_port`]) should. The port
/// is [`reserved`]: not handed out again, nor bound by [`listener`].
pub fn free_port() -> SocketAddr {
    let l = bind_unreserved();
    let addr = l.local_addr().unwrap();
    reserved().insert(addr.port());
    addr
}

/// Runs `duo <service> --listen addr <flags>` and waits until it listens;
/// [`Process::addr`] is the address it bound, as it wrote it to its
/// `--port-file`. With port 0 ([`any_port`]) the service picks a free port
/// itself: no race for it. A service that exits before listening (its
/// port taken, a bad flag) fails the test at once.
pub fn spawn_process(service: &str, addr: SocketAddr, flags: &[String]) -> Process {
    static SPAWNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    loop {
        let n = SPAWNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port_file = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("port-{}-{n}-{service}", std::process::id()));
        let _ = std::fs::remove_file(&port_file);
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_duo"))
            .arg(service)
            .args(["--listen".to_string(), addr.to_string()])
            .arg("--port-file")
            .arg(&port_file)
            .args(flags)
            .env("RUST_LOG", "warn,ort=error")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Killed if the wait below fails.
        let mut p = Process { child, addr };
        let bound = blocking(|| wait_for_port_file(&mut p.child, &port_file, service, addr));
        let _ = std::fs::remove_file(&port_file);
        let mut reserved = reserved();
        if addr.port() == 0 && reserved.contains(&bound.port()) {
            // The system gave it a port a test holds for a restart: again.
            continue;
        }
        reserved.insert(bound.port());
        p.addr = bound;
        return p;
    }
}

/// The address a child process wrote to `port_file`, waited for (up to
/// 60 s; the service binds before it loads its model).
fn wait_for_port_file(
    child: &mut std::process::Child,
    port_file: &Path,
    service: &str,
    listen: SocketAddr,
) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(port_file) {
            return text
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("{service}: bad port file {text:?}: {e}"));
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{service} exited ({status}) before listening on {listen}");
        }
        assert!(
            Instant::now() < deadline,
            "{service} not listening on {listen} after 60 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs blocking `f` from sync or async code (off the runtime's worker in
/// a multi-threaded runtime, where other tasks must go on).
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// A draft worker process on `addr` (port 0: any) with the bundled model.
pub fn draft_process(addr: SocketAddr) -> Process {
    let flags = draft_flags(addr, &models().join("tokenizer.json"));
    spawn_process("draft-service", addr, &flags[2..])
}

/// A target process on `addr` (port 0: any) with the bundled model.
pub fn target_process(addr: SocketAddr) -> Process {
    let m = models();
    let flags = [
        s("--model"),
        s(m.join("target").display()),
        s("--tokenizer"),
        s(m.join("tokenizer.json").display()),
    ];
    spawn_process("target-service", addr, &flags)
}

/// Polls `cond` every 50 ms until it holds or `secs` pass.
pub async fn wait_until<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The orchestrator's draft pool, from `Info`.
pub async fn pool(dep: &Deployment) -> Vec<duo_rpc::pb::DraftWorkerState> {
    match dep.client().await.info(duo_rpc::pb::InfoRequest {}).await {
        Ok(r) => r.into_inner().draft_pool,
        Err(_) => Vec::new(),
    }
}

/// A generation read to its end: tokens, stats, and how many final chunks
/// came (must be exactly one, and last).
pub struct Streamed {
    pub tokens: Vec<u32>,
    pub stats: duo_rpc::pb::Stats,
}

/// Reads a stream to its end, checking it closes with exactly one final chunk.
pub async fn drain(
    mut stream: tonic::Streaming<duo_rpc::pb::GenerateChunk>,
    mut tokens: Vec<u32>,
) -> Result<Streamed, tonic::Status> {
    let mut stats = None;
    while let Some(chunk) = stream.message().await? {
        assert!(stats.is_none(), "a chunk came after the final chunk");
        tokens.extend_from_slice(&chunk.token_ids);
        if let Some(f) = chunk.r#final {
            stats = Some(f.stats.unwrap_or_default());
        }
    }
    Ok(Streamed {
        tokens,
        stats: stats.expect("the stream ended without a final chunk"),
    })
}

/// A greedy request for `prompt`.
pub fn greedy(
    prompt: &str,
    mode: duo_rpc::pb::Mode,
    max_new_tokens: u32,
) -> duo_rpc::pb::GenerateRequest {
    duo_rpc::pb::GenerateRequest {
        prompt: Some(duo_rpc::pb::generate_request::Prompt::Text(
            prompt.to_string(),
        )),
        max_new_tokens,
        mode: mode as i32,
        ..Default::default()
    }
}

/// GET `path` over plain HTTP/1.0; returns the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    http(addr, "GET", path, "").await.2
}

/// A raw HTTP/1.0 request (JSON body); returns the status code, the
/// headers (lower-cased) and the body, read to the end.
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_lowercase(), body.to_string())
}

/// Largest top-1 minus top-2 target logit gap at which two modes may pick
/// different tokens: a multi-token forward (verification) and a one-token
/// forward (autoregressive) round differently, so an exact tie can flip.
/// The same rule as `tests/greedy_equality.rs` and `duo bench`.
pub const NEAR_TIE: f32 = duo_core::speculative::verify::NEAR_TIE_GAP;

/// Checks a greedy output against the autoregressive reference for `prompt`
/// (ids). Equal, or diverging only at a near-tie of the target's top-2
/// logits (then the rest is not compared, and the tie is reported): `Ok`
/// with the number of near-tie divergences (0 or 1). Anything else panics
/// with the position and the gap.
pub fn check_greedy(what: &str, prompt: &[u32], got: &[u32], want: &[u32]) -> usize {
    if got == want {
        return 0;
    }
    let at = got.iter().zip(want).take_while(|(a, b)| a == b).count();
    assert!(
        at < got.len() && at < want.len(),
        "{what}: lengths differ ({} vs {}) with no divergent token",
        got.len(),
        want.len()
    );
    let mut ctx = prompt.to_vec();
    ctx.extend_from_slice(&want[..at]);
    let gap = with_engine(|e| e.target_top2_gap(&ctx).unwrap());
    assert!(
        gap < NEAR_TIE,
        "{what}: diverged from autoregressive at token {at} (target top-2 gap {gap:.3e}): {:?} vs {:?}",
        &got[at..(at + 5).min(got.len())],
        &want[at..(at + 5).min(want.len())]
    );
    eprintln!("{what}: near-tie divergence at token {at} (gap {gap:.2e})");
    1
}

/// Runs `f` on one in-process engine with the bundled pair (loaded once).
fn with_engine<R>(f: impl FnOnce(&mut duo_core::engine::Engine) -> R) -> R {
    static ENGINE: std::sync::OnceLock<std::sync::Mutex<duo_core::engine::Engine>> =
        std::sync::OnceLock::new();
    let run = || {
        let engine = ENGINE.get_or_init(|| {
            std::sync::Mutex::new(
                duo_core::engine::Engine::load(&duo_core::engine::EngineConfig::bundled(&models()))
                    .unwrap(),
            )
        });
        f(&mut engine.lock().unwrap_or_else(|p| p.into_inner()))
    };
    match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(run),
        Err(_) => run(),
    }
}

/// The bundled tokenizer's ids for `text` (as the orchestrator encodes it).
pub fn encode(text: &str) -> Vec<u32> {
    duo_core::tokenizer::Tokenizer::from_file(models().join("tokenizer.json"))
        .unwrap()
        .encode(text)
        .unwrap()
}

/// A "bring your own model" fixture folder: an Optimum export with its
/// tokenizer files and transformers' reference.json
/// (`models/fixtures/byom/NAME`, made by models/make_byom_fixtures.py).
pub fn byom(name: &str) -> PathBuf {
    models().join("fixtures/byom").join(name)
}

/// Starts a target-service on the model `target`, a draft-service on each
/// of `drafts` — every worker with its model folder's own tokenizer (no
/// `--tokenizer`) — and an orchestrator with `tokenizer` (a model folder
/// or a tokenizer.json). Returns once the orchestrator answers `Info` and
/// every draft worker was probed (healthy or incompatible).
pub async fn start_models(target: &Path, drafts: &[PathBuf], tokenizer: &Path) -> Deployment {
    let (stop, rx) = watch::channel(false);
    let (tl, t) = listener().await;
    let flags = [s("--listen"), s(t), s("--model"), s(target.display())];
    tokio::spawn(target_service::serve(
        parse("target-service", &flags),
        tl,
        duo_rpc::serve::stopped(&rx),
    ));
    let mut addrs = Vec::new();
    for d in drafts {
        let (dl, a) = listener().await;
        let flags = [s("--listen"), s(a), s("--model"), s(d.display())];
        tokio::spawn(draft_service::serve(
            parse("draft-service", &flags),
            dl,
            duo_rpc::serve::stopped(&rx),
        ));
        addrs.push(a);
    }
    let orchestrator = Orchestrator {
        target: t,
        static_drafts: &addrs,
        tokenizer,
        flags: &[s("--health-interval-ms"), s(100)],
        seams: orchestrator::Seams::default(),
    };
    let dep = orchestrator.start(addrs.clone(), stop, rx).await;
    wait_until(60, "every draft worker probed", || async {
        let pool = pool(&dep).await;
        pool.len() == drafts.len()
            && pool
                .iter()
                .all(|w| w.state == "healthy" || w.state == "incompatible")
    })
    .await;
    dep
}

/// Sum of every sample of `name` (all label sets) whose labels contain
/// `filter`, in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
