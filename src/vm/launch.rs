use std::path::PathBuf;

use super::argv::{Accelerator, NetworkAttachment, VmSpec, qemu_argv};
use super::run_dir::RunDir;
use super::supervisor::{VmError, VmLaunch, create_run_dir};
use crate::image::ImageLease;
use crate::job::Machine;

/// Everything needed to start a VM from a cached image.
#[derive(Debug)]
pub struct LaunchPlan<'a> {
    /// A short name for process listings.
    pub name: &'a str,
    pub image: &'a ImageLease,
    pub machine: &'a Machine,
    pub run_dir: RunDir,
    pub log_dir: PathBuf,
    pub network: NetworkAttachment,
    pub accelerator: Accelerator,
}

/// Creates the run dir (0700) with the job's overlay in it, and builds QEMU's command
/// line. The overlay goes away with the run dir when the VM is torn down.
pub fn prepare_launch(plan: LaunchPlan<'_>) -> Result<VmLaunch, VmError> {
    create_run_dir(plan.run_dir.path())?;
    let overlay = plan.run_dir.path().join("overlay.qcow2");
    let disk = plan.image.create_overlay(&overlay).map_err(|e| {
        let _ = std::fs::remove_dir_all(plan.run_dir.path());
        VmError::Prepare {
            path: overlay.clone(),
            source: std::io::Error::other(e.to_string()),
        }
    })?;
    // Direct boot only when the resolved machine asks for it (a payload may turn it off).
    let kernel = plan
        .machine
        .kernel
        .as_ref()
        .and_then(|_| plan.image.contents().kernel_files());
    let argv = qemu_argv(&VmSpec {
        name: plan.name,
        machine: plan.machine,
        run_dir: &plan.run_dir,
        disk: &disk,
        kernel: kernel.as_ref(),
        network: &plan.network,
        accelerator: plan.accelerator,
    });
    let netns = match &plan.network {
        NetworkAttachment::Tap { netns, .. } => Some(netns.clone()),
        NetworkAttachment::User { .. } => None,
    };
    Ok(VmLaunch {
        argv,
        run_dir: plan.run_dir,
        log_dir: plan.log_dir,
        netns,
    })
}
