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
    /// Once listening, write the bound address (`IP:PORT` and a newline)
    /// to this file, atomically (written beside it, then renamed). With
    /// `--listen 127.0.0.1:0` the system picks a free port: this is how
    /// whoever started the service (the end-to-end tests) learns which.
    #[arg(long)]
    pub port_file: Option<std::path::PathBuf>,
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

/// Server reflection (`grpc.reflection.v1`) for a server that serves
/// `service` (e.g. `duo_rpc::pb::target_server::SERVICE_NAME`): it lists
/// exactly that service, `grpc.health.v1.Health` and the two reflection
/// services, and describes their files. Serve it beside
/// [`reflection_v1alpha`] (older grpcurl and other tools ask v1alpha).
///
/// Our own implementation rather than tonic-reflection's server: that one
/// ends the whole stream with a status on an unknown symbol or file, where
/// the protocol answers with an `error_response` (NOT_FOUND) and goes on.
pub fn reflection_v1(
    service: &str,
) -> Result<
    tonic_reflection::pb::v1::server_reflection_server::ServerReflectionServer<reflect::V1>,
    String,
> {
    Ok(
        tonic_reflection::pb::v1::server_reflection_server::ServerReflectionServer::new(
            reflect::V1(Arc::new(reflect::Descriptors::new(service)?)),
        ),
    )
}

/// [`reflection_v1`] as `grpc.reflection.v1alpha`.
pub fn reflection_v1alpha(
    service: &str,
) -> Result<
    tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflectionServer<
        reflect::V1alpha,
    >,
    String,
> {
    Ok(
        tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflectionServer::new(
            reflect::V1alpha(Arc::new(reflect::Descriptors::new(service)?)),
        ),
    )
}

/// The reflection services behind [`reflection_v1`] and
/// [`reflection_v1alpha`].
pub mod reflect {
    use std::collections::{HashMap, HashSet};
    use std::sync::Arc;

    use prost::Message;
    use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto};
    use tonic::Code;

    /// The other services every server advertises besides its own.
    pub const SHARED_SERVICES: [&str; 3] = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];

    /// A `FileDescriptorSet` whose files are kept as their encoded bytes
    /// (served verbatim: nothing a decode would drop is lost).
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawFileSet {
        #[prost(bytes = "vec", repeated, tag = "1")]
        file: Vec<Vec<u8>>,
    }

    /// The descriptors one server describes, indexed.
    #[derive(Debug)]
    pub struct Descriptors {
        services: Vec<String>,
        /// File name -> (encoded FileDescriptorProto, its imports).
        files: HashMap<String, (Vec<u8>, Vec<String>)>,
        /// Fully-qualified symbol -> the file defining it.
        symbols: HashMap<String, String>,
        /// Fully-qualified message names (for extension-number queries).
        messages: HashSet<String>,
    }

    /// A reflection request, whichever protocol version it came in.
    pub(super) enum Ask<'a> {
        ListServices,
        FileByFilename(&'a str),
        FileContainingSymbol(&'a str),
        FileContainingExtension(&'a str, i32),
        AllExtensionNumbersOfType(&'a str),
        Nothing,
    }

    /// What to answer.
    pub(super) enum Answer {
        Services(Vec<String>),
        Files(Vec<Vec<u8>>),
        ExtensionNumbers(String),
        Error(Code, String),
    }

    impl Descriptors {
        /// The duo.v1, health and reflection files; advertises `service`
        /// and [`SHARED_SERVICES`].
        pub fn new(service: &str) -> Result<Self, String> {
            let mut d = Descriptors {
                services: Vec::new(),
                files: HashMap::new(),
                symbols: HashMap::new(),
                messages: HashSet::new(),
            };
            for set in [
                crate::pb::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ] {
                let set = RawFileSet::decode(set)
                    .map_err(|e| format!("building reflection: a descriptor set: {e}"))?;
                for raw in set.file {
                    let fd = FileDescriptorProto::decode(raw.as_slice())
                        .map_err(|e| format!("building reflection: a file descriptor: {e}"))?;
                    d.add_file(fd, raw);
                }
            }
            for name in std::iter::once(service).chain(SHARED_SERVICES) {
                if !d.symbols.contains_key(name) {
                    return Err(format!(
                        "building reflection: service {name} is in no descriptor"
                    ));
                }
                d.services.push(name.to_string());
            }
            Ok(d)
        }

        fn add_file(&mut self, fd: FileDescriptorProto, raw: Vec<u8>) {
            let file = fd.name().to_string();
            if self.files.contains_key(&file) {
                return;
            }
            let package = fd.package();
            let mut add = |symbol: String| {
                self.symbols.entry(symbol).or_insert_with(|| file.clone());
            };
            for m in &fd.message_type {
                message_symbols(package, m, &mut add, &mut self.messages);
            }
            for e in &fd.enum_type {
                enum_symbols(package, e, &mut add);
            }
            for x in &fd.extension {
                add(join(package, x.name()));
            }
            for s in &fd.service {
                let service = join(package, s.name());
                for m in &s.method {
                    add(join(&service, m.name()));
                }
                add(service);
            }
            self.files.insert(file, (raw, fd.dependency));
        }

        /// `name` and every file it imports, transitively (what the
        /// protocol asks for: a client needs them all to use `name`).
        fn file_with_imports(&self, name: &str) -> Vec<Vec<u8>> {
            let mut seen = HashSet::new();
            let mut todo = vec![name.to_string()];
            let mut out = Vec::new();
            while let Some(f) = todo.pop() {
                if !seen.insert(f.clone()) {
                    continue;
                }
                // An import we do not hold is left for the client to ask.
                if let Some((raw, deps)) = self.files.get(&f) {
                    out.push(raw.clone());
                    todo.extend(deps.iter().rev().cloned());
                }
            }
            out
        }

        pub(super) fn answer(&self, ask: Ask<'_>) -> Answer {
            match ask {
                Ask::ListServices => Answer::Services(self.services.clone()),
                Ask::FileByFilename(name) => {
                    if self.files.contains_key(name) {
                        Answer::Files(self.file_with_imports(name))
                    } else {
                        Answer::Error(Code::NotFound, format!("file '{name}' not found"))
                    }
                }
                Ask::FileContainingSymbol(symbol) => {
                    match self.symbols.get(symbol.trim_start_matches('.')) {
                        Some(file) => Answer::Files(self.file_with_imports(file)),
                        None => {
                            Answer::Error(Code::NotFound, format!("symbol '{symbol}' not found"))
                        }
                    }
                }
                Ask::FileContainingExtension(ty, number) => Answer::Error(
                    Code::NotFound,
                    format!("no extension {number} of '{ty}' (no extensions are served)"),
                ),
                Ask::AllExtensionNumbersOfType(ty) => {
                    let ty = ty.trim_start_matches('.');
                    if self.messages.contains(ty) {
                        Answer::ExtensionNumbers(ty.to_string())
                    } else {
                        Answer::Error(Code::NotFound, format!("message type '{ty}' not found"))
                    }
                }
                Ask::Nothing => Answer::Error(
                    Code::InvalidArgument,
                    "empty request: set one of file_by_filename, file_containing_symbol, \
                     file_containing_extension, all_extension_numbers_of_type, list_services"
                        .to_string(),
                ),
            }
        }
    }

    fn join(scope: &str, name: &str) -> String {
        if scope.is_empty() {
            name.to_string()
        } else {
            format!("{scope}.{name}")
        }
    }

    fn message_symbols(
        scope: &str,
        m: &DescriptorProto,
        add: &mut impl FnMut(String),
        messages: &mut HashSet<String>,
    ) {
        let name = join(scope, m.name());
        for f in m.field.iter().chain(&m.extension) {
            add(join(&name, f.name()));
        }
        for o in &m.oneof_decl {
            add(join(&name, o.name()));
        }
        for n in &m.nested_type {
            message_symbols(&name, n, add, messages);
        }
        for e in &m.enum_type {
            enum_symbols(&name, e, add);
        }
        messages.insert(name.clone());
        add(name);
    }

    fn enum_symbols(scope: &str, e: &EnumDescriptorProto, add: &mut impl FnMut(String)) {
        let name = join(scope, e.name());
        for v in &e.value {
            // Protobuf scopes enum values beside their enum (`pkg.VALUE`);
            // some tools ask for `pkg.Enum.VALUE`: both resolve.
            add(join(scope, v.name()));
            add(join(&name, v.name()));
        }
        add(name);
    }

    /// One reflection service per protocol version: the two are the same
    /// messages in different packages.
    macro_rules! version {
        ($service:ident, $pb:ident) => {
            /// The reflection service, as its protocol version.
            #[derive(Debug, Clone)]
            pub struct $service(pub Arc<Descriptors>);

            impl $service {
                fn respond(
                    &self,
                    req: tonic_reflection::pb::$pb::ServerReflectionRequest,
                ) -> tonic_reflection::pb::$pb::ServerReflectionResponse {
                    use pb::server_reflection_request::MessageRequest as Req;
                    use pb::server_reflection_response::MessageResponse as Resp;
                    use tonic_reflection::pb::$pb as pb;
                    let ask = match &req.message_request {
                        Some(Req::ListServices(_)) => Ask::ListServices,
                        Some(Req::FileByFilename(f)) => Ask::FileByFilename(f),
                        Some(Req::FileContainingSymbol(s)) => Ask::FileContainingSymbol(s),
                        Some(Req::FileContainingExtension(x)) => {
                            Ask::FileContainingExtension(&x.containing_type, x.extension_number)
                        }
                        Some(Req::AllExtensionNumbersOfType(t)) => {
                            Ask::AllExtensionNumbersOfType(t)
                        }
                        None => Ask::Nothing,
                    };
                    let response = match self.0.answer(ask) {
                        Answer::Services(names) => {
                            Resp::ListServicesResponse(pb::ListServiceResponse {
                                service: names
                                    .into_iter()
                                    .map(|name| pb::ServiceResponse { name })
                                    .collect(),
                            })
                        }
                        Answer::Files(files) => {
                            Resp::FileDescriptorResponse(pb::FileDescriptorResponse {
                                file_descriptor_proto: files,
                            })
                        }
                        Answer::ExtensionNumbers(base_type_name) => {
                            Resp::AllExtensionNumbersResponse(pb::ExtensionNumberResponse {
                                base_type_name,
                                extension_number: Vec::new(),
                            })
                        }
                        Answer::Error(code, error_message) => {
                            Resp::ErrorResponse(pb::ErrorResponse {
                                error_code: code as i32,
                                error_message,
                            })
                        }
                    };
                    pb::ServerReflectionResponse {
                        valid_host: req.host.clone(),
                        original_request: Some(req),
                        message_response: Some(response),
                    }
                }
            }

            #[tonic::async_trait]
            impl tonic_reflection::pb::$pb::server_reflection_server::ServerReflection
                for $service
            {
                type ServerReflectionInfoStream = std::pin::Pin<
                    Box<
                        dyn tokio_stream::Stream<
                                Item = Result<
                                    tonic_reflection::pb::$pb::ServerReflectionResponse,
                                    tonic::Status,
                                >,
                            > + Send,
                    >,
                >;

                /// One response per request, in order; a request that
                /// cannot be answered gets an `error_response` and the
                /// stream goes on.
                async fn server_reflection_info(
                    &self,
                    req: tonic::Request<
                        tonic::Streaming<tonic_reflection::pb::$pb::ServerReflectionRequest>,
                    >,
                ) -> Result<tonic::Response<Self::ServerReflectionInfoStream>, tonic::Status> {
                    use tokio_stream::StreamExt;
                    let this = self.clone();
                    let responses = req
                        .into_inner()
                        .map(move |req| req.map(|req| this.respond(req)));
                    Ok(tonic::Response::new(Box::pin(responses)))
                }
            }
        };
    }

    version!(V1, v1);
    version!(V1alpha, v1alpha);
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
/// `common.listen` (its address written to `--port-file`, if given), then
/// `serve` until it returns (services stop on SIGTERM or Ctrl-C). Any error
/// is one line on stderr and exit code 1.
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
        if let Some(path) = &common.port_file {
            let bound = listener
                .local_addr()
                .map_err(|e| format!("cannot read the address bound for {listen}: {e}"))?;
            write_port_file(path, bound)?;
        }
        serve(listener).await
    })
    .map_or_else(fail, |()| std::process::ExitCode::SUCCESS)
}

/// Writes `addr` and a newline to `path`: to a file beside it, then
/// renamed, so that a reader never sees it half written.
fn write_port_file(path: &std::path::Path, addr: SocketAddr) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{addr}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write the port file {}: {e}", path.display()))
}

/// The accepted connections of `listener`, with Nagle's algorithm off:
/// each round's small messages must leave at once (with it on, a reply
/// can wait ~40 ms for the peer's delayed ACK).
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serves `app` over HTTP/1.1 on `listener` until `stop`, then lets the
/// requests in flight finish (as `axum::serve(..).with_graceful_shutdown`
/// does), with a bound on slow clients, which `axum::serve` lacks: a
/// client must send a request's headers within `read_timeout` of starting
/// it (of connecting, or of the previous response on a kept-alive
/// connection), or the connection is closed; then its body within
/// `read_timeout` more, or reading the body fails (the handler answers
/// 400) and the connection is closed. `None`: no bound.
pub async fn serve_http<L>(
    mut listener: L,
    app: axum::Router,
    read_timeout: Option<Duration>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) where
    L: axum::serve::Listener,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;
    let mut http = hyper::server::conn::http1::Builder::new();
    // No half_close: a client that shuts its side of the connection is
    // taken as gone (as nginx does), so a request it left in the queue or
    // mid-stream gives its place up at once. A client that half-closes
    // after its request (`nc -N`) is therefore not answered: hyper cannot
    // tell it from one that went away until it writes (docs/reliability.md).
    http.timer(TokioTimer::new())
        .header_read_timeout(read_timeout);
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        stop.await;
        let _ = stopping_tx.send(true);
    });
    // Every connection task holds a sender; all gone = all drained.
    let (alive, mut drained) = tokio::sync::mpsc::channel::<()>(1);
    let stop_accepting = stopped(&stopping);
    tokio::pin!(stop_accepting);
    loop {
        let (io, _) = tokio::select! {
            conn = listener.accept() => conn,
            _ = &mut stop_accepting => break,
        };
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let req =
                    req.map(|body| axum::body::Body::new(ReadDeadline::new(body, read_timeout)));
                app.clone().oneshot(req)
            });
        let conn = http
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let stop_conn = stopped(&stopping);
        let alive = alive.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop_conn => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                // A header read timeout, a malformed request, a client gone.
                tracing::debug!("HTTP connection: {e}");
            }
            drop(alive);
        });
    }
    drop(listener);
    drop(alive);
    let _ = drained.recv().await;
}

/// A request body that fails once `timeout` has passed since its request's
/// headers arrived (a client trickling its body).
struct ReadDeadline {
    body: hyper::body::Incoming,
    deadline: Option<(tokio::time::Instant, Duration)>,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl ReadDeadline {
    fn new(body: hyper::body::Incoming, timeout: Option<Duration>) -> Self {
        Self {
            body,
            deadline: timeout.map(|t| (tokio::time::Instant::now() + t, t)),
            sleep: None,
        }
    }
}

impl hyper::body::Body for ReadDeadline {
    type Data = hyper::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if let Some((at, timeout)) = this.deadline {
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(Err(format!(
                    "the request body did not arrive within {} ms",
                    timeout.as_millis()
                )
                .into())));
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
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

    /// A queued request that got no slot within the queue's timeout: not
    /// the same as [`Self::full`] (refused at once, the queue full).
    fn timed_out(&self, what: &str) -> Status {
        Status::resource_exhausted(format!(
            "{what} is at its limit of {} concurrent {}, and none freed within the {} ms queue timeout: retry later or add capacity",
            self.max,
            self.unit,
            self.queue_timeout.as_millis()
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
            _ => Err(self.timed_out(what)),
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

    #[test]
    fn the_port_file_holds_the_bound_address() {
        let path = std::env::temp_dir().join(format!("duo-port-file-{}", std::process::id()));
        let addr: SocketAddr = "127.0.0.1:40123".parse().unwrap();
        write_port_file(&path, addr).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(text, "127.0.0.1:40123\n");
        assert_eq!(text.trim().parse::<SocketAddr>().unwrap(), addr);
    }

    #[tokio::test]
    async fn a_queued_request_times_out() {
        let l = SessionLimiter::new(1).with_queue(4, Duration::from_millis(20));
        let _first = l.try_open("w").unwrap();
        let e = l.open("w").await.err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        // Said apart from a full queue (refused at once).
        assert!(
            e.message().contains("20 ms queue timeout"),
            "{}",
            e.message()
        );
        assert!(!e.message().contains("queued"), "{}", e.message());
        assert_eq!(l.waiting(), 0);
        assert_eq!(l.open_count(), 1);
    }
}
