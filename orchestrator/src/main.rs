//! orchestrator binary: parses flags, listens, serves until SIGTERM/Ctrl-C.

use clap::Parser;
use duo_rpc::serve::{init_logging, shutdown_signal};
use orchestrator::{Args, serve};

#[tokio::main]
async fn main() {
    let args = Args::parse();
    init_logging(args.common.log_format);
    let listener = match tokio::net::TcpListener::bind(args.common.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("orchestrator: cannot listen on {}: {e}", args.common.listen);
            std::process::exit(1);
        }
    };
    let http = match args.http_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("orchestrator: cannot listen on {addr} for HTTP: {e}");
                std::process::exit(1);
            }
        },
        None => None,
    };
    if let Err(e) = serve(args, listener, http, shutdown_signal()).await {
        tracing::error!("{e}");
        eprintln!("orchestrator: {e}");
        std::process::exit(1);
    }
}
