//! draft-service binary: parses flags, listens, serves until SIGTERM/Ctrl-C.

use clap::Parser;
use draft_service::{Args, serve};
use duo_rpc::serve::{init_logging, shutdown_signal};

#[tokio::main]
async fn main() {
    let args = Args::parse();
    init_logging(args.common.log_format);
    let listener = match tokio::net::TcpListener::bind(args.common.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "draft-service: cannot listen on {}: {e}",
                args.common.listen
            );
            std::process::exit(1);
        }
    };
    if let Err(e) = serve(args, listener, shutdown_signal()).await {
        tracing::error!("{e}");
        eprintln!("draft-service: {e}");
        std::process::exit(1);
    }
}
