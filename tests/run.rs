//! `qemu-worker run` end to end through the CLI, on the test image under TCG.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::{KillOnDrop, test_image};
use test_support::{processes_under, require};

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        require("qemu-system-x86_64", "qemu-system-x86");
        let image = test_image();
        let dir = tempfile::Builder::new()
            .prefix("qw-run")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let config = format!(
            "stateDir: state\naccelerator: tcg\nlimits: {{maxMemory: 256, maxCPUs: 1, defaultThreads: 1}}\n\
             timeouts: {{shutdownSeconds: 5}}\nimages: {{allowedLocalDirs: [{}]}}\n\
             artifacts: {{maxFileSize: 1 MiB}}\n",
            image.parent().expect("images/out").display()
        );
        std::fs::write(dir.path().join("worker.yml"), config).expect("config");
        Self { dir }
    }

    fn run(&self, payload: &str) -> (Output, serde_json::Value) {
        let path = self.dir.path().join("payload.yml");
        std::fs::write(&path, payload).expect("payload");
        let output = Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
            .arg("--config")
            .arg(self.dir.path().join("worker.yml"))
            .args(["run", "--json"])
            .arg(&path)
            .output()
            .expect("qemu-worker runs");
        let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON report ({e}); stderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (output, report)
    }

    /// The single job directory under the state dir.
    fn job_dir(&self) -> PathBuf {
        let jobs = self.dir.path().join("state/jobs");
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&jobs)
            .expect("jobs")
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(dirs.len(), 1, "{dirs:?}");
        dirs.remove(0)
    }

    fn assert_no_vm_left(&self) {
        let running = processes_under(self.dir.path());
        assert!(running.is_empty(), "QEMU left running: {running:?}");
        let run = self.dir.path().join("state/run");
        let left: Vec<_> = std::fs::read_dir(&run)
            .map(|d| d.flatten().collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "run dirs left: {left:?}");
    }
}

fn payload(script: &str, max_run_time: u64, artifacts: &str) -> String {
    format!(
        "image: {}\ncommand: [/bin/sh, -c, {script:?}]\nmaxRunTime: {max_run_time}\n{artifacts}",
        test_image().display()
    )
}

#[test]
fn a_job_completes_with_its_artifacts_and_screenshot() {
    let fx = Fixture::new();
    let (output, report) = fx.run(&payload(
        "mkdir -p /tmp/o/d/e && echo hi > /tmp/o/f.txt && echo x > /tmp/o/d/e/x.txt && echo done",
        60,
        "artifacts:\n  - {type: file, path: /tmp/o/f.txt, name: public/f.txt}\n  - {type: directory, path: /tmp/o/d, name: public/d}\n",
    ));
    assert_eq!(output.status.code(), Some(0), "{report}");
    assert_eq!(report["state"], "completed");
    let names: Vec<&str> = report["artifacts"]
        .as_array()
        .expect("artifacts")
        .iter()
        .map(|a| a["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["public/f.txt", "public/d/e/x.txt"]);
    let job = fx.job_dir();
    assert_eq!(
        std::fs::read_to_string(job.join("artifacts/public/f.txt")).expect("artifact"),
        "hi\n"
    );
    assert_eq!(report["screenshot"], "screenshots/final.png");
    let png = std::fs::read(job.join("screenshots/final.png")).expect("screenshot");
    assert_eq!(&png[..4], b"\x89PNG");
    assert!(
        std::fs::read_to_string(job.join("job.log"))
            .expect("log")
            .contains("done")
    );
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job.join("report.json")).expect("report"))
            .expect("json");
    assert_eq!(stored["state"], "completed");
    fx.assert_no_vm_left();
}

#[test]
fn a_failing_command_fails_the_job_and_a_missing_artifact_is_reported() {
    let fx = Fixture::new();
    let (output, report) = fx.run(&payload("echo about to fail; exit 1", 60, ""));
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        (report["state"].as_str(), report["exitCode"].as_i64()),
        (Some("failed"), Some(1))
    );

    // A missing artifact and one over the size cap (cut off mid-stream, so the agent
    // port is reconnected) are reported; the artifacts after them still come back.
    let fx = Fixture::new();
    let (output, report) = fx.run(&payload(
        "head -c 2097152 /dev/zero > /tmp/big; echo ok > /tmp/ok.txt",
        60,
        "artifacts:\n  - {type: file, path: /nowhere.txt, name: public/nowhere.txt}\n  \
         - {type: file, path: /tmp/big, name: public/big}\n  \
         - {type: file, path: /tmp/ok.txt, name: public/ok.txt}\n",
    ));
    assert_eq!(
        output.status.code(),
        Some(1),
        "a missing artifact fails the job"
    );
    assert_eq!(report["errors"][0]["path"], "/artifacts/0");
    assert!(
        report["errors"][0]["message"]
            .as_str()
            .unwrap_or("")
            .contains("not found"),
        "{report}"
    );
    assert_eq!(report["errors"][1]["path"], "/artifacts/1", "{report}");
    assert!(
        report["errors"][1]["message"]
            .as_str()
            .unwrap_or("")
            .contains("larger than the limit"),
        "{report}"
    );
    assert_eq!(report["artifacts"][0]["name"], "public/ok.txt", "{report}");
    assert_eq!(report["artifacts"].as_array().map(Vec::len), Some(1));
    let log = std::fs::read_to_string(fx.job_dir().join("job.log")).expect("log");
    assert!(log.contains("[qemu-worker:error] /artifacts/0"), "{log}");
    fx.assert_no_vm_left();
}

#[test]
fn exceeding_max_run_time_fails_the_job_and_stops_the_vm() {
    let fx = Fixture::new();
    let (output, report) = fx.run(&payload("echo started; sleep 600", 5, ""));
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(report["state"], "failed");
    assert!(report.get("exitCode").is_none(), "{report}");
    let log = std::fs::read_to_string(fx.job_dir().join("job.log")).expect("log");
    assert!(
        log.contains("started") && log.contains("maxRunTime of 5 seconds exceeded"),
        "{log}"
    );
    fx.assert_no_vm_left();
}

#[test]
fn a_malformed_job_is_resolved_without_starting_a_vm() {
    let fx = Fixture::new();
    let (output, report) = fx.run(&format!(
        "image: {}\ncommand: []\nmaxRunTime: 0\nmachine: {{memory: 4096}}\n",
        test_image().display()
    ));
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        (report["state"].as_str(), report["reason"].as_str()),
        (Some("exception"), Some("malformed-payload"))
    );
    let paths: Vec<&str> = report["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["path"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(paths, ["/command", "/maxRunTime", "/machine/memory"]);
    assert!(
        !fx.dir.path().join("state/run").exists(),
        "no VM was prepared"
    );
    assert!(
        !fx.dir
            .path()
            .join("state/images/objects")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "no image was fetched"
    );
    let log = std::fs::read_to_string(fx.job_dir().join("job.log")).expect("log");
    assert_eq!(log.matches("[qemu-worker:error]").count(), 3, "{log}");
}

#[test]
fn an_interrupted_run_tears_the_vm_down() {
    let fx = Fixture::new();
    let path = fx.dir.path().join("payload.yml");
    std::fs::write(&path, payload("echo waiting; sleep 600", 600, "")).expect("payload");
    let child = KillOnDrop::new(
        Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
            .arg("--config")
            .arg(fx.dir.path().join("worker.yml"))
            .args(["run", "--json"])
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("qemu-worker runs"),
    );
    // Wait until the command runs in the guest, then interrupt as a user would.
    let jobs = fx.dir.path().join("state/jobs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let started = std::fs::read_dir(&jobs)
            .into_iter()
            .flatten()
            .flatten()
            .any(|job| {
                std::fs::read_to_string(job.path().join("job.log"))
                    .is_ok_and(|l| l.contains("waiting"))
            });
        if started {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("SIGINT");
    let output = child.into_inner().wait_with_output().expect("wait");
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("a report after the interrupt");
    assert_eq!(
        (report["state"].as_str(), report["reason"].as_str()),
        (Some("exception"), Some("canceled"))
    );
    assert_eq!(output.status.code(), Some(3));
    fx.assert_no_vm_left();
}

#[test]
fn a_killed_run_does_not_leave_its_vm_running() {
    let fx = Fixture::new();
    let path = fx.dir.path().join("payload.yml");
    std::fs::write(&path, payload("echo waiting; sleep 600", 600, "")).expect("payload");
    let mut child = KillOnDrop::new(
        Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
            .arg("--config")
            .arg(fx.dir.path().join("worker.yml"))
            .arg("run")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-worker runs"),
    );
    let jobs = fx.dir.path().join("state/jobs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !std::fs::read_dir(&jobs)
        .into_iter()
        .flatten()
        .flatten()
        .any(|job| {
            std::fs::read_to_string(job.path().join("job.log")).is_ok_and(|l| l.contains("waiting"))
        })
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the job never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        !processes_under(fx.dir.path()).is_empty(),
        "the VM runs before the kill"
    );
    // SIGKILL: no destructor runs in the worker; the kernel must take QEMU down.
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !processes_under(fx.dir.path()).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "QEMU outlived its killed worker"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// An image whose guest tools are gone by collection time (here the command kills them
/// and reports its own result): file artifacts come back through qemu-ga, and a
/// directory artifact, which qemu-ga cannot list, is a named error.
#[test]
fn without_guest_tools_file_artifacts_come_back_through_qemu_ga() {
    let fx = Fixture::new();
    let script = "echo through-qga > /tmp/q.txt; mkdir -p /tmp/d; echo x > /tmp/d/x; \
                  echo stopping the guest tools; exec >/dev/null 2>&1; \
                  g=$(pidof qemu-worker-guest); \
                  kill -9 $(awk '/^PPid/{print $2}' /proc/$g/status) $g; \
                  exec qemu-worker-guest report 0";
    let (output, report) = fx.run(&payload(
        script,
        120,
        "artifacts:\n  - {type: file, path: /tmp/q.txt, name: public/q.txt}\n  - {type: directory, path: /tmp/d, name: public/d}\n",
    ));
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert_eq!(report["artifacts"][0]["name"], "public/q.txt");
    assert_eq!(report["artifacts"][0]["size"], 12);
    let job = fx.job_dir();
    assert_eq!(
        std::fs::read_to_string(job.join("artifacts/public/q.txt")).expect("artifact"),
        "through-qga\n"
    );
    assert_eq!(report["errors"][0]["path"], "/artifacts/1", "{report}");
    assert!(
        report["errors"][0]["message"]
            .as_str()
            .unwrap_or("")
            .contains("directory artifacts need the guest tools"),
        "{report}"
    );
    let log = std::fs::read_to_string(job.join("job.log")).expect("log");
    assert!(
        log.contains("collecting artifacts through qemu-ga"),
        "{log}"
    );
    fx.assert_no_vm_left();
}
