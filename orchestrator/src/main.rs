//! orchestrator binary: parses flags, listens, serves until SIGTERM/Ctrl-C.

use clap::Parser;

fn main() -> std::process::ExitCode {
    orchestrator::main(&orchestrator::Args::parse())
}
