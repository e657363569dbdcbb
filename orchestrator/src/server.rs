//! The process around the service: `main`, building the shared state from
//! the flags, and serving gRPC (with health and reflection) and the HTTP
//! API until shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use duo_core::speculative::budget::{BudgetConfig, BudgetController};
use duo_core::tokenizer::Tokenizer;
use duo_rpc::pb;
use duo_rpc::pb::generation_server::GenerationServer;
use duo_rpc::pb::target_client::TargetClient;
use duo_rpc::serve::{SessionLimiter, reflection_v1, reflection_v1alpha};

use crate::args::Args;
use crate::health::watch_health;
use crate::hold::HoldGate;
use crate::openai;
use crate::pool::{DraftPool, PoolConfig, Resolver, SystemResolver};
use crate::remote::endpoint;
use crate::service::{Orchestrator, State};

/// The `orchestrator` command: serves `args` until SIGTERM or Ctrl-C.
pub fn main(args: &Args) -> std::process::ExitCode {
    duo_rpc::serve::run_main("orchestrator", &args.common, |listener| async move {
        let http = match args.http_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr} for HTTP: {e}"))?,
            ),
            None => None,
        };
        serve(
            args.clone(),
            listener,
            http,
            duo_rpc::serve::shutdown_signal(),
        )
        .await
    })
}

/// Serves gRPC on `listener` (and the OpenAI HTTP API on `http`, if given)
/// until `shutdown` resolves, then drains and returns.
pub async fn serve(
    args: Args,
    listener: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    serve_with(args, listener, http, shutdown, Seams::default()).await
}

/// What an embedding program (the end-to-end tests) may swap in.
pub struct Seams {
    /// Resolves `--draft-dns` names.
    pub resolver: Arc<dyn Resolver>,
    /// Holds generations after their first chunk while closed.
    pub hold: Arc<HoldGate>,
}

impl Default for Seams {
    fn default() -> Self {
        Self {
            resolver: Arc::new(SystemResolver),
            hold: Arc::default(),
        }
    }
}

/// [`serve`] with `seams`.
pub async fn serve_with(
    args: Args,
    listener: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    seams: Seams,
) -> Result<(), String> {
    let life = duo_rpc::serve::start_common(&args.common, shutdown).await?;
    let stop_rx = life.stop.clone();
    let stopped = duo_rpc::serve::stopped;
    let tokenizer = Tokenizer::load(&args.tokenizer).map_err(|e| e.to_string())?;
    let fingerprint = tokenizer.fingerprint();
    let ms = Duration::from_millis;
    let pool = DraftPool::new(
        PoolConfig {
            static_addrs: args.drafts.clone(),
            dns_names: args.draft_dns.clone(),
            discovery_interval: ms(args.discovery_interval_ms.max(100)),
            health_interval: ms(args.health_interval_ms.max(50)),
            probe_timeout: ms(args.health_interval_ms.clamp(500, 5000)),
            queue: args.draft_queue,
            queue_timeout: ms(args.draft_queue_timeout_ms),
            fingerprint: fingerprint.clone(),
        },
        seams.resolver,
    )?;
    pool.discover().await;
    pool.spawn_tasks(stop_rx.clone());
    let state = Arc::new(State {
        fingerprint,
        tokenizer,
        target: TargetClient::new(endpoint(&args.target)?.connect_lazy()),
        target_address: args.target.clone(),
        pool,
        draft_timeout: ms(args.draft_timeout_ms.max(1)),
        target_timeout: ms(args.target_timeout_ms.max(1)),
        max_prompt_bytes: args.max_prompt_bytes,
        limits: Mutex::new(None),
        budget: Mutex::new(BudgetController::new(BudgetConfig::default())),
        limiter: SessionLimiter::new(args.max_generations)
            .with_queue(args.generation_queue, ms(args.generation_queue_timeout_ms))
            .with_gauge("duo_orchestrator_generations_open")
            .with_waiting_gauge("duo_orchestrator_generation_queue_waiting")
            .with_unit("generations"),
        chat_template: openai::ChatTemplate {
            assistant_name: args.chat_assistant_name.clone(),
        },
        hold: seams.hold,
    });
    let svc = Orchestrator(state);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_not_serving::<GenerationServer<Orchestrator>>()
        .await;
    tracing::info!(listen = ?listener.local_addr().ok(), target = %args.target, drafts = ?args.drafts, draft_dns = ?args.draft_dns, "orchestrator listening");
    tokio::spawn(watch_health(
        svc.clone(),
        health_reporter.clone(),
        ms(args.health_interval_ms.max(50)),
        life.draining.clone(),
    ));
    if let Some(http) = http {
        tracing::info!(listen = ?http.local_addr().ok(), "OpenAI-compatible HTTP API listening (and /metrics)");
        let app = openai::router(svc.clone()).merge(duo_rpc::metrics::router());
        let stop = stopped(&stop_rx);
        // Slow clients (slowloris) are cut off; `axum::serve` has no bound.
        let read_timeout = (args.http_read_timeout_ms > 0).then(|| ms(args.http_read_timeout_ms));
        tokio::spawn(async move {
            // Nagle off, as for gRPC: streamed chunks leave at once.
            let http = axum::serve::ListenerExt::tap_io(http, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            duo_rpc::serve::serve_http(http, app, read_timeout, stop).await;
        });
    }
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1(pb::generation_server::SERVICE_NAME)?)
        .add_service(reflection_v1alpha(pb::generation_server::SERVICE_NAME)?)
        .add_service(
            GenerationServer::new(svc).max_decoding_message_size(args.common.max_message_bytes),
        )
        .serve_with_incoming_shutdown(duo_rpc::serve::incoming(listener), stopped(&stop_rx))
        .await
        .map_err(|e| format!("server: {e}"))?;
    health_reporter
        .set_not_serving::<GenerationServer<Orchestrator>>()
        .await;
    Ok(())
}
