use std::path::{Path, PathBuf};

use super::argv::{Accelerator, NetworkAttachment, VmSpec, qemu_argv};
use super::firmware;
use super::run_dir::RunDir;
use super::snapshot::{Lookup, Snapshot, SnapshotStore, Volatile};
use super::supervisor::{VmError, VmLaunch, create_run_dir};
use crate::config::FirmwareConfig;
use crate::error_chain::DisplayChain;
use crate::image::{BootDisk, ImageLease, KernelFiles, QemuImgError};
use crate::job::{Firmware, JobDir, Machine};

/// Everything needed to start a VM from a cached image.
#[derive(Debug)]
pub struct LaunchPlan<'a> {
    /// A short name for process listings.
    pub name: &'a str,
    pub image: &'a ImageLease,
    pub machine: &'a Machine,
    pub run_dir: RunDir,
    pub job_dir: JobDir,
    pub network: NetworkAttachment,
    pub accelerator: Accelerator,
    /// The serial log's cap (worker.yml `logs.maxConsoleSize`).
    pub max_console: u64,
    /// OVMF's files (worker.yml `firmware`), for a `uefi` machine.
    pub firmware: &'a FirmwareConfig,
    /// What the guest reads at boot besides its command line (a cloud-init VM's
    /// user-data): part of a boot snapshot's key.
    pub boot_inputs: &'a [u8],
}

/// What a launch does about boot snapshots (see `snapshot.rs`).
#[derive(Debug)]
pub enum SnapshotPlan {
    /// Snapshots are off, or cannot work for this machine: boot.
    Boot,
    /// Boot, and save a snapshot under this key when the guest parks.
    Save(String),
    /// Resume from this snapshot instead of booting.
    Resume(Snapshot),
}

/// Creates the run dir (0700) with the job's overlay in it (and a UEFI machine's variable
/// store), and builds QEMU's command line. Both go away with the run dir when the VM is
/// torn down.
pub async fn prepare_launch(plan: LaunchPlan<'_>) -> Result<VmLaunch, VmError> {
    prepare_launch_with_snapshots(plan, None)
        .await
        .map(|(launch, _)| launch)
}

/// `prepare_launch`, resuming from the image's boot snapshot for this machine when
/// `snapshots` has one (the overlay then sits on the snapshot's disk), or planning to
/// save one.
pub async fn prepare_launch_with_snapshots(
    plan: LaunchPlan<'_>,
    snapshots: Option<&SnapshotStore>,
) -> Result<(VmLaunch, SnapshotPlan), VmError> {
    create_run_dir(plan.run_dir.path())?;
    let uefi = plan.machine.firmware == Firmware::Uefi;
    if uefi && let Err(e) = firmware::check_code(plan.firmware) {
        let _ = tokio::fs::remove_dir_all(plan.run_dir.path()).await;
        return Err(e.into());
    }
    let overlay = plan.run_dir.overlay();
    // Direct boot only when the resolved machine asks for it (a payload may turn it off).
    let kernel = plan
        .machine
        .kernel
        .as_ref()
        .and_then(|_| plan.image.kernel_files());
    let mut snapshot = SnapshotPlan::Boot;
    if let Some(store) = snapshots {
        // The key is the cold boot's command line (the overlay file need not exist).
        let disk = plan.image.boot_chain(&overlay);
        let argv = qemu_argv(&spec(&plan, kernel.as_ref(), &disk, None));
        let m = plan.machine;
        let key = SnapshotStore::key(
            &argv,
            Volatile {
                run_dir: plan.run_dir.path(),
                name: plan.name,
                mac: &m.mac,
                uuid: &m.uuid,
                disk_serial: &m.disk_serial,
            },
            uefi.then_some(plan.firmware.ovmf_code.as_path()),
            plan.boot_inputs,
        );
        // The lookup reads the snapshot directory: on the blocking pool.
        let (looking, wanted) = (store.clone(), key.clone());
        let lookup = tokio::task::spawn_blocking(move || looking.lookup(&wanted)).await;
        snapshot = match lookup {
            Ok(Lookup::Ready(snapshot)) => SnapshotPlan::Resume(snapshot),
            Ok(Lookup::Missing) => SnapshotPlan::Save(key),
            Ok(Lookup::Full) => SnapshotPlan::Boot,
            Ok(Lookup::Unsupported(why)) => {
                tracing::debug!(key, why, "boot snapshots cannot work for this machine");
                SnapshotPlan::Boot
            }
            Err(_) => SnapshotPlan::Boot,
        };
    }
    let resumed = match &snapshot {
        SnapshotPlan::Resume(saved) => match resume_disk(&plan, saved, &overlay).await {
            Ok(disk) => Some((disk, saved.vmstate().display().to_string())),
            // Incomplete, or removed meanwhile by a job that found it broken: drop it
            // (the next job saves a new one) and boot.
            Err(why) => {
                tracing::warn!(
                    key = %saved.key,
                    why = %DisplayChain(&why),
                    "cannot resume the boot snapshot; booting"
                );
                if let Some(store) = snapshots {
                    store.discard(saved).await;
                }
                let _ = tokio::fs::remove_file(&overlay).await;
                let _ = tokio::fs::remove_file(plan.run_dir.serial_log()).await;
                snapshot = SnapshotPlan::Boot;
                None
            }
        },
        _ => None,
    };
    let (disk, vmstate) = match resumed {
        Some((disk, vmstate)) => (disk, Some(vmstate)),
        None => {
            let disk = match plan.image.create_overlay(&overlay).await {
                Ok(disk) => disk,
                Err(e) => {
                    let _ = tokio::fs::remove_dir_all(plan.run_dir.path()).await;
                    return Err(VmError::Overlay {
                        path: overlay.clone(),
                        source: e,
                    });
                }
            };
            if uefi
                && let Err(e) = firmware::install_template_vars(plan.firmware, &plan.run_dir).await
            {
                let _ = tokio::fs::remove_dir_all(plan.run_dir.path()).await;
                return Err(e.into());
            }
            (disk, None)
        }
    };
    let argv = qemu_argv(&spec(&plan, kernel.as_ref(), &disk, vmstate.as_deref()));
    let netns = match &plan.network {
        NetworkAttachment::Tap { netns, .. } => Some(netns.clone()),
        NetworkAttachment::User { .. } => None,
    };
    Ok((
        VmLaunch {
            argv,
            run_dir: plan.run_dir,
            job_dir: plan.job_dir,
            netns,
            max_console: plan.max_console,
        },
        snapshot,
    ))
}

/// Why a boot snapshot's disk, console or variable store cannot be set up for a job.
#[derive(Debug, thiserror::Error)]
enum ResumeDiskError {
    #[error(transparent)]
    Overlay(#[from] QemuImgError),
    #[error("cannot copy the saved console {}", path.display())]
    Console {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot copy the saved UEFI variable store {}", path.display())]
    UefiVars {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The job's overlay over the snapshot's saved disk (over the image's disk), the
/// console so far in the run dir's serial log, and a UEFI machine's variable store as
/// it was saved (the migrated flash must find the store it was saved with).
async fn resume_disk(
    plan: &LaunchPlan<'_>,
    saved: &Snapshot,
    overlay: &Path,
) -> Result<BootDisk, ResumeDiskError> {
    let disk = plan
        .image
        .create_resume_overlay(overlay, &saved.disk())
        .await?;
    // The console goes on from the boot it was saved in.
    let console = saved.console();
    tokio::fs::copy(&console, plan.run_dir.serial_log())
        .await
        .map_err(|source| ResumeDiskError::Console {
            path: console,
            source,
        })?;
    if plan.machine.firmware == Firmware::Uefi {
        let vars = saved.uefi_vars();
        firmware::copy_vars(&vars, &plan.run_dir)
            .await
            .map_err(|source| ResumeDiskError::UefiVars { path: vars, source })?;
    }
    Ok(disk)
}

fn spec<'a>(
    plan: &'a LaunchPlan<'_>,
    kernel: Option<&'a KernelFiles>,
    disk: &'a BootDisk,
    resume: Option<&'a str>,
) -> VmSpec<'a> {
    VmSpec {
        name: plan.name,
        machine: plan.machine,
        run_dir: &plan.run_dir,
        disk,
        kernel,
        ovmf_code: &plan.firmware.ovmf_code,
        network: &plan.network,
        accelerator: plan.accelerator,
        resume,
    }
}
