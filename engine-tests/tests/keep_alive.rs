//! A failed job's VM kept for a look (payload `debug.keepAliveOnFailure`) on the test
//! image under `serve`: the job's result is recorded at once, its VM stays up (its log
//! says how to reach it, a screenshot on demand answers, its slot stays taken), the
//! CLI's `release` lets it go, and another one is torn down when its time is up; both
//! leave nothing behind. A success keeps nothing; asking for more than the worker
//! allows is a malformed payload naming the field.

use std::time::Duration;

use engine_tests::{Job, Worker, base_config, free_port, with_setting};
use sha2::{Digest, Sha256};

const TOKEN: &str = "qwt_keepalive-test-token-0000000000000000000000000000000000000000";

fn failing(minutes: u32) -> Job {
    Job::script("echo about-to-fail; exit 3")
        .extra(&format!("debug: {{keepAliveOnFailure: {minutes}}}\n"))
}

/// QEMU processes of the worker's jobs (under its run dirs).
fn vms(worker: &Worker) -> Vec<String> {
    test_support::processes_under(&worker.state().join("run"))
        .into_iter()
        .filter(|p| p.contains("qemu-system"))
        .collect()
}

#[test]
fn a_failed_jobs_vm_is_kept_until_released_or_its_time_is_up() {
    let port = free_port();
    let sha256: String = Sha256::digest(TOKEN.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let config = with_setting(
        &with_setting(
            &with_setting(&base_config(), "capacity", "1"),
            "api",
            &format!(
                "{{listen: \"127.0.0.1:{port}\", tokens: [{{name: t, scope: submit, sha256: {sha256}}}]}}"
            ),
        ),
        "debug",
        "{maxKeepAliveMinutes: 5}",
    );
    let worker = Worker::with_config(&config);
    let _serve = worker.serve();
    let cli = |args: &[&str]| {
        worker
            .command(args)
            .env("QEMU_WORKER_TOKEN", TOKEN)
            .output()
            .expect("qemu-worker runs")
    };

    // Failed, with its result recorded, and its VM still up.
    let kept = worker.submit(&failing(1));
    worker.wait_for("the job to fail", 240, || {
        worker.status(&kept)["state"] == "failed"
    });
    let status = worker.status(&kept);
    assert_eq!(status["report"]["exitCode"], 3, "{status}");
    let log = worker.job_log(&kept);
    assert!(
        log.contains("its VM is kept running for 1 minute(s)")
            && log.contains(&format!("qemu-worker release {kept}")),
        "the log says how to reach it:\n{log}"
    );
    assert_eq!(vms(&worker).len(), 1, "the VM runs: {:?}", vms(&worker));
    let shot = worker.dir().join("kept.png");
    let taken = cli(&["screenshot", &kept, "--out", &shot.display().to_string()]);
    assert!(
        taken.status.success(),
        "{}",
        String::from_utf8_lossy(&taken.stderr)
    );
    assert!(
        std::fs::read(&shot)
            .expect("the screenshot")
            .starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG"
    );
    // Its slot stays taken (capacity 1): the next job waits.
    let next = worker.submit(&Job::script("echo next-ran"));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(worker.status(&next)["state"], "pending");

    // Released: torn down, and the slot free again.
    let released = cli(&["release", &kept]);
    assert!(
        released.status.success(),
        "{}",
        String::from_utf8_lossy(&released.stderr)
    );
    worker.wait_for("the next job to complete", 240, || {
        worker.status(&next)["state"] == "completed"
    });
    worker.wait_for("the kept VM to be torn down", 60, || {
        worker.job_log(&kept).contains("torn down: it was released") && vms(&worker).is_empty()
    });
    assert!(
        !worker.job_log(&next).contains("kept running"),
        "a success keeps nothing"
    );
    let again = cli(&["release", &kept]);
    let said = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(2), "{said}");
    assert!(said.contains("409 not-kept"), "{said}");

    // When its time is up, it goes by itself.
    let timed = worker.submit(&failing(1));
    worker.wait_for("the second job to fail", 240, || {
        worker.status(&timed)["state"] == "failed"
    });
    assert_eq!(vms(&worker).len(), 1);
    worker.wait_for("the kept VM's time to run out", 180, || {
        worker
            .job_log(&timed)
            .contains("torn down: its time was up")
    });
    worker.wait_for("nothing left behind", 30, || worker.leftovers().is_empty());

    // More than the worker keeps: refused, naming the field.
    let greedy = worker.submit(&failing(6));
    worker.wait_for("the greedy job to be refused", 60, || {
        worker.status(&greedy)["state"] == "exception"
    });
    let refused = worker.status(&greedy);
    assert_eq!(
        refused["report"]["reason"], "malformed-payload",
        "{refused}"
    );
    assert!(
        refused["report"]["errors"]
            .to_string()
            .contains("/debug/keepAliveOnFailure"),
        "{refused}"
    );
}
