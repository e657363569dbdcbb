//! Prometheus metrics: one recorder per process (the `metrics` facade, so
//! recording is a lock-free atomic update), rendered as text on
//! `GET /metrics`. Every service calls [`install`] at start; metric names
//! carry the service (`duo_orchestrator_*`, `duo_draft_*`, `duo_target_*`).

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Latency buckets (seconds): 0.5 ms to 60 s.
const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets for small counts (metrics named `*_per_round`: γ, branches).
const COUNTS: &[f64] = &[
    1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0, 32.0, 64.0,
];

/// Installs the process's recorder (once) and returns its handle; `None`
/// when another recorder was installed first.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(SECONDS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_per_round".into()), COUNTS)
                })
                .and_then(|b| b.install_recorder())
                .map_err(|e| tracing::warn!("metrics disabled: {e}"))
                .ok()?;
            // Histograms need periodic upkeep to bound their memory.
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                });
            Some(handle)
        })
        .as_ref()
}

/// The metrics as Prometheus text.
pub fn render() -> String {
    install().map(|h| h.render()).unwrap_or_default()
}

/// `GET /metrics`, to serve alone or merge into another router.
pub fn router() -> axum::Router {
    install();
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            ([("content-type", "text/plain; version=0.0.4")], render())
        }),
    )
}

/// Serves `/metrics` on `addr` until `shutdown` resolves (a background task).
pub async fn spawn_server(
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(listen = %local, "metrics on /metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router())
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!("metrics server: {e}");
        }
    });
    Ok(local)
}
