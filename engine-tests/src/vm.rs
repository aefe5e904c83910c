//! The VM runtime in process, on the test image (for `tests/vm_guest.rs` and the `vm`
//! and `guest` benchmarks): a cache holding the test image, its machine within small
//! limits, a TCG launch, and user networking whose guestfwd helper is the worker's.

use std::path::Path;

use qemu_worker::image::{
    CacheSettings, FetchPolicy, Fetcher, ImageCache, ImageLease, ImageLimits, ImageRequest,
};
use qemu_worker::job::{
    Identity, ImageSource, Machine, MachineDefinition, MachineLayers, MachineLimits,
};
use qemu_worker::vm::{
    Accelerator, LaunchPlan, NetworkAttachment, RunDir, VmLaunch, prepare_launch,
};

use crate::{assets, worker_binary};

/// A cache in `dir` holding the test image, and a lease on it.
pub async fn cached_test_image(dir: &Path) -> (ImageCache, ImageLease) {
    let image = assets::test_image();
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
        source: ImageSource::Local(image),
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
    lease: &ImageLease,
    name: &str,
    memory: u64,
    change: impl FnOnce(&mut MachineDefinition),
) -> Machine {
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
    lease: &ImageLease,
    machine: &Machine,
    dir: &Path,
    name: &str,
    network: NetworkAttachment,
) -> VmLaunch {
    prepare_launch(LaunchPlan {
        name,
        image: lease,
        machine,
        run_dir: RunDir::new(&dir.join(name)).expect("run dir"),
        job_dir: qemu_worker::job::JobDir::at(dir.join(format!("{name}-logs"))),
        network,
        accelerator: Accelerator::Tcg,
        max_console: 16 << 20,
        firmware: &qemu_worker::config::FirmwareConfig::default(),
        boot_inputs: &[],
    })
    .await
    .expect("launch")
}

/// User networking whose guestfwd helper is `qemu-worker metadata-splice` of the binary
/// under test ([`worker_binary`]).
pub fn metadata_network(socket: &str) -> NetworkAttachment {
    NetworkAttachment::User {
        guestfwd_command: vec![
            worker_binary().display().to_string(),
            "metadata-splice".into(),
            socket.into(),
        ],
    }
}
