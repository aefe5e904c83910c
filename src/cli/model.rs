//! The command line's model (clap): every command, flag and default.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "qemu-worker",
    version,
    about = "Runs CI jobs in isolated QEMU VMs"
)]
pub(super) struct Cli {
    /// Worker configuration [default: ./worker.yml, else the embedded default]
    #[arg(long, global = true, value_name = "FILE")]
    pub(super) config: Option<PathBuf>,
    /// The worker's own log on stderr: `text` for people, `json` (one object per line,
    /// job and run ids as fields) for log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(super) log_format: LogFormat,
    /// Send submit, status, jobs, logs, artifacts and cancel to this worker's API
    /// (http://HOST:PORT, https://HOST:PORT or unix:PATH) instead of opening the queue
    /// database [default: worker.yml client.server]. The token comes from
    /// QEMU_WORKER_TOKEN, else worker.yml client.tokenFile.
    #[arg(long, global = true, value_name = "URL")]
    pub(super) server: Option<String>,
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Debug, Subcommand)]
pub(super) enum Command {
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
    /// Let a failed job's VM kept for debugging (debug.keepAliveOnFailure) go, through
    /// serve's API as `screenshot` does.
    Release { job: String },
    /// Take a screenshot of a running job's VM now (through serve's API: --server,
    /// worker.yml client.server, else this host's api.listen) and write it as PNG.
    Screenshot {
        job: String,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Open a shell in a running job's guest (or run CMD there), through serve's API as
    /// `screenshot` does (a token with scope admin). On a terminal it gets one of its
    /// own; otherwise stdin and stdout are piped (`echo cmd | qemu-worker shell JOB`).
    /// Exits with the command's status.
    Shell {
        job: String,
        /// A terminal even when stdin is not one (--tty), or none even when it is
        /// (--no-tty).
        #[arg(long, overrides_with = "no_tty")]
        tty: bool,
        #[arg(long)]
        no_tty: bool,
        /// The command and its arguments (run as they are, no shell in between);
        /// without, the image's login shell.
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
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
    /// API bearer tokens (docs/api.md).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Developer tools for VMs.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub(super) enum TokenCommand {
    /// Make a new API bearer token: prints the token (give it to its holder; it is not
    /// stored anywhere) and the worker.yml `api.tokens` entry that lets it in.
    New {
        /// Who holds it (in the worker's log when a request of theirs is refused).
        #[arg(long)]
        name: String,
        /// What it may do: read (jobs, logs, metrics), submit (also submit and
        /// cancel), admin (everything).
        #[arg(long, value_enum)]
        scope: TokenScope,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum TokenScope {
    Read,
    Submit,
    Admin,
}

#[derive(Debug, Subcommand)]
pub(super) enum VmCommand {
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
pub(super) enum ImageCommand {
    /// Build an image from a recipe (docs/image-recipes.md): a Debian base from
    /// mmdebstrap, copy and run steps, a disk and boot members, packed as `pack` does.
    Build { recipe: PathBuf, out: PathBuf },
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
