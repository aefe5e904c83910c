//! Isolation through the engine: two jobs run at once through `serve`; each guest sees
//! only its own task, and neither reaches a service on the host's loopback or on any of
//! the host's addresses.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use engine_tests::{Job, Worker, wait_until};

/// Accepts (and counts) connections on `listener` for the rest of the test.
fn count_connections(listener: TcpListener) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&count);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if stream.is_ok() {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    count
}

/// The host's IPv4 addresses, from `ip -4 -o addr`.
fn host_addresses() -> Vec<String> {
    let output = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .expect("ip (apt-get install iproute2)");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|cidr| cidr.split('/').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn concurrent_guests_see_only_their_own_task_and_never_reach_the_host() {
    let worker = Worker::new();
    let listener = TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let connections = count_connections(listener);
    // The host as the guest's gateway (slirp's alias for the host), and every host address.
    let mut targets = vec!["169.254.169.2".to_owned()];
    targets.extend(host_addresses());
    assert!(targets.iter().any(|t| t == "127.0.0.1"));
    // busybox nc: the same tool for the probe that must work (the metadata service,
    // proving nc itself works in the guest) and for the ones that must not.
    // (busybox's static wget crashes in this image, so it is not used.)
    let probes: String = targets
        .iter()
        .map(|t| {
            format!(
                "if nc -w 3 {t} {port} </dev/null >/dev/null 2>&1; \
                 then echo REACHED-{t}; else echo BLOCKED-{t}; fi; "
            )
        })
        .collect();
    let job = |marker: &str| {
        Job::script(&format!(
            "printf 'GET /v1/task HTTP/1.0\\r\\n\\r\\n' | nc -w 10 169.254.169.254 80; echo; {probes} \
             sleep 3; echo end-of-{marker}"
        ))
        .env("MARKER", marker)
    };
    let a = worker.submit(&job("vm-a-marker"));
    let b = worker.submit(&job("vm-b-marker"));
    worker.serve();
    for id in [&a, &b] {
        wait_until(
            "both jobs to complete",
            Duration::from_secs(240),
            Duration::from_millis(200),
            || (worker.status(id)["state"] == "completed").then_some(()),
        )
        .unwrap_or_else(|e| panic!("{e}; serve said:\n{}", worker.serve_log()));
    }
    for (id, own, other) in [
        (&a, "vm-a-marker", "vm-b-marker"),
        (&b, "vm-b-marker", "vm-a-marker"),
    ] {
        let log =
            std::fs::read_to_string(worker.state().join("jobs").join(id).join("run-1/job.log"))
                .expect("log");
        assert!(
            log.contains(&format!("\"MARKER\":\"{own}\"")),
            "its own task: {log}"
        );
        assert!(!log.contains(other), "never the other VM's task: {log}");
        for target in &targets {
            assert!(
                log.lines().any(|l| l == format!("BLOCKED-{target}")),
                "{target}: {log}"
            );
        }
        assert!(!log.lines().any(|l| l.starts_with("REACHED")), "{log}");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "no guest connection reached the host"
    );
    // Both ran at the same time (capacity 2): the second started before the first ended.
    let started = |id: &str| {
        std::fs::metadata(worker.state().join("jobs").join(id).join("run-1/job.log"))
            .and_then(|m| m.created())
            .expect("created")
    };
    let ended = |id: &str| {
        std::fs::metadata(
            worker
                .state()
                .join("jobs")
                .join(id)
                .join("run-1/report.json"),
        )
        .and_then(|m| m.modified())
        .expect("modified")
    };
    assert!(
        started(&b) < ended(&a) && started(&a) < ended(&b),
        "the two guests overlapped"
    );
}
