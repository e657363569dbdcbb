//! The orchestrator's command-line flags (each also from the environment).

use std::path::PathBuf;

use clap::Parser;
use duo_rpc::serve::CommonArgs;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "orchestrator",
    version,
    about = "DuoDecoding orchestrator: public gRPC endpoint"
)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    /// target-service address, e.g. http://127.0.0.1:50052.
    #[arg(long, env = "DUO_TARGET")]
    pub target: String,
    /// draft-service addresses (repeat, or comma-separate in the env var).
    #[arg(long = "draft", env = "DUO_DRAFTS", value_delimiter = ',')]
    pub drafts: Vec<String>,
    /// DNS names (`host:port`) whose addresses are all draft workers, e.g.
    /// a compose service scaled with `--scale draft=4` or a Kubernetes
    /// headless service; re-resolved every --discovery-interval-ms.
    #[arg(long = "draft-dns", env = "DUO_DRAFT_DNS", value_delimiter = ',')]
    pub draft_dns: Vec<String>,
    #[arg(long, env = "DUO_DISCOVERY_INTERVAL_MS", default_value_t = 5000)]
    pub discovery_interval_ms: u64,
    /// How often every draft worker and the target are probed.
    #[arg(long, env = "DUO_HEALTH_INTERVAL_MS", default_value_t = 1000)]
    pub health_interval_ms: u64,
    /// Generations that may wait for a draft worker when all are full;
    /// beyond, and after --draft-queue-timeout-ms, RESOURCE_EXHAUSTED.
    #[arg(long, env = "DUO_DRAFT_QUEUE", default_value_t = 64)]
    pub draft_queue: usize,
    #[arg(long, env = "DUO_DRAFT_QUEUE_TIMEOUT_MS", default_value_t = 5000)]
    pub draft_queue_timeout_ms: u64,
    /// Longest wait for one draft; a worker slower than this is failed
    /// over (the generation goes on, unchanged).
    #[arg(long, env = "DUO_DRAFT_TIMEOUT_MS", default_value_t = 2000)]
    pub draft_timeout_ms: u64,
    /// Longest wait for one verification; beyond, the generation fails
    /// with UNAVAILABLE.
    #[arg(long, env = "DUO_TARGET_TIMEOUT_MS", default_value_t = 30000)]
    pub target_timeout_ms: u64,
    /// The workers' tokenizer (must match theirs): a tokenizer.json, or the
    /// target model's folder — then its tokenizer_config.json also gives the
    /// prompt-encoding rules (BOS) and the chat template that
    /// /v1/chat/completions renders.
    #[arg(long, env = "DUO_TOKENIZER")]
    pub tokenizer: PathBuf,
    /// Most generations at once.
    #[arg(long, env = "DUO_MAX_GENERATIONS", default_value_t = 64)]
    pub max_generations: usize,
    /// Requests that may wait for a generation slot when all are taken;
    /// beyond, and after --generation-queue-timeout-ms, RESOURCE_EXHAUSTED.
    #[arg(long, env = "DUO_GENERATION_QUEUE", default_value_t = 64)]
    pub generation_queue: usize,
    #[arg(long, env = "DUO_GENERATION_QUEUE_TIMEOUT_MS", default_value_t = 5000)]
    pub generation_queue_timeout_ms: u64,
    /// Also serve the OpenAI-compatible HTTP API (/v1/completions,
    /// /v1/chat/completions, /v1/models) on this address.
    #[arg(long, env = "DUO_HTTP_LISTEN")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// Longest time an HTTP client may take to send a request's headers
    /// (from connecting, or from the previous response), and then its
    /// body; a slower client's connection is closed. 0 = no limit.
    #[arg(long, env = "DUO_HTTP_READ_TIMEOUT_MS", default_value_t = 10000)]
    pub http_read_timeout_ms: u64,
    /// Longest prompt text accepted (bytes; INVALID_ARGUMENT beyond).
    #[arg(long, env = "DUO_MAX_PROMPT_BYTES", default_value_t = 65536)]
    pub max_prompt_bytes: usize,
    /// Speaker name of the assistant in the chat template (see docs/openai.md).
    #[arg(long, env = "DUO_CHAT_ASSISTANT", default_value = "Assistant")]
    pub chat_assistant_name: String,
}
