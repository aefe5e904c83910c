use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::process::{Child, Command};
use tokio::sync::broadcast;

use super::console::{ConsoleUsage, capture_console};
use super::run_dir::RunDir;
use crate::job::JobDir;
use crate::qemu::{QmpClient, QmpError, QmpEvent};

/// How much of QEMU's output is quoted when it fails.
const STDERR_TAIL: u64 = 4096;
/// Guest resets within `RESET_WINDOW` that make a reboot loop.
const RESET_LIMIT: usize = 5;
const RESET_WINDOW: Duration = Duration::from_secs(60);

/// Timeouts of the supervisor; every wait has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmTimeouts {
    /// For QEMU to open its QMP socket, and for each QMP command.
    pub qmp: Duration,
    /// From the first ACPI power-down request to giving up on the guest.
    pub powerdown: Duration,
    /// How often the power-down request is repeated (a guest may miss the first).
    pub powerdown_resend: Duration,
    /// For QEMU to exit after `quit`, and again after SIGTERM.
    pub exit: Duration,
}

impl Default for VmTimeouts {
    fn default() -> Self {
        Self {
            qmp: Duration::from_secs(10),
            powerdown: Duration::from_secs(20),
            powerdown_resend: Duration::from_secs(3),
            exit: Duration::from_secs(5),
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct VmLaunch {
    /// QEMU's arguments (from `qemu_argv`), without the program.
    pub argv: Vec<String>,
    pub run_dir: RunDir,
    /// Where `qemu.log` (QEMU's stdout and stderr) and `console.log` (the serial
    /// console) are kept after the VM is gone.
    pub job_dir: JobDir,
    /// The network namespace QEMU runs in (`network: tap`).
    pub netns: Option<String>,
    /// The serial log's cap (worker.yml `logs.maxConsoleSize`), when QEMU serves the
    /// console on the run dir's console socket.
    pub max_console: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("failed to prepare {path:?}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to create the job's overlay {}", path.display())]
    Overlay {
        path: PathBuf,
        #[source]
        source: crate::image::QemuImgError,
    },
    #[error(transparent)]
    Firmware(#[from] super::firmware::FirmwareError),
    #[error("failed to start qemu-system-x86_64 (install the qemu-system-x86 package)")]
    Spawn {
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU failed to start ({status}): {stderr_tail}")]
    QemuFailed { status: String, stderr_tail: String },
    #[error("QEMU did not open its QMP socket within {0:?}")]
    QmpTimeout(Duration),
    #[error("QMP failed")]
    Qmp(#[from] QmpError),
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered itself off; `requested` when the worker had asked it to.
    PoweredOff { requested: bool },
    /// The guest kept resetting; the worker stopped it.
    RebootLoop { resets: usize },
    /// The guest kernel panicked (pvpanic) and QEMU stopped.
    Panicked,
    /// QEMU exited on its own without a guest shutdown: an emulator error, or QEMU
    /// killed from outside (`signal`).
    QemuFailed {
        code: Option<i32>,
        signal: Option<i32>,
        stderr_tail: String,
    },
    /// The guest did not power off; the worker ended QEMU at this step.
    Stopped { step: StopStep },
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PoweredOff { requested: true } => write!(f, "the guest powered off when asked"),
            Self::PoweredOff { requested: false } => write!(f, "the guest powered itself off"),
            Self::RebootLoop { resets } => write!(
                f,
                "the guest kept resetting ({resets} resets within {} s), so the worker stopped it",
                RESET_WINDOW.as_secs()
            ),
            Self::Panicked => write!(f, "the guest kernel panicked"),
            Self::QemuFailed {
                code,
                signal,
                stderr_tail,
            } => {
                match (code, signal) {
                    (_, Some(signal)) => write!(
                        f,
                        "QEMU was killed by signal {signal} ({}) while the job ran: something outside the worker ended it (the OOM killer, or an operator)",
                        signal_name(*signal)
                    )?,
                    (Some(code), None) => {
                        write!(f, "QEMU exited with status {code} while the job ran")?
                    }
                    (None, None) => write!(f, "QEMU ended while the job ran, with no exit status")?,
                }
                match stderr_tail.lines().last() {
                    Some(last) => write!(f, "; its last message: {last}"),
                    None => Ok(()),
                }
            }
            Self::Stopped { step } => write!(
                f,
                "the guest did not power off, so the worker ended QEMU ({})",
                match step {
                    StopStep::Quit => "QMP quit",
                    StopStep::Terminate => "SIGTERM",
                    StopStep::Kill => "SIGKILL",
                }
            ),
        }
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        6 => "SIGABRT",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        15 => "SIGTERM",
        _ => "a signal",
    }
}

/// The step of the stop sequence that ended QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopStep {
    Quit,
    Terminate,
    Kill,
}

/// Everything a VM created on the host. Dropping it (on any path, panics included)
/// kills QEMU's whole process group and removes the run dir, so nothing outlives the VM.
#[derive(Debug)]
struct VmResources {
    run_dir: PathBuf,
    job_dir: JobDir,
    process_group: Option<Pid>,
}

impl VmResources {
    fn release(&mut self) {
        if let Some(group) = self.process_group.take() {
            // ESRCH just means everything already exited.
            let _ = kill_process_group(group, Signal::KILL);
        }
        super::kill_strays(&self.run_dir);
        // Keep the console for the job log before the run dir goes (copied when the
        // job directory is on another file system).
        let serial = self.run_dir.join("serial.log");
        if serial.exists() {
            let kept = self.job_dir.console();
            if std::fs::rename(&serial, &kept).is_err() {
                let _ = std::fs::copy(&serial, &kept);
            }
        }
        match std::fs::remove_dir_all(&self.run_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(dir = %self.run_dir.display(), %error, "failed to remove a run dir")
            }
        }
    }
}

impl Drop for VmResources {
    fn drop(&mut self) {
        // Also on the error paths of `Vm::start` and when a job's future is dropped:
        // waiting for strays and removing the run dir must not hold up the executor.
        super::in_drop::blocking_in_drop(|| self.release());
    }
}

/// A running (or paused) QEMU, supervised.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    qmp: QmpClient,
    events: broadcast::Receiver<QmpEvent>,
    seen: Vec<QmpEvent>,
    run_dir: RunDir,
    resources: VmResources,
    timeouts: VmTimeouts,
    powerdown_requested: bool,
    exit: Option<VmExit>,
    console: Arc<ConsoleUsage>,
    console_task: Option<tokio::task::JoinHandle<()>>,
}

impl Vm {
    /// Starts QEMU paused in its own process group in the run dir (created 0700 if
    /// `prepare_launch` did not already), and connects to QMP. From here on the run dir
    /// belongs to the VM: on any failure everything in it is removed.
    pub async fn start(launch: VmLaunch, timeouts: VmTimeouts) -> Result<Self, VmError> {
        let run_path = launch.run_dir.path().to_path_buf();
        let mut resources = VmResources {
            run_dir: run_path.clone(),
            job_dir: launch.job_dir.clone(),
            process_group: None,
        };
        create_run_dir(&run_path)?;
        std::fs::create_dir_all(launch.job_dir.path()).map_err(|source| VmError::Prepare {
            path: launch.job_dir.path().to_path_buf(),
            source,
        })?;

        let log_path = launch.job_dir.qemu_log();
        let log = File::create(&log_path).map_err(|source| VmError::Prepare {
            path: log_path.clone(),
            source,
        })?;
        let log_err = log.try_clone().map_err(|source| VmError::Prepare {
            path: log_path.clone(),
            source,
        })?;
        let mut command = match &launch.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns, "qemu-system-x86_64"]);
                command
            }
            None => Command::new("qemu-system-x86_64"),
        };
        // QEMU runs in its own process group, so a worker killed with SIGKILL (which runs
        // no destructors) would leave it running: the kernel kills it with its parent.
        // PR_SET_PDEATHSIG survives the exec of `ip netns exec` into QEMU.
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // prctl(2), which is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))
                .map_err(std::io::Error::from)
            });
        }
        let mut child = command
            .args(&launch.argv)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| VmError::Spawn { source })?;
        resources.process_group = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(Pid::from_raw);

        let qmp = connect_qmp(&mut child, &launch.run_dir, &log_path, timeouts.qmp).await?;
        let (seen, events) = qmp.subscribe().await?;
        // QEMU made every chardev before it greeted on QMP, and the guest has not run
        // yet: the console is captured from its first byte.
        let console = Arc::new(ConsoleUsage::default());
        let console_socket = PathBuf::from(launch.run_dir.serial_socket());
        let console_task = if console_socket.exists() {
            let log = PathBuf::from(launch.run_dir.serial_log());
            Some(
                capture_console(
                    &console_socket,
                    log,
                    launch.max_console,
                    Arc::clone(&console),
                )
                .await
                .map_err(|source| VmError::Prepare {
                    path: console_socket.clone(),
                    source,
                })?,
            )
        } else {
            None
        };
        tracing::info!(run_dir = %launch.run_dir.path().display(), qemu = qmp.qemu_version(), "VM started (paused)");
        Ok(Self {
            child,
            qmp,
            events,
            seen,
            run_dir: launch.run_dir,
            resources,
            timeouts,
            powerdown_requested: false,
            exit: None,
            console,
            console_task,
        })
    }

    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    pub fn run_dir(&self) -> &RunDir {
        &self.run_dir
    }

    /// Lets the guest run (QEMU starts paused so the host side can be made ready first).
    pub async fn resume(&self) -> Result<(), QmpError> {
        self.qmp.cont(self.timeouts.qmp).await
    }

    /// Waits up to `timeout` for the VM to end by itself. Stops a guest that is caught
    /// in a reboot loop. Returns `None` if it is still running.
    pub async fn wait(&mut self, timeout: Duration) -> Option<VmExit> {
        if let Some(exit) = &self.exit {
            return Some(exit.clone());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut resets: Vec<Instant> = Vec::new();
        loop {
            tokio::select! {
                status = self.child.wait() => {
                    let exit = self.classify(status.ok()).await;
                    self.exit = Some(exit.clone());
                    return Some(exit);
                }
                event = self.events.recv() => {
                    match event {
                        Ok(event) => {
                            if event.name == "RESET" {
                                resets.push(Instant::now());
                                resets.retain(|t| t.elapsed() < RESET_WINDOW);
                                if resets.len() >= RESET_LIMIT {
                                    tracing::warn!(resets = resets.len(), "guest is in a reboot loop; stopping it");
                                    self.force_stop().await;
                                    let exit = VmExit::RebootLoop { resets: resets.len() };
                                    self.exit = Some(exit.clone());
                                    return Some(exit);
                                }
                            }
                            self.seen.push(event);
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => {
                            // QMP is gone: QEMU is exiting; the child wait will tell.
                            let status = tokio::time::timeout(self.timeouts.exit, self.child.wait()).await;
                            let exit = self.classify(status.ok().and_then(Result::ok)).await;
                            self.exit = Some(exit.clone());
                            return Some(exit);
                        }
                    }
                }
                () = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Stops the VM: ACPI power-down (repeated) until the power-down timeout, then QMP
    /// `quit`, then SIGTERM, then SIGKILL, each step bounded. Returns how it ended.
    pub async fn stop(&mut self) -> VmExit {
        if let Some(exit) = self.wait(Duration::ZERO).await {
            return exit;
        }
        self.powerdown_requested = true;
        let deadline = Instant::now() + self.timeouts.powerdown;
        while Instant::now() < deadline {
            let _ = self.qmp.system_powerdown(self.timeouts.qmp).await;
            let slice = self
                .timeouts
                .powerdown_resend
                .min(deadline.saturating_duration_since(Instant::now()));
            if let Some(exit) = self.wait(slice).await {
                return exit;
            }
        }
        tracing::info!(
            "guest did not power off within {:?}; quitting QEMU",
            self.timeouts.powerdown
        );
        let exit = VmExit::Stopped {
            step: self.force_stop().await,
        };
        self.exit = Some(exit.clone());
        exit
    }

    /// `quit` → SIGTERM → SIGKILL; returns the step that worked.
    async fn force_stop(&mut self) -> StopStep {
        let _ = self.qmp.quit(self.timeouts.qmp).await;
        if tokio::time::timeout(self.timeouts.exit, self.child.wait())
            .await
            .is_ok()
        {
            return StopStep::Quit;
        }
        if let Some(group) = self.resources.process_group {
            let _ = kill_process_group(group, Signal::TERM);
        }
        if tokio::time::timeout(self.timeouts.exit, self.child.wait())
            .await
            .is_ok()
        {
            return StopStep::Terminate;
        }
        if let Some(group) = self.resources.process_group {
            let _ = kill_process_group(group, Signal::KILL);
        }
        let _ = tokio::time::timeout(self.timeouts.exit, self.child.wait()).await;
        StopStep::Kill
    }

    /// Why QEMU exited, from its last events and exit status.
    async fn classify(&mut self, status: Option<ExitStatus>) -> VmExit {
        // Events written just before exit may still be in flight.
        while let Ok(event) = self.events.try_recv() {
            self.seen.push(event);
        }
        let shutdown = self.seen.iter().rev().find(|e| e.name == "SHUTDOWN");
        let panicked = self.seen.iter().any(|e| e.name == "GUEST_PANICKED");
        if panicked {
            return VmExit::Panicked;
        }
        if let Some(event) = shutdown
            && event.data["guest"].as_bool() == Some(true)
        {
            return VmExit::PoweredOff {
                requested: self.powerdown_requested,
            };
        }
        use std::os::unix::process::ExitStatusExt;
        VmExit::QemuFailed {
            code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            stderr_tail: tail_of(self.resources.job_dir.qemu_log(), STDERR_TAIL).await,
        }
    }

    /// Ends the VM if it still runs and removes everything it created; the console and
    /// QEMU logs stay in the log dir.
    pub async fn teardown(mut self) -> VmExit {
        let exit = match self.exit.clone() {
            Some(exit) => exit,
            None => self.stop().await,
        };
        self.release(exit).await
    }

    /// Ends a VM whose disk is thrown away (a job's, once its result and artifacts are
    /// in): nothing of the guest is kept, so there is no ACPI power-off to wait for
    /// (a systemd guest takes most of `shutdownSeconds` for it under TCG); QEMU is quit
    /// at once (`quit` → SIGTERM → SIGKILL), then everything is released as in
    /// `teardown`.
    pub async fn discard(mut self) -> VmExit {
        let exit = match self.wait(Duration::ZERO).await {
            Some(exit) => exit,
            None => {
                let exit = VmExit::Stopped {
                    step: self.force_stop().await,
                };
                self.exit = Some(exit.clone());
                exit
            }
        };
        self.release(exit).await
    }

    /// After QEMU ended: lets the console copy finish and releases the VM's resources.
    async fn release(mut self, exit: VmExit) -> VmExit {
        // QEMU is gone, so the console socket is at its end: let the copy finish before
        // the serial log moves.
        if let Some(task) = self.console_task.take() {
            let _ = tokio::time::timeout(self.timeouts.exit, task).await;
        }
        // Dropping the resources releases them: stray helpers are waited for and the
        // run dir holds the job's overlay, so that happens on the blocking pool.
        let resources = self.resources;
        let _ = tokio::task::spawn_blocking(move || drop(resources)).await;
        exit
    }

    /// What the console capture kept and dropped (readable after `teardown` too).
    pub fn console(&self) -> Arc<ConsoleUsage> {
        Arc::clone(&self.console)
    }

    /// QMP events seen so far.
    pub fn events(&self) -> &[QmpEvent] {
        &self.seen
    }
}

/// Creates a run dir readable by its owner only (QEMU's sockets live there).
pub fn create_run_dir(dir: &Path) -> Result<(), VmError> {
    let prepare = |source| VmError::Prepare {
        path: dir.to_path_buf(),
        source,
    };
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(prepare)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(prepare)
        }
        Err(e) => Err(prepare(e)),
    }
}

async fn connect_qmp(
    child: &mut Child,
    run_dir: &RunDir,
    log: &Path,
    timeout: Duration,
) -> Result<QmpClient, VmError> {
    let socket = PathBuf::from(run_dir.qmp_socket());
    let deadline = Instant::now() + timeout;
    let failed = async |status: ExitStatus| VmError::QemuFailed {
        status: status.to_string(),
        stderr_tail: tail_of(log.to_path_buf(), STDERR_TAIL).await,
    };
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(failed(status).await);
        }
        if socket.exists() {
            match QmpClient::connect(&socket, timeout).await {
                Ok(qmp) => return Ok(qmp),
                // Not listening yet: the loop checks for an exit and tries again.
                Err(QmpError::Connect { .. }) if Instant::now() < deadline => {}
                Err(error) => {
                    // QEMU opens its QMP socket before it checks disks and devices, so a
                    // QEMU that is about to fail can close the connection first: say
                    // why QEMU failed rather than that QMP closed.
                    if let Ok(Ok(status)) =
                        tokio::time::timeout(Duration::from_secs(2), child.wait()).await
                    {
                        return Err(failed(status).await);
                    }
                    return Err(error.into());
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(VmError::QmpTimeout(timeout));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `read_tail` on the blocking pool.
async fn tail_of(path: PathBuf, bytes: u64) -> String {
    tokio::task::spawn_blocking(move || read_tail(&path, bytes))
        .await
        .unwrap_or_default()
}

/// The last `bytes` of a log (never more, however large it is), trimmed, as text.
pub fn read_tail(path: &Path, bytes: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(bytes)));
    let mut raw = Vec::new();
    let _ = file.take(bytes).read_to_end(&mut raw);
    String::from_utf8_lossy(&raw).trim().to_owned()
}
