//! The engine conformance cases of taskcluster-worker's `engines/enginetest`, ported and
//! extended: environment variables, logging, artifacts, kill, display. Each runs a real
//! job through `qemu-worker run` (or `serve` for cancel) on the test image under TCG.

use std::time::Duration;

use engine_tests::{Job, Worker, wait_until};
use qemu_worker::job::{ExceptionReason, ResultState};

// --- environment variables (EnvVarTestCase) ---

#[test]
fn an_environment_variable_is_visible_to_the_command() {
    let worker = Worker::new();
    let outcome = Job::script("echo \"value=[$HELLO_WORLD]\"")
        .env("HELLO_WORLD", "hello-world")
        .run(&worker);
    assert_eq!(outcome.state(), ResultState::Completed, "{outcome}");
    assert!(
        outcome.log().contains("value=[hello-world]"),
        "{}",
        outcome.log()
    );
    worker.assert_clean();
}

#[test]
fn invalid_and_duplicate_variable_names_are_malformed_payloads() {
    let worker = Worker::new();
    for (name, path) in [("#", "/env/#"), ("1A", "/env/1A"), ("", "/env/")] {
        let outcome = Job::script("true").env(name, "x").run(&worker);
        assert_eq!(
            (outcome.state(), outcome.reason()),
            (
                ResultState::Exception,
                Some(ExceptionReason::MalformedPayload)
            ),
            "{name:?}: {outcome}"
        );
        assert_eq!(outcome.error_paths(), [path], "{name:?}: {outcome}");
        assert!(
            !outcome.vm_started(),
            "{name:?}: no VM for a malformed payload"
        );
    }
    let duplicate = Job::script("true")
        .env("CI", "true")
        .env("CI", "false")
        .run(&worker);
    assert_eq!(
        duplicate.reason(),
        Some(ExceptionReason::MalformedPayload),
        "{duplicate}"
    );
    assert_eq!(duplicate.error_paths(), ["/env/CI"], "{duplicate}");
    assert!(
        duplicate.error_messages().contains("duplicate"),
        "{duplicate}"
    );
    assert!(!duplicate.vm_started());
    worker.assert_clean();
}

// --- logging (LoggingTestCase) ---

#[test]
fn the_target_text_is_logged_on_success_and_on_failure_and_absent_when_silent() {
    let worker = Worker::new();
    let target = "Hello World, this is the target text";
    let ok = Job::script(&format!("echo '{target}'")).run(&worker);
    assert_eq!(ok.state(), ResultState::Completed);
    assert!(ok.log().contains(target), "{}", ok.log());

    let failing = Job::script(&format!("echo '{target}' >&2; exit 3")).run(&worker);
    assert_eq!(
        (failing.state(), failing.report.exit_code),
        (ResultState::Failed, Some(3))
    );
    assert!(failing.log().contains(target), "{}", failing.log());

    let silent = Job::script("true").run(&worker);
    assert_eq!(silent.state(), ResultState::Completed);
    assert!(!silent.log().contains(target), "{}", silent.log());
    worker.assert_clean();
}

#[test]
fn the_log_is_live_while_the_command_runs() {
    let worker = Worker::new();
    let job_id = worker.submit(&Job::script(
        "echo first-line; while [ ! -e /tmp/never ]; do sleep 1; done",
    ));
    worker.serve();
    worker.wait_for_log(&job_id, 1, "first-line");
    assert_eq!(worker.status(&job_id)["state"], "running", "still running");
    // `logs --follow` shows it too, from the job CLI.
    let logs = worker.cli(&["logs", &job_id]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("first-line"));
    assert_eq!(worker.cli(&["cancel", &job_id]).status.code(), Some(0));
    wait_until(
        "the canceled job to end",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || (worker.status(&job_id)["state"] == "exception").then_some(()),
    )
    .expect("canceled");
}

// --- artifacts (ArtifactTestCase) ---

#[test]
fn file_and_nested_folder_artifacts_come_back_with_their_contents_and_names() {
    let worker = Worker::new();
    let outcome = Job::script(
        "mkdir -p /out/sub/deeper && echo hello > /out/sub/a.txt && echo deep > /out/sub/deeper/b.txt \
         && echo top > /out/top.txt && ln -s /etc/passwd /out/sub/escape && ln -s ../../etc /out/sub/updir",
    )
    .file_artifact("/out/top.txt", "public/top.txt")
    .directory_artifact("/out/sub", "public/sub")
    .run(&worker);
    assert_eq!(outcome.state(), ResultState::Completed, "{outcome}");
    assert_eq!(
        outcome.artifact("public/top.txt").as_deref(),
        Some(&b"top\n"[..])
    );
    let mut names = outcome.artifact_names();
    names.sort();
    assert_eq!(
        names,
        [
            "public/sub/a.txt",
            "public/sub/deeper/b.txt",
            "public/top.txt"
        ],
        "exactly the folder's files, by relative name; symlinks out of it not followed"
    );
    assert_eq!(
        outcome.artifact("public/sub/deeper/b.txt").as_deref(),
        Some(&b"deep\n"[..])
    );
    assert!(
        outcome.artifact("public/sub/escape").is_none(),
        "a symlink to /etc/passwd must not be followed"
    );
    for record in &outcome.report.artifacts {
        assert_eq!(record.sha256.len(), 64, "{outcome}");
    }
    worker.assert_clean();
}

#[test]
fn a_missing_file_or_folder_is_not_found_and_fails_the_job() {
    let worker = Worker::new();
    let outcome = Job::script("mkdir -p /there && echo x > /there/x")
        .file_artifact("/no/such/file.txt", "public/file.txt")
        .directory_artifact("/no/such/folder", "public/folder")
        .directory_artifact("/there", "public/there")
        .run(&worker);
    assert_eq!(outcome.state(), ResultState::Failed, "{outcome}");
    assert_eq!(outcome.exit_code, Some(1));
    assert_eq!(outcome.error_paths(), ["/artifacts/0", "/artifacts/1"]);
    let messages = outcome.error_messages();
    assert_eq!(messages.matches("not found").count(), 2, "{messages}");
    assert_eq!(
        outcome.artifact_names(),
        ["public/there/x"],
        "the rest still come back"
    );
    assert!(outcome.log().contains("[qemu-worker:error] /artifacts/0"));
    worker.assert_clean();
}

// --- kill (KillTestCase) ---

#[test]
fn max_run_time_exceeded_fails_the_job_and_ends_the_vm() {
    let worker = Worker::new();
    let outcome = Job::script("echo started; sleep 600")
        .max_run_time(5)
        .run(&worker);
    assert_eq!(outcome.state(), ResultState::Failed, "{outcome}");
    assert!(outcome.report.exit_code.is_none());
    assert!(
        outcome.log().contains("maxRunTime of 5 seconds exceeded"),
        "{}",
        outcome.log()
    );
    worker.assert_clean();
}

#[test]
fn cancel_while_running_ends_the_vm_and_resolves_canceled() {
    let worker = Worker::new();
    let job_id = worker.submit(&Job::script("echo running; sleep 600"));
    worker.serve();
    worker.wait_for_log(&job_id, 1, "running");
    let canceled = worker.cli(&["cancel", &job_id]);
    assert_eq!(canceled.status.code(), Some(0));
    // Bounded: the heartbeat (1 s) sees the cancel, then the VM is stopped (5 s).
    let status = wait_until(
        "the canceled job to resolve",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let status = worker.status(&job_id);
            (status["state"] != "running").then_some(status)
        },
    )
    .expect("resolved");
    assert_eq!(status["state"], "exception");
    assert_eq!(status["report"]["reason"], "canceled");
    wait_until(
        "the VM to be gone",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || worker.leftovers().is_empty().then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}: {:#?}", worker.leftovers()));
}

// --- display (the screenshot half of DisplayTestCase) ---

#[test]
fn the_final_screenshot_is_a_png_of_the_guest_display() {
    let worker = Worker::new();
    let outcome = Job::script("echo on-screen > /dev/tty0").run(&worker);
    assert_eq!(outcome.state(), ResultState::Completed);
    assert_eq!(
        outcome.report.screenshot.as_deref(),
        Some("screenshots/final.png")
    );
    let png = std::fs::read(outcome.job_dir.join("screenshots/final.png")).expect("screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let width = u32::from_be_bytes([png[16], png[17], png[18], png[19]]);
    let height = u32::from_be_bytes([png[20], png[21], png[22], png[23]]);
    // The test image leaves the standard VGA adapter in 80x25 text mode: 720x400.
    assert_eq!((width, height), (720, 400));
    worker.assert_clean();
}
