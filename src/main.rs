//! The `qemu-worker` binary: the CLI edge (the only place that uses anyhow).

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
