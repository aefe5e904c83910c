//! Harness for the engine conformance suite (`engine-tests/tests/`), in the style of
//! cloud-hypervisor's `test_infra`: every case drives the real `qemu-worker` binary
//! (`run --json`, `serve`, the job CLI) on the test image under TCG.
//!
//! - [`Worker`]: a per-test state dir and worker.yml; on drop it kills anything the test
//!   started (the registry of spawned children, then any process whose command line
//!   names the test's directory) so a failed test leaks nothing into the next one.
//! - [`Job`]: a payload builder; [`Job::run`] returns an [`Outcome`] with the typed
//!   result report, the log and the job's files; [`Job::start`] returns while the job
//!   runs (to cancel or kill it mid-way).
//! - [`wait_until`]: tests wait for a state, never for a fixed time.
//! - [`assets`]: the test image and generated hostile archives, pinned by hash in
//!   `engine-tests/assets.json`.
//! - [`browser`]: a real headless browser (chromium over WebDriver), for the web page.
//! - [`pty`]: a real pseudo-terminal, for interactive commands (`qemu-worker shell`).
//! - [`vm`]: the VM runtime in process on the test image, for the cases and benchmarks
//!   that drive the library rather than the binary.

pub mod assets;
pub mod browser;
pub mod pty;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use qemu_worker::job::{ExceptionReason, ResultReport, ResultState};
use test_support::{processes_under, require, rss_kib};

/// A TCP port on loopback that nothing listens on now (for an API, a driver).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The `qemu-worker` binary under test: `QEMU_WORKER_BIN`, or the workspace's build
/// (checked once per process: every CLI call goes through here).
pub fn worker_binary() -> PathBuf {
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BINARY.get_or_init(find_worker_binary).clone()
}

fn find_worker_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("QEMU_WORKER_BIN") {
        return PathBuf::from(path);
    }
    let binary = workspace().join("target/debug/qemu-worker");
    let built = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "no {}: run `cargo build` first (scripts/test does), or set QEMU_WORKER_BIN",
                binary.display()
            )
        });
    // `cargo nextest run -p engine-tests` does not rebuild the binary: never test a stale one.
    if let Some(newer) = newest_source(&workspace().join("src")).filter(|(t, _)| *t > built) {
        panic!(
            "{} is older than {}: run `cargo build` first",
            binary.display(),
            newer.1.display()
        );
    }
    binary
}

/// The most recently modified file under `dir`, with its time.
fn newest_source(dir: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_source(&path)
        } else {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .map(|t| (t, path))
        };
        if let Some(candidate) = candidate
            && newest.as_ref().is_none_or(|n| candidate.0 > n.0)
        {
            newest = Some(candidate);
        }
    }
    newest
}

/// The repository root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("engine-tests lives in the workspace")
        .to_path_buf()
}

/// A condition that did not become true in time.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {waited:?} waiting for {what}")]
pub struct WaitTimeout {
    pub what: String,
    pub waited: Duration,
}

/// Polls `check` every `interval` until it returns `Some`, or fails after `timeout`
/// naming `what` was awaited. Tests never sleep for a fixed time: they wait for a state.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T, WaitTimeout> {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if start.elapsed() >= timeout {
            return Err(WaitTimeout {
                what: what.to_owned(),
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(interval);
    }
}

fn kill(pid: i32, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// A worker host for one test: its own directory, state dir and worker.yml.
#[derive(Debug)]
pub struct Worker {
    dir: tempfile::TempDir,
    config: PathBuf,
    /// Children this test started; killed on drop if still running.
    spawned: Mutex<Vec<Child>>,
}

/// The worker.yml every case starts from: TCG, small guests, short timeouts, the test
/// image's directory allowed as a local image source.
pub fn base_config() -> String {
    format!(
        "stateDir: state\naccelerator: tcg\ncapacity: 2\n\
         limits: {{maxMemory: 256, maxCPUs: 1, defaultThreads: 1}}\n\
         timeouts: {{heartbeatSeconds: 1, leaseSeconds: 10, graceSeconds: 2, shutdownSeconds: 5}}\n\
         images: {{allowedLocalDirs: [{}]}}\n",
        assets::test_image()
            .parent()
            .expect("the test image has a directory")
            .display()
    )
}

/// [`base_config`] with its `images:` line replaced by `images: {IMAGES}` (the test
/// image's directory stays allowed: `{allowed}` in `images` stands for it).
pub fn config_with_images(images: &str) -> String {
    let allowed = assets::test_image()
        .parent()
        .expect("the test image has a directory")
        .display()
        .to_string();
    with_setting(
        &base_config(),
        "images",
        &images.replace("{allowed}", &allowed),
    )
}

/// `config` with its top-level `key:` line replaced by `key: value` (appended if it
/// has none).
pub fn with_setting(config: &str, key: &str, value: &str) -> String {
    let prefix = format!("{key}:");
    let mut config: String = config
        .lines()
        .filter(|l| !l.starts_with(&prefix))
        .map(|l| format!("{l}\n"))
        .collect();
    config.push_str(&format!("{key}: {value}\n"));
    config
}

impl Worker {
    /// A worker with [`base_config`].
    pub fn new() -> Self {
        Self::with_config(&base_config())
    }

    /// A worker with `config` as its worker.yml (`{dir}` is replaced by its directory).
    pub fn with_config(config: &str) -> Self {
        require("qemu-system-x86_64", "qemu-system-x86");
        let dir = tempfile::Builder::new()
            .prefix("qw-et")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let path = dir.path().join("worker.yml");
        std::fs::write(
            &path,
            config.replace("{dir}", &dir.path().display().to_string()),
        )
        .expect("worker.yml");
        Self {
            dir,
            config: path,
            spawned: Mutex::new(Vec::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `qemu-worker --config worker.yml ARGS…`, waited for.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("qemu-worker runs")
    }

    /// The command, not yet started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(worker_binary());
        command.arg("--config").arg(&self.config).args(args);
        command
    }

    /// Starts `qemu-worker serve`, its log in `serve.log`; registered for cleanup.
    pub fn serve(&self) -> u32 {
        let log = std::fs::File::create(self.dir.path().join("serve.log")).expect("log");
        let child = self
            .command(&["serve"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("serve starts");
        let pid = child.id();
        self.spawned.lock().expect("registry").push(child);
        pid
    }

    /// Starts a command registered for cleanup (e.g. `run` to cancel mid-way).
    pub fn spawn(&self, mut command: Command) -> u32 {
        let child = command.spawn().expect("spawn");
        let pid = child.id();
        self.spawned.lock().expect("registry").push(child);
        pid
    }

    /// Waits for a registered child to exit and returns its status.
    pub fn wait_exit(&self, pid: u32, within: Duration) -> std::process::ExitStatus {
        wait_until(
            "a process to exit",
            within,
            Duration::from_millis(50),
            || {
                let mut spawned = self.spawned.lock().expect("registry");
                let child = spawned.iter_mut().find(|c| c.id() == pid)?;
                child.try_wait().expect("try_wait")
            },
        )
        .unwrap_or_else(|e| panic!("{e}; serve said:\n{}", self.serve_log()))
    }

    pub fn signal(&self, pid: u32, signal: rustix::process::Signal) {
        kill(pid as i32, signal);
    }

    /// Waits until run `run` of `job_id` has logged `text` (a job run by `serve`).
    /// The log of a job's first run ("" until it has one).
    pub fn job_log(&self, job_id: &str) -> String {
        std::fs::read_to_string(self.state().join(format!("jobs/{job_id}/run-1/job.log")))
            .unwrap_or_default()
    }

    /// Waits up to `seconds` for `done`; panics naming `what`, with serve's log.
    pub fn wait_for(&self, what: &str, seconds: u64, mut done: impl FnMut() -> bool) {
        wait_until(
            what,
            Duration::from_secs(seconds),
            Duration::from_millis(200),
            || done().then_some(()),
        )
        .unwrap_or_else(|e| panic!("{e}; serve said:\n{}", self.serve_log()));
    }

    pub fn wait_for_log(&self, job_id: &str, run: u32, text: &str) {
        let log = self
            .state()
            .join("jobs")
            .join(job_id)
            .join(format!("run-{run}/job.log"));
        wait_until(
            &format!("run {run} of {job_id} to log {text:?}"),
            Duration::from_secs(120),
            Duration::from_millis(100),
            || {
                std::fs::read_to_string(&log)
                    .ok()
                    .filter(|l| l.contains(text))
            },
        )
        .unwrap_or_else(|e| panic!("{e}; serve said:\n{}", self.serve_log()));
    }

    pub fn serve_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// Writes `job` as a payload file and submits it; returns the job id.
    pub fn submit(&self, job: &Job) -> String {
        let path = job.write(self.dir.path());
        let output = self.cli(&["submit", path.to_str().expect("utf-8")]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "submit: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// `status --json JOB`.
    pub fn status(&self, job_id: &str) -> serde_json::Value {
        let output = self.cli(&["status", "--json", job_id]);
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json is not JSON ({e}): {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }

    /// Everything a finished job may leave behind that it should not: processes under
    /// the test's directory, run dirs (sockets, overlays) under `<state>/run`.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = processes_under(self.dir.path());
        // Workers this test still runs are expected; the rest are not.
        let own: Vec<String> = self
            .spawned
            .lock()
            .expect("registry")
            .iter_mut()
            .filter_map(|c| matches!(c.try_wait(), Ok(None)).then(|| format!("{}: ", c.id())))
            .collect();
        left.retain(|p| !own.iter().any(|o| p.starts_with(o)));
        for entry in std::fs::read_dir(self.state().join("run"))
            .into_iter()
            .flatten()
            .flatten()
        {
            left.push(format!("run dir {}", entry.path().display()));
        }
        left
    }

    pub fn assert_clean(&self) {
        let left = self.leftovers();
        assert!(left.is_empty(), "left behind: {left:#?}");
    }
}

impl Default for Worker {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let mut spawned = self.spawned.lock().unwrap_or_else(|e| e.into_inner());
        for child in spawned.iter_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for process in processes_under(self.dir.path()) {
            if let Some(pid) = process.split(':').next().and_then(|p| p.parse().ok()) {
                kill(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// A payload under construction. Defaults: the test image, `maxRunTime: 120`.
#[derive(Debug, Clone)]
pub struct Job {
    image: String,
    command: Vec<String>,
    max_run_time: u64,
    env: Vec<(String, String)>,
    artifacts: Vec<String>,
    extra: String,
    raw: Option<String>,
}

impl Job {
    /// `/bin/sh -c SCRIPT` in the test image.
    pub fn script(script: &str) -> Self {
        Self {
            image: assets::test_image().display().to_string(),
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            max_run_time: 120,
            env: Vec::new(),
            artifacts: Vec::new(),
            extra: String::new(),
            raw: None,
        }
    }

    /// A payload given as text, exactly (for malformed cases).
    pub fn raw(text: &str) -> Self {
        Self {
            raw: Some(text.to_owned()),
            ..Self::script("true")
        }
    }

    pub fn image(mut self, image: &str) -> Self {
        self.image = image.to_owned();
        self
    }

    pub fn max_run_time(mut self, seconds: u64) -> Self {
        self.max_run_time = seconds;
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn file_artifact(mut self, path: &str, name: &str) -> Self {
        self.artifacts
            .push(format!("{{type: file, path: {path:?}, name: {name:?}}}"));
        self
    }

    pub fn directory_artifact(mut self, path: &str, name: &str) -> Self {
        self.artifacts.push(format!(
            "{{type: directory, path: {path:?}, name: {name:?}}}"
        ));
        self
    }

    /// More top-level YAML, as is.
    pub fn extra(mut self, yaml: &str) -> Self {
        self.extra.push_str(yaml);
        if !yaml.ends_with('\n') {
            self.extra.push('\n');
        }
        self
    }

    pub fn yaml(&self) -> String {
        if let Some(raw) = &self.raw {
            return raw.clone();
        }
        let mut text = format!(
            "image: {:?}\ncommand: {}\nmaxRunTime: {}\n",
            self.image,
            serde_json::to_string(&self.command).expect("json"),
            self.max_run_time
        );
        if !self.env.is_empty() {
            text.push_str("env:\n");
            for (name, value) in &self.env {
                text.push_str(&format!("  {name:?}: {value:?}\n"));
            }
        }
        if !self.artifacts.is_empty() {
            text.push_str("artifacts:\n");
            for artifact in &self.artifacts {
                text.push_str(&format!("  - {artifact}\n"));
            }
        }
        text.push_str(&self.extra);
        text
    }

    fn write(&self, dir: &Path) -> PathBuf {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("payload-{n}.yml"));
        std::fs::write(&path, self.yaml()).expect("payload");
        path
    }

    /// `qemu-worker run --json` on `worker`: the whole job, no queue.
    pub fn run(&self, worker: &Worker) -> Outcome {
        self.start(worker).finish()
    }

    /// Starts `qemu-worker run --json` on `worker` and returns while it runs (to cancel
    /// it, kill it or something under it mid-way).
    pub fn start<'w>(&self, worker: &'w Worker) -> RunningJob<'w> {
        let path = self.write(worker.dir());
        let mut child = worker
            .command(&["run", "--json", path.to_str().expect("utf-8")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run starts");
        // Read the pipes on threads: a full pipe would stop the worker.
        let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                bytes
            })
        };
        let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
        let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
        RunningJob {
            worker,
            child,
            output: Some((stdout, stderr)),
        }
    }

    /// [`Job::run`], watching the worker while it runs: its peak resident memory and the
    /// most guestfwd helper processes alive at once, sampled every 20 ms.
    pub fn run_watched(&self, worker: &Worker) -> (Outcome, Watched) {
        let mut run = self.start(worker);
        let mut watched = Watched::default();
        while run.child.try_wait().expect("wait").is_none() {
            watched.peak_rss_kib = watched.peak_rss_kib.max(rss_kib(run.pid()));
            // QEMU's own command line names the helper in its guestfwd rule.
            let helpers = processes_under(worker.dir())
                .iter()
                .filter(|p| p.contains("metadata-splice") && !p.contains("qemu-system"))
                .count();
            watched.peak_helpers = watched.peak_helpers.max(helpers);
            std::thread::sleep(Duration::from_millis(20));
        }
        (run.finish(), watched)
    }
}

/// What [`Job::run_watched`] saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct Watched {
    pub peak_rss_kib: u64,
    pub peak_helpers: usize,
}

type Pipe = std::thread::JoinHandle<Vec<u8>>;

/// A `qemu-worker run --json` under way ([`Job::start`]); killed if dropped unfinished.
#[derive(Debug)]
pub struct RunningJob<'w> {
    worker: &'w Worker,
    child: Child,
    /// The threads reading stdout and stderr, until [`RunningJob::finish`] joins them.
    output: Option<(Pipe, Pipe)>,
}

impl RunningJob<'_> {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the job log shows `text` (a run that ends first fails the test).
    pub fn wait_for_log(&mut self, text: &str) {
        let pid = self.pid();
        let state = self.worker.state();
        let child = &mut self.child;
        wait_until(
            &format!("the job log of run {pid} to show {text:?}"),
            Duration::from_secs(120),
            Duration::from_millis(100),
            || {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    panic!("the run ended ({status}) before its log showed {text:?}");
                }
                let log = run_job_dir(&state, pid)?.join("job.log");
                std::fs::read_to_string(log)
                    .ok()
                    .filter(|l| l.contains(text))
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn signal(&self, signal: rustix::process::Signal) {
        kill(self.pid() as i32, signal);
    }

    /// SIGKILL, reaped: none of the worker's own cleanup runs.
    pub fn kill(mut self) -> std::process::ExitStatus {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped")
    }

    /// Waits for the run to end; what it left.
    pub fn finish(mut self) -> Outcome {
        let status = self.child.wait().expect("wait");
        let (stdout, stderr) = self.output.take().expect("finished once");
        let output = Output {
            status,
            stdout: stdout.join().expect("stdout thread"),
            stderr: stderr.join().expect("stderr thread"),
        };
        Outcome::of(self.worker, self.pid(), output)
    }
}

impl Drop for RunningJob<'_> {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The directory of the job that the `qemu-worker run` with process id `pid` runs:
/// `run` names its job `run-<unix millis>-<its pid>` (src/cli/job.rs, `run_job`), and a
/// job's files are in `<state>/jobs/<job id>`.
fn run_job_dir(state: &Path, pid: u32) -> Option<PathBuf> {
    let pid = pid.to_string();
    std::fs::read_dir(state.join("jobs"))
        .ok()?
        .flatten()
        .find(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(|name| name.strip_prefix("run-")?.split_once('-'))
                .is_some_and(|(millis, id)| id == pid && millis.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|entry| entry.path())
}

/// What a finished `run` left: its exit code, report, stderr and job directory.
#[derive(Debug)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    pub report: ResultReport,
    pub stderr: String,
    /// `<state>/jobs/<job id>` (empty if the worker made none).
    pub job_dir: PathBuf,
}

impl Outcome {
    fn of(worker: &Worker, pid: u32, output: Output) -> Self {
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "no result report ({e}): {}\nstderr:\n{stderr}",
                String::from_utf8_lossy(&output.stdout)
            )
        });
        Outcome {
            exit_code: output.status.code(),
            report,
            stderr,
            job_dir: run_job_dir(&worker.state(), pid).unwrap_or_default(),
        }
    }

    pub fn state(&self) -> ResultState {
        self.report.state
    }

    pub fn reason(&self) -> Option<ExceptionReason> {
        self.report.reason
    }

    /// The first error's message ("" without errors).
    pub fn first_error(&self) -> &str {
        self.report
            .errors
            .first()
            .map_or("", |e| e.message.as_str())
    }

    /// The error paths, in order.
    pub fn error_paths(&self) -> Vec<&str> {
        self.report.errors.iter().map(|e| e.path.as_str()).collect()
    }

    /// Every error, as the report's JSON has them.
    pub fn error_messages(&self) -> String {
        serde_json::to_string(&self.report.errors).expect("errors serialize")
    }

    /// The job log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.job_dir.join("job.log")).unwrap_or_default()
    }

    /// Whether a VM was started for the job (QEMU writes its log when it starts).
    pub fn vm_started(&self) -> bool {
        self.job_dir.join("qemu.log").exists()
            || self.report.timings.iter().any(|t| t.phase == "start")
    }

    /// An artifact's stored bytes.
    pub fn artifact(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.job_dir.join("artifacts").join(name)).ok()
    }

    /// The artifact names in the report, in order.
    pub fn artifact_names(&self) -> Vec<&str> {
        self.report
            .artifacts
            .iter()
            .map(|a| a.name.as_str())
            .collect()
    }
}

/// The report as JSON, for failure messages.
impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let json = serde_json::to_string(&self.report).map_err(|_| std::fmt::Error)?;
        f.write_str(&json)?;
        // What a failed assertion needs next to the report: the ends of the job's log
        // and of the guest's console.
        for name in ["job.log", "console.log"] {
            let text = std::fs::read_to_string(self.job_dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            write!(
                f,
                "\n--- {name} (last {} lines)\n{}",
                tail.len(),
                tail.join("\n")
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_the_first_value() {
        let mut calls = 0;
        let value = wait_until("third call", Duration::from_secs(5), Duration::ZERO, || {
            calls += 1;
            (calls == 3).then_some(calls)
        })
        .expect("reached");
        assert_eq!(value, 3);
    }

    #[test]
    fn wait_until_names_what_timed_out() {
        let err = wait_until(
            "a state that never comes",
            Duration::from_millis(30),
            Duration::from_millis(5),
            || None::<()>,
        )
        .expect_err("times out");
        assert!(err.to_string().contains("a state that never comes"));
    }

    #[test]
    fn a_setting_replaces_its_line_or_is_appended() {
        let config = "stateDir: state\ncapacity: 2\ncapacityNote: x\n";
        assert_eq!(
            with_setting(config, "capacity", "1"),
            "stateDir: state\ncapacityNote: x\ncapacity: 1\n"
        );
        assert_eq!(
            with_setting(config, "queue", "{backend: sqlite}"),
            format!("{config}queue: {{backend: sqlite}}\n")
        );
    }

    #[test]
    fn a_run_finds_its_job_dir_by_its_job_id() {
        let state = tempfile::tempdir().expect("tempdir");
        for name in [
            "run-1700000000000-4567",
            "run-1700000000001-456",
            "456",
            "run-x-456",
        ] {
            std::fs::create_dir_all(state.path().join("jobs").join(name)).expect("dir");
        }
        assert_eq!(
            run_job_dir(state.path(), 456),
            Some(state.path().join("jobs/run-1700000000001-456"))
        );
        assert_eq!(run_job_dir(state.path(), 45), None);
    }

    #[test]
    fn a_job_builds_the_payload_it_describes() {
        let yaml = Job::script("echo hi")
            .image("/img.tar.zst")
            .env("A", "1")
            .file_artifact("/tmp/f", "public/f")
            .max_run_time(7)
            .yaml();
        assert_eq!(
            yaml,
            "image: \"/img.tar.zst\"\ncommand: [\"/bin/sh\",\"-c\",\"echo hi\"]\nmaxRunTime: 7\n\
             env:\n  \"A\": \"1\"\nartifacts:\n  - {type: file, path: \"/tmp/f\", name: \"public/f\"}\n"
        );
    }
}
