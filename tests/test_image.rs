//! The test image built by `images/build-test-image` boots under TCG: fetched through
//! the cache as a local image, given a per-job overlay, started with the argv builder's
//! command line, and watched on its serial console until init reports ready.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestQmp, require};
use qemu_worker::image::{
    CacheSettings, FetchPolicy, Fetcher, ImageCache, ImageLimits, ImageRequest,
};
use qemu_worker::job::{Identity, ImageSource, MachineLayers, MachineLimits};
use qemu_worker::vm::{Accelerator, NetworkAttachment, RunDir, VmSpec, qemu_argv};

fn test_image() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/out/qemu-worker-test.tar.zst");
    assert!(
        path.is_file(),
        "the test image is missing: run images/build-test-image (scripts/test does it)"
    );
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn the_test_image_boots_to_init_under_tcg() {
    require("qemu-system-x86_64", "qemu-system-x86");
    let image = test_image();
    let scratch = tempfile::Builder::new()
        .prefix("qw-boot")
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
    let lease = cache
        .acquire(
            &ImageRequest {
                source: ImageSource::Local(image),
                sha256: None,
            },
            None,
        )
        .await
        .expect("the test image is valid");

    let run = scratch.path().join("run");
    std::fs::create_dir(&run).expect("run dir");
    let run_dir = RunDir::new(&run).expect("short path");
    let disk = lease
        .create_overlay(&run.join("overlay.qcow2"))
        .expect("overlay");
    let kernel = lease
        .contents()
        .kernel_files()
        .expect("the test image boots a kernel directly");
    let layers = MachineLayers {
        image: lease.contents().machine.clone(),
        ..Default::default()
    };
    let limits = MachineLimits {
        max_memory: 512,
        max_cpus: 1,
        default_threads: 1,
    };
    let machine = layers
        .resolve(&limits, &Identity::derive("boot-test", 0))
        .expect("machine");
    let argv = qemu_argv(&VmSpec {
        name: "boot-test",
        machine: &machine,
        run_dir: &run_dir,
        disk: &disk,
        kernel: Some(&kernel),
        network: &NetworkAttachment::User {
            guestfwd_command: vec!["/bin/false".into()],
        },
        accelerator: Accelerator::Tcg,
    });

    let stderr = std::fs::File::create(run.join("qemu.stderr")).expect("stderr file");
    let mut child = Command::new("qemu-system-x86_64")
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start QEMU");
    let outcome = (|| -> Result<String, String> {
        let mut qmp = TestQmp::connect(
            &mut child,
            Path::new(&run_dir.qmp_socket()),
            Duration::from_secs(30),
        )?;
        qmp.execute("cont")?;
        let serial = run_dir.serial_log();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let console = std::fs::read_to_string(&serial).unwrap_or_default();
            if console.contains("QEMU-WORKER-READY") {
                let _ = qmp.execute("quit");
                return Ok(console);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("QEMU exited with {status}; console:\n{console}"));
            }
            if Instant::now() > deadline {
                return Err(format!("init never reported ready; console:\n{console}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })();
    let _ = child.kill();
    let _ = child.wait();
    let console = outcome.unwrap_or_else(|e| {
        let qemu = std::fs::read_to_string(run.join("qemu.stderr")).unwrap_or_default();
        panic!("{e}\nQEMU stderr: {qemu}")
    });
    assert!(console.contains("QEMU-WORKER-INIT"), "{console}");
    drop(lease);
    cache.close().await;
}
