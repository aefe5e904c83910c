//! `qemu-worker run` end to end through the CLI, on the test image under TCG.

use std::path::PathBuf;
use std::time::Duration;

use engine_tests::assets::test_image;
use engine_tests::{Job, Outcome, Worker, base_config, wait_until};
use qemu_worker::job::{ExceptionReason, ResultReport, ResultState};
use test_support::processes_under;

/// A worker whose artifacts are capped at 1 MiB each.
fn capped_worker() -> Worker {
    Worker::with_config(&format!(
        "{}artifacts: {{maxFileSize: 1 MiB}}\n",
        base_config()
    ))
}

/// The job's directory: the single one under the state dir.
fn only_job_dir(worker: &Worker, outcome: &Outcome) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(worker.state().join("jobs"))
        .expect("jobs")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(
        dirs,
        std::slice::from_ref(&outcome.job_dir),
        "one job, in its own directory"
    );
    outcome.job_dir.clone()
}

#[test]
fn a_job_completes_with_its_artifacts_and_screenshot() {
    let worker = capped_worker();
    let outcome = Job::script(
        "mkdir -p /tmp/o/d/e && echo hi > /tmp/o/f.txt && echo x > /tmp/o/d/e/x.txt && echo done",
    )
    .max_run_time(60)
    .file_artifact("/tmp/o/f.txt", "public/f.txt")
    .directory_artifact("/tmp/o/d", "public/d")
    .run(&worker);
    assert_eq!(outcome.exit_code, Some(0), "{outcome}");
    assert_eq!(outcome.state(), ResultState::Completed);
    assert_eq!(
        outcome.artifact_names(),
        ["public/f.txt", "public/d/e/x.txt"]
    );
    let job = only_job_dir(&worker, &outcome);
    assert_eq!(
        std::fs::read_to_string(job.join("artifacts/public/f.txt")).expect("artifact"),
        "hi\n"
    );
    assert_eq!(
        outcome.report.screenshot.as_deref(),
        Some("screenshots/final.png")
    );
    let png = std::fs::read(job.join("screenshots/final.png")).expect("screenshot");
    assert_eq!(&png[..4], b"\x89PNG");
    assert!(
        std::fs::read_to_string(job.join("job.log"))
            .expect("log")
            .contains("done")
    );
    let stored: ResultReport =
        serde_json::from_slice(&std::fs::read(job.join("report.json")).expect("report"))
            .expect("a result report");
    assert_eq!(stored.state, ResultState::Completed);
    worker.assert_clean();
}

#[test]
fn a_failing_command_fails_the_job_and_a_missing_artifact_is_reported() {
    let worker = capped_worker();
    let outcome = Job::script("echo about to fail; exit 1")
        .max_run_time(60)
        .run(&worker);
    assert_eq!(outcome.exit_code, Some(1));
    assert_eq!(
        (outcome.state(), outcome.report.exit_code),
        (ResultState::Failed, Some(1))
    );

    // A missing artifact and one over the size cap (cut off mid-stream, so the agent
    // port is reconnected) are reported; the artifacts after them still come back.
    let worker = capped_worker();
    let outcome = Job::script("head -c 2097152 /dev/zero > /tmp/big; echo ok > /tmp/ok.txt")
        .max_run_time(60)
        .file_artifact("/nowhere.txt", "public/nowhere.txt")
        .file_artifact("/tmp/big", "public/big")
        .file_artifact("/tmp/ok.txt", "public/ok.txt")
        .run(&worker);
    assert_eq!(
        outcome.exit_code,
        Some(1),
        "a missing artifact fails the job"
    );
    let errors = &outcome.report.errors;
    assert_eq!(
        errors.first().map(|e| e.path.as_str()),
        Some("/artifacts/0")
    );
    assert!(
        errors
            .first()
            .is_some_and(|e| e.message.contains("not found")),
        "{outcome}"
    );
    assert_eq!(
        errors.get(1).map(|e| e.path.as_str()),
        Some("/artifacts/1"),
        "{outcome}"
    );
    assert!(
        errors
            .get(1)
            .is_some_and(|e| e.message.contains("larger than the limit")),
        "{outcome}"
    );
    assert_eq!(
        outcome.artifact_names().first(),
        Some(&"public/ok.txt"),
        "{outcome}"
    );
    assert_eq!(outcome.artifact_names().len(), 1);
    let log =
        std::fs::read_to_string(only_job_dir(&worker, &outcome).join("job.log")).expect("log");
    assert!(log.contains("[qemu-worker:error] /artifacts/0"), "{log}");
    worker.assert_clean();
}

#[test]
fn exceeding_max_run_time_fails_the_job_and_stops_the_vm() {
    let worker = capped_worker();
    let outcome = Job::script("echo started; sleep 600")
        .max_run_time(5)
        .run(&worker);
    assert_eq!(outcome.exit_code, Some(1));
    assert_eq!(outcome.state(), ResultState::Failed);
    assert!(outcome.report.exit_code.is_none(), "{outcome}");
    let log =
        std::fs::read_to_string(only_job_dir(&worker, &outcome).join("job.log")).expect("log");
    assert!(
        log.contains("started") && log.contains("maxRunTime of 5 seconds exceeded"),
        "{log}"
    );
    worker.assert_clean();
}

#[test]
fn a_malformed_job_is_resolved_without_starting_a_vm() {
    let worker = capped_worker();
    let outcome = Job::raw(&format!(
        "image: {}\ncommand: []\nmaxRunTime: 0\nmachine: {{memory: 4096}}\n",
        test_image().display()
    ))
    .run(&worker);
    assert_eq!(outcome.exit_code, Some(2));
    assert_eq!(
        (outcome.state(), outcome.reason()),
        (
            ResultState::Exception,
            Some(ExceptionReason::MalformedPayload)
        )
    );
    assert_eq!(
        outcome.error_paths(),
        ["/command", "/maxRunTime", "/machine/memory"]
    );
    assert!(!worker.state().join("run").exists(), "no VM was prepared");
    assert!(
        !worker
            .state()
            .join("images/objects")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "no image was fetched"
    );
    let log =
        std::fs::read_to_string(only_job_dir(&worker, &outcome).join("job.log")).expect("log");
    assert_eq!(log.matches("[qemu-worker:error]").count(), 3, "{log}");
}

#[test]
fn an_interrupted_run_tears_the_vm_down() {
    let worker = capped_worker();
    let mut run = Job::script("echo waiting; sleep 600")
        .max_run_time(600)
        .start(&worker);
    // Wait until the command runs in the guest, then interrupt as a user would.
    run.wait_for_log("waiting");
    run.signal(rustix::process::Signal::INT);
    let outcome = run.finish();
    assert_eq!(
        (outcome.state(), outcome.reason()),
        (ResultState::Exception, Some(ExceptionReason::Canceled))
    );
    assert_eq!(outcome.exit_code, Some(3));
    worker.assert_clean();
}

#[test]
fn a_killed_run_does_not_leave_its_vm_running() {
    let worker = capped_worker();
    let mut run = Job::script("echo waiting; sleep 600")
        .max_run_time(600)
        .start(&worker);
    run.wait_for_log("waiting");
    assert!(
        !processes_under(worker.dir()).is_empty(),
        "the VM runs before the kill"
    );
    // SIGKILL: no destructor runs in the worker; the kernel must take QEMU down.
    run.kill();
    wait_until(
        "QEMU to end with its killed worker",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || processes_under(worker.dir()).is_empty().then_some(()),
    )
    .unwrap_or_else(|e| {
        panic!(
            "QEMU outlived its killed worker ({e}): {:?}",
            processes_under(worker.dir())
        )
    });
}

/// An image whose guest tools are gone by collection time (here the command kills them
/// and reports its own result): file artifacts come back through qemu-ga, and a
/// directory artifact, which qemu-ga cannot list, is a named error.
#[test]
fn without_guest_tools_file_artifacts_come_back_through_qemu_ga() {
    let worker = capped_worker();
    let script = "echo through-qga > /tmp/q.txt; mkdir -p /tmp/d; echo x > /tmp/d/x; \
                  echo stopping the guest tools; exec >/dev/null 2>&1; \
                  g=$(pidof qemu-worker-guest); \
                  kill -9 $(awk '/^PPid/{print $2}' /proc/$g/status) $g; \
                  exec qemu-worker-guest report 0";
    let outcome = Job::script(script)
        .max_run_time(120)
        .file_artifact("/tmp/q.txt", "public/q.txt")
        .directory_artifact("/tmp/d", "public/d")
        .run(&worker);
    assert_eq!(outcome.exit_code, Some(1), "{outcome}");
    let artifact = outcome.report.artifacts.first();
    assert_eq!(artifact.map(|a| a.name.as_str()), Some("public/q.txt"));
    assert_eq!(artifact.map(|a| a.size), Some(12));
    let job = only_job_dir(&worker, &outcome);
    assert_eq!(
        std::fs::read_to_string(job.join("artifacts/public/q.txt")).expect("artifact"),
        "through-qga\n"
    );
    let error = outcome.report.errors.first();
    assert_eq!(
        error.map(|e| e.path.as_str()),
        Some("/artifacts/1"),
        "{outcome}"
    );
    assert!(
        error.is_some_and(|e| e
            .message
            .contains("directory artifacts need the guest tools")),
        "{outcome}"
    );
    let log = std::fs::read_to_string(job.join("job.log")).expect("log");
    assert!(
        log.contains("collecting artifacts through qemu-ga"),
        "{log}"
    );
    worker.assert_clean();
}
