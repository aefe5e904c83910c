//! Soak: 30 consecutive jobs through one `serve`, with nothing leaked (processes, run
//! dirs with their sockets and overlays, file descriptors) and a stable worker RSS.

use std::time::Duration;

use engine_tests::{Job, Worker, wait_until};
use test_support::rss_kib;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Submits `count` jobs and waits until all completed.
fn run_batch(worker: &Worker, from: usize, count: usize) {
    let ids: Vec<String> = (from..from + count)
        .map(|n| worker.submit(&Job::script(&format!("echo soak-{n}"))))
        .collect();
    for id in &ids {
        let status = wait_until(
            "a soak job to finish",
            Duration::from_secs(300),
            Duration::from_millis(200),
            || {
                let status = worker.status(id);
                (status["state"] != "pending" && status["state"] != "running").then_some(status)
            },
        )
        .unwrap_or_else(|e| panic!("{e}; serve said:\n{}", worker.serve_log()));
        assert_eq!(status["state"], "completed", "{status}");
    }
}

#[test]
fn thirty_jobs_through_serve_leak_nothing_and_keep_rss_stable() {
    let worker = Worker::new();
    let serve = worker.serve();
    // Warm up (first image unpack, first runtime allocations), then measure.
    run_batch(&worker, 0, 6);
    let (rss_before, fds_before) = (rss_kib(serve), open_fds(serve));
    worker.assert_clean();
    run_batch(&worker, 6, 24);
    let (rss_after, fds_after) = (rss_kib(serve), open_fds(serve));
    worker.assert_clean();
    assert_eq!(fds_after, fds_before, "file descriptors leaked");
    let growth = rss_after.saturating_sub(rss_before);
    assert!(
        growth <= 4 * 1024,
        "worker RSS grew {growth} KiB over 24 jobs ({rss_before} -> {rss_after} KiB)"
    );
    let logs: Vec<String> = std::fs::read_dir(worker.state().join("jobs"))
        .expect("jobs")
        .flatten()
        .map(|j| std::fs::read_to_string(j.path().join("run-1/job.log")).unwrap_or_default())
        .collect();
    assert_eq!(logs.len(), 30);
    for n in 0..30 {
        assert!(
            logs.iter().any(|l| l.contains(&format!("soak-{n}\n"))),
            "job {n} logged its line"
        );
    }
}
