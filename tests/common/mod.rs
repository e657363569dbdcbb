//! A local deployment for end-to-end tests: target-service, draft-service(s)
//! and orchestrator as real tonic servers on 127.0.0.1 ephemeral ports.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use duo_rpc::pb::generation_client::GenerationClient;
use duo_rpc::serve::{CommonArgs, LogFormat};
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
}

impl Deployment {
    pub async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::new(channel(self.orchestrator).await)
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn common(addr: SocketAddr) -> CommonArgs {
    CommonArgs {
        listen: addr,
        log_format: LogFormat::Human,
    }
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

fn stopper(rx: &watch::Receiver<bool>) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// Starts the three services; `draft_tokenizers` gives each draft worker's
/// tokenizer (normally the bundled one). Returns once the orchestrator
/// answers `Info`.
pub async fn start(draft_tokenizers: &[PathBuf]) -> Deployment {
    let m = models();
    let tok = m.join("tokenizer.json");
    let (stop, rx) = watch::channel(false);
    let (tl, target) = listener().await;
    tokio::spawn(target_service::serve(
        target_service::Args {
            common: common(target),
            model: m.join("target"),
            tokenizer: tok.clone(),
            device: duo_core::runtime::Device::Cpu,
            threads: 1,
            max_sessions: 64,
            cpu_core: None,
            ort_lib: None,
        },
        tl,
        stopper(&rx),
    ));
    let mut drafts = Vec::new();
    for dt in draft_tokenizers {
        let (dl, d) = listener().await;
        tokio::spawn(draft_service::serve(
            draft_service::Args {
                common: common(d),
                model: m.join("draft"),
                tokenizer: dt.clone(),
                threads: 1,
                max_sessions: 64,
                cpu_core: None,
                ort_lib: None,
            },
            dl,
            stopper(&rx),
        ));
        drafts.push(d);
    }
    let (ol, orchestrator) = listener().await;
    let (hl, http) = listener().await;
    tokio::spawn(orchestrator::serve(
        orchestrator::Args {
            common: common(orchestrator),
            target: format!("http://{target}"),
            drafts: drafts.iter().map(|d| format!("http://{d}")).collect(),
            tokenizer: tok,
            max_generations: 64,
            http_listen: Some(http),
            chat_assistant_name: "Assistant".into(),
        },
        ol,
        Some(hl),
        stopper(&rx),
    ));
    let dep = Deployment {
        orchestrator,
        http,
        target,
        drafts,
        stop,
    };
    let mut client = dep.client().await;
    for _ in 0..300 {
        if client.info(duo_rpc::pb::InfoRequest {}).await.is_ok() {
            return dep;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("deployment did not become ready");
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
