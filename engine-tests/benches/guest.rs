//! Guest channel benchmarks on the test image under TCG, each next to its baseline:
//!
//! 1. Metadata GET latency from inside the guest (200 requests, p50/p99, measured by the
//!    guest tools themselves), next to the same request made on the host to the unix
//!    socket.
//! 2. Log streaming throughput: 64 MiB of command output, guest → job log.
//! 3. Artifact throughput for a 256 MiB file through the agent port, next to a raw
//!    `cat` of the same file into a second virtio-serial port. Goal: ≥ 0.5×.
//! 4. Shell keystroke round trip (a key typed into a shell's terminal until the guest's
//!    echo of it comes back through the agent port), p50/p99 of 200, next to the
//!    quickest way qemu-ga offers: `guest-exec` of `echo` with its output.
//!
//! `cargo bench -p engine-tests --bench guest` (needs images/build-test-image). The
//! guestfwd helper is the worker binary's (QEMU_WORKER_BIN, which bench/run sets to the
//! release build; otherwise target/debug's).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use engine_tests::vm::{cached_test_image, metadata_network, test_launch, test_machine};
use qemu_worker::artifacts::{AgentClient, ShellEvent, ShellRequest};
use qemu_worker::job::ArtifactKind;
use qemu_worker::metadata::{
    LogSink, MetadataHandle, MetadataLimits, Task, start_metadata_service,
};
use qemu_worker::vm::{RunDir, Vm, VmTimeouts};
use test_support::figure;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIG: u64 = 256 << 20;
const LOG_BYTES: u64 = 64 << 20;

struct Started {
    vm: Vm,
    service: MetadataHandle,
    log: PathBuf,
}

async fn start(
    scratch: &Path,
    lease: &qemu_worker::image::ImageLease,
    name: &str,
    script: &str,
    extra: &[String],
) -> Started {
    let machine = test_machine(lease, name, 1024, |_| {});
    let socket = RunDir::new(&scratch.join(name))
        .expect("run dir")
        .metadata_socket();
    let mut launch = test_launch(lease, &machine, scratch, name, metadata_network(&socket)).await;
    launch.argv.extend_from_slice(extra);
    std::fs::create_dir_all(launch.job_dir.path()).expect("log dir");
    let log = launch.job_dir.log();
    let sink = LogSink::create(&log, 1 << 30).await.expect("log");
    let task = Task {
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: BTreeMap::new(),
        max_run_time: 600,
        working_directory: "/root".into(),
    };
    let service =
        start_metadata_service(Path::new(&socket), &task, sink, MetadataLimits::default())
            .await
            .expect("service");
    let vm = Vm::start(launch, VmTimeouts::default())
        .await
        .expect("start");
    Started { vm, service, log }
}

async fn host_ping(socket: &Path) -> Duration {
    let start = Instant::now();
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    stream
        .write_all(b"GET /v1/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.expect("read");
    assert!(reply.starts_with(b"HTTP/1.1 200"));
    start.elapsed()
}

fn main() {
    let scratch = tempfile::Builder::new()
        .prefix("qw-bg")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let (cache, lease) = cached_test_image(scratch.path()).await;
        metadata_latency(scratch.path(), &lease).await;
        log_throughput(scratch.path(), &lease).await;
        artifact_throughput(scratch.path(), &lease).await;
        shell_round_trip(scratch.path(), &lease).await;
        drop(lease);
        cache.close().await;
    });
}

async fn metadata_latency(scratch: &Path, lease: &qemu_worker::image::ImageLease) {
    let mut s = start(
        scratch,
        lease,
        "lat",
        "/usr/bin/qemu-worker-guest bench-metadata 200",
        &[],
    )
    .await;
    s.vm.resume().await.expect("cont");
    tokio::time::timeout(Duration::from_secs(300), s.service.result())
        .await
        .expect("result");
    s.service_log_flush().await;
    let text = std::fs::read_to_string(&s.log).expect("log");
    let line = text
        .lines()
        .find(|l| l.starts_with("bench-metadata:"))
        .unwrap_or("bench-metadata: no result");
    let socket = s.service.socket().expect("a unix socket").to_path_buf();
    let mut host: Vec<f64> = Vec::new();
    for _ in 0..200 {
        host.push(host_ping(&socket).await.as_secs_f64() * 1e6);
    }
    host.sort_by(f64::total_cmp);
    let field = |name: &str| -> f64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    for (label, guest, on_host) in [
        ("p50", field("p50_us="), host[100]),
        ("p99", field("p99_us="), host[197]),
    ] {
        figure::Figure {
            figure: &format!("metadata GET latency from the guest, {label} of 200"),
            unit: "µs",
            samples: &[guest],
            baseline_name: "the same request on the host's unix socket",
            baseline: &[on_host],
            goal: "",
            met: None,
            note: "under TCG, through slirp and one guestfwd helper process per connection",
            ..Default::default()
        }
        .emit();
    }
    println!("metadata GET /v1/ping latency, 200 requests (µs)");
    println!("  from inside the guest (TCG, user-mode network, guestfwd helper): {line}");
    println!(
        "  baseline: same request on the host to the unix socket: p50_us={:.0} p99_us={:.0}",
        host[100], host[197]
    );
    s.vm.teardown().await;
}

impl Started {
    async fn service_log_flush(&self) {
        // The service appends as it receives; give the log writer a moment to settle.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn log_throughput(scratch: &Path, lease: &qemu_worker::image::ImageLease) {
    let mut rates = Vec::new();
    for round in 0..3 {
        rates.push(log_throughput_once(scratch, lease, round).await);
    }
    println!(
        "\nlog streaming, {} MiB of output from task start to result: median {:.1} MB/s (all {rates:.1?})",
        LOG_BYTES >> 20,
        figure::median(&rates)
    );
    figure::Figure {
        figure: "log streaming throughput (guest to job log)",
        unit: "MB/s",
        samples: &rates,
        goal: "",
        met: None,
        note: "no baseline of its own: it is the baseline of the QGA figure",
        ..Default::default()
    }
    .emit();
}

async fn log_throughput_once(
    scratch: &Path,
    lease: &qemu_worker::image::ImageLease,
    round: usize,
) -> f64 {
    let script = format!("head -c {LOG_BYTES} /dev/zero");
    let mut s = start(scratch, lease, &format!("logs{round}"), &script, &[]).await;
    s.vm.resume().await.expect("cont");
    assert!(s.service.task_fetched().await);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(600), s.service.result())
        .await
        .expect("result");
    let seconds = started.elapsed().as_secs_f64();
    s.service_log_flush().await;
    let bytes = std::fs::metadata(&s.log).map(|m| m.len()).unwrap_or(0);
    assert_eq!(bytes, LOG_BYTES, "the whole output reached the log");
    s.vm.teardown().await;
    bytes as f64 / 1e6 / seconds
}

async fn timed_fetch(agent: &mut AgentClient, scratch: &Path, verify: bool, name: &str) -> f64 {
    let start = Instant::now();
    let limits = qemu_worker::config::ArtifactStoreConfig::default();
    let fetched = agent
        .fetch_one(
            "/tmp/big",
            ArtifactKind::File,
            scratch,
            name,
            &limits,
            verify,
        )
        .await
        .expect("fetch");
    assert_eq!(fetched.files[0].size, BIG);
    start.elapsed().as_secs_f64()
}

async fn artifact_throughput(scratch: &Path, lease: &qemu_worker::image::ImageLease) {
    let raw_socket = scratch.join("raw.sock");
    let extra = vec![
        "-chardev".to_owned(),
        format!(
            "socket,id=raw0,path={},server=on,wait=off",
            raw_socket.display()
        ),
        "-device".to_owned(),
        "virtserialport,bus=vser0.0,chardev=raw0,name=org.qemu-worker.bench.0".to_owned(),
    ];
    let script = format!(
        "head -c {BIG} /dev/urandom > /tmp/big && \\
         p=$(grep -l org.qemu-worker.bench.0 /sys/class/virtio-ports/*/name) && \\
         dev=/dev/$(basename $(dirname $p)) && cat /tmp/big > $dev && echo sent"
    );
    let mut s = start(scratch, lease, "art", &script, &extra).await;
    // Connect to the raw port before the guest runs, so no byte can be missed.
    let mut raw = tokio::net::UnixStream::connect(&raw_socket)
        .await
        .expect("raw port");
    s.vm.resume().await.expect("cont");
    let raw_out = scratch.join("raw.bin");
    let mut file = tokio::fs::File::create(&raw_out).await.expect("raw out");
    let mut buffer = vec![0u8; 1 << 20];
    let mut received: u64 = 0;
    let mut first: Option<Instant> = None;
    while received < BIG {
        let n = raw.read(&mut buffer).await.expect("raw read");
        assert!(n > 0, "the raw port closed early");
        first.get_or_insert_with(Instant::now);
        file.write_all(&buffer[..n]).await.expect("write");
        received += n as u64;
    }
    let raw_seconds = first.map_or(1.0, |t| t.elapsed().as_secs_f64());
    tokio::time::timeout(Duration::from_secs(600), s.service.result())
        .await
        .expect("result");

    let mut agent = AgentClient::connect(
        Path::new(&s.vm.run_dir().agent_socket()),
        Duration::from_secs(60),
    )
    .await
    .expect("agent");
    let mut agent_rates = Vec::new();
    for _ in 0..3 {
        let seconds = timed_fetch(&mut agent, scratch, false, "agent.bin").await;
        agent_rates.push(BIG as f64 / 1e6 / seconds);
        let _ = std::fs::remove_file(scratch.join("agent.bin"));
    }
    let verified_seconds = timed_fetch(&mut agent, scratch, true, "agent-verified.bin").await;
    let raw_rate = BIG as f64 / 1e6 / raw_seconds;
    let agent_rate = figure::median(&agent_rates);
    let agent_seconds = BIG as f64 / 1e6 / agent_rate;
    let verified_rate = BIG as f64 / 1e6 / verified_seconds;
    let ratio = agent_rate / raw_rate;
    println!("\nartifact throughput, 256 MiB file");
    println!(
        "  agent port (framed, sha256 on the host, written to disk): {agent_rate:.1} MB/s ({agent_seconds:.1} s)"
    );
    println!(
        "  agent port with verify (sha256 in the guest too): {verified_rate:.1} MB/s ({verified_seconds:.1} s)"
    );
    println!(
        "  baseline: raw cat into a virtio-serial port, written to disk: {raw_rate:.1} MB/s ({raw_seconds:.1} s)"
    );
    println!(
        "  ratio {ratio:.2}x (goal >= 0.5x: {})",
        if ratio >= 0.5 { "met" } else { "NOT met" }
    );
    figure::Figure {
        figure: "artifact throughput via the agent port (256 MiB file)",
        unit: "MB/s",
        samples: &agent_rates,
        baseline_name: "raw cat into a virtio-serial port (one run)",
        baseline: &[raw_rate],
        goal: ">= 0.5x the baseline",
        met: Some(ratio >= 0.5),
        ..Default::default()
    }
    .emit();
    s.vm.teardown().await;
}

async fn shell_round_trip(scratch: &Path, lease: &qemu_worker::image::ImageLease) {
    let s = start(scratch, lease, "sh", "echo ready; sleep 600", &[]).await;
    s.vm.resume().await.expect("cont");
    let agent = AgentClient::connect(
        Path::new(&s.vm.run_dir().agent_socket()),
        Duration::from_secs(120),
    )
    .await
    .expect("agent");
    let request = ShellRequest {
        command: Some(vec!["/bin/sh".into()]),
        tty: true,
        rows: 24,
        cols: 80,
        term: None,
    };
    let mut shell = agent.shells().open(&request).await.expect("a shell");
    // Until the prompt: the shell reads its terminal from here on.
    let mut shown = Vec::new();
    // busybox's prompt is `~ # ` (and a cursor position query after it).
    while !shown.windows(2).any(|w| w == b"# ") {
        match tokio::time::timeout(Duration::from_secs(60), shell.next()).await {
            Ok(ShellEvent::Output { data, .. }) => shown.extend_from_slice(&data),
            other => panic!("no prompt: {other:?}"),
        }
    }
    let mut keys = Vec::new();
    for i in 0..200 {
        // A line at a time stays short of the terminal's line buffer.
        let key = if i % 50 == 49 { b"\r" } else { b"x" };
        let started = Instant::now();
        shell.write(key).await.expect("a key");
        loop {
            match tokio::time::timeout(Duration::from_secs(30), shell.next()).await {
                Ok(ShellEvent::Output { data, .. }) if data.contains(&key[0]) => break,
                Ok(ShellEvent::Output { .. }) => {}
                other => panic!("no echo: {other:?}"),
            }
        }
        if key == b"x" {
            keys.push(started.elapsed().as_secs_f64() * 1e3);
        }
        if i % 50 == 49 {
            // The shell runs the line of x's (not found) and prompts again.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while let Ok(ShellEvent::Output { .. }) =
                tokio::time::timeout(Duration::from_millis(100), shell.next()).await
            {}
        }
    }
    drop(shell);
    drop(agent);
    let mut qga = qemu_worker::qemu::QgaClient::connect(
        Path::new(&s.vm.run_dir().qga_socket()),
        Duration::from_secs(60),
    )
    .await
    .expect("qemu-ga");
    let mut exec = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        let out = qga
            .exec("/bin/echo", &["x"], Duration::from_secs(30))
            .await
            .expect("guest-exec");
        assert_eq!(out.stdout, b"x\n");
        exec.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let mut sorted = keys.clone();
    sorted.sort_by(f64::total_cmp);
    let mut exec_sorted = exec.clone();
    exec_sorted.sort_by(f64::total_cmp);
    let pick = |v: &[f64], q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
        figure::Figure {
            figure: &format!("shell keystroke round trip, {label} of {}", sorted.len()),
            unit: "ms",
            samples: &[pick(&sorted, q)],
            baseline_name: "qemu-ga guest-exec of echo with its output (50 runs)",
            baseline: &[pick(&exec_sorted, q)],
            goal: "",
            met: None,
            note: "agent port, guest tools' pty, under TCG; qemu-ga is polled every 20 ms",
            ..Default::default()
        }
        .emit();
    }
    s.vm.teardown().await;
}
