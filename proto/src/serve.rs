//! What every service shares: logging, health, reflection, graceful
//! shutdown and a session limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// Flags every service takes (also from the environment).
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Address to listen on.
    #[arg(long, env = "DUO_LISTEN")]
    pub listen: SocketAddr,
    /// Log format: human or json.
    #[arg(long, env = "DUO_LOG_FORMAT", default_value = "human")]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics (GET /metrics) over HTTP on this address.
    #[arg(long, env = "DUO_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Largest gRPC message accepted (bytes); larger ones are refused
    /// before they are decoded.
    #[arg(long, env = "DUO_MAX_MESSAGE_BYTES", default_value_t = 4 << 20)]
    pub max_message_bytes: usize,
    /// On SIGTERM, report NOT_SERVING at once and keep serving this long
    /// before draining (so Kubernetes endpoints, load balancers and the
    /// orchestrator's probes stop sending new work first); then in-flight
    /// work finishes and the process exits.
    #[arg(long, env = "DUO_DRAIN_DELAY_MS", default_value_t = 0)]
    pub drain_delay_ms: u64,
}

/// Session limits of a worker (draft or target service).
#[derive(clap::Args, Debug, Clone)]
pub struct SessionArgs {
    /// Most sessions held at once.
    #[arg(long, env = "DUO_MAX_SESSIONS", default_value_t = 64)]
    pub max_sessions: usize,
    /// Session requests that may wait for a free slot when all are taken;
    /// beyond, and after --session-queue-timeout-ms, RESOURCE_EXHAUSTED.
    #[arg(long, env = "DUO_SESSION_QUEUE", default_value_t = 64)]
    pub session_queue: usize,
    /// How long a queued session request waits for a slot.
    #[arg(long, env = "DUO_SESSION_QUEUE_TIMEOUT_MS", default_value_t = 5000)]
    pub session_queue_timeout_ms: u64,
    /// Close a session that sends nothing for this long (an abandoned
    /// client whose connection stays up); 0 = never.
    #[arg(long, env = "DUO_SESSION_TTL_S", default_value_t = 300)]
    pub session_ttl_s: u64,
}

impl SessionArgs {
    /// The limiter these arguments describe, counting into `gauge`.
    pub fn limiter(&self, gauge: &'static str) -> SessionLimiter {
        SessionLimiter::new(self.max_sessions)
            .with_queue(
                self.session_queue,
                Duration::from_millis(self.session_queue_timeout_ms),
            )
            .with_gauge(gauge)
    }

    /// The idle time-to-live, if any.
    pub fn ttl(&self) -> Option<Duration> {
        (self.session_ttl_s > 0).then(|| Duration::from_secs(self.session_ttl_s))
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// Installs the tracing subscriber (level from `RUST_LOG`, default info).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Server reflection for the duo.v1 services and health.
pub fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    String,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("building reflection: {e}"))
}

/// A service's shutdown, in two phases: `draining` turns true on the
/// shutdown signal (health goes NOT_SERVING), `stop` turns true
/// `--drain-delay-ms` later (the servers stop accepting and drain).
/// Invariant: `stop` never turns true before `draining`.
pub struct Lifecycle {
    pub draining: tokio::sync::watch::Receiver<bool>,
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// What every service does first: installs the metrics recorder, turns
/// `shutdown` into the two phases of a [`Lifecycle`] (each a watch every
/// server can wait on with [`stopped`]), and serves `/metrics` when
/// `--metrics-listen` is set.
pub async fn start_common(
    common: &CommonArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Lifecycle, String> {
    crate::metrics::install();
    let (draining_tx, draining) = tokio::sync::watch::channel(false);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let delay = Duration::from_millis(common.drain_delay_ms);
    tokio::spawn(async move {
        shutdown.await;
        let _ = draining_tx.send(true);
        if !delay.is_zero() {
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "not serving; draining after the delay"
            );
            tokio::time::sleep(delay).await;
        }
        let _ = stop_tx.send(true);
    });
    if let Some(addr) = common.metrics_listen {
        crate::metrics::spawn_server(addr, stopped(&stop)).await?;
    }
    Ok(Lifecycle { draining, stop })
}

/// Marks `service` SERVING — unless draining has begun — and NOT_SERVING
/// as soon as draining begins. Call once the service is ready.
pub async fn serve_until_draining(
    reporter: tonic_health::server::HealthReporter,
    service: &'static str,
    draining: &tokio::sync::watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    if !*draining.borrow() {
        reporter
            .set_service_status(service, ServingStatus::Serving)
            .await;
    }
    let drained = stopped(draining);
    tokio::spawn(async move {
        drained.await;
        reporter
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    });
}

/// A future that resolves once `rx` turns true (shutdown fan-out: one
/// signal stops the gRPC server and the HTTP servers beside it).
pub fn stopped(
    rx: &tokio::sync::watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// A service's `main`: logging, a tokio runtime, the listener on
/// `common.listen`, then `serve` until it returns (services stop on
/// SIGTERM or Ctrl-C). Any error is one line on stderr and exit code 1.
pub fn run_main<F, Fut>(name: &str, common: &CommonArgs, serve: F) -> std::process::ExitCode
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    init_logging(common.log_format);
    let fail = |e: String| {
        tracing::error!("{e}");
        eprintln!("{name}: {e}");
        std::process::ExitCode::FAILURE
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    let listen = common.listen;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        serve(listener).await
    })
    .map_or_else(fail, |()| std::process::ExitCode::SUCCESS)
}

/// The accepted connections of `listener`, with Nagle's algorithm off:
/// each round's small messages must leave at once (with it on, a reply
/// can wait ~40 ms for the peer's delayed ACK).
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received: draining");
}

/// Bounds the sessions a service holds at once, with a bounded queue of
/// requests waiting for a slot. Invariant: `open()` equals the slots alive.
#[derive(Clone)]
pub struct SessionLimiter {
    permits: Arc<Semaphore>,
    open: Arc<AtomicUsize>,
    waiting: Arc<AtomicUsize>,
    max: usize,
    queue: usize,
    queue_timeout: Duration,
    gauge: Option<&'static str>,
    /// The Prometheus gauge of requests waiting in the queue, if any.
    waiting_gauge: Option<&'static str>,
    /// What is counted, for messages ("sessions", "generations").
    unit: &'static str,
}

/// Held for the life of a session; dropping it frees the slot.
pub struct SessionSlot {
    _permit: OwnedSemaphorePermit,
    open: Arc<AtomicUsize>,
    gauge: Option<&'static str>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(g) = self.gauge {
            metrics::gauge!(g).decrement(1.0);
        }
    }
}

/// Counts a waiter for as long as it waits.
/// One request in the queue; leaving it (served, timed out, or abandoned
/// by its client) takes it out of the count and the gauge.
struct Waiting(Arc<AtomicUsize>, Option<&'static str>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        if let Some(g) = self.1 {
            metrics::gauge!(g).decrement(1.0);
        }
    }
}

impl SessionLimiter {
    /// At most `max` sessions, no queue.
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            open: Arc::new(AtomicUsize::new(0)),
            waiting: Arc::new(AtomicUsize::new(0)),
            max,
            queue: 0,
            queue_timeout: Duration::ZERO,
            gauge: None,
            waiting_gauge: None,
            unit: "sessions",
        }
    }

    /// Names what is counted in messages (default "sessions").
    pub fn with_unit(mut self, unit: &'static str) -> Self {
        self.unit = unit;
        self
    }

    /// Lets up to `queue` requests wait up to `timeout` for a slot.
    pub fn with_queue(mut self, queue: usize, timeout: Duration) -> Self {
        self.queue = queue;
        self.queue_timeout = timeout;
        self
    }

    /// Keeps the Prometheus gauge `name` equal to the sessions open.
    pub fn with_gauge(mut self, name: &'static str) -> Self {
        self.gauge = Some(name);
        self
    }

    /// Keeps the Prometheus gauge `name` equal to the requests queued.
    pub fn with_waiting_gauge(mut self, name: &'static str) -> Self {
        self.waiting_gauge = Some(name);
        self
    }

    fn full(&self, what: &str) -> Status {
        Status::resource_exhausted(format!(
            "{what} is at its limit of {} concurrent {}{}: retry later or add capacity",
            self.max,
            self.unit,
            if self.queue > 0 {
                format!(" and {} queued", self.queue)
            } else {
                String::new()
            }
        ))
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> SessionSlot {
        self.open.fetch_add(1, Ordering::Relaxed);
        if let Some(g) = self.gauge {
            metrics::gauge!(g).increment(1.0);
        }
        SessionSlot {
            _permit: permit,
            open: self.open.clone(),
            gauge: self.gauge,
        }
    }

    /// A slot, or RESOURCE_EXHAUSTED when all are taken.
    pub fn try_open(&self, what: &str) -> Result<SessionSlot, Status> {
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.full(what))?;
        Ok(self.slot(permit))
    }

    /// A slot; when all are taken, waits in the queue (if it has room) up
    /// to the queue timeout, then RESOURCE_EXHAUSTED.
    pub async fn open(&self, what: &str) -> Result<SessionSlot, Status> {
        if let Ok(slot) = self.try_open(what) {
            return Ok(slot);
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.queue {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(self.full(what));
        }
        if let Some(g) = self.waiting_gauge {
            metrics::gauge!(g).increment(1.0);
        }
        let _waiting = Waiting(self.waiting.clone(), self.waiting_gauge);
        match tokio::time::timeout(self.queue_timeout, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(self.slot(permit)),
            _ => Err(self.full(what)),
        }
    }

    pub fn open_count(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queued_requests_get_freed_slots_and_the_rest_are_refused() {
        let l = SessionLimiter::new(1).with_queue(1, Duration::from_secs(5));
        let first = l.open("w").await.unwrap();
        let l2 = l.clone();
        let queued = tokio::spawn(async move { l2.open("w").await.map(|_| ()) });
        while l.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        // The queue (1) is full: refused at once.
        let refused = l.open("w").await.err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("1 queued"),
            "{}",
            refused.message()
        );
        drop(first);
        queued.await.unwrap().unwrap();
        assert_eq!(l.open_count(), 0);
        assert_eq!(l.waiting(), 0);
    }

    #[tokio::test]
    async fn a_queued_request_times_out() {
        let l = SessionLimiter::new(1).with_queue(4, Duration::from_millis(20));
        let _first = l.try_open("w").unwrap();
        let e = l.open("w").await.err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert_eq!(l.waiting(), 0);
        assert_eq!(l.open_count(), 1);
    }
}
