//! `qemu-worker serve` through the CLI on the test image: with the embedded queue, and
//! two workers (two state dirs, as two hosts) sharing a real PostgreSQL queue.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{KillOnDrop, test_image};
use qemu_worker::queue::{JobState, Queue, SqliteQueue};
use test_support::{processes_under, require};

struct Fixture {
    dir: tempfile::TempDir,
}

/// A worker.yml in `dir` for one worker host: its state dir, queue and capacity.
fn write_config(dir: &Path, name: &str, state: &str, queue: &str, capacity: u32) -> PathBuf {
    let config = format!(
        "stateDir: {state}\naccelerator: tcg\ncapacity: {capacity}\nqueue: {queue}\n\
         limits: {{maxMemory: 256, maxCPUs: 1, defaultThreads: 1}}\n\
         timeouts: {{heartbeatSeconds: 1, leaseSeconds: 10, graceSeconds: 2, shutdownSeconds: 5}}\n\
         images: {{allowedLocalDirs: [{}]}}\n",
        test_image().parent().expect("images/out").display()
    );
    let path = dir.join(name);
    std::fs::write(&path, config).expect("config");
    path
}

/// `qemu-worker --config CONFIG ARGS…`, waited for.
fn cli_with(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("qemu-worker runs")
}

/// Writes `payload` as `dir/NAME.yml`, submits it with `config`, returns the job id.
fn submit_with(config: &Path, dir: &Path, name: &str, payload: &str) -> String {
    let path = dir.join(format!("{name}.yml"));
    std::fs::write(&path, payload).expect("payload");
    let output = cli_with(config, &["submit", path.to_str().expect("utf-8")]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// `qemu-worker serve` with `config`, its log in `log`.
fn serve_with(config: &Path, log: &Path) -> KillOnDrop {
    KillOnDrop::new(
        Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
            .arg("--config")
            .arg(config)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log"))
            .spawn()
            .expect("serve starts"),
    )
}

impl Fixture {
    fn new() -> Self {
        require("qemu-system-x86_64", "qemu-system-x86");
        let dir = tempfile::Builder::new()
            .prefix("qw-srv")
            .tempdir_in("/tmp")
            .expect("tempdir");
        write_config(dir.path(), "worker.yml", "state", "{backend: sqlite}", 2);
        Self { dir }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn cli(&self, args: &[&str]) -> Output {
        cli_with(&self.dir.path().join("worker.yml"), args)
    }

    fn submit(&self, name: &str, payload: &str) -> String {
        submit_with(
            &self.dir.path().join("worker.yml"),
            self.dir.path(),
            name,
            payload,
        )
    }

    fn serve(&self) -> KillOnDrop {
        serve_with(
            &self.dir.path().join("worker.yml"),
            &self.dir.path().join("serve.log"),
        )
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
    // Only what the report lists is handed out: a file it does not list (a transfer
    // that failed, say) stays where it is.
    let store = fx.state().join("jobs").join(&ok).join("run-1/artifacts");
    std::fs::write(store.join("public/unlisted.bin"), b"partial").expect("stray file");
    let again = fx.dir.path().join("artifacts-again");
    let copied = fx.cli(&["artifacts", &ok, "--out", again.to_str().expect("utf-8")]);
    assert_eq!(copied.status.code(), Some(0));
    assert!(again.join("public/r.txt").exists());
    assert!(!again.join("public/unlisted.bin").exists());
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

/// Reads a worker's log for a failure message.
fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits for `done`, failing with both workers' logs.
fn wait_until_both(what: &str, logs: [&Path; 2], mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(400);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; worker A said:\n{}\nworker B said:\n{}",
            log_of(logs[0]),
            log_of(logs[1])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The run dirs of `job` a worker host has under its state dir.
fn runs_on(state: &Path, job: &str) -> Vec<String> {
    let mut runs: Vec<String> = std::fs::read_dir(state.join("jobs").join(job))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    runs.sort();
    runs
}

#[test]
fn two_workers_share_a_postgres_queue_and_take_over_a_killed_workers_job() {
    require("qemu-system-x86_64", "qemu-system-x86");
    let server = test_support::postgres::TestPostgres::start();
    let dir = tempfile::Builder::new()
        .prefix("qw-pg")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let queue_yaml = format!("{{backend: postgres, url: {:?}}}", server.url());
    let configs = [
        write_config(dir.path(), "a.yml", "a-state", &queue_yaml, 1),
        write_config(dir.path(), "b.yml", "b-state", &queue_yaml, 1),
    ];
    let states = [dir.path().join("a-state"), dir.path().join("b-state")];
    let logs = [dir.path().join("a.log"), dir.path().join("b.log")];
    let log_refs = [logs[0].as_path(), logs[1].as_path()];
    let queue = qemu_worker::queue::PostgresQueue::open(&server.url()).expect("queue");
    let mut workers = [
        serve_with(&configs[0], &logs[0]),
        serve_with(&configs[1], &logs[1]),
    ];
    wait_until_both("both workers to start", log_refs, || {
        logs.iter().all(|l| log_of(l).contains("worker started"))
    });

    // 20 jobs, each printing its number; each must run exactly once.
    let submit = |name: &str, body: &str| submit_with(&configs[0], dir.path(), name, body);
    let jobs: Vec<String> = (0..20)
        .map(|n| {
            submit(
                &format!("job{n}"),
                &payload(&format!("echo job-{n}-ran"), ""),
            )
        })
        .collect();
    wait_until_both("20 jobs to finish", log_refs, || {
        jobs.iter().all(|id| {
            !matches!(
                queue.status(id).expect("status").state,
                JobState::Pending | JobState::Running
            )
        })
    });
    let mut ran_on = [0, 0];
    for (n, id) in jobs.iter().enumerate() {
        let status = queue.status(id).expect("status");
        assert_eq!(
            (status.state, status.runs),
            (JobState::Completed, 1),
            "{id}"
        );
        let hosts: Vec<usize> = (0..2)
            .filter(|&h| !runs_on(&states[h], id).is_empty())
            .collect();
        assert_eq!(hosts.len(), 1, "{id} ran on exactly one host: {hosts:?}");
        assert_eq!(runs_on(&states[hosts[0]], id), ["run-1"], "{id} ran once");
        let log =
            std::fs::read_to_string(states[hosts[0]].join("jobs").join(id).join("run-1/job.log"))
                .expect("job log");
        assert!(log.contains(&format!("job-{n}-ran")), "{id}: {log}");
        ran_on[hosts[0]] += 1;
    }
    assert!(
        ran_on.iter().all(|&n| n > 0),
        "both workers took jobs: {ran_on:?}"
    );
    // Status, listing and cancel go through the shared queue from either host.
    let listed = cli_with(&configs[1], &["jobs", "--state", "completed"]);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).lines().count(),
        20,
        "{}",
        String::from_utf8_lossy(&listed.stdout)
    );

    // A job that takes a while; kill -9 the worker running it.
    let slow = submit(
        "slow",
        &payload("echo slow-started; sleep 20; echo slow-done", ""),
    );
    let mut holder = None;
    wait_until_both("the slow job to start", log_refs, || {
        holder = (0..2).find(|&h| {
            std::fs::read_to_string(states[h].join("jobs").join(&slow).join("run-1/job.log"))
                .is_ok_and(|l| l.contains("slow-started"))
        });
        holder.is_some()
    });
    let killed = holder.expect("a holder");
    let other = 1 - killed;
    workers[killed].kill().expect("kill -9");
    workers[killed].wait().expect("reap");
    assert!(
        std::fs::read_dir(states[killed].join("run"))
            .expect("run dir")
            .next()
            .is_some(),
        "the killed worker left its run dir behind"
    );

    // After the lease (10 s) the other worker takes the job over as run 2.
    wait_until_both("the slow job to finish elsewhere", log_refs, || {
        queue.status(&slow).expect("status").state == JobState::Completed
    });
    let status = queue.status(&slow).expect("status");
    assert_eq!((status.runs, status.run_id), (2, 2));
    assert_eq!(runs_on(&states[other], &slow), ["run-2"]);
    let log = std::fs::read_to_string(states[other].join("jobs").join(&slow).join("run-2/job.log"))
        .expect("job log");
    assert!(log.contains("slow-done"), "{log}");
    assert!(
        log_of(&logs[other]).contains("claim-expired"),
        "the expiry is logged"
    );

    // The killed worker, restarted, cleans what it left: no VM process, no run dir.
    workers[killed] = serve_with(&configs[killed], &dir.path().join("restarted.log"));
    let restarted = dir.path().join("restarted.log");
    wait_until_both(
        "the restarted worker to start",
        [&restarted, &logs[other]],
        || log_of(&restarted).contains("worker started"),
    );
    assert!(
        processes_under(&states[killed]).is_empty(),
        "{:?}",
        processes_under(&states[killed])
    );
    let left: Vec<_> = std::fs::read_dir(states[killed].join("run"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "run dirs left: {left:?}");

    for worker in &mut workers {
        sigterm(worker);
        assert!(wait_exit(worker, Duration::from_secs(60)).success());
    }
    assert!(
        processes_under(dir.path()).is_empty(),
        "{:?}",
        processes_under(dir.path())
    );
}
