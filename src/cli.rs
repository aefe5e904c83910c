use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use qemu_worker::config::{LoadedConfig, load_config};
use qemu_worker::image::{
    CacheSettings, FetchError, FetchPolicy, Fetcher, ImageCache, ImageLimits, ImageProblem,
    ImageRequest, Progress, Unpacked, Validators, pack_image,
};
use qemu_worker::job::{Identity, ImageSource, PayloadCheck, PayloadContext, validate_payload};
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
    /// Run one job (no queue): the live log on stderr, the result report with --json.
    Run {
        payload: PathBuf,
        /// Print the result report (schemas/result-report.schema.json) on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run jobs from the queue until SIGTERM or Ctrl-C.
    Serve,
    /// Add a job to the queue and print its id.
    Submit {
        payload: PathBuf,
        /// Higher runs first.
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// Runs the job may have in all (a run whose worker disappears is retried).
        #[arg(long, default_value_t = 3)]
        max_runs: u32,
        /// Seconds from now by which the job must have ended; it is not started after
        /// that, and a running job is stopped as exception/deadline-exceeded.
        #[arg(long)]
        deadline: Option<u64>,
    },
    /// Show a job's state and its result report.
    Status {
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// List jobs, newest first.
    Jobs {
        /// Only jobs in this state (pending, running, completed, failed, exception).
        #[arg(long)]
        state: Option<String>,
    },
    /// Print a job's log (of its latest run); --follow keeps printing until it ends.
    Logs {
        job: String,
        #[arg(long)]
        follow: bool,
    },
    /// Copy a job's artifacts (of its latest run) into DIR.
    Artifacts {
        job: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Cancel a job: a pending one at once, a running one at its next heartbeat.
    Cancel { job: String },
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
    /// Build, check and manage VM images.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// (internal) QEMU's guestfwd helper: splice stdin/stdout to a VM's metadata socket.
    #[command(hide = true)]
    MetadataSplice { socket: PathBuf },
    /// Developer tools for VMs.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Boot an image (a URL or an allowed local path) with its machine definition,
    /// print the serial console, take a screenshot, and power it off.
    Boot {
        image: String,
        /// Stop waiting once the console shows this text.
        #[arg(long, default_value = "QEMU-WORKER-READY")]
        until: String,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 120)]
        seconds: u64,
        /// Where to write the screenshot [default: <stateDir>/vm-boot/screenshot.png].
        #[arg(long)]
        screenshot: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Pack an image directory (machine.json, disk, optional kernel/initrd) into a
    /// deterministic, sparse-aware .tar.zst, after the same checks a worker makes.
    Pack { dir: PathBuf, out: PathBuf },
    /// Unpack an archive (a file or an http(s) URL) into a scratch directory and report
    /// its members, disks, machine definition, and every problem.
    Inspect {
        archive: String,
        #[arg(long)]
        json: bool,
    },
    /// Fetch an image into the cache (a URL or an allowed local path).
    Pull {
        reference: String,
        /// The sha256 the archive must have.
        #[arg(long)]
        sha256: Option<String>,
    },
    /// List the cached images.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove every cached image that no job is using.
    Prune,
}

pub fn main() -> ExitCode {
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
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QEMU_WORKER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
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
        Command::Run { payload, json } => {
            let loaded = load_config(cli.config.as_deref()).exit_with(EXIT_OTHER)?;
            let text = read_payload(&payload).exit_with(EXIT_USAGE)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .exit_with(EXIT_OTHER)?;
            runtime.block_on(run_job(&loaded, text, json))
        }
        Command::Serve => {
            let loaded = load_config(cli.config.as_deref()).exit_with(EXIT_OTHER)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .exit_with(EXIT_OTHER)?;
            runtime.block_on(serve(&loaded))
        }
        Command::Submit {
            payload,
            priority,
            max_runs,
            deadline,
        } => {
            let loaded = load_config(cli.config.as_deref()).exit_with(EXIT_OTHER)?;
            let text = read_payload(&payload).exit_with(EXIT_USAGE)?;
            let queue = open_queue(&loaded)?;
            let job = qemu_worker::queue::NewJob {
                payload: text,
                priority,
                max_runs: max_runs.max(1),
                deadline_ms: deadline.map(|s| now_ms().saturating_add(s.saturating_mul(1000))),
            };
            let id = queue.enqueue(&job, now_ms()).exit_with(EXIT_OTHER)?;
            print(&format!("{id}\n"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { job, json } => {
            let loaded = load_config(cli.config.as_deref()).exit_with(EXIT_OTHER)?;
            let status = open_queue(&loaded)?.status(&job).exit_with(EXIT_USAGE)?;
            if json {
                print(&(serde_json::to_string_pretty(&status).exit_with(EXIT_OTHER)? + "\n"))?;
            } else {
                let mut out = format!(
                    "{} {} (run {} of {})\n",
                    status.job_id, status.state, status.run_id, status.runs
                );
                if let Some(report) = &status.report {
                    if let Some(code) = report.exit_code {
                        out.push_str(&format!("  exit code {code}\n"));
                    }
                    if let Some(reason) = report.reason {
                        out.push_str(&format!("  reason {reason}\n"));
                    }
                    for issue in &report.errors {
                        out.push_str(&format!("  {issue}\n"));
                    }
                }
                print(&out)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Jobs { state } => {
            let loaded = load_config(cli.config.as_deref()).exit_with(EXIT_OTHER)?;
            let state = match state {
                Some(text) => Some(
                    qemu_worker::queue::JobState::parse(&text)
                        .ok_or_else(|| anyhow::anyhow!("unknown state {text:?}: pending, running, completed, failed or exception"))
                        .exit_with(EXIT_USAGE)?,
                ),
                None => None,
            };
            let jobs = open_queue(&loaded)?.list(state).exit_with(EXIT_OTHER)?;
            let out: String = jobs
                .iter()
                .map(|j| format!("{}  {:<9}  run {}\n", j.job_id, j.state.as_str(), j.run_id))
                .collect();
            print(&out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { job, follow } => {
            let loaded = load_config(cli.config.as_deref()).exit_with(EXIT_OTHER)?;
            logs(&loaded, &job, follow)
        }
        Command::Artifacts { job, out } => {
            let loaded = load_config(cli.config.as_deref()).exit_with(EXIT_OTHER)?;
            let status = open_queue(&loaded)?.status(&job).exit_with(EXIT_USAGE)?;
            let Some(report) = &status.report else {
                return Err(anyhow::anyhow!(
                    "{job} is {} and has no result yet: its artifacts are collected when it ends",
                    status.state.as_str()
                ))
                .exit_with(EXIT_USAGE);
            };
            let dir = run_dir_of(&loaded, &job)?.join("artifacts");
            // Only what the report lists is complete; nothing else is handed out.
            let copied = copy_listed(&dir, &report.artifacts, &out).exit_with(EXIT_OTHER)?;
            print(&format!("{copied} file(s) copied into {}\n", out.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { job } => {
            let loaded = load_config(cli.config.as_deref()).exit_with(EXIT_OTHER)?;
            let state = open_queue(&loaded)?.cancel(&job).exit_with(EXIT_USAGE)?;
            print(&format!(
                "{job}: {}\n",
                match state {
                    qemu_worker::queue::JobState::Running =>
                        "cancel requested; its worker stops it at the next heartbeat",
                    qemu_worker::queue::JobState::Exception => "canceled",
                    _ => "already finished",
                }
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema { out } => {
            let written = write_schemas(&out).exit_with(EXIT_OTHER)?;
            for path in written {
                println!("{}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Image { command } => {
            let loaded = load_config(cli.config.as_deref()).exit_with(EXIT_OTHER)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .exit_with(EXIT_OTHER)?;
            runtime.block_on(image(&loaded, command))
        }
        Command::MetadataSplice { socket } => {
            qemu_worker::metadata::splice_stdio_to_socket(&socket)
                .map(|()| ExitCode::SUCCESS)
                .exit_with(EXIT_OTHER)
        }
        Command::Vm { command } => {
            let loaded = load_config(cli.config.as_deref()).exit_with(EXIT_OTHER)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .exit_with(EXIT_OTHER)?;
            runtime.block_on(vm(&loaded, command))
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn open_queue(loaded: &LoadedConfig) -> Result<Arc<dyn qemu_worker::queue::Queue>, Failure> {
    qemu_worker::queue::open(&loaded.config).exit_with(EXIT_OTHER)
}

/// The directory of a job's latest run.
fn run_dir_of(loaded: &LoadedConfig, job: &str) -> Result<PathBuf, Failure> {
    let status = open_queue(loaded)?.status(job).exit_with(EXIT_USAGE)?;
    Ok(loaded
        .config
        .state_dir
        .join("jobs")
        .join(&status.job_id)
        .join(format!("run-{}", status.run_id)))
}

fn logs(loaded: &LoadedConfig, job: &str, follow: bool) -> Result<ExitCode, Failure> {
    let queue = open_queue(loaded)?;
    let mut shown = 0usize;
    let mut run = 0;
    loop {
        let status = queue.status(job).exit_with(EXIT_USAGE)?;
        if status.run_id != run {
            run = status.run_id;
            shown = 0;
        }
        let path = loaded
            .config
            .state_dir
            .join("jobs")
            .join(job)
            .join(format!("run-{run}"))
            .join("job.log");
        let bytes = std::fs::read(&path).unwrap_or_default();
        if bytes.len() > shown {
            std::io::stdout()
                .write_all(&bytes[shown..])
                .exit_with(EXIT_OTHER)?;
            let _ = std::io::stdout().flush();
            shown = bytes.len();
        }
        let finished = !matches!(
            status.state,
            qemu_worker::queue::JobState::Pending | qemu_worker::queue::JobState::Running
        );
        if !follow || finished {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Copies the artifacts a report lists from `from` into `to`, checking each one's size.
fn copy_listed(
    from: &Path,
    artifacts: &[qemu_worker::job::ArtifactRecord],
    to: &Path,
) -> anyhow::Result<usize> {
    use anyhow::Context;
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for artifact in artifacts {
        let name = Path::new(&artifact.name);
        anyhow::ensure!(
            name.components()
                .all(|c| matches!(c, std::path::Component::Normal(_))),
            "the report lists an unsafe artifact name {:?}",
            artifact.name
        );
        let target = to.join(name);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let copied = std::fs::copy(from.join(name), &target)
            .with_context(|| format!("cannot copy the artifact {}", artifact.name))?;
        anyhow::ensure!(
            copied == artifact.size,
            "the stored artifact {} has {copied} bytes, the report says {}",
            artifact.name,
            artifact.size
        );
    }
    Ok(artifacts.len())
}

async fn serve(loaded: &LoadedConfig) -> Result<ExitCode, Failure> {
    use qemu_worker::engine::{Engine, Worker};
    let config = loaded.config.clone();
    // Off the executor: connecting to PostgreSQL blocks.
    let queue = tokio::task::spawn_blocking(move || qemu_worker::queue::open(&config))
        .await
        .exit_with(EXIT_OTHER)?
        .exit_with(EXIT_OTHER)?;
    let cache = open_cache(CacheSettings::from_config(&loaded.config)).await?;
    let worker = Worker {
        engine: Engine {
            config: loaded.config.clone(),
            cache: cache.clone(),
            helper: std::env::current_exe().exit_with(EXIT_OTHER)?,
        },
        queue,
        worker_id: format!("{}-{}", hostname(), std::process::id()),
        grace: std::time::Duration::from_secs(loaded.config.timeouts.grace_seconds),
    };
    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            let _ = shutdown.send(true);
        }
    });
    worker.serve(shutdown_rx).await;
    drop(worker);
    cache.close().await;
    Ok(ExitCode::SUCCESS)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "worker".to_owned(), |h| h.trim().to_owned())
}

async fn run_job(loaded: &LoadedConfig, payload: String, json: bool) -> Result<ExitCode, Failure> {
    use qemu_worker::engine::{Engine, JobRun};
    let config = loaded.config.clone();
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let job_id = format!("run-{millis}-{}", std::process::id());
    let job_dir = qemu_worker::job::JobDir::one_shot(&config.state_dir, &job_id);
    let cache = open_cache(CacheSettings::from_config(&config)).await?;
    let engine = Engine {
        config,
        cache: cache.clone(),
        helper: std::env::current_exe().exit_with(EXIT_OTHER)?,
    };
    // Ctrl-C cancels the job, SIGTERM is a shutdown: either way the engine tears the VM
    // down (exiting on the signal would leave QEMU running in its own process group).
    let (cancel, cancel_rx) = tokio::sync::watch::channel(None);
    let signals = tokio::spawn(async move {
        use qemu_worker::job::ExceptionReason;
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        let reason = tokio::select! {
            _ = int.recv() => ExceptionReason::Canceled,
            _ = term.recv() => ExceptionReason::WorkerShutdown,
        };
        eprintln!("qemu-worker: stopping the job ({reason})");
        let _ = cancel.send(Some(reason));
    });
    let report = engine
        .run(&JobRun {
            job_id: job_id.clone(),
            run_id: 0,
            payload,
            job_dir: job_dir.clone(),
            live_log: true,
            cancel: cancel_rx,
        })
        .await;
    signals.abort();
    drop(engine);
    cache.close().await;
    if json {
        print(&(serde_json::to_string_pretty(&report).exit_with(EXIT_OTHER)? + "\n"))?;
    }
    let outcome = match (report.state, report.reason, report.exit_code) {
        (state, Some(reason), _) => format!("{state} ({reason})"),
        (state, None, Some(code)) => format!("{state} (exit code {code})"),
        (state, None, None) => state.to_string(),
    };
    eprintln!(
        "qemu-worker: job {job_id} {outcome}; log, report and artifacts in {}",
        job_dir.path().display()
    );
    for issue in &report.errors {
        eprintln!("  {issue}");
    }
    Ok(ExitCode::from(report.resolution().cli_exit_code()))
}

async fn vm(loaded: &LoadedConfig, command: VmCommand) -> Result<ExitCode, Failure> {
    use qemu_worker::job::{Identity, MachineLayers};
    use qemu_worker::vm::{
        LaunchPlan, NetworkAttachment, RunDir, Vm, VmTimeouts, choose_accelerator_cached,
        prepare_launch, take_screenshot,
    };
    let VmCommand::Boot {
        image,
        until,
        seconds,
        screenshot,
    } = command;
    let config = &loaded.config;
    let source = cli_image_source(&image)?;
    let accelerator = choose_accelerator_cached(config.accelerator, &config.state_dir)
        .await
        .exit_with(EXIT_OTHER)?;
    let cache = open_cache(CacheSettings::from_config(config)).await?;
    let (progress, bar) = progress_bar();
    let lease = cache
        .acquire(
            &ImageRequest {
                source,
                sha256: None,
            },
            progress,
        )
        .await
        .exit_with(EXIT_USAGE)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let layers = MachineLayers {
        image: lease.contents().machine.clone(),
        worker_config: config.machine.clone(),
        ..Default::default()
    };
    let name = format!("vm-boot-{}", std::process::id());
    let machine = layers
        .resolve(&config.limits, &Identity::derive(&name, 0))
        .map_err(|issues| {
            let lines: Vec<String> = issues.iter().map(ToString::to_string).collect();
            anyhow::anyhow!(
                "the image's machine is not allowed here: {}",
                lines.join("; ")
            )
        })
        .exit_with(EXIT_USAGE)?;
    let log_dir = config.state_dir.join("vm-boot");
    let run_dir = RunDir::new(&config.state_dir.join("run").join(&name)).exit_with(EXIT_OTHER)?;
    let launch = prepare_launch(LaunchPlan {
        name: &name,
        image: &lease,
        machine: &machine,
        run_dir,
        log_dir: log_dir.clone(),
        // No metadata service yet: the guest's connections to 169.254.169.254 fail.
        network: NetworkAttachment::User {
            guestfwd_command: vec!["/bin/false".into()],
        },
        accelerator,
        max_console: config.logs.max_console_size.bytes(),
    })
    .await
    .exit_with(EXIT_OTHER)?;
    let timeouts = VmTimeouts::default();
    let mut vm = Vm::start(launch, timeouts).await.exit_with(EXIT_OTHER)?;
    vm.resume().await.exit_with(EXIT_OTHER)?;

    // Follow the serial console until the marker, the deadline, or the guest ends.
    let serial = PathBuf::from(vm.run_dir().serial_log());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let mut shown = 0;
    let mut found = false;
    let mut ended = None;
    while std::time::Instant::now() < deadline {
        let text = tokio::fs::read(&serial).await.unwrap_or_default();
        if text.len() > shown {
            let _ = std::io::stdout().write_all(&text[shown..]);
            shown = text.len();
        }
        if String::from_utf8_lossy(&text).contains(&until) {
            found = true;
            break;
        }
        if let Some(exit) = vm.wait(std::time::Duration::from_millis(100)).await {
            ended = Some(exit);
            break;
        }
    }
    let mut summary = String::new();
    if ended.is_none() {
        let path = screenshot.unwrap_or_else(|| log_dir.join("screenshot.png"));
        match take_screenshot(vm.qmp(), vm.run_dir().path(), timeouts.qmp).await {
            Ok(shot) => {
                tokio::fs::write(&path, &shot.png)
                    .await
                    .exit_with(EXIT_OTHER)?;
                summary.push_str(&format!(
                    "screenshot: {} ({}x{})\n",
                    path.display(),
                    shot.width,
                    shot.height
                ));
            }
            Err(error) => summary.push_str(&format!("screenshot: none ({error})\n")),
        }
    }
    let exit = vm.teardown().await;
    drop(lease);
    cache.close().await;
    summary.push_str(&format!(
        "accelerator: {accelerator:?}\nconsole {}: {until:?}\nexit: {exit:?}\nlogs: {}\n",
        if found { "reached" } else { "did not reach" },
        log_dir.display()
    ));
    eprint!("\n{summary}");
    Ok(if found {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
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
    print(&output)?;
    Ok(if check.is_valid() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_USAGE)
    })
}

fn print(text: &str) -> Result<(), Failure> {
    std::io::stdout()
        .write_all(text.as_bytes())
        .exit_with(EXIT_OTHER)
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

async fn image(loaded: &LoadedConfig, command: ImageCommand) -> Result<ExitCode, Failure> {
    let settings = CacheSettings::from_config(&loaded.config);
    match command {
        ImageCommand::Pack { dir, out } => {
            // Packing reads and compresses the whole disk: on the blocking pool.
            let limits = settings.limits;
            let (from, to) = (dir.clone(), out.clone());
            let contents = tokio::task::spawn_blocking(move || pack_image(&from, &to, limits))
                .await
                .exit_with(EXIT_OTHER)?
                .exit_with(EXIT_USAGE)?;
            let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
            print(&format!(
                "{}: {size} bytes, disk {:?}, {} member(s) checked\n",
                out.display(),
                contents.disk,
                contents.disks.len()
                    + 1
                    + usize::from(contents.kernel)
                    + usize::from(contents.initrd)
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Inspect { archive, json } => inspect(&settings, &archive, json).await,
        ImageCommand::Pull { reference, sha256 } => {
            let source = cli_image_source(&reference)?;
            let cache = open_cache(settings).await?;
            let request = ImageRequest { source, sha256 };
            let (progress, bar) = progress_bar();
            let result = cache.acquire(&request, progress).await;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            let lease = result.map_err(|e| {
                let code = if e.reason() == qemu_worker::job::ExceptionReason::MalformedPayload {
                    EXIT_USAGE
                } else {
                    EXIT_OTHER
                };
                Failure {
                    error: e.into(),
                    exit_code: code,
                }
            })?;
            print(&format!(
                "{} {}\n",
                lease.sha256(),
                lease.contents().dir.display()
            ))?;
            drop(lease);
            cache.close().await;
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::List { json } => {
            let cache = open_cache(settings).await?;
            let images = cache.list().await.exit_with(EXIT_OTHER)?;
            cache.close().await;
            if json {
                print(&(serde_json::to_string_pretty(&images).exit_with(EXIT_OTHER)? + "\n"))?;
            } else {
                let mut out = String::new();
                for image in &images {
                    out.push_str(&format!(
                        "{}  {:>12} bytes  {}\n",
                        image.sha256,
                        image.size_bytes,
                        image.sources.join(", ")
                    ));
                }
                print(&out)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Prune => {
            let cache = open_cache(settings).await?;
            let freed = cache.prune().await.exit_with(EXIT_OTHER)?;
            cache.close().await;
            print(&format!("freed {freed} bytes\n"))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// An image named on the command line: a URL, or a path (relative to the current
/// directory, unlike in payloads).
fn cli_image_source(text: &str) -> Result<ImageSource, Failure> {
    let absolute = if text.contains("://") || Path::new(text).is_absolute() {
        text.to_owned()
    } else {
        std::env::current_dir()
            .exit_with(EXIT_OTHER)?
            .join(text)
            .display()
            .to_string()
    };
    ImageSource::parse(&absolute).exit_with(EXIT_USAGE)
}

async fn open_cache(settings: CacheSettings) -> Result<ImageCache, Failure> {
    let fetcher = Fetcher::new(FetchPolicy::default());
    ImageCache::open(settings, fetcher)
        .await
        .exit_with(EXIT_OTHER)
}

/// A progress bar on a terminal; nothing otherwise.
fn progress_bar() -> (Option<Progress>, Option<indicatif::ProgressBar>) {
    if !std::io::stderr().is_terminal() {
        return (None, None);
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {bytes}/{total_bytes} {bytes_per_sec} {wide_bar} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let handle = bar.clone();
    let progress: Progress = Arc::new(move |done, total| {
        if let Some(total) = total {
            handle.set_length(total);
        }
        handle.set_position(done);
    });
    (Some(progress), Some(bar))
}

/// The `image inspect` report.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct InspectReport {
    archive: String,
    valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    archive_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    contents: Option<qemu_worker::image::ImageContents>,
    problems: Vec<ImageProblem>,
}

async fn inspect(settings: &CacheSettings, archive: &str, json: bool) -> Result<ExitCode, Failure> {
    let scratch = tempfile::tempdir().exit_with(EXIT_OTHER)?;
    let dest = scratch.path().join("image");
    std::fs::create_dir(&dest).exit_with(EXIT_OTHER)?;
    let limits: ImageLimits = settings.limits;
    let outcome: Result<Unpacked, FetchError> =
        if archive.starts_with("http://") || archive.starts_with("https://") {
            let fetcher = Fetcher::new(FetchPolicy::default());
            match fetcher
                .fetch_http(archive, None, &Validators::default(), &dest, limits, None)
                .await
            {
                Ok(qemu_worker::image::HttpOutcome::Fetched { unpacked, .. }) => Ok(*unpacked),
                Ok(qemu_worker::image::HttpOutcome::NotModified) => Err(FetchError::Internal(
                    "unexpected 304 without validators".into(),
                )),
                Err(e) => Err(e),
            }
        } else {
            // The same path a worker takes, with the archive's own directory allowed
            // (canonical, so a symlinked archive is inspected where it really is).
            let path = std::fs::canonicalize(archive)
                .with_context(|| format!("cannot read {archive:?}"))
                .exit_with(EXIT_USAGE)?;
            let allowed: Vec<PathBuf> = path.parent().map(Path::to_path_buf).into_iter().collect();
            let fetcher = Fetcher::new(FetchPolicy::default());
            fetcher
                .fetch_local(&path, &allowed, None, &dest, limits)
                .await
        };
    let report = match outcome {
        Ok(unpacked) => InspectReport {
            archive: archive.to_owned(),
            valid: true,
            sha256: Some(unpacked.sha256),
            archive_bytes: Some(unpacked.archive_bytes),
            contents: Some(unpacked.contents),
            problems: Vec::new(),
        },
        Err(FetchError::Rejected(problems)) => InspectReport {
            archive: archive.to_owned(),
            valid: false,
            sha256: None,
            archive_bytes: None,
            contents: None,
            problems,
        },
        Err(other) => return Err(other).exit_with(EXIT_OTHER),
    };
    if json {
        print(&(serde_json::to_string_pretty(&report).exit_with(EXIT_OTHER)? + "\n"))?;
    } else {
        print(&human_inspect(&report))?;
    }
    Ok(if report.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_USAGE)
    })
}

fn human_inspect(report: &InspectReport) -> String {
    let mut out = String::new();
    match (&report.contents, &report.sha256) {
        (Some(contents), Some(sha)) => {
            out.push_str(&format!(
                "{}: valid image\n  sha256: {sha}\n",
                report.archive
            ));
            out.push_str(&format!(
                "  archive: {} bytes\n  disk layout: {:?}\n",
                report.archive_bytes.unwrap_or(0),
                contents.disk
            ));
            for disk in &contents.disks {
                out.push_str(&format!(
                    "  {}: {}, virtual size {} bytes, {} bytes allocated\n",
                    disk.member,
                    disk.format,
                    disk.virtual_size,
                    disk.allocated_size.unwrap_or(0)
                ));
            }
            out.push_str(&format!(
                "  direct kernel boot: {}{}\n",
                if contents.kernel { "kernel" } else { "no" },
                if contents.initrd { " + initrd" } else { "" }
            ));
            let machine = serde_json::to_string(&contents.machine).unwrap_or_default();
            out.push_str(&format!("  machine.json: {machine}\n"));
        }
        _ => {
            let count = report.problems.len();
            out.push_str(&format!(
                "{}: invalid image, {count} problem{}\n",
                report.archive,
                if count == 1 { "" } else { "s" }
            ));
            for problem in &report.problems {
                out.push_str(&format!("  {problem}\n"));
            }
        }
    }
    out
}
