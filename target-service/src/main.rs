//! target-service binary: parses flags, listens, serves until SIGTERM/Ctrl-C.

use clap::Parser;

fn main() -> std::process::ExitCode {
    target_service::main(&target_service::Args::parse())
}
