//! The CLI's entry: parses the command line and runs the command.

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use qemu_worker::config::load_config;
use qemu_worker::schema::write_schemas;

use super::exit::{EXIT_OTHER, EXIT_USAGE, ExitWith, Failure};
use super::job::read_payload;
use super::model::{Cli, Command, LogFormat, TokenCommand, TokenScope};
use super::{image, job, queue, remote, serve, vm};

pub(crate) fn main() -> ExitCode {
    // The guestfwd helper runs once per guest connection: skip everything else.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let [_, command, socket] = args.as_slice()
        && command == "metadata-splice"
    {
        return match qemu_worker::metadata::splice_stdio_to_socket(Path::new(socket)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("qemu-worker metadata-splice: {error}");
                ExitCode::from(EXIT_OTHER)
            }
        };
    }
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
    let filter = tracing_subscriber::EnvFilter::try_from_env("QEMU_WORKER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let log = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match cli.log_format {
        LogFormat::Text => log.init(),
        // One object per line; an event's fields (job_id, run_id, ...) are keys of it.
        LogFormat::Json => log.json().flatten_event(true).init(),
    }
    match run(cli) {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("qemu-worker: error: {:#}", failure.error);
            ExitCode::from(failure.exit_code)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Failure> {
    let config = cli.config.as_deref();
    let load = || load_config(config).exit_with(EXIT_OTHER);
    let server = cli.server;
    let queue_command = matches!(
        cli.command,
        Command::Submit { .. }
            | Command::Status { .. }
            | Command::Jobs { .. }
            | Command::Logs { .. }
            | Command::Artifacts { .. }
            | Command::Cancel { .. }
            | Command::Screenshot { .. }
            | Command::Release { .. }
            | Command::Shell { .. }
    );
    if server.is_some() && !queue_command {
        return Err(anyhow::anyhow!(
            "--server applies to submit, status, jobs, logs, artifacts, cancel, screenshot, release and shell"
        ))
        .exit_with(EXIT_USAGE);
    }
    match cli.command {
        Command::Validate { payload, json } => job::validate(&load()?, &payload, json),
        Command::Run { payload, json } => {
            let loaded = load()?;
            let text = read_payload(&payload).exit_with(EXIT_USAGE)?;
            block_on(job::run_job(&loaded, text, json))
        }
        Command::Serve => {
            let loaded = load()?;
            block_on(serve::serve(&loaded))
        }
        Command::Submit {
            payload,
            priority,
            max_runs,
            deadline,
        } => {
            let loaded = load()?;
            match api_client(&loaded, server.as_deref())? {
                Some(c) => block_on(remote::submit(&c, &payload, priority, max_runs, deadline)),
                None => queue::submit(&loaded, &payload, priority, max_runs, deadline),
            }
        }
        Command::Status { job, json } => {
            let loaded = load()?;
            match api_client(&loaded, server.as_deref())? {
                Some(c) => block_on(remote::status(&c, &job, json)),
                None => queue::status(&loaded, &job, json),
            }
        }
        Command::Jobs { state } => {
            let loaded = load()?;
            match api_client(&loaded, server.as_deref())? {
                Some(c) => block_on(remote::jobs(&c, state)),
                None => queue::jobs(&loaded, state),
            }
        }
        Command::Logs { job, follow } => {
            let loaded = load()?;
            match api_client(&loaded, server.as_deref())? {
                Some(c) => block_on(remote::logs(&c, &job, follow)),
                None => queue::logs(&loaded, &job, follow),
            }
        }
        Command::Artifacts { job, out } => {
            let loaded = load()?;
            match api_client(&loaded, server.as_deref())? {
                Some(c) => block_on(remote::artifacts(&c, &job, &out)),
                None => queue::artifacts(&loaded, &job, &out),
            }
        }
        Command::Cancel { job } => {
            let loaded = load()?;
            match api_client(&loaded, server.as_deref())? {
                Some(c) => block_on(remote::cancel(&c, &job)),
                None => queue::cancel(&loaded, &job),
            }
        }
        Command::Release { job } => {
            let client = running_job_api(&load()?, server.as_deref())?;
            block_on(remote::release(&client, &job))
        }
        Command::Screenshot { job, out } => {
            let client = running_job_api(&load()?, server.as_deref())?;
            block_on(remote::screenshot(&client, &job, &out))
        }
        Command::Shell {
            job,
            tty,
            no_tty,
            command,
        } => {
            let client = running_job_api(&load()?, server.as_deref())?;
            let tty = match (tty, no_tty) {
                (true, _) => true,
                (_, true) => false,
                _ => std::io::IsTerminal::is_terminal(&std::io::stdin()),
            };
            block_on(super::shell::shell(&client, &job, tty, command))
        }
        Command::Schema { out } => {
            let written = write_schemas(&out).exit_with(EXIT_OTHER)?;
            for path in written {
                println!("{}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Image { command } => {
            let loaded = load()?;
            block_on(image::image(&loaded, command))
        }
        Command::MetadataSplice { socket } => {
            qemu_worker::metadata::splice_stdio_to_socket(&socket)
                .map(|()| ExitCode::SUCCESS)
                .exit_with(EXIT_OTHER)
        }
        Command::Vm { command } => {
            let loaded = load()?;
            block_on(vm::vm(&loaded, command))
        }
        Command::Token {
            command: TokenCommand::New { name, scope },
        } => new_token(&name, scope),
    }
}

fn new_token(name: &str, scope: TokenScope) -> Result<ExitCode, Failure> {
    use super::exit::print;
    if name.is_empty() || name.len() > 64 || name.contains(['"', '\\', '\n']) {
        return Err(anyhow::anyhow!(
            "--name must be 1 to 64 characters with no quote, backslash or newline"
        ))
        .exit_with(EXIT_USAGE);
    }
    let (token, sha256) = qemu_worker::api::new_token().exit_with(EXIT_OTHER)?;
    let scope = match scope {
        TokenScope::Read => "read",
        TokenScope::Submit => "submit",
        TokenScope::Admin => "admin",
    };
    print(&format!(
        "{token}\n# worker.yml, under api.tokens:\n- {{name: \"{name}\", scope: {scope}, sha256: {sha256}}}\n"
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// The API client when `--server` or worker.yml `client.server` names a server; `None`
/// when the command opens the queue database itself.
fn api_client(
    loaded: &qemu_worker::config::LoadedConfig,
    server: Option<&str>,
) -> Result<Option<qemu_worker::api::client::ApiClient>, Failure> {
    let client = &loaded.config.client;
    let Some(server) = server.or(client.server.as_deref()) else {
        return Ok(None);
    };
    qemu_worker::api::client::ApiClient::new(server, client)
        .map(Some)
        .exit_with(EXIT_USAGE)
}

/// For what only a worker can do to a job's VM: `--server` or `client.server`, else
/// this host's own API (worker.yml api.listen).
fn running_job_api(
    loaded: &qemu_worker::config::LoadedConfig,
    server: Option<&str>,
) -> Result<qemu_worker::api::client::ApiClient, Failure> {
    match api_client(loaded, server)? {
        Some(client) => Ok(client),
        None => local_api(loaded),
    }
}

/// This host's own API (worker.yml api.listen).
fn local_api(
    loaded: &qemu_worker::config::LoadedConfig,
) -> Result<qemu_worker::api::client::ApiClient, Failure> {
    use qemu_worker::config::ApiListen;
    let scheme = if loaded.config.api.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let server = match loaded.config.api_listen() {
        ApiListen::Unix(path) => format!("unix:{}", path.display()),
        ApiListen::Tcp(address) => format!("{scheme}://{address}"),
        ApiListen::Off => {
            return Err(anyhow::anyhow!(
                "this needs serve's API: worker.yml api.listen is off; give --server URL"
            ))
            .exit_with(EXIT_USAGE);
        }
    };
    qemu_worker::api::client::ApiClient::new(&server, &loaded.config.client).exit_with(EXIT_USAGE)
}

/// Runs an async command on a multi-threaded runtime of its own.
fn block_on(command: impl Future<Output = Result<ExitCode, Failure>>) -> Result<ExitCode, Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .exit_with(EXIT_OTHER)?;
    runtime.block_on(command)
}
