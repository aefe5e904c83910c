use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use qemu_worker::config::{LoadedConfig, load_config};
use qemu_worker::job::{Identity, PayloadCheck, PayloadContext, validate_payload};
use qemu_worker::schema::write_schemas;

/// Exit status for bad usage and malformed payloads (DESIGN §4).
const EXIT_USAGE: u8 = 2;
/// Exit status for every other failure of the worker itself.
const EXIT_OTHER: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "qemu-worker",
    version,
    about = "Runs CI jobs in isolated QEMU VMs"
)]
struct Cli {
    /// Worker configuration [default: ./worker.yml, else the embedded default]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a job payload (YAML or JSON; `-` for stdin) and print every problem.
    Validate {
        payload: PathBuf,
        /// Print the machine-readable report (schemas/validation-report.schema.json).
        #[arg(long)]
        json: bool,
    },
    /// Write the JSON Schemas of every document the worker reads or writes.
    Schema {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("qemu-worker: error: {:#}", failure.error);
            ExitCode::from(failure.exit_code)
        }
    }
}

/// An error with the exit status it maps to.
struct Failure {
    error: anyhow::Error,
    exit_code: u8,
}

trait ExitWith<T> {
    fn exit_with(self, exit_code: u8) -> Result<T, Failure>;
}

impl<T, E: Into<anyhow::Error>> ExitWith<T> for Result<T, E> {
    fn exit_with(self, exit_code: u8) -> Result<T, Failure> {
        self.map_err(|e| Failure {
            error: e.into(),
            exit_code,
        })
    }
}

fn run(cli: Cli) -> Result<ExitCode, Failure> {
    match cli.command {
        Command::Validate { payload, json } => {
            let loaded = load_config(cli.config.as_deref()).exit_with(EXIT_OTHER)?;
            validate(&loaded, &payload, json)
        }
        Command::Schema { out } => {
            let written = write_schemas(&out).exit_with(EXIT_OTHER)?;
            for path in written {
                println!("{}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn read_payload(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("failed to read the payload from standard input")?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("failed to read payload {path:?}"))
    }
}

fn validate(loaded: &LoadedConfig, path: &Path, json: bool) -> Result<ExitCode, Failure> {
    let text = read_payload(path).exit_with(EXIT_USAGE)?;
    let context = PayloadContext::from_config(&loaded.config);
    let check = validate_payload(&text, &context, &Identity::derive("validate", 0));
    let output = if json {
        serde_json::to_string_pretty(&check.report()).exit_with(EXIT_OTHER)? + "\n"
    } else {
        human_report(path, &check)
    };
    std::io::stdout()
        .write_all(output.as_bytes())
        .exit_with(EXIT_OTHER)?;
    Ok(if check.is_valid() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_USAGE)
    })
}

fn human_report(path: &Path, check: &PayloadCheck) -> String {
    let name = path.display();
    if let (true, Some(m)) = (check.is_valid(), &check.machine) {
        let t = m.topology;
        return format!(
            "{name}: valid\n  machine: {} {}, {} vCPUs ({} threads × {} cores × {} sockets), \
             {} MiB, {} disk, {} NIC {}, display {}\n",
            m.chipset,
            m.cpu,
            t.vcpus(),
            t.threads,
            t.cores,
            t.sockets,
            m.memory,
            m.storage,
            m.network,
            m.mac,
            m.graphics
        );
    }
    let count = check.issues.len();
    let mut out = format!(
        "{name}: {count} problem{}\n",
        if count == 1 { "" } else { "s" }
    );
    for issue in &check.issues {
        out.push_str(&format!("  {issue}\n"));
    }
    out
}
