//! VM runtime benchmarks on the test image under TCG, each next to its baseline:
//!
//! 1. Screenshot latency: `screendump` as PNG (QEMU encodes) vs the PPM fallback
//!    (QEMU writes PPM, we convert). Goal: ≤ 100 ms.
//! 2. QGA file read throughput for a 64 MiB guest file with 4 MiB chunks, the fallback
//!    artifact path (2–10 MB/s was measured here by hand).
//! 3. VM start overhead: the supervisor (overlay, start paused, QMP, cont) vs the same
//!    QEMU argv started by hand, both to init's first serial line.
//!
//! `cargo bench -p engine-tests --bench vm` (needs images/build-test-image).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use engine_tests::vm::{cached_test_image, test_launch, test_machine};
use qemu_worker::image::ImageLease;
use qemu_worker::job::Machine;
use qemu_worker::qemu::QgaClient;
use qemu_worker::vm::{NetworkAttachment, Vm, VmTimeouts, take_screenshot, take_screenshot_ppm};
use test_support::figure;

const T: Duration = Duration::from_secs(60);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::MAX, f64::min);
    let max = v.iter().copied().fold(0.0, f64::max);
    format!(
        "median {:7.1}  (min {min:7.1}, max {max:7.1})",
        median(v.to_vec())
    )
}

fn wait_for_line(path: &Path, marker: &str, deadline: Duration) -> Option<Instant> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(marker)) {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Like `wait_for_line`, on the serial console's unix socket, for a QEMU that no
/// supervisor copies into `serial.log` (the by-hand baseline). QEMU listens without
/// waiting, so the socket is connected as soon as it exists: long before init prints.
fn wait_for_console(socket: &Path, marker: &str, deadline: Duration) -> Option<Instant> {
    use std::io::Read;
    let start = Instant::now();
    let mut stream = loop {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(_) if start.elapsed() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Err(_) => return None,
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .ok()?;
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while start.elapsed() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) => return None,
            Ok(n) => {
                seen.extend_from_slice(&buffer[..n]);
                if String::from_utf8_lossy(&seen).contains(marker) {
                    return Some(Instant::now());
                }
            }
            Err(_) => {}
        }
    }
    None
}

struct Bench {
    scratch: PathBuf,
    lease: ImageLease,
    machine: Machine,
}

impl Bench {
    async fn launch(&self, name: &str) -> qemu_worker::vm::VmLaunch {
        let network = NetworkAttachment::User {
            guestfwd_command: vec!["/bin/false".into()],
        };
        test_launch(&self.lease, &self.machine, &self.scratch, name, network).await
    }
}

fn main() {
    let scratch = tempfile::Builder::new()
        .prefix("qw-bvm")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let (cache, lease) = cached_test_image(scratch.path()).await;
        let machine = test_machine(&lease, "bench", 256, |_| {});
        let bench = Bench {
            scratch: scratch.path().to_path_buf(),
            lease,
            machine,
        };
        start_overhead(&bench).await;
        screenshots_and_qga(&bench).await;
        drop(bench);
        cache.close().await;
    });
}

async fn start_overhead(bench: &Bench) {
    const ROUNDS: usize = 3;
    let (mut supervised, mut by_hand) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Supervisor: overlay + start paused + QMP + cont, to init's first line.
        let name = format!("sup{round}");
        let start = Instant::now();
        let launch = bench.launch(&name).await;
        let serial = PathBuf::from(launch.run_dir.serial_log());
        let vm = Vm::start(launch, VmTimeouts::default())
            .await
            .expect("start");
        vm.resume().await.expect("cont");
        let seen =
            tokio::task::spawn_blocking(move || wait_for_line(&serial, "QEMU-WORKER-INIT", T))
                .await
                .expect("join")
                .expect("init line");
        supervised.push((seen - start).as_secs_f64() * 1000.0);
        drop(vm);

        // By hand: the same argv without -S, started directly.
        let name = format!("hand{round}");
        let launch = bench.launch(&name).await;
        let argv: Vec<String> = launch.argv.iter().filter(|a| *a != "-S").cloned().collect();
        let serial = PathBuf::from(launch.run_dir.serial_socket());
        let start = Instant::now();
        let mut child = Command::new("qemu-system-x86_64")
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu");
        let seen = wait_for_console(&serial, "QEMU-WORKER-INIT", T).expect("init line");
        by_hand.push((seen - start).as_secs_f64() * 1000.0);
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(launch.run_dir.path());
    }
    let overhead = median(supervised.clone()) - median(by_hand.clone());
    println!("VM start to init's first serial line ({ROUNDS} rounds, ms)");
    println!(
        "  supervisor (overlay, paused start, QMP, cont)  {}",
        spread(&supervised)
    );
    println!(
        "  baseline: same argv by hand, no -S            {}",
        spread(&by_hand)
    );
    println!(
        "  supervisor overhead: {overhead:.0} ms (the by-hand run reuses the supervisor's overlay step)"
    );
    figure::Figure {
        figure: "VM start to init's first serial line, supervised",
        unit: "ms",
        samples: &supervised,
        baseline_name: "the same QEMU argv started by hand",
        baseline: &by_hand,
        goal: "",
        met: None,
        ..Default::default()
    }
    .emit();
}

async fn screenshots_and_qga(bench: &Bench) {
    const SHOTS: usize = 20;
    let launch = bench.launch("main").await;
    let vm = Vm::start(launch, VmTimeouts::default())
        .await
        .expect("start");
    vm.resume().await.expect("cont");
    let serial = PathBuf::from(vm.run_dir().serial_log());
    tokio::task::spawn_blocking(move || wait_for_line(&serial, "QEMU-WORKER-READY", T))
        .await
        .expect("join")
        .expect("ready");

    let (mut png, mut ppm) = (Vec::new(), Vec::new());
    let dir = vm.run_dir().path().to_path_buf();
    take_screenshot(vm.qmp(), &dir, T).await.expect("warm-up");
    for _ in 0..SHOTS {
        let start = Instant::now();
        take_screenshot(vm.qmp(), &dir, T).await.expect("png");
        png.push(start.elapsed().as_secs_f64() * 1000.0);
        let start = Instant::now();
        take_screenshot_ppm(vm.qmp(), &dir, T).await.expect("ppm");
        ppm.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let png_median = median(png.clone());
    println!("\nscreenshot latency, 720x400 text console ({SHOTS} rounds, ms)");
    println!("  screendump as PNG                  {}", spread(&png));
    println!("  baseline: PPM fallback + convert   {}", spread(&ppm));
    println!(
        "  goal <= 100 ms: {}",
        if png_median <= 100.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    figure::Figure {
        figure: "screenshot latency (PNG, 720x400)",
        unit: "ms",
        samples: &png,
        baseline_name: "PPM screendump + conversion",
        baseline: &ppm,
        goal: "<= 100 ms",
        met: Some(png_median <= 100.0),
        ..Default::default()
    }
    .emit();

    let mut qga = QgaClient::connect(Path::new(&vm.run_dir().qga_socket()), T)
        .await
        .expect("qga");
    let made = qga
        .exec(
            "/bin/sh",
            &["-c", "head -c 67108864 /dev/urandom > /tmp/big"],
            Duration::from_secs(300),
        )
        .await
        .expect("make the file");
    assert_eq!(made.exit_code, Some(0), "{made:?}");
    let mut rates = Vec::new();
    for _ in 0..3 {
        let mut sink = tokio::io::sink();
        let start = Instant::now();
        let read = qga
            .file_read("/tmp/big", &mut sink, 1 << 30, Duration::from_secs(120))
            .await
            .expect("read");
        assert_eq!(read.bytes, 64 << 20);
        rates.push(read.bytes as f64 / 1e6 / start.elapsed().as_secs_f64());
    }
    println!("\nQGA guest-file-read of a 64 MiB guest file, 4 MiB chunks");
    println!(
        "  median {:.1} MB/s (all {rates:.1?}); the by-hand measurement here was 2-10 MB/s",
        figure::median(&rates)
    );
    figure::Figure {
        figure: "QGA artifact throughput (64 MiB file)",
        unit: "MB/s",
        samples: &rates,
        baseline_name: "the metadata upload path (log streaming)",
        baseline_from: "log streaming throughput (guest to job log)",
        goal: "",
        met: None,
        note: "the fallback path; the agent port is the main one",
        ..Default::default()
    }
    .emit();
    let _ = vm.teardown().await;
}
