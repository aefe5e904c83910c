//! Faults: the guest powers off before reporting, QEMU is killed from outside, the
//! worker is killed and restarted, and the disk fills up while an image downloads or an
//! artifact arrives.

use std::time::Duration;

use engine_tests::assets::test_image;
use engine_tests::{Job, Worker, config_with_images, wait_until};
use qemu_worker::job::{ExceptionReason, ResultState};
use test_support::processes_under;

#[test]
fn a_guest_that_powers_off_before_reporting_fails_the_job_with_the_console_tail() {
    let worker = Worker::new();
    let outcome = Job::script("echo going down; poweroff -f").run(&worker);
    assert_eq!(outcome.state(), ResultState::Failed, "{outcome}");
    assert!(outcome.report.exit_code.is_none(), "{outcome}");
    let log = outcome.log();
    assert!(log.contains("going down"), "{log}");
    assert!(
        log.contains(
            "the VM ended before the guest reported a result: the guest powered itself off"
        ) && log.contains("console: QEMU-WORKER-INIT"),
        "the log says why, with the console's tail: {log}"
    );
    worker.assert_clean();
}

#[test]
fn qemu_killed_from_outside_fails_the_job_and_leaves_nothing() {
    let worker = Worker::new();
    let mut run = Job::script("echo running; sleep 600").start(&worker);
    run.wait_for_log("running");
    let qemu: Vec<i32> = processes_under(worker.dir())
        .iter()
        .filter(|p| p.contains("qemu-system"))
        .filter_map(|p| p.split(':').next()?.parse().ok())
        .collect();
    assert_eq!(qemu.len(), 1, "one QEMU: {qemu:?}");
    let pid = rustix::process::Pid::from_raw(qemu[0]).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill QEMU");
    let outcome = run.finish();
    assert_eq!(outcome.exit_code, Some(1), "{outcome}");
    assert_eq!(outcome.state(), ResultState::Failed, "{outcome}");
    let log = std::fs::read_to_string(outcome.job_dir.join("job.log")).expect("log");
    // In words, with the signal, in the report and the log; never Rust's debug text.
    let sentence =
        "the VM ended before the guest reported a result: QEMU was killed by signal 9 (SIGKILL)";
    assert!(outcome.first_error().starts_with(sentence), "{outcome}");
    assert!(
        log.contains(sentence),
        "the log says QEMU was killed: {log}"
    );
    assert!(!log.contains("QemuFailed"), "{log}");
    worker.assert_clean();
}

#[test]
fn a_killed_worker_restarts_clean_and_its_job_runs_again() {
    let worker = Worker::new();
    let job_id = worker.submit(&Job::script("echo started; sleep 5; echo finished"));
    let first = worker.serve();
    worker.wait_for_log(&job_id, 1, "started");
    worker.signal(first, rustix::process::Signal::KILL);
    worker.wait_exit(first, Duration::from_secs(10));
    let stale: Vec<_> = std::fs::read_dir(worker.state().join("run"))
        .expect("run dirs")
        .flatten()
        .collect();
    assert_eq!(
        stale.len(),
        1,
        "the killed worker left its run dir: {stale:?}"
    );

    // Restarted: it cleans up at once, and runs the job again once its lease expired.
    worker.serve();
    let status = wait_until(
        "the job to complete as run 2",
        Duration::from_secs(180),
        Duration::from_millis(200),
        || {
            let status = worker.status(&job_id);
            (status["state"] == "completed").then_some(status)
        },
    )
    .unwrap_or_else(|e| panic!("{e}; serve said:\n{}", worker.serve_log()));
    assert_eq!(status["runId"], 2, "{status}");
    let log2 = worker
        .state()
        .join("jobs")
        .join(&job_id)
        .join("run-2/job.log");
    assert!(
        std::fs::read_to_string(log2)
            .expect("log")
            .contains("finished")
    );
    let serve_log = worker.serve_log();
    assert!(
        serve_log.contains("cleaned up after an earlier worker"),
        "{serve_log}"
    );
    worker.assert_clean();
}

/// A small tmpfs mounted for the test (the real ENOSPC), in a mount namespace of the
/// test's own: the host never sees it, and it cannot outlive the test even if the test
/// is killed before its drop runs. The namespace belongs to the calling thread and the
/// processes it starts afterwards (the worker under test).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(path: &std::path::Path, size: &str) -> Self {
        std::fs::create_dir_all(path).expect("mount point");
        // SAFETY: NEWNS leaves the file descriptor table shared; only FILES is unsafe.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }
            .expect("a private mount namespace needs root (this case fills a real file system)");
        let private = std::process::Command::new("mount")
            .args(["--make-rprivate", "/"])
            .status()
            .expect("mount");
        assert!(private.success(), "mount --make-rprivate / failed");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (this case fills a real file system)"
        );
        Self(path.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Every file (not directory) under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path.display().to_string());
        }
    }
    files
}

/// Serves `body` at every path on 127.0.0.1; returns the base URL.
fn serve_bytes(body: Vec<u8>) -> String {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("http server");
    let url = format!("http://{}", server.server_addr());
    std::thread::spawn(move || {
        for request in server.incoming_requests() {
            let _ = request.respond(tiny_http::Response::from_data(body.clone()));
        }
    });
    url
}

#[test]
fn a_full_disk_while_downloading_is_a_resource_error_and_the_cache_stays_consistent() {
    let worker = Worker::with_config(&config_with_images(
        "{dir: '{dir}/cache', minFreeSpace: 0 B, allowedLocalDirs: [{allowed}]}",
    ));
    // Room for the cache's index, not for the test image's disk.
    let _disk = SmallDisk::mount(&worker.dir().join("cache"), "4M");
    let url = serve_bytes(std::fs::read(test_image()).expect("image"));
    let outcome = Job::script("true")
        .image(&format!("{url}/qemu-worker-test.tar.zst"))
        .run(&worker);
    assert_eq!(
        (outcome.state(), outcome.reason()),
        (
            ResultState::Exception,
            Some(ExceptionReason::ResourceUnavailable)
        ),
        "{outcome}"
    );
    assert_eq!(outcome.exit_code, Some(3));
    assert_eq!(outcome.error_paths(), ["/image"]);
    assert!(!outcome.vm_started());
    // Consistent: no partial object left, nothing listed, and the cache still works.
    let leftovers: Vec<String> = files_under(&worker.dir().join("cache"))
        .into_iter()
        .filter(|n| !n.ends_with(".json") && !n.ends_with(".lock"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "partial downloads left: {leftovers:?}"
    );
    let listed = worker.cli(&["image", "list", "--json"]);
    assert_eq!(
        listed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(listed, serde_json::json!([]), "nothing cached");
    worker.assert_clean();
}

#[test]
fn a_full_disk_while_an_artifact_arrives_names_enospc_and_keeps_nothing_of_it() {
    let worker = Worker::new();
    // The job directories on a disk with room for the logs, not for the artifact.
    let _disk = SmallDisk::mount(&worker.state().join("jobs"), "2M");
    let outcome = Job::script("head -c 8388608 /dev/zero > /tmp/big.bin && echo made")
        .file_artifact("/tmp/big.bin", "public/big.bin")
        .file_artifact("/etc/passwd", "later/passwd")
        .run(&worker);
    assert_eq!(outcome.state(), ResultState::Failed, "{outcome}");
    let message = outcome.first_error();
    assert!(
        message.starts_with("artifact public/big.bin: cannot write public/big.bin")
            && message.contains("No space left on device (os error 28)"),
        "{outcome}"
    );
    assert_eq!(outcome.error_paths(), ["/artifacts/0"]);
    assert!(
        outcome.log().contains("No space left on device"),
        "{}",
        outcome.log()
    );
    // Nothing of it, and the space it took is free again for the next artifact.
    assert!(!outcome.job_dir.join("artifacts/public/big.bin").exists());
    assert!(!outcome.job_dir.join(".partial").exists());
    assert_eq!(outcome.artifact_names(), ["later/passwd"]);
    assert!(outcome.artifact("later/passwd").is_some());
    worker.assert_clean();
}
