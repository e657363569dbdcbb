//! draft-service binary: parses flags, listens, serves until SIGTERM/Ctrl-C.

use clap::Parser;

fn main() -> std::process::ExitCode {
    draft_service::main(&draft_service::Args::parse())
}
