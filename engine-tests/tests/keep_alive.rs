//! A failed job's VM kept for a look (payload `debug.keepAliveOnFailure`) on the test
//! image under `serve`: the job's result is recorded at once, its VM stays up (its log
//! says how to reach it, a screenshot on demand answers, its slot stays taken), the
//! CLI's `release` lets it go, and another one is torn down when its time is up; both
//! leave nothing behind. A success keeps nothing; asking for more than the worker
//! allows is a malformed payload naming the field.

use std::time::Duration;

use engine_tests::{Job, Worker, base_config, free_port, wait_until, with_setting};
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

fn log_of(worker: &Worker, id: &str) -> String {
    std::fs::read_to_string(worker.state().join(format!("jobs/{id}/run-1/job.log")))
        .unwrap_or_default()
}

fn wait_for(worker: &Worker, what: &str, seconds: u64, mut done: impl FnMut() -> bool) {
    wait_until(
        what,
        Duration::from_secs(seconds),
        Duration::from_millis(200),
        || done().then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}; serve said:\n{}", worker.serve_log()));
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
    wait_for(&worker, "the job to fail", 240, || {
        worker.status(&kept)["state"] == "failed"
    });
    let status = worker.status(&kept);
    assert_eq!(status["report"]["exitCode"], 3, "{status}");
    let log = log_of(&worker, &kept);
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
    wait_for(&worker, "the next job to complete", 240, || {
        worker.status(&next)["state"] == "completed"
    });
    wait_for(&worker, "the kept VM to be torn down", 60, || {
        log_of(&worker, &kept).contains("torn down: it was released") && vms(&worker).is_empty()
    });
    assert!(
        !log_of(&worker, &next).contains("kept running"),
        "a success keeps nothing"
    );
    let again = cli(&["release", &kept]);
    let said = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(2), "{said}");
    assert!(said.contains("409 not-kept"), "{said}");

    // When its time is up, it goes by itself.
    let timed = worker.submit(&failing(1));
    wait_for(&worker, "the second job to fail", 240, || {
        worker.status(&timed)["state"] == "failed"
    });
    assert_eq!(vms(&worker).len(), 1);
    wait_for(&worker, "the kept VM's time to run out", 180, || {
        log_of(&worker, &timed).contains("torn down: its time was up")
    });
    wait_for(&worker, "nothing left behind", 30, || {
        worker.leftovers().is_empty()
    });

    // More than the worker keeps: refused, naming the field.
    let greedy = worker.submit(&failing(6));
    wait_for(&worker, "the greedy job to be refused", 60, || {
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
