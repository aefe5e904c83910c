//! Helpers shared by the component tests that start real QEMU.
//!
//! A deliberately minimal, blocking QMP client: enough to negotiate, resume and query
//! a test VM. The engine's own client lives in the library.

#![allow(
    dead_code,
    unused_imports,
    reason = "each test binary uses a different subset"
)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

pub struct TestQmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl TestQmp {
    /// Connects to QEMU's QMP socket (waiting for it while `child` runs) and negotiates.
    pub fn connect(child: &mut Child, socket: &Path, timeout: Duration) -> Result<Self, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("QEMU exited with {status}"));
            }
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(format!("QMP socket never came up: {e}")),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
        };
        qmp.next_with("QMP")?;
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    /// Runs a command without arguments and returns its `return` value.
    pub fn execute(&mut self, command: &str) -> Result<serde_json::Value, String> {
        self.writer
            .write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        Ok(self.next_with("return")?["return"].take())
    }

    /// The next message that has `key`, skipping events; QMP errors fail.
    fn next_with(&mut self, key: &str) -> Result<serde_json::Value, String> {
        loop {
            let mut line = String::new();
            if self
                .reader
                .read_line(&mut line)
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err("QMP closed".into());
            }
            let value: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| format!("bad QMP line {line:?}: {e}"))?;
            if let Some(error) = value.get("error") {
                return Err(format!("QMP error: {error}"));
            }
            if value.get(key).is_some() {
                return Ok(value);
            }
        }
    }
}

/// The test image built by `images/build-test-image`.
pub fn test_image() -> std::path::PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/out/qemu-worker-test.tar.zst");
    assert!(
        path.is_file(),
        "the test image is missing: run images/build-test-image (scripts/test does it)"
    );
    path
}

/// A cache in `dir` holding the test image, and a lease on it.
pub async fn cached_test_image(
    dir: &Path,
) -> (
    qemu_worker::image::ImageCache,
    qemu_worker::image::ImageLease,
) {
    use qemu_worker::image::{
        CacheSettings, FetchPolicy, Fetcher, ImageCache, ImageLimits, ImageRequest,
    };
    let image = test_image();
    let settings = CacheSettings {
        dir: dir.join("cache"),
        max_size: 1 << 30,
        min_free: 0,
        limits: ImageLimits {
            max_image_bytes: 1 << 30,
        },
        allowed_local_dirs: vec![image.parent().expect("images/out").to_path_buf()],
    };
    let cache = ImageCache::open(settings, Fetcher::new(FetchPolicy::default()))
        .await
        .expect("cache");
    let request = ImageRequest {
        source: qemu_worker::job::ImageSource::Local(image),
        sha256: None,
    };
    let lease = cache
        .acquire(&request, None)
        .await
        .expect("the test image is valid");
    (cache, lease)
}

/// The test image's machine definition, edited by `change`, resolved within limits of
/// one vCPU and `memory` MiB (which the machine gets).
pub fn test_machine(
    lease: &qemu_worker::image::ImageLease,
    name: &str,
    memory: u64,
    change: impl FnOnce(&mut qemu_worker::job::MachineDefinition),
) -> qemu_worker::job::Machine {
    use qemu_worker::job::{Identity, MachineDefinition, MachineLayers, MachineLimits};
    let mut image = lease.contents().machine.clone();
    change(&mut image);
    let layers = MachineLayers {
        payload: MachineDefinition {
            memory: Some(memory),
            ..Default::default()
        },
        image,
        ..Default::default()
    };
    let limits = MachineLimits {
        max_memory: memory,
        max_cpus: 1,
        default_threads: 1,
    };
    layers
        .resolve(&limits, &Identity::derive(name, 0))
        .expect("the test machine fits its limits")
}

/// Prepares a TCG VM of the test image: run dir `dir/<name>`, logs in `dir/<name>-logs`.
pub async fn test_launch(
    lease: &qemu_worker::image::ImageLease,
    machine: &qemu_worker::job::Machine,
    dir: &Path,
    name: &str,
    network: qemu_worker::vm::NetworkAttachment,
) -> qemu_worker::vm::VmLaunch {
    use qemu_worker::vm::{Accelerator, LaunchPlan, RunDir, prepare_launch};
    prepare_launch(LaunchPlan {
        name,
        image: lease,
        machine,
        run_dir: RunDir::new(&dir.join(name)).expect("run dir"),
        log_dir: dir.join(format!("{name}-logs")),
        network,
        accelerator: Accelerator::Tcg,
        max_console: 16 << 20,
    })
    .await
    .expect("launch")
}

/// User networking whose guestfwd helper is this build's `qemu-worker metadata-splice`.
pub fn metadata_network(socket: &str) -> qemu_worker::vm::NetworkAttachment {
    qemu_worker::vm::NetworkAttachment::User {
        guestfwd_command: vec![
            env!("CARGO_BIN_EXE_qemu-worker").into(),
            "metadata-splice".into(),
            socket.into(),
        ],
    }
}
/// A child process that is killed (and reaped) if it still runs when dropped, so that a
/// failing test leaves nothing behind.
pub struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    /// The child, no longer guarded (for `wait_with_output`).
    pub fn into_inner(mut self) -> Child {
        self.0.take().expect("the child is still held")
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("the child is still held")
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("the child is still held")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut()
            && matches!(child.try_wait(), Ok(None))
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
