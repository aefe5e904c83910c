//! `qemu-worker serve` with the embedded queue, through the CLI, on the test image.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{processes_under, require, test_image};
use qemu_worker::queue::{JobState, Queue, SqliteQueue};

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        require("qemu-system-x86_64", "qemu-system-x86");
        let dir = tempfile::Builder::new()
            .prefix("qw-srv")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let config = format!(
            "stateDir: state\naccelerator: tcg\ncapacity: 2\n\
             limits: {{maxMemory: 256, maxCPUs: 1, defaultThreads: 1}}\n\
             timeouts: {{heartbeatSeconds: 1, leaseSeconds: 10, graceSeconds: 2, shutdownSeconds: 5}}\n\
             images: {{allowedLocalDirs: [{}]}}\n",
            test_image().parent().expect("images/out").display()
        );
        std::fs::write(dir.path().join("worker.yml"), config).expect("config");
        Self { dir }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
            .arg("--config")
            .arg(self.dir.path().join("worker.yml"))
            .args(args)
            .output()
            .expect("qemu-worker runs")
    }

    fn submit(&self, name: &str, payload: &str) -> String {
        let path = self.dir.path().join(format!("{name}.yml"));
        std::fs::write(&path, payload).expect("payload");
        let output = self.cli(&["submit", path.to_str().expect("utf-8")]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    fn serve(&self) -> Child {
        Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
            .arg("--config")
            .arg(self.dir.path().join("worker.yml"))
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("serve.log")).expect("log"))
            .spawn()
            .expect("serve starts")
    }

    fn queue(&self) -> SqliteQueue {
        SqliteQueue::open(&self.state().join("queue.sqlite")).expect("queue")
    }

    fn wait_for(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(240);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; serve said:\n{}",
                std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn payload(script: &str, extra: &str) -> String {
    format!(
        "image: {}\ncommand: [/bin/sh, -c, {script:?}]\nmaxRunTime: 120\n{extra}",
        test_image().display()
    )
}

fn sigterm(child: &Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the process did not exit in time"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn serve_runs_queued_jobs_cleans_orphans_and_gives_jobs_back_on_shutdown() {
    let fx = Fixture::new();
    // Leftovers of a worker that was killed: a QEMU and a run dir under state/run.
    let orphan_dir = fx.state().join("run/orphan");
    std::fs::create_dir_all(&orphan_dir).expect("orphan dir");
    let mut orphan = Command::new("qemu-system-x86_64")
        .args(["-S", "-nodefaults", "-display", "none", "-name"])
        .arg(orphan_dir.join("vm"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("orphan QEMU");

    let ok = fx.submit(
        "ok",
        &payload(
            "echo done > /tmp/r.txt; echo all fine",
            "artifacts:\n  - {type: file, path: /tmp/r.txt, name: public/r.txt}\n",
        ),
    );
    let failing = fx.submit("fail", &payload("echo failing; exit 1", ""));
    let malformed = fx.submit("bad", &payload("true", "machine: {memory: 4096}\n"));

    let mut serve = fx.serve();
    wait_exit(&mut orphan, Duration::from_secs(30));
    fx.wait_for("the orphan run dir to go", || !orphan_dir.exists());

    let queue = fx.queue();
    fx.wait_for("all three jobs to finish", || {
        [&ok, &failing, &malformed].iter().all(|id| {
            !matches!(
                queue.status(id).expect("status").state,
                JobState::Pending | JobState::Running
            )
        })
    });
    assert_eq!(
        queue.status(&ok).expect("status").state,
        JobState::Completed
    );
    let failed = queue.status(&failing).expect("status");
    assert_eq!(
        (failed.state, failed.report.and_then(|r| r.exit_code)),
        (JobState::Failed, Some(1))
    );
    let bad = queue
        .status(&malformed)
        .expect("status")
        .report
        .expect("report");
    assert_eq!(bad.errors[0].path, "/machine/memory");

    let logs = fx.cli(&["logs", &ok]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("all fine"));
    let out = fx.dir.path().join("artifacts-out");
    let copied = fx.cli(&["artifacts", &ok, "--out", out.to_str().expect("utf-8")]);
    assert_eq!(
        copied.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("public/r.txt")).expect("artifact"),
        "done\n"
    );
    let status = fx.cli(&["status", "--json", &malformed]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(status["report"]["reason"], "malformed-payload");

    // A long job, then SIGTERM: after the grace period it is stopped and given back.
    let long = fx.submit("long", &payload("echo waiting; sleep 600", ""));
    let log = fx.state().join("jobs").join(&long).join("run-1/job.log");
    fx.wait_for("the long job to start", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("waiting"))
    });
    sigterm(&serve);
    let status = wait_exit(&mut serve, Duration::from_secs(120));
    assert!(status.success(), "serve exits cleanly on SIGTERM");
    let long_status = fx.queue().status(&long).expect("status");
    assert_eq!(
        (long_status.state, long_status.runs),
        (JobState::Pending, 1),
        "back in the queue for another worker"
    );
    assert!(
        processes_under(fx.dir.path()).is_empty(),
        "{:?}",
        processes_under(fx.dir.path())
    );
    let runs: Vec<_> = std::fs::read_dir(fx.state().join("run"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(runs.is_empty(), "run dirs left: {runs:?}");
}
