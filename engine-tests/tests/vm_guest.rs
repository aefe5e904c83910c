//! The VM runtime with real guests: the test image (images/build-test-image) booted
//! under TCG through the cache, a job overlay, the argv builder and the supervisor.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use engine_tests::vm::{cached_test_image, metadata_network, test_launch, test_machine};
use qemu_worker::artifacts::{AgentClient, AgentError};
use qemu_worker::config::{ArtifactStoreConfig, ByteSize};
use qemu_worker::image::{ImageCache, ImageLease};
use qemu_worker::job::ArtifactKind;
use qemu_worker::job::MachineDefinition;
use qemu_worker::metadata::{
    LogSink, MetadataHandle, MetadataLimits, Task, start_metadata_service,
    start_metadata_service_tcp,
};
use qemu_worker::qemu::QgaClient;
use qemu_worker::vm::{
    NetworkAttachment, RunDir, StopStep, TAP_DEVICE, TapNetwork, Vm, VmExit, VmTimeouts,
    take_screenshot, take_screenshot_ppm,
};
use test_support::{processes_under, require};

const READY: &str = "QEMU-WORKER-READY";

struct Guest {
    scratch: tempfile::TempDir,
    cache: ImageCache,
    lease: ImageLease,
}

impl Guest {
    async fn new() -> Self {
        require("qemu-system-x86_64", "qemu-system-x86");
        let scratch = tempfile::Builder::new()
            .prefix("qw-g")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let (cache, lease) = cached_test_image(scratch.path()).await;
        Self {
            scratch,
            cache,
            lease,
        }
    }

    /// Starts a VM from the test image; `change` edits the image's machine definition.
    async fn start(&self, name: &str, change: impl FnOnce(&mut MachineDefinition)) -> Vm {
        self.start_with(name, change, Duration::from_secs(30)).await
    }

    /// Starts a VM whose guest tools run `script` through its metadata service; returns
    /// the VM, the service, and the job log's path.
    async fn start_task(&self, name: &str, script: &str) -> (Vm, MetadataHandle, PathBuf) {
        let machine = test_machine(&self.lease, name, 256, |_| {});
        let socket = RunDir::new(&self.scratch.path().join(name))
            .expect("run dir")
            .metadata_socket();
        let launch = test_launch(
            &self.lease,
            &machine,
            self.scratch.path(),
            name,
            metadata_network(&socket),
        )
        .await;
        std::fs::create_dir_all(launch.job_dir.path()).expect("log dir");
        let log_path = launch.job_dir.log();
        let log = LogSink::create(&log_path, 1 << 20).await.expect("log");
        let task = Task {
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: [("GREETING".to_owned(), "hello".to_owned())].into(),
            max_run_time: 120,
            working_directory: "/root".into(),
        };
        let service =
            start_metadata_service(Path::new(&socket), &task, log, MetadataLimits::default())
                .await
                .expect("metadata service");
        let vm = Vm::start(launch, VmTimeouts::default())
            .await
            .expect("QEMU starts");
        vm.resume().await.expect("cont");
        (vm, service, log_path)
    }

    async fn start_with(
        &self,
        name: &str,
        change: impl FnOnce(&mut MachineDefinition),
        powerdown: Duration,
    ) -> Vm {
        let machine = test_machine(&self.lease, name, 256, change);
        let network = NetworkAttachment::User {
            guestfwd_command: vec!["/bin/false".into()],
        };
        let launch = test_launch(&self.lease, &machine, self.scratch.path(), name, network).await;
        let timeouts = VmTimeouts {
            powerdown,
            powerdown_resend: Duration::from_secs(1),
            ..VmTimeouts::default()
        };
        let vm = Vm::start(launch, timeouts).await.expect("QEMU starts");
        vm.resume().await.expect("cont");
        vm
    }

    fn console(&self, name: &str, vm: &Vm) -> String {
        let live = PathBuf::from(vm.run_dir().serial_log());
        let kept = self.scratch.path().join(format!("{name}-logs/console.log"));
        std::fs::read_to_string(live)
            .or_else(|_| std::fs::read_to_string(kept))
            .unwrap_or_default()
    }

    /// Waits for init's ready marker (or fails with the console).
    async fn wait_ready(&self, name: &str, vm: &mut Vm) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let console = self.console(name, vm);
            if console.contains(READY) {
                assert!(console.contains("QEMU-WORKER-INIT"), "{console}");
                return;
            }
            if let Some(exit) = vm.wait(Duration::from_millis(100)).await {
                panic!("the guest ended before init was ready: {exit:?}\n{console}");
            }
            assert!(
                Instant::now() < deadline,
                "init never reported ready:\n{console}"
            );
        }
    }

    /// No QEMU process and no run dir of this test remains.
    fn assert_clean(&self) {
        let running = processes_under(self.scratch.path());
        assert!(running.is_empty(), "QEMU left running: {running:?}");
        let dirs: Vec<String> = std::fs::read_dir(self.scratch.path())
            .expect("scratch")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "cache" && !n.ends_with("-logs"))
            .collect();
        assert!(dirs.is_empty(), "run dirs left: {dirs:?}");
    }

    async fn close(self) {
        drop(self.lease);
        self.cache.close().await;
    }
}

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_boots_answers_qga_shows_its_screen_and_powers_off_gracefully() {
    let guest = Guest::new().await;
    let mut vm = guest.start("main", |_| {}).await;
    guest.wait_ready("main", &mut vm).await;

    let mut qga = QgaClient::connect(Path::new(&vm.run_dir().qga_socket()), T)
        .await
        .expect("qemu-ga answers in the guest");
    let mut passwd = Vec::new();
    let read = qga
        .file_read("/etc/passwd", &mut passwd, 1 << 20, T)
        .await
        .expect("read");
    assert_eq!(passwd, b"root:x:0:0:root:/root:/bin/sh\n");
    assert_eq!(read.bytes, passwd.len() as u64);
    let out = qga
        .exec("/bin/sh", &["-c", "echo hello from $(hostname); exit 7"], T)
        .await
        .expect("exec");
    assert_eq!(out.exit_code, Some(7));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from qemu-worker-guest\n"
    );

    // A bzImage boot keeps the VGA text console: 80x25 cells of 9x16 pixels.
    let png = take_screenshot(vm.qmp(), vm.run_dir().path(), T)
        .await
        .expect("PNG");
    assert_eq!((png.width, png.height), (720, 400));
    let ppm = take_screenshot_ppm(vm.qmp(), vm.run_dir().path(), T)
        .await
        .expect("PPM fallback");
    assert_eq!((ppm.width, ppm.height), (720, 400));
    assert_eq!(&ppm.png[..4], b"\x89PNG");

    let exit = vm.stop().await;
    assert_eq!(exit, VmExit::PoweredOff { requested: true });
    vm.teardown().await;
    let console = std::fs::read_to_string(guest.scratch.path().join("main-logs/console.log"))
        .expect("console kept");
    assert!(console.contains(READY));
    guest.assert_clean();
    guest.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_that_powers_off_at_once_is_classified() {
    let guest = Guest::new().await;
    let mut vm = guest
        .start("quick", |m| {
            // Everything after `--` is passed to init: busybox `poweroff -f` as PID 1.
            m.cmdline = Some(
                "root=/dev/vda rw init=/bin/poweroff console=ttyS0 quiet no_timer_check -- -f"
                    .into(),
            );
        })
        .await;
    let exit = vm
        .wait(Duration::from_secs(120))
        .await
        .expect("the guest powers off");
    assert_eq!(exit, VmExit::PoweredOff { requested: false });
    vm.teardown().await;
    guest.assert_clean();
    guest.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_shutdown_through_qga_powers_the_guest_off() {
    let guest = Guest::new().await;
    let mut vm = guest.start("agent-off", |_| {}).await;
    guest.wait_ready("agent-off", &mut vm).await;
    let mut qga = QgaClient::connect(Path::new(&vm.run_dir().qga_socket()), T)
        .await
        .expect("qga");
    qga.shutdown(T).await.expect("guest-shutdown");
    let exit = vm.wait(Duration::from_secs(60)).await.expect("powered off");
    assert_eq!(exit, VmExit::PoweredOff { requested: false });
    vm.teardown().await;
    guest.assert_clean();
    guest.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_that_never_boots_is_stopped_by_the_worker() {
    let guest = Guest::new().await;
    // Without direct kernel boot, SeaBIOS finds no boot loader on the bare ext4 disk.
    let mut vm = guest
        .start_with(
            "noboot",
            |m| {
                m.kernel = None;
                m.initrd = None;
                m.cmdline = None;
            },
            Duration::from_secs(3),
        )
        .await;
    assert_eq!(
        vm.wait(Duration::from_secs(3)).await,
        None,
        "nothing to boot, nothing ends"
    );
    let exit = vm.stop().await;
    assert_eq!(
        exit,
        VmExit::Stopped {
            step: StopStep::Quit
        }
    );
    let powerdowns = vm.events().iter().filter(|e| e.name == "POWERDOWN").count();
    assert!(
        powerdowns >= 2,
        "ACPI power-down was requested and repeated before quitting ({powerdowns})"
    );
    let console = guest.console("noboot", &vm);
    assert!(
        !console.contains("QEMU-WORKER-INIT"),
        "the kernel must not have booted:
{console}"
    );
    vm.teardown().await;
    guest.assert_clean();
    guest.close().await;
}

/// Waits for `needle` in the job log, failing with the log and the console.
async fn wait_for_log(log: &Path, needle: &str, guest: &Guest, name: &str, vm: &Vm) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} never reached the job log:\n{text}\nconsole:\n{}\nQEMU:\n{}",
            guest.console(name, vm),
            std::fs::read_to_string(guest.scratch.path().join(format!("{name}-logs/qemu.log")))
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_guest_tools_stream_the_log_live_and_report_the_exit_code() {
    let guest = Guest::new().await;
    let (vm, mut service, log) = guest
        .start_task(
            "live",
            "echo \"$GREETING first\"; sleep 4; echo second; echo oops >&2; exit 3",
        )
        .await;
    let early = wait_for_log(&log, "hello first", &guest, "live", &vm).await;
    assert_eq!(
        service.reported(),
        None,
        "the first line arrived while the command still ran:\n{early}"
    );
    assert!(!early.contains("second"), "{early}");
    let code = tokio::time::timeout(Duration::from_secs(120), service.result())
        .await
        .expect("a result");
    assert_eq!(code, Some(3));
    // stdout and stderr share one pipe, so the log keeps the order they were written in.
    let text = wait_for_log(&log, "oops", &guest, "live", &vm).await;
    assert_eq!(text, "hello first\nsecond\noops\n");
    vm.teardown().await;
    guest.assert_clean();
    guest.close().await;
}

/// The first address of this host that is not loopback.
fn host_address() -> String {
    let output = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .expect("hostname -I");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .find(|a| !a.starts_with("127.") && a.contains('.'))
        .expect("a non-loopback IPv4 address")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn guests_reach_only_their_own_metadata_service() {
    let guest = Guest::new().await;
    // A service on the host's loopback and one on all its addresses.
    let loopback = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let anywhere = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let (lo_port, any_port) = (
        loopback.local_addr().expect("addr").port(),
        anywhere.local_addr().expect("addr").port(),
    );
    for listener in [loopback, anywhere] {
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                use std::io::Write;
                let _ = stream.write_all(b"HOST-SERVICE-REACHED\n");
            }
        });
    }
    let host = host_address();
    let probes = format!(
        "timeout 10 wget -q -O - http://169.254.169.254/v1/ping && echo; echo OWN-METADATA-DONE; \
         for target in 169.254.169.2:{lo_port} 127.0.0.1:{lo_port} 10.0.2.2:{lo_port} {host}:{any_port} 169.254.169.2:{any_port}; do \
           if timeout 3 nc ${{target%:*}} ${{target#*:}} </dev/null 2>/dev/null | grep -q REACHED; \
           then echo \"LEAK $target\"; else echo \"BLOCKED $target\"; fi; \
         done; exit 3"
    );
    let (vm_a, mut service_a, log_a) = guest.start_task("iso-a", &probes).await;
    let (vm_b, mut service_b, log_b) = guest.start_task("iso-b", "echo I am B; exit 5").await;

    let code_a = tokio::time::timeout(Duration::from_secs(180), service_a.result())
        .await
        .expect("A reports");
    let code_b = tokio::time::timeout(Duration::from_secs(180), service_b.result())
        .await
        .expect("B reports");
    assert_eq!(
        (code_a, code_b),
        (Some(3), Some(5)),
        "each VM's result resolves only its own job"
    );

    let text_a = wait_for_log(&log_a, "OWN-METADATA-DONE", &guest, "iso-a", &vm_a).await;
    assert!(
        text_a.contains(r#"{"status":"ok"}"#),
        "the guest reaches its own metadata service:\n{text_a}"
    );
    let text_a = wait_for_log(
        &log_a,
        &format!("169.254.169.2:{any_port}"),
        &guest,
        "iso-a",
        &vm_a,
    )
    .await;
    assert!(
        !text_a.contains("LEAK"),
        "a guest reached a host service:\n{text_a}"
    );
    assert_eq!(text_a.matches("BLOCKED").count(), 5, "{text_a}");
    let text_b = wait_for_log(&log_b, "I am B", &guest, "iso-b", &vm_b).await;
    assert!(
        !text_b.contains("BLOCKED") && !text_a.contains("I am B"),
        "logs stay with their own job"
    );

    vm_a.teardown().await;
    vm_b.teardown().await;
    guest.assert_clean();
    guest.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn artifacts_come_back_through_the_agent_port() {
    let guest = Guest::new().await;
    let script = "mkdir -p /out/logs/nested && echo report > /out/report.txt && echo a > /out/logs/a.txt \
        && echo b > /out/logs/nested/b.txt && ln -s /etc /out/logs/escape \
        && head -c 3145728 /dev/urandom > /out/big.bin && echo made";
    let (vm, mut service, log) = guest.start_task("art", script).await;
    let code = tokio::time::timeout(Duration::from_secs(120), service.result())
        .await
        .expect("a result");
    assert_eq!(
        code,
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let socket = PathBuf::from(vm.run_dir().agent_socket());
    let out = guest.scratch.path().join("art-logs/artifacts");

    let mut agent = AgentClient::connect(&socket, T).await.expect("agent port");
    let file = agent
        .fetch_one(
            "/out/report.txt",
            ArtifactKind::File,
            &out,
            "report.txt",
            &capped(1 << 20),
            true,
        )
        .await
        .expect("file");
    assert_eq!(
        std::fs::read_to_string(out.join("report.txt")).expect("written"),
        "report\n"
    );
    assert_eq!(file.files[0].size, 7);

    let tree = agent
        .fetch_one(
            "/out/logs",
            ArtifactKind::Directory,
            &out,
            "logs",
            &capped(1 << 20),
            true,
        )
        .await
        .expect("folder");
    let names: Vec<&str> = tree.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["logs/a.txt", "logs/nested/b.txt"],
        "exactly the relative names"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("logs/nested/b.txt")).expect("nested"),
        "b\n"
    );
    assert_eq!(tree.skipped.len(), 1);
    assert_eq!(
        tree.skipped[0].name, "logs/escape",
        "the symlink out of the folder is not followed"
    );
    assert!(!out.join("logs/escape").exists());

    for (path, kind) in [
        ("/out/missing.txt", ArtifactKind::File),
        ("/out/missing", ArtifactKind::Directory),
    ] {
        let error = agent
            .fetch_one(path, kind, &out, "missing", &capped(1 << 20), false)
            .await
            .expect_err("missing");
        assert!(matches!(error, AgentError::NotFound { .. }), "{error}");
    }
    let error = agent
        .fetch_one(
            "/out/big.bin",
            ArtifactKind::File,
            &out,
            "big.bin",
            &capped(1 << 20),
            false,
        )
        .await
        .expect_err("over the cap");
    assert!(matches!(error, AgentError::TooLarge { .. }), "{error}");

    // The host reconnects, and the guest tools restart: the port still serves, and the
    // task does not run again.
    drop(agent);
    let mut qga = QgaClient::connect(Path::new(&vm.run_dir().qga_socket()), T)
        .await
        .expect("qga");
    qga.exec("/bin/sh", &["-c", "kill $(pidof qemu-worker-guest)"], T)
        .await
        .expect("kill");
    let mut agent = AgentClient::connect(&socket, T)
        .await
        .expect("agent port after a restart");
    let big = agent
        .fetch_one(
            "/out/big.bin",
            ArtifactKind::File,
            &out,
            "big.bin",
            &capped(8 << 20),
            false,
        )
        .await
        .expect("big file");
    assert_eq!(big.files[0].size, 3 << 20);
    let console = guest.console("art", &vm);
    assert!(
        console.contains("restarted: the task already ran"),
        "{console}"
    );
    assert_eq!(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("made")
            .count(),
        1
    );
    vm.teardown().await;
    guest.assert_clean();
    guest.close().await;
}

/// Artifact limits with every file and the total capped at `bytes`.
fn capped(bytes: u64) -> ArtifactStoreConfig {
    ArtifactStoreConfig {
        max_file_size: ByteSize(bytes),
        max_total_size: ByteSize(bytes),
        ..ArtifactStoreConfig::default()
    }
}

/// The probe script shared by the isolation tests: the guest's own metadata service
/// must answer; every host service must stay out of reach.
fn isolation_probes(targets: &[String]) -> String {
    format!(
        "timeout 10 wget -q -O - http://169.254.169.254/v1/ping && echo; echo OWN-METADATA-DONE; \
         for target in {}; do \
           if timeout 3 nc ${{target%:*}} ${{target#*:}} </dev/null 2>/dev/null | grep -q REACHED; \
           then echo \"LEAK $target\"; else echo \"BLOCKED $target\"; fi; \
         done; echo PROBES-DONE; exit 3",
        targets.join(" ")
    )
}

fn host_services() -> (u16, u16) {
    let loopback = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let anywhere = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let ports = (
        loopback.local_addr().expect("addr").port(),
        anywhere.local_addr().expect("addr").port(),
    );
    for listener in [loopback, anywhere] {
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                use std::io::Write;
                let _ = stream.write_all(b"HOST-SERVICE-REACHED\n");
            }
        });
    }
    ports
}

#[tokio::test(flavor = "multi_thread")]
async fn tap_networking_isolates_the_guest_too() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "network: tap needs root; run the suite as root (CI does)"
    );
    let guest = Guest::new().await;
    let (lo_port, any_port) = host_services();
    let host = host_address();
    let targets = [
        format!("127.0.0.1:{lo_port}"),
        format!("{host}:{any_port}"),
        format!("169.254.169.2:{any_port}"),
        "169.254.169.254:8080".to_owned(),
    ];
    let name = "tap";
    let tap = TapNetwork::create(name, false)
        .await
        .expect("namespace and tap");
    let netns = tap.netns().to_owned();
    let listener = tap
        .bind_metadata()
        .await
        .expect("metadata listener in the namespace");
    let machine = test_machine(&guest.lease, name, 256, |_| {});
    let network = NetworkAttachment::Tap {
        ifname: TAP_DEVICE.into(),
        netns: netns.clone(),
    };
    let launch = test_launch(&guest.lease, &machine, guest.scratch.path(), name, network).await;
    std::fs::create_dir_all(launch.job_dir.path()).expect("log dir");
    let log = launch.job_dir.log();
    let sink = LogSink::create(&log, 1 << 20).await.expect("log");
    let task = Task {
        command: vec!["/bin/sh".into(), "-c".into(), isolation_probes(&targets)],
        env: Default::default(),
        max_run_time: 120,
        working_directory: "/root".into(),
    };
    let mut service = start_metadata_service_tcp(listener, &task, sink, MetadataLimits::default())
        .expect("service");
    let vm = Vm::start(launch, VmTimeouts::default())
        .await
        .expect("QEMU starts in the namespace");
    vm.resume().await.expect("cont");
    let code = tokio::time::timeout(Duration::from_secs(180), service.result())
        .await
        .expect("a result");
    assert_eq!(code, Some(3));
    let text = wait_for_log(&log, "PROBES-DONE", &guest, name, &vm).await;
    assert!(
        text.contains(r#"{"status":"ok"}"#),
        "the guest reaches its own metadata service:\n{text}"
    );
    assert!(
        !text.contains("LEAK"),
        "a guest on tap reached a host service:\n{text}"
    );
    assert_eq!(text.matches("BLOCKED").count(), targets.len(), "{text}");
    vm.teardown().await;
    drop(service);
    drop(tap);
    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns");
    assert!(
        !String::from_utf8_lossy(&namespaces.stdout).contains(&netns),
        "the namespace is deleted with the network"
    );
    guest.assert_clean();
    guest.close().await;
}
