//! The containers for real: builds the CPU image offline
//! (`scripts/docker-images.sh`, with the `duo` binary this test run built,
//! on a Debian base made from the package archive), brings up
//! `compose.yaml` + `compose.cpu.yaml` with 2 draft replicas, and from the
//! host:
//! - streams greedy generations over gRPC and over HTTP (SSE): the text
//!   equals the in-process `duo generate` output;
//! - `--scale draft=3`: the orchestrator finds the third replica by DNS,
//!   without a restart, and places sessions on it;
//! - `docker kill` of a draft container under 3 streams: every generation
//!   completes, identical, one of them failed over; `up --scale draft=3`
//!   brings the replica back;
//! - `docker network disconnect` of a draft container under 3 streams:
//!   failover, no failed request; reconnected, it is used again;
//! - `stop` of the target mid-stream: the stream ends UNAVAILABLE and new
//!   requests are refused UNAVAILABLE; after `start`, generations run again;
//! - `down` leaves no container and no network of the project.
//!
//! Needs a Docker engine with Compose (`docker-compose` or `docker
//! compose`) and debootstrap (installed with apt when missing). Without an
//! engine it skips with a line saying so, unless `DUO_REQUIRE_DOCKER=1`
//! (CI) makes that a failure.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use duo_rpc::pb::generation_client::GenerationClient;
use duo_rpc::pb::{self, Mode};
use tonic::Code;

const PROMPTS: [&str; 3] = [
    "ROMEO. But soft, what light",
    "KING. What say you to this?",
    "HAMLET. To be, or not",
];
/// Long enough that a fault injected after the first chunk lands mid-stream.
const TOKENS: u32 = 300;

/// The Compose command line this engine has.
fn compose_command() -> Option<Vec<String>> {
    let works = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !works(&["docker", "info"]) {
        return None;
    }
    if works(&["docker", "compose", "version"]) {
        Some(vec!["docker".into(), "compose".into()])
    } else if works(&["docker-compose", "version"]) {
        Some(vec!["docker-compose".into()])
    } else {
        None
    }
}

/// One Compose project; `down` when dropped.
struct Project {
    compose: Vec<String>,
    name: String,
    grpc: u16,
    http: u16,
}

impl Project {
    /// `docker compose` (or `docker-compose`) on this project's files and
    /// ports, with `args`.
    fn compose(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.compose[0]);
        c.args(&self.compose[1..])
            .current_dir(common::models().join(".."))
            .args([
                "-p",
                &self.name,
                "-f",
                "compose.yaml",
                "-f",
                "compose.cpu.yaml",
            ])
            .args(args)
            .env("DUO_GRPC_PORT", self.grpc.to_string())
            .env("DUO_HTTP_PORT", self.http.to_string());
        c
    }

    fn cmd(&self, args: &[&str]) -> String {
        let out = self.compose(args).output().expect("compose runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "compose {args:?}: {text}");
        text
    }

    /// The project's running containers of `service`, by name.
    fn containers(&self, service: &str) -> Vec<String> {
        let out = docker(&[
            "ps",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
            "--format",
            "{{.Names}}",
        ]);
        let mut names: Vec<String> = out.lines().map(str::to_string).collect();
        names.sort();
        names
    }

    fn network(&self) -> String {
        format!("{}_default", self.name)
    }

    async fn client(&self) -> GenerationClient<tonic::transport::Channel> {
        GenerationClient::new(common::channel(([127, 0, 0, 1], self.grpc).into()).await)
    }

    /// Waits until the orchestrator answers a generation.
    async fn wait_serving(&self, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(mut c) = tokio::time::timeout(Duration::from_secs(5), self.client_try()).await
                && let Some(c) = c.as_mut()
                && c.generate(common::greedy("Hi", Mode::Autoregressive, 2))
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the deployment did not serve within {secs} s"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn client_try(&self) -> Option<GenerationClient<tonic::transport::Channel>> {
        let ep = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", self.grpc))
            .ok()?;
        Some(GenerationClient::new(ep.connect().await.ok()?))
    }

    /// `up --scale draft=n`, keeping the running containers.
    fn scale_drafts(&self, n: usize) {
        let scale = format!("draft={n}");
        self.cmd(&["up", "-d", "--no-build", "--no-recreate", "--scale", &scale]);
    }

    /// Waits until the orchestrator's pool has `n` healthy draft workers.
    async fn wait_healthy_drafts(&self, n: usize, secs: u64, what: &str) {
        common::wait_until(secs, what, || async {
            self.pool()
                .await
                .iter()
                .filter(|w| w.state == "healthy")
                .count()
                == n
        })
        .await;
    }

    /// The orchestrator's draft pool.
    async fn pool(&self) -> Vec<pb::DraftWorkerState> {
        self.client()
            .await
            .info(pb::InfoRequest {})
            .await
            .map(|r| r.into_inner().draft_pool)
            .unwrap_or_default()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self
            .compose(&["down", "--remove-orphans", "-t", "5"])
            .output();
    }
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The in-process greedy output of `prompt`: (text, token ids).
fn in_process(prompt: &str) -> (String, Vec<u32>) {
    let out = Command::new(env!("CARGO_BIN_EXE_duo"))
        .args([
            "generate",
            "--mode",
            "autoregressive",
            "-n",
            &TOKENS.to_string(),
            "--json",
            prompt,
        ])
        .output()
        .expect("duo generate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let ids = v["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    (v["text"].as_str().expect("text").to_string(), ids)
}

/// Streams a greedy duodecoding generation over gRPC: (text, ids), or the
/// status it ended with.
async fn stream(
    p: &Project,
    prompt: &str,
    tokens: u32,
) -> Result<(String, Vec<u32>), tonic::Status> {
    let mut c = p.client().await;
    let mut s = c
        .generate_stream(common::greedy(prompt, Mode::Duodecoding, tokens))
        .await?
        .into_inner();
    let (mut text, mut ids) = (String::new(), Vec::new());
    while let Some(chunk) = s.message().await? {
        text.push_str(&chunk.text);
        ids.extend(chunk.token_ids);
    }
    Ok((text, ids))
}

/// Three streams at once, each checked against its reference; `fault`
/// runs once all three have received their first chunk (mid-stream).
/// Returns the draft failures the three generations reported.
async fn three_streams(
    p: &Project,
    refs: &[(String, Vec<u32>)],
    what: &str,
    fault: impl FnOnce(),
) -> u32 {
    let (started_tx, mut started) = tokio::sync::mpsc::channel::<()>(3);
    let mut tasks = Vec::new();
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let mut c = p.client().await;
        let prompt = prompt.to_string();
        let started_tx = started_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = c
                .generate_stream(common::greedy(&prompt, Mode::Duodecoding, TOKENS))
                .await?
                .into_inner();
            let (mut ids, mut failures) = (Vec::new(), 0);
            let mut first = true;
            while let Some(chunk) = s.message().await? {
                ids.extend(chunk.token_ids);
                if let Some(stats) = chunk.r#final.and_then(|f| f.stats) {
                    failures = stats.draft_failures;
                }
                if std::mem::take(&mut first) {
                    let _ = started_tx.send(()).await;
                }
            }
            Ok::<_, tonic::Status>((i, prompt, ids, failures))
        }));
    }
    drop(started_tx);
    for _ in 0..PROMPTS.len() {
        let _ = started.recv().await;
    }
    fault();
    let mut failures = 0;
    for t in tasks {
        let (i, prompt, ids, f) = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{what}: a stream failed: {e}"));
        common::check_greedy(what, &common::encode(&prompt), &ids, &refs[i].1);
        failures += f;
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compose_serves_scales_fails_over_and_comes_down() {
    let Some(compose) = compose_command() else {
        assert!(
            std::env::var("DUO_REQUIRE_DOCKER").as_deref() != Ok("1"),
            "DUO_REQUIRE_DOCKER=1 but no Docker engine with Compose answers (docker info, docker-compose version)"
        );
        eprintln!(
            "skipped: no Docker engine with Compose here (set DUO_REQUIRE_DOCKER=1 to make this a failure)"
        );
        return;
    };
    let root = common::models().join("..");
    let built = Command::new("bash")
        .arg("scripts/docker-images.sh")
        .arg("duo:cpu")
        .current_dir(&root)
        .env("DUO_BIN", env!("CARGO_BIN_EXE_duo"))
        .output()
        .expect("bash runs");
    assert!(
        built.status.success(),
        "building the image: {}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    let p = Project {
        compose,
        name: format!("duotest{}", std::process::id()),
        grpc: common::free_port().port(),
        http: common::free_port().port(),
    };
    let refs: Vec<(String, Vec<u32>)> = PROMPTS.iter().map(|p| in_process(p)).collect();

    // Up with two draft replicas, healthy.
    p.scale_drafts(2);
    p.wait_serving(120).await;
    p.wait_healthy_drafts(2, 60, "two healthy draft workers")
        .await;

    // gRPC and HTTP streams equal the in-process output.
    let (text, ids) = stream(&p, PROMPTS[0], TOKENS).await.expect("gRPC stream");
    common::check_greedy("gRPC", &common::encode(PROMPTS[0]), &ids, &refs[0].1);
    if ids == refs[0].1 {
        assert_eq!(text, refs[0].0, "gRPC text");
    }
    let body = serde_json::json!({
        "model": "duo", "prompt": PROMPTS[0], "max_tokens": TOKENS, "temperature": 0, "stream": true,
    });
    let (code, _, sse) = common::http(
        ([127, 0, 0, 1], p.http).into(),
        "POST",
        "/v1/completions",
        &body.to_string(),
    )
    .await;
    assert_eq!(code, 200, "{sse}");
    let http_text: String = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    if ids == refs[0].1 {
        assert_eq!(http_text, refs[0].0, "HTTP text");
    }

    // Scale to three: found by DNS, and used.
    p.scale_drafts(3);
    p.wait_healthy_drafts(3, 60, "a third healthy draft worker")
        .await;
    let placed_before: Vec<u64> = p.pool().await.iter().map(|w| w.sessions_placed).collect();
    for _ in 0..2 {
        three_streams(&p, &refs, "three replicas", || {}).await;
    }
    let pool = p.pool().await;
    assert!(
        pool.iter().all(|w| w.sessions_placed > 0),
        "every replica drafted: {pool:?} (before: {placed_before:?})"
    );

    // A draft container killed under three streams (one on each replica).
    let drafts = p.containers("draft");
    assert_eq!(drafts.len(), 3, "{drafts:?}");
    let failures = three_streams(&p, &refs, "a draft killed", || {
        docker(&["kill", &drafts[0]]);
    })
    .await;
    assert!(
        failures >= 1,
        "the generation on the killed worker failed over"
    );

    // A draft container cut off the network mid-stream, then back (the
    // killed replica first brought back, as an operator would).
    p.scale_drafts(3);
    p.wait_healthy_drafts(3, 90, "three healthy draft workers")
        .await;
    let cut = p.containers("draft")[1].clone();
    let failures = three_streams(&p, &refs, "a draft cut off", || {
        docker(&["network", "disconnect", &p.network(), &cut]);
    })
    .await;
    assert!(
        failures >= 1,
        "the generation on the cut-off worker failed over"
    );
    // (Compose gave it the service's DNS alias when it made it; a manual
    // connect must give it again, or `draft` no longer resolves to it.)
    docker(&["network", "connect", "--alias", "draft", &p.network(), &cut]);
    p.wait_healthy_drafts(3, 90, "the cut-off worker healthy again")
        .await;
    let placed: Vec<u64> = p.pool().await.iter().map(|w| w.sessions_placed).collect();
    for _ in 0..2 {
        three_streams(&p, &refs, "after reconnecting", || {}).await;
    }
    let again: Vec<u64> = p.pool().await.iter().map(|w| w.sessions_placed).collect();
    assert!(
        placed.iter().zip(&again).all(|(a, b)| b > a),
        "every worker drafts again after the reconnect: {placed:?} -> {again:?}"
    );

    // The target stopped mid-stream, then started.
    let mut c = p.client().await;
    let mut s = c
        .generate_stream(common::greedy(PROMPTS[1], Mode::Duodecoding, 400))
        .await
        .expect("stream starts")
        .into_inner();
    let _ = s.message().await;
    p.cmd(&["stop", "-t", "1", "target-cpu"]);
    let ended = loop {
        match s.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    // A stream that finished before the target went is no failure; one cut
    // off must say UNAVAILABLE.
    if let Some(e) = ended {
        assert_eq!(e.code(), Code::Unavailable, "{e}");
    }
    let refused = p
        .client()
        .await
        .generate(common::greedy(PROMPTS[1], Mode::Duodecoding, 8))
        .await
        .expect_err("no target");
    assert_eq!(refused.code(), Code::Unavailable, "{refused}");
    p.cmd(&["start", "target-cpu"]);
    p.wait_serving(120).await;
    let (_, ids) = stream(&p, PROMPTS[2], TOKENS)
        .await
        .expect("after the target came back");
    common::check_greedy("target back", &common::encode(PROMPTS[2]), &ids, &refs[2].1);

    // Down leaves nothing of the project.
    p.cmd(&["down", "--remove-orphans", "-t", "5"]);
    let left = docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=com.docker.compose.project={}", p.name),
        "--format",
        "{{.Names}}",
    ]);
    assert!(left.trim().is_empty(), "containers left: {left}");
    let nets = docker(&[
        "network",
        "ls",
        "--filter",
        &format!("name={}", p.network()),
        "--format",
        "{{.Name}}",
    ]);
    assert!(nets.trim().is_empty(), "networks left: {nets}");
}
