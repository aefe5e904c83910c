//! Isolation through the engine: two jobs run at once through `serve`; each guest sees
//! only its own task, and neither reaches a service on the host's loopback or on any of
//! the host's addresses.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use engine_tests::{Job, Worker, base_config, wait_until};
use qemu_worker::job::ResultState;

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

/// A stand-in for the internet: a network namespace behind a veth from the host, with a
/// public (TEST-NET-2) address and a private one routed to it, and a service on both
/// that answers with the address the connection came from. Removed on drop, with the
/// host's forwarding switch and NAT table as they were.
struct Internet {
    netns: String,
    port: u16,
    forwarding_was: String,
    table_existed: bool,
}

const PUBLIC: &str = "198.51.100.2";
const HOST_ON_THE_INTERNET: &str = "198.51.100.1";
const PRIVATE: &str = "10.203.0.2";

fn ip(args: &[&str]) {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("ip (apt-get install iproute2)");
    assert!(status.success(), "ip {args:?}");
}

impl Internet {
    fn new() -> Self {
        assert_eq!(
            rustix::process::geteuid().as_raw(),
            0,
            "outbound NAT needs network: tap, which needs root; run the suite as root (CI does)"
        );
        let forwarding_was =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("ip_forward");
        let table_existed = std::process::Command::new("nft")
            .args(["list", "table", "inet", "qemu_worker_outbound"])
            .stderr(std::process::Stdio::null())
            .status()
            .expect("nft (apt-get install nftables)")
            .success();
        let id = std::process::id() % 100_000;
        let netns = format!("qwt-inet-{id}");
        let host_end = format!("qwti{id}");
        ip(&["netns", "add", &netns]);
        let mut internet = Self {
            netns,
            port: 0,
            forwarding_was,
            table_existed,
        };
        let ns = internet.netns.as_str();
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{HOST_ON_THE_INTERNET}/24"),
            "dev",
            &host_end,
        ]);
        ip(&["link", "set", &host_end, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{PUBLIC}/24"),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{PRIVATE}/32"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["route", "add", "10.203.0.0/24", "via", PUBLIC]);
        let listener = internet.bind_inside();
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                use std::io::Write;
                let peer = stream.peer_addr().map(|a| a.ip().to_string());
                let _ = writeln!(stream, "INTERNET-SAW-{}", peer.unwrap_or_default());
            }
        });
        internet.port = port;
        internet
    }

    /// A listener on every address of the namespace (a thread enters it to bind).
    fn bind_inside(&self) -> TcpListener {
        let path = format!("/run/netns/{}", self.netns);
        std::thread::spawn(move || {
            use std::os::fd::AsFd;
            let file = std::fs::File::open(path).expect("netns");
            rustix::thread::move_into_link_name_space(
                file.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("setns");
            TcpListener::bind("0.0.0.0:0").expect("bind inside")
        })
        .join()
        .expect("bind thread")
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["route", "del", "10.203.0.0/24"])
            .status();
        // Deleting the namespace deletes the veth pair.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", &self.forwarding_was);
        if !self.table_existed {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", "inet", "qemu_worker_outbound"])
                .status();
        }
    }
}

#[test]
fn outbound_jobs_reach_public_addresses_through_nat_and_nothing_else() {
    let internet = Internet::new();
    let port = internet.port;
    // Positive controls from the host: both services of the "internet" answer.
    for target in [PUBLIC, PRIVATE] {
        let stream = std::net::TcpStream::connect_timeout(
            &format!("{target}:{port}").parse().expect("address"),
            Duration::from_secs(5),
        );
        assert!(stream.is_ok(), "the host reaches {target}: {stream:?}");
    }
    let host_listener = TcpListener::bind("0.0.0.0:0").expect("bind");
    let host_port = host_listener.local_addr().expect("addr").port();
    let host_connections = count_connections(host_listener);

    let mut config = base_config();
    config.push_str("network: {backend: tap, allowOutbound: true}\n");
    let worker = Worker::with_config(&config);
    // Must not reach: the private address (routed, as the control showed), the host on
    // its internet-facing address, loopback, the guest's gateway, and the metadata
    // address on another port.
    let blocked = [
        format!("{PRIVATE} {port}"),
        format!("{HOST_ON_THE_INTERNET} {host_port}"),
        format!("127.0.0.1 {host_port}"),
        format!("169.254.169.2 {host_port}"),
        "169.254.169.254 8080".to_owned(),
    ];
    let probes: String = blocked
        .iter()
        .map(|t| {
            format!(
                "if nc -w 3 {t} </dev/null >/dev/null 2>&1; \
                 then echo REACHED-{t}; else echo BLOCKED-{t}; fi; "
            )
        })
        .collect();
    let script = format!(
        "printf 'GET /v1/ping HTTP/1.0\\r\\n\\r\\n' | nc -w 10 169.254.169.254 80; echo; \
         nc -w 5 {PUBLIC} {port} </dev/null || echo NO-INTERNET; {probes}"
    );
    let outbound = Job::script(&script)
        .extra("network: {outbound: true}")
        .run(&worker);
    let log = outbound.log();
    assert_eq!(outbound.state(), ResultState::Completed, "{log}");
    assert!(
        log.contains(r#"{"status":"ok"}"#),
        "metadata still works: {log}"
    );
    assert!(
        log.lines()
            .any(|l| l == format!("INTERNET-SAW-{HOST_ON_THE_INTERNET}")),
        "the guest reaches the public address, masqueraded behind the host: {log}"
    );
    for target in &blocked {
        assert!(
            log.lines().any(|l| l == format!("BLOCKED-{target}")),
            "{target}: {log}"
        );
    }
    assert!(!log.contains("REACHED-"), "{log}");

    // The same probe from a job that did not ask: no route out at all.
    let closed = Job::script(&format!(
        "nc -w 3 {PUBLIC} {port} </dev/null || echo NO-INTERNET"
    ))
    .run(&worker);
    assert_eq!(closed.state(), ResultState::Completed, "{}", closed.log());
    assert!(
        closed.log().lines().any(|l| l == "NO-INTERNET"),
        "{}",
        closed.log()
    );
    assert!(!closed.log().contains("INTERNET-SAW"), "{}", closed.log());
    assert_eq!(host_connections.load(Ordering::SeqCst), 0);
    // No outbound link outlives its VM.
    let links = std::fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("qwo"))
        .count();
    assert_eq!(links, 0, "outbound veths left behind");
    worker.assert_clean();
    drop(internet);
}
