//! `qemu-worker serve` through the CLI on the test image: with the embedded queue, and
//! two workers (two state dirs, as two hosts) sharing a real PostgreSQL queue.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use engine_tests::{Job, Worker, base_config, wait_until, with_setting};
use qemu_worker::queue::{JobState, PostgresQueue, Queue, SqliteQueue};
use rustix::process::Signal;
use test_support::postgres::TestPostgres;
use test_support::{processes_under, require};

/// Waits for `done`, failing with what `worker`'s serve said.
fn wait_for(worker: &Worker, what: &str, mut done: impl FnMut() -> bool) {
    wait_until(
        what,
        Duration::from_secs(240),
        Duration::from_millis(200),
        || done().then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}; serve said:\n{}", worker.serve_log()));
}

#[test]
fn serve_runs_queued_jobs_cleans_orphans_and_gives_jobs_back_on_shutdown() {
    let worker = Worker::with_config(&with_setting(&base_config(), "queue", "{backend: sqlite}"));
    // Leftovers of a worker that was killed: a QEMU and a run dir under state/run.
    let orphan_dir = worker.state().join("run/orphan");
    std::fs::create_dir_all(&orphan_dir).expect("orphan dir");
    let mut orphan = Command::new("qemu-system-x86_64");
    orphan
        .args(["-S", "-nodefaults", "-display", "none", "-name"])
        .arg(orphan_dir.join("vm"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let orphan = worker.spawn(orphan);

    let ok = worker.submit(
        &Job::script("echo done > /tmp/r.txt; echo all fine")
            .file_artifact("/tmp/r.txt", "public/r.txt"),
    );
    let failing = worker.submit(&Job::script("echo failing; exit 1"));
    let malformed = worker.submit(&Job::script("true").extra("machine: {memory: 4096}"));

    let serve = worker.serve();
    worker.wait_exit(orphan, Duration::from_secs(30));
    wait_for(&worker, "the orphan run dir to go", || !orphan_dir.exists());

    let queue = SqliteQueue::open(&worker.state().join("queue.sqlite")).expect("queue");
    wait_for(&worker, "all three jobs to finish", || {
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

    let logs = worker.cli(&["logs", &ok]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("all fine"));
    let out = worker.dir().join("artifacts-out");
    let copied = worker.cli(&["artifacts", &ok, "--out", out.to_str().expect("utf-8")]);
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
    let store = worker
        .state()
        .join("jobs")
        .join(&ok)
        .join("run-1/artifacts");
    std::fs::write(store.join("public/unlisted.bin"), b"partial").expect("stray file");
    let again = worker.dir().join("artifacts-again");
    let copied = worker.cli(&["artifacts", &ok, "--out", again.to_str().expect("utf-8")]);
    assert_eq!(copied.status.code(), Some(0));
    assert!(again.join("public/r.txt").exists());
    assert!(!again.join("public/unlisted.bin").exists());
    assert_eq!(
        worker.status(&malformed)["report"]["reason"],
        "malformed-payload"
    );

    // A long job, then SIGTERM: after the grace period it is stopped and given back.
    let long = worker.submit(&Job::script("echo waiting; sleep 600"));
    let log = worker
        .state()
        .join("jobs")
        .join(&long)
        .join("run-1/job.log");
    wait_for(&worker, "the long job to start", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("waiting"))
    });
    worker.signal(serve, Signal::TERM);
    let status = worker.wait_exit(serve, Duration::from_secs(120));
    assert!(status.success(), "serve exits cleanly on SIGTERM");
    let long_status = queue.status(&long).expect("status");
    assert_eq!(
        (long_status.state, long_status.runs),
        (JobState::Pending, 1),
        "back in the queue for another worker"
    );
    assert!(
        processes_under(worker.dir()).is_empty(),
        "{:?}",
        processes_under(worker.dir())
    );
    let runs: Vec<_> = std::fs::read_dir(worker.state().join("run"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(runs.is_empty(), "run dirs left: {runs:?}");
}

/// Waits for `done`, failing with both workers' logs.
fn wait_until_both(what: &str, workers: &[Worker; 2], mut done: impl FnMut() -> bool) {
    wait_until(
        what,
        Duration::from_secs(400),
        Duration::from_millis(200),
        || done().then_some(()),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}; worker A said:\n{}\nworker B said:\n{}",
            workers[0].serve_log(),
            workers[1].serve_log()
        )
    });
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
    let server = TestPostgres::start();
    let queue_yaml = format!("{{backend: postgres, url: {:?}}}", server.url());
    let config = with_setting(
        &with_setting(&base_config(), "capacity", "1"),
        "queue",
        &queue_yaml,
    );
    // Two hosts: each worker has its own directory and state dir.
    let workers = [Worker::with_config(&config), Worker::with_config(&config)];
    let states = [workers[0].state(), workers[1].state()];
    let queue = PostgresQueue::open(&server.url()).expect("queue");
    let mut serving = [workers[0].serve(), workers[1].serve()];
    wait_until_both("both workers to start", &workers, || {
        workers
            .iter()
            .all(|w| w.serve_log().contains("worker started"))
    });

    // 20 jobs, each printing its number; each must run exactly once.
    let jobs: Vec<String> = (0..20)
        .map(|n| workers[0].submit(&Job::script(&format!("echo job-{n}-ran"))))
        .collect();
    wait_until_both("20 jobs to finish", &workers, || {
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
    let listed = workers[1].cli(&["jobs", "--state", "completed"]);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).lines().count(),
        20,
        "{}",
        String::from_utf8_lossy(&listed.stdout)
    );

    // A job that takes a while; kill -9 the worker running it.
    let slow = workers[0].submit(&Job::script("echo slow-started; sleep 20; echo slow-done"));
    let mut holder = None;
    wait_until_both("the slow job to start", &workers, || {
        holder = (0..2).find(|&h| {
            std::fs::read_to_string(states[h].join("jobs").join(&slow).join("run-1/job.log"))
                .is_ok_and(|l| l.contains("slow-started"))
        });
        holder.is_some()
    });
    let killed = holder.expect("a holder");
    let other = 1 - killed;
    workers[killed].signal(serving[killed], Signal::KILL);
    workers[killed].wait_exit(serving[killed], Duration::from_secs(60));
    assert!(
        std::fs::read_dir(states[killed].join("run"))
            .expect("run dir")
            .next()
            .is_some(),
        "the killed worker left its run dir behind"
    );

    // After the lease (10 s) the other worker takes the job over as run 2.
    wait_until_both("the slow job to finish elsewhere", &workers, || {
        queue.status(&slow).expect("status").state == JobState::Completed
    });
    let status = queue.status(&slow).expect("status");
    assert_eq!((status.runs, status.run_id), (2, 2));
    assert_eq!(runs_on(&states[other], &slow), ["run-2"]);
    let log = std::fs::read_to_string(states[other].join("jobs").join(&slow).join("run-2/job.log"))
        .expect("job log");
    assert!(log.contains("slow-done"), "{log}");
    assert!(
        workers[other].serve_log().contains("claim-expired"),
        "the expiry is logged"
    );

    // The killed worker, restarted (a fresh serve.log), cleans what it left: no VM
    // process, no run dir.
    serving[killed] = workers[killed].serve();
    wait_until_both("the restarted worker to start", &workers, || {
        workers[killed].serve_log().contains("worker started")
    });
    assert!(
        processes_under(&states[killed]).is_empty(),
        "{:?}",
        processes_under(&states[killed])
    );
    let left: Vec<_> = std::fs::read_dir(states[killed].join("run"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "run dirs left: {left:?}");

    for (worker, pid) in workers.iter().zip(serving) {
        worker.signal(pid, Signal::TERM);
        assert!(worker.wait_exit(pid, Duration::from_secs(60)).success());
    }
    for worker in &workers {
        assert!(
            processes_under(worker.dir()).is_empty(),
            "{:?}",
            processes_under(worker.dir())
        );
    }
}
