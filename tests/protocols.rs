//! Protocol edges of the three servers: gRPC server reflection (v1 and
//! v1alpha, as grpcurl and other tools use it) and the orchestrator's HTTP
//! server against slow clients (slowloris).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEALTH: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// The `name` (field 1, written first) of an encoded FileDescriptorProto.
fn file_name(fd: &[u8]) -> String {
    assert_eq!(fd[0], 0x0a, "a FileDescriptorProto starts with its name");
    let len = fd[1] as usize;
    String::from_utf8(fd[2..2 + len].to_vec()).unwrap()
}

/// One reflection version against one server: `$pb` is `v1` or `v1alpha`.
/// Every request goes on the same stream, one at a time, so a request
/// answered with an error must leave the stream usable for the next.
macro_rules! check_reflection {
    ($pb:ident, $addr:expr, $service:expr) => {{
        use pb::server_reflection_client::ServerReflectionClient;
        use pb::server_reflection_request::MessageRequest as Req;
        use pb::server_reflection_response::MessageResponse as Resp;
        use tonic_reflection::pb::$pb as pb;
        let (addr, service): (SocketAddr, &str) = ($addr, $service);
        let what = format!("{} on {service}", stringify!($pb));
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut responses = ServerReflectionClient::new(common::channel(addr).await)
            .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut ask = async |req: Option<Req>| -> Resp {
            let sent = pb::ServerReflectionRequest {
                host: "duo-test".into(),
                message_request: req,
            };
            tx.send(sent.clone()).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(10), responses.message())
                .await
                .unwrap_or_else(|_| panic!("{what}: no answer to {sent:?}"))
                .unwrap_or_else(|e| panic!("{what}: the stream failed on {sent:?}: {e}"))
                .unwrap_or_else(|| panic!("{what}: the stream ended on {sent:?}"));
            assert_eq!(got.original_request.as_ref(), Some(&sent), "{what}");
            assert_eq!(got.valid_host, "duo-test", "{what}");
            got.message_response
                .unwrap_or_else(|| panic!("{what}: an empty answer"))
        };

        // Exactly the services this server serves.
        let Resp::ListServicesResponse(list) = ask(Some(Req::ListServices(String::new()))).await
        else {
            panic!("{what}: no service list");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        let mut want = vec![service, HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA];
        want.sort();
        assert_eq!(names, want, "{what}");

        // A served symbol (the service, one of its methods' messages, the
        // health service) resolves to the file defining it.
        for (symbol, file) in [
            (service, "duo/v1/duo.proto"),
            ("duo.v1.Mode", "duo/v1/duo.proto"),
            (HEALTH, "health.proto"),
            (".grpc.health.v1.Health.Check", "health.proto"),
        ] {
            let Resp::FileDescriptorResponse(files) =
                ask(Some(Req::FileContainingSymbol(symbol.into()))).await
            else {
                panic!("{what}: no file for {symbol}");
            };
            let first = &files.file_descriptor_proto[0];
            assert_eq!(file_name(first), file, "{what}: {symbol}");
            let short = symbol.rsplit('.').next().unwrap();
            assert!(
                first.windows(short.len()).any(|w| w == short.as_bytes()),
                "{what}: {symbol} is not in {file}"
            );
        }

        // An unknown symbol: NOT_FOUND in band, and the stream goes on.
        let unknown = "duo.v1.NoSuchService";
        let Resp::ErrorResponse(e) = ask(Some(Req::FileContainingSymbol(unknown.into()))).await
        else {
            panic!("{what}: {unknown} got no error response");
        };
        assert_eq!(e.error_code, tonic::Code::NotFound as i32, "{what}: {e:?}");
        assert_eq!(e.error_code, 5);
        assert!(e.error_message.contains(unknown), "{what}: {e:?}");
        let Resp::FileDescriptorResponse(files) =
            ask(Some(Req::FileContainingSymbol(service.into()))).await
        else {
            panic!("{what}: the stream is unusable after an unknown symbol");
        };
        assert_eq!(
            file_name(&files.file_descriptor_proto[0]),
            "duo/v1/duo.proto"
        );

        // The same for a file name, and for a request that asks nothing.
        let Resp::ErrorResponse(e) = ask(Some(Req::FileByFilename("no/such.proto".into()))).await
        else {
            panic!("{what}: an unknown file got no error response");
        };
        assert_eq!(e.error_code, tonic::Code::NotFound as i32, "{what}: {e:?}");
        let Resp::ErrorResponse(e) = ask(None).await else {
            panic!("{what}: an empty request got no error response");
        };
        assert_eq!(
            e.error_code,
            tonic::Code::InvalidArgument as i32,
            "{what}: {e:?}"
        );
        let Resp::FileDescriptorResponse(files) =
            ask(Some(Req::FileByFilename("health.proto".into()))).await
        else {
            panic!("{what}: the stream is unusable after an error");
        };
        assert_eq!(file_name(&files.file_descriptor_proto[0]), "health.proto");
        // Extension numbers of a known message: none (grpcurl asks).
        let Resp::AllExtensionNumbersResponse(n) = ask(Some(Req::AllExtensionNumbersOfType(
            "duo.v1.InfoRequest".into(),
        )))
        .await
        else {
            panic!("{what}: no extension numbers");
        };
        assert_eq!(n.base_type_name, "duo.v1.InfoRequest");
        assert!(n.extension_number.is_empty());

        // The client closes its side: the stream ends cleanly (status OK).
        drop(tx);
        let end = tokio::time::timeout(Duration::from_secs(10), responses.message())
            .await
            .unwrap();
        assert!(matches!(end, Ok(None)), "{what}: {end:?}");
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_what_each_server_serves_and_answers_unknown_symbols_in_band() {
    let dep = common::start(&[common::models().join("tokenizer.json")]).await;
    let servers = [
        (dep.orchestrator, "duo.v1.Generation"),
        (dep.target, "duo.v1.Target"),
        (dep.drafts[0], "duo.v1.Draft"),
    ];
    for (addr, service) in servers {
        check_reflection!(v1, addr, service);
        check_reflection!(v1alpha, addr, service);
    }
}

/// Reads from `s` until the server closes the connection (or `limit`
/// passes: a panic); returns what came and when the close came.
async fn read_until_closed(
    s: &mut TcpStream,
    start: Instant,
    limit: Duration,
) -> (String, Duration) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => panic!(
                "the server still holds the connection after {limit:?}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
}

const READ_TIMEOUT_MS: u64 = 500;
/// Well under what a slowloris needs, well over the timeout plus a loaded
/// CI machine's scheduling.
const CLOSE_WITHIN: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_clients_are_cut_off_while_others_are_served() {
    let dep = common::start_with(common::Setup {
        orchestrator_flags: vec!["--http-read-timeout-ms".into(), READ_TIMEOUT_MS.to_string()],
        ..common::Setup::drafts(0)
    })
    .await;
    let addr = dep.http;
    let timeout = Duration::from_millis(READ_TIMEOUT_MS);

    // A client that connects and sends nothing.
    let silent = tokio::spawn(async move {
        let start = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        read_until_closed(&mut s, start, CLOSE_WITHIN).await
    });
    // A slowloris: a header line every 100 ms, never the blank line.
    let trickle = tokio::spawn(async move {
        let start = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut sent = 0;
        let closed = loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if s.write_all(format!("X-Slow-{sent}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                break start.elapsed();
            }
            sent += 1;
            // The server closed its side: a read says so at once.
            let mut b = [0u8; 64];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(1), s.read(&mut b)).await
            {
                break start.elapsed();
            }
            assert!(
                start.elapsed() < CLOSE_WITHIN,
                "the slowloris still holds its connection"
            );
        };
        (sent, closed)
    });
    // A body that never completes: the request fails, the connection closes.
    let slow_body = tokio::spawn(async move {
        let start = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"prompt\": ",
        )
        .await
        .unwrap();
        read_until_closed(&mut s, start, CLOSE_WITHIN).await
    });
    // A kept-alive connection left idle after its response.
    let idle = tokio::spawn(async move {
        let start = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        read_until_closed(&mut s, start, CLOSE_WITHIN).await
    });

    // Meanwhile the server serves a normal client, at once, repeatedly.
    let served_from = Instant::now();
    let mut served = 0;
    while served_from.elapsed() < timeout / 2 || served < 3 {
        let (code, _, body) = common::http(addr, "GET", "/v1/models", "").await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"list\""), "{body}");
        served += 1;
    }

    let (got, after) = silent.await.unwrap();
    println!("silent client: closed after {after:?}");
    assert!(got.is_empty(), "{got}");
    assert!(
        after >= timeout * 8 / 10,
        "closed too early, not by the timeout: {after:?}"
    );

    let (lines, after) = trickle.await.unwrap();
    println!("slowloris: {lines} header lines, closed after {after:?}");
    assert!(after >= timeout * 8 / 10, "closed too early: {after:?}");

    let (got, after) = slow_body.await.unwrap();
    println!("slow body: closed after {after:?}: {got:?}");
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(got.contains("did not arrive within"), "{got}");
    assert!(after >= timeout * 8 / 10, "closed too early: {after:?}");

    let (got, after) = idle.await.unwrap();
    println!("idle kept-alive connection: closed after {after:?}");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(after >= timeout * 8 / 10, "closed too early: {after:?}");

    // And still afterwards.
    let (code, _, body) = common::http(addr, "GET", "/v1/models", "").await;
    assert_eq!(code, 200, "{body}");
}

/// A body over the 2 MiB limit is 413 naming the limit, on both endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_are_413_naming_the_limit() {
    let dep = common::start_with(common::Setup::drafts(0)).await;
    let big = format!(
        r#"{{"prompt": "{}", "max_tokens": 1}}"#,
        "a".repeat(3 << 20)
    );
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let (code, _, text) = common::http(dep.http, "POST", path, &big).await;
        assert_eq!(code, 413, "{path}: {text}");
        assert!(text.contains("2097152 bytes"), "{path}: {text}");
    }
}
