//! The gRPC client side of `duo`: streaming a generation from a running
//! orchestrator, as a blocking API for the CLI and the bench.

use std::time::Duration;

use anyhow::{Context, bail};
use duo_core::engine::{GenerateParams, Generation};
use duo_rpc::convert::{finish_from_pb, mode_to_pb, stats_from_pb};
use duo_rpc::pb::generation_client::GenerationClient;
use duo_rpc::pb::{self, generate_request};
use tonic::transport::Channel;

/// A connection to an orchestrator, with its own small runtime.
pub struct Remote {
    rt: tokio::runtime::Runtime,
    client: GenerationClient<Channel>,
}

impl Remote {
    pub fn connect(endpoint: &str) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let uri = if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        let channel = rt
            .block_on(
                tonic::transport::Endpoint::from_shared(uri)?
                    .connect_timeout(Duration::from_secs(5))
                    .tcp_nodelay(true)
                    .connect(),
            )
            .with_context(|| format!("connecting to the orchestrator at {endpoint}"))?;
        Ok(Self {
            rt,
            client: GenerationClient::new(channel),
        })
    }

    pub fn info(&mut self) -> anyhow::Result<pb::InfoResponse> {
        let mut c = self.client.clone();
        Ok(self.rt.block_on(c.info(pb::InfoRequest {}))?.into_inner())
    }

    /// Streams a generation; `on_text` sees each text delta. Returns the
    /// whole generation with the server's stats.
    pub fn generate(
        &mut self,
        prompt: Prompt,
        params: &GenerateParams,
        mut on_text: impl FnMut(&str),
    ) -> anyhow::Result<Generation> {
        let req = pb::GenerateRequest {
            prompt: Some(match prompt {
                Prompt::Text(t) => generate_request::Prompt::Text(t),
                Prompt::Ids(ids) => generate_request::Prompt::TokenIds(pb::TokenIds { ids }),
            }),
            max_new_tokens: params.max_new_tokens as u32,
            temperature: params.sampling.temperature,
            top_k: params.sampling.top_k as u32,
            top_p: Some(params.sampling.top_p),
            seed: params.seed,
            stop: params.stop.clone(),
            mode: mode_to_pb(params.mode) as i32,
            gamma: params.gamma.map(|g| g as u32),
            max_branches: Some(params.max_branches as u32),
            max_hedges: params.max_hedges.map(|h| h as u32),
            logprobs: params.logprobs,
            greedy_drafts: params.greedy_drafts,
        };
        let mut c = self.client.clone();
        let start = std::time::Instant::now();
        self.rt.block_on(async move {
            let mut stream = c.generate_stream(req).await?.into_inner();
            let mut ttft_ms = None;
            let (mut text, mut tokens, mut logprobs) = (String::new(), Vec::new(), Vec::new());
            while let Some(chunk) = stream.message().await? {
                if ttft_ms.is_none() && !chunk.token_ids.is_empty() {
                    ttft_ms = Some(start.elapsed().as_secs_f64() * 1e3);
                }
                on_text(&chunk.text);
                text.push_str(&chunk.text);
                tokens.extend_from_slice(&chunk.token_ids);
                logprobs.extend_from_slice(&chunk.logprobs);
                if let Some(f) = chunk.r#final {
                    // Times as the client sees them (network included).
                    let mut stats = stats_from_pb(&f.stats.unwrap_or_default());
                    stats.total_ms = start.elapsed().as_secs_f64() * 1e3;
                    stats.ttft_ms = ttft_ms.unwrap_or(stats.total_ms);
                    stats.tokens_per_s = tokens.len() as f64 / (stats.total_ms / 1e3).max(1e-9);
                    return Ok(Generation {
                        tokens,
                        text,
                        logprobs,
                        finish_reason: finish_from_pb(f.finish_reason),
                        stats,
                    });
                }
            }
            bail!("the stream ended without a final chunk")
        })
    }
}

pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

#[derive(clap::Args)]
pub struct HealthArgs {
    /// The service's gRPC address, e.g. 127.0.0.1:50051.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub endpoint: String,
    /// The service name to ask about (empty: the server as a whole).
    #[arg(long, default_value = "")]
    pub service: String,
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
}

/// `duo health`: exit 0 when the service reports SERVING, 1 otherwise
/// (with one line saying why).
pub fn health(a: &HealthArgs) -> std::process::ExitCode {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let check = async {
        let uri = if a.endpoint.contains("://") {
            a.endpoint.clone()
        } else {
            format!("http://{}", a.endpoint)
        };
        let channel = tonic::transport::Endpoint::from_shared(uri)?
            .connect()
            .await
            .with_context(|| format!("connecting to {}", a.endpoint))?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: a.service.clone(),
            })
            .await?
            .into_inner();
        anyhow::Ok(reply.status)
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("duo health: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let timeout = Duration::from_millis(a.timeout_ms);
    match rt.block_on(async { tokio::time::timeout(timeout, check).await }) {
        Ok(Ok(1)) => {
            println!("SERVING");
            std::process::ExitCode::SUCCESS
        }
        Ok(Ok(status)) => {
            let name = tonic_health::pb::health_check_response::ServingStatus::try_from(status)
                .map_or("UNKNOWN".to_string(), |s| s.as_str_name().to_string());
            println!("{name}");
            std::process::ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("duo health: {e:#}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("duo health: no answer within {} ms", a.timeout_ms);
            std::process::ExitCode::FAILURE
        }
    }
}
