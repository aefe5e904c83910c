//! The VM runtime with real guests: the test image (images/build-test-image) booted
//! under TCG through the cache, a job overlay, the argv builder and the supervisor.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::require;
use qemu_worker::image::{
    CacheSettings, FetchPolicy, Fetcher, ImageCache, ImageLease, ImageLimits, ImageRequest,
};
use qemu_worker::job::{Identity, ImageSource, MachineDefinition, MachineLayers, MachineLimits};
use qemu_worker::qemu::QgaClient;
use qemu_worker::vm::{
    Accelerator, LaunchPlan, NetworkAttachment, RunDir, StopStep, Vm, VmExit, VmTimeouts,
    prepare_launch, take_screenshot, take_screenshot_ppm,
};

const READY: &str = "QEMU-WORKER-READY";

struct Guest {
    scratch: tempfile::TempDir,
    cache: ImageCache,
    lease: ImageLease,
}

impl Guest {
    async fn new() -> Self {
        require("qemu-system-x86_64", "qemu-system-x86");
        let image =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("images/out/qemu-worker-test.tar.zst");
        assert!(
            image.is_file(),
            "the test image is missing: run images/build-test-image (scripts/test does it)"
        );
        let scratch = tempfile::Builder::new()
            .prefix("qw-g")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let settings = CacheSettings {
            dir: scratch.path().join("cache"),
            max_size: 1 << 30,
            min_free: 0,
            limits: ImageLimits {
                max_image_bytes: 1 << 30,
            },
            allowed_local_dirs: vec![image.parent().expect("images/out").to_path_buf()],
        };
        let cache = ImageCache::open(
            settings,
            Fetcher::new(FetchPolicy::default()).expect("fetcher"),
        )
        .await
        .expect("cache");
        let request = ImageRequest {
            source: ImageSource::Local(image),
            sha256: None,
        };
        let lease = cache
            .acquire(&request, None)
            .await
            .expect("the test image is valid");
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

    async fn start_with(
        &self,
        name: &str,
        change: impl FnOnce(&mut MachineDefinition),
        powerdown: Duration,
    ) -> Vm {
        let mut image_machine = self.lease.contents().machine.clone();
        change(&mut image_machine);
        let layers = MachineLayers {
            image: image_machine,
            ..Default::default()
        };
        let limits = MachineLimits {
            max_memory: 256,
            max_cpus: 1,
            default_threads: 1,
        };
        let machine = layers
            .resolve(&limits, &Identity::derive(name, 0))
            .expect("machine");
        let launch = prepare_launch(LaunchPlan {
            name,
            image: &self.lease,
            machine: &machine,
            run_dir: RunDir::new(&self.scratch.path().join(name)).expect("run dir"),
            log_dir: self.scratch.path().join(format!("{name}-logs")),
            network: NetworkAttachment::User {
                guestfwd_command: vec!["/bin/false".into()],
            },
            accelerator: Accelerator::Tcg,
        })
        .expect("launch");
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
        let needle = self.scratch.path().display().to_string();
        let running: Vec<String> = std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains("qemu-system") && c.contains(&needle))
            .collect();
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
            m.cmdline = Some("root=/dev/nvme0n1 rootfstype=ext4 rw init=/bin/poweroff console=ttyS0 quiet no_timer_check -- -f".into());
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
