//! UEFI machines against real QEMU and Debian's OVMF, without a guest (the image's disk
//! is blank: OVMF finds nothing to boot): each VM's own variable store in its run dir, a
//! boot snapshot that carries it, and a clear error when OVMF is not installed.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use qemu_worker::config::FirmwareConfig;
use qemu_worker::image::{
    CacheSettings, FetchPolicy, Fetcher, ImageCache, ImageLease, ImageLimits, ImageRequest,
    pack_image,
};
use qemu_worker::job::{
    Firmware, Identity, ImageSource, JobDir, Machine, MachineLayers, MachineLimits,
};
use qemu_worker::vm::{
    Accelerator, FirmwareError, LaunchPlan, NetworkAttachment, RunDir, SnapshotPlan, SnapshotStore,
    Vm, VmError, VmTimeouts, finish_resume, prepare_launch_with_snapshots,
};
use qemu_worker_protocol::agent::{self, PARK, RESUME, SYNC, VERSION};
use test_support::{processes_under, require, require_file};

const T: Duration = Duration::from_secs(10);

/// A scratch directory with a cached image whose machine.json asks for UEFI on q35, and
/// a copy of Debian's OVMF variable template the test may change.
struct Fixture {
    root: tempfile::TempDir,
    _cache: ImageCache,
    lease: ImageLease,
    firmware: FirmwareConfig,
}

impl Fixture {
    async fn new() -> Self {
        require("qemu-system-x86_64", "qemu-system-x86");
        require("qemu-img", "qemu-utils");
        let debian = FirmwareConfig::default();
        require_file(&debian.ovmf_code, "ovmf");
        require_file(&debian.ovmf_vars, "ovmf");
        // Short paths: unix socket names are limited to 108 bytes.
        let root = tempfile::Builder::new()
            .prefix("qw-uefi")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let image = root.path().join("image");
        std::fs::create_dir_all(&image).expect("image dir");
        std::fs::write(
            image.join("machine.json"),
            r#"{"version": 1, "chipset": "q35", "firmware": "uefi", "memory": 128}"#,
        )
        .expect("machine.json");
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(image.join("disk.qcow2"))
            .arg("16M")
            .status()
            .expect("qemu-img");
        assert!(status.success());
        let allowed = root.path().join("allowed");
        std::fs::create_dir_all(&allowed).expect("allowed");
        let limits = ImageLimits {
            max_image_bytes: 64 << 20,
        };
        pack_image(&image, &allowed.join("uefi.tar.zst"), limits).expect("pack");
        let cache = ImageCache::open(
            CacheSettings {
                dir: root.path().join("cache"),
                max_size: 1 << 30,
                min_free: 0,
                limits,
                allowed_local_dirs: vec![allowed.clone()],
            },
            Fetcher::new(FetchPolicy::default()),
        )
        .await
        .expect("cache");
        let lease = cache
            .acquire(
                &ImageRequest {
                    source: ImageSource::Local(allowed.join("uefi.tar.zst")),
                    sha256: None,
                },
                None,
            )
            .await
            .expect("image");
        let template = root.path().join("OVMF_VARS_4M.fd");
        std::fs::copy(&debian.ovmf_vars, &template).expect("template");
        let firmware = FirmwareConfig {
            ovmf_code: debian.ovmf_code,
            ovmf_vars: template,
        };
        Self {
            root,
            _cache: cache,
            lease,
            firmware,
        }
    }

    fn machine(&self, name: &str) -> Machine {
        let layers = MachineLayers {
            image: self.lease.contents().machine.clone(),
            ..Default::default()
        };
        let limits = MachineLimits {
            max_memory: 256,
            max_cpus: 1,
            default_threads: 1,
        };
        layers
            .resolve(&limits, &Identity::derive(name, 0))
            .expect("the image's machine is valid")
    }

    fn plan<'a>(
        &'a self,
        name: &'a str,
        machine: &'a Machine,
        firmware: &'a FirmwareConfig,
    ) -> LaunchPlan<'a> {
        let dir = self.root.path();
        LaunchPlan {
            name,
            image: &self.lease,
            machine,
            run_dir: RunDir::new(&dir.join("run").join(name)).expect("run dir"),
            job_dir: JobDir::at(dir.join(format!("{name}-logs"))),
            // The guest reaches nothing: there is no guest.
            network: NetworkAttachment::User {
                guestfwd_command: vec!["/bin/false".into()],
            },
            accelerator: Accelerator::Tcg,
            max_console: 1 << 20,
            firmware,
            boot_inputs: &[],
        }
    }
}

/// QEMU's block nodes by name: (file, read-only).
async fn block_nodes(vm: &Vm) -> Vec<(String, String, bool)> {
    let nodes = vm
        .qmp()
        .execute("query-named-block-nodes", None, T)
        .await
        .expect("query-named-block-nodes");
    nodes
        .as_array()
        .expect("a list")
        .iter()
        .map(|n| {
            (
                n["node-name"].as_str().unwrap_or_default().to_owned(),
                n["file"].as_str().unwrap_or_default().to_owned(),
                n["ro"].as_bool().unwrap_or_default(),
            )
        })
        .collect()
}
#[tokio::test(flavor = "multi_thread")]
async fn a_uefi_vm_runs_over_its_own_variable_store_which_its_boot_snapshot_carries() {
    let fx = Fixture::new().await;
    let template = std::fs::read(&fx.firmware.ovmf_vars).expect("template");
    let machine = fx.machine("uefi-1");
    assert_eq!(machine.firmware, Firmware::Uefi);
    let store = SnapshotStore::new(fx.lease.snapshot_dir());

    // Booting: a copy of the template, the VM's alone.
    let (launch, plan) =
        prepare_launch_with_snapshots(fx.plan("uefi-1", &machine, &fx.firmware), Some(&store))
            .await
            .expect("launch");
    let SnapshotPlan::Save(key) = plan else {
        panic!("no snapshot yet, so the first VM saves one: {plan:?}");
    };
    let vars = PathBuf::from(launch.run_dir.uefi_vars());
    assert_eq!(std::fs::read(&vars).expect("the VM's store"), template);
    let (copy, original) = (
        std::fs::metadata(&vars).expect("copy"),
        std::fs::metadata(&fx.firmware.ovmf_vars).expect("template"),
    );
    assert_ne!(copy.ino(), original.ino(), "a copy, not a link");
    assert_eq!(copy.permissions().mode() & 0o777, 0o600);

    let vm = Vm::start(launch, VmTimeouts::default())
        .await
        .expect("QEMU starts with OVMF");
    let status = vm.qmp().query_status(T).await.expect("QMP answers");
    assert_eq!(status.status, "prelaunch");
    let nodes = block_nodes(&vm).await;
    let code = fx.firmware.ovmf_code.display().to_string();
    let store_file = vars.display().to_string();
    assert!(
        nodes.contains(&("firmware-code".into(), code, true)),
        "{nodes:?}"
    );
    assert!(
        nodes.contains(&("firmware-vars".into(), store_file, false)),
        "{nodes:?}"
    );

    // From now on the template is another's: what the snapshot and the resumed VM get
    // must come from this VM's store.
    let other: Vec<u8> = template.iter().map(|b| !b).collect();
    std::fs::write(&fx.firmware.ovmf_vars, &other).expect("change the template");

    vm.resume().await.expect("OVMF runs");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // There is no guest: its tools' side of the park handshake answers on a socket put
    // where the VM's agent port is.
    let _guest = fake_guest_tools(Path::new(&vm.run_dir().agent_socket()));
    let snapshot = store
        .take(&key, vm.qmp(), vm.run_dir())
        .await
        .expect("a UEFI VM is saved");
    let saved = std::fs::read(snapshot.uefi_vars()).expect("the snapshot carries the store");
    assert_eq!(saved.len(), template.len());
    assert_ne!(saved, other);
    let run_dir = vm.run_dir().path().to_path_buf();
    vm.discard().await;
    assert!(!run_dir.exists(), "the run dir and its store are removed");

    // Resuming: a copy of the snapshot's store, not of the template.
    let machine = fx.machine("uefi-2");
    let (launch, plan) =
        prepare_launch_with_snapshots(fx.plan("uefi-2", &machine, &fx.firmware), Some(&store))
            .await
            .expect("launch");
    assert!(
        matches!(&plan, SnapshotPlan::Resume(s) if s.key == key),
        "the second VM resumes the snapshot: {plan:?}"
    );
    let vars = PathBuf::from(launch.run_dir.uefi_vars());
    assert_eq!(std::fs::read(&vars).expect("the VM's store"), saved);
    let vm = Vm::start(launch, VmTimeouts::default())
        .await
        .expect("QEMU starts from the snapshot");
    finish_resume(vm.qmp()).await.expect("the state loads");
    vm.resume().await.expect("cont");
    let status = vm.qmp().query_status(T).await.expect("QMP answers");
    assert!(status.running, "{status:?}");
    let run_dir = vm.run_dir().path().to_path_buf();
    vm.discard().await;
    assert!(!run_dir.exists(), "the run dir and its store are removed");
    assert!(processes_under(fx.root.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_without_ovmf_is_told_which_file_and_package_and_keeps_no_run_dir() {
    let fx = Fixture::new().await;
    let machine = fx.machine("no-ovmf");
    for (firmware, missing, key) in [
        (
            FirmwareConfig {
                ovmf_code: fx.root.path().join("none/OVMF_CODE_4M.fd"),
                ..fx.firmware.clone()
            },
            fx.root.path().join("none/OVMF_CODE_4M.fd"),
            "ovmfCode",
        ),
        (
            FirmwareConfig {
                ovmf_vars: fx.root.path().join("none/OVMF_VARS_4M.fd"),
                ..fx.firmware.clone()
            },
            fx.root.path().join("none/OVMF_VARS_4M.fd"),
            "ovmfVars",
        ),
    ] {
        let plan = fx.plan("no-ovmf", &machine, &firmware);
        let run_dir = plan.run_dir.path().to_path_buf();
        let error = prepare_launch_with_snapshots(plan, None)
            .await
            .expect_err("no OVMF");
        match &error {
            VmError::Firmware(FirmwareError::Missing { path, key: k }) => {
                assert_eq!((path, *k), (&missing, key));
            }
            other => panic!("expected a missing firmware file, got {other:?}"),
        }
        let message = error.to_string();
        assert!(
            message.contains(&missing.display().to_string())
                && message.contains("apt-get install ovmf")
                && message.contains(&format!("firmware.{key}")),
            "{message}"
        );
        assert!(!run_dir.exists(), "nothing is left: {}", run_dir.display());
    }
}

/// Echoes SYNC, PARK and RESUME as parked guest tools do (and answers VERSION), on a socket bound at `path`
/// (QEMU's own socket there is unlinked first).
fn fake_guest_tools(path: &Path) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).expect("bind the agent socket");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            loop {
                let mut head = [0u8; agent::HEAD_LEN];
                if stream.read_exact(&mut head).await.is_err() {
                    break;
                }
                let (kind, len) = agent::parse_head(head);
                let mut payload = vec![0u8; len.min(agent::MAX_CONTROL)];
                if stream.read_exact(&mut payload).await.is_err() {
                    break;
                }
                assert!(
                    matches!(kind, SYNC | PARK | RESUME | VERSION),
                    "frame {kind}"
                );
                // VERSION is answered with the tools' own; the rest are echoed.
                let payload = if kind == VERSION {
                    format!(r#"{{"version":{}}}"#, agent::PROTOCOL_VERSION).into_bytes()
                } else {
                    payload
                };
                let mut answer = agent::head(kind, payload.len() as u32).to_vec();
                answer.extend_from_slice(&payload);
                if stream.write_all(&answer).await.is_err() {
                    break;
                }
            }
        }
    })
}
