//! A delaying TCP proxy: what a network between hosts adds to every
//! message, on loopback. Each byte is forwarded half the round-trip time
//! after it arrived, in each direction, in order (the link's latency; its
//! bandwidth is loopback's). `duo bench-load --rtt-ms` puts one in front of
//! the draft workers or the target to measure what the split costs across
//! hosts (docs/benchmark.md, "Network latency between hosts").

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Proxies started on one runtime; they stop when this is dropped.
pub struct Proxies {
    runtime: tokio::runtime::Runtime,
}

impl Proxies {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?,
        })
    }

    /// Listens on `listen` and forwards every connection to `to`, adding
    /// `rtt` to its round trips (`rtt / 2` each way).
    pub fn add(&self, listen: SocketAddr, to: SocketAddr, rtt: Duration) -> anyhow::Result<()> {
        let listener = self
            .runtime
            .block_on(TcpListener::bind(listen))
            .map_err(|e| anyhow::anyhow!("delay proxy on {listen}: {e}"))?;
        self.runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(to).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pipe(cr, sw, rtt / 2));
                    tokio::spawn(pipe(sr, cw, rtt / 2));
                });
            }
        });
        Ok(())
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
