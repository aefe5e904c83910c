use std::path::Path;
use std::time::Duration;

use super::context::JobContext;
use super::error::JobError;
use super::prepare::Prepared;
use super::run::Engine;
use crate::config::NetworkBackend;
use crate::error_chain::display_chain;
use crate::job::SnapshotEvent;
use crate::metadata::{
    MetadataHandle, MetadataLimits, Offer, start_metadata_service, start_metadata_service_tcp,
};
use crate::vm::{
    LaunchPlan, NetworkAttachment, ResumeError, RunDir, Snapshot, SnapshotPlan, SnapshotStore,
    TAP_DEVICE, TapNetwork, Vm, VmError, VmTimeouts, finish_resume, prepare_launch_with_snapshots,
    release_resumed,
};

/// A running VM with what it needs until teardown. Field order is drop order: the VM
/// goes before its metadata service and its network.
#[derive(Debug)]
pub struct Running {
    pub vm: Vm,
    pub service: MetadataHandle,
    pub tap: Option<TapNetwork>,
    /// Save a boot snapshot under this key once the guest parks.
    pub save: Option<String>,
}

/// Lets a started (paused) VM run; one that cannot is torn down.
pub(super) async fn let_run(vm: Vm) -> Result<Vm, JobError> {
    match vm.resume().await {
        Ok(()) => Ok(vm),
        Err(e) => {
            vm.discard().await;
            Err(JobError::Continue(e))
        }
    }
}

/// How one attempt to start the VM went.
enum Started {
    Running(Box<Running>),
    /// The boot snapshot did not load; the VM is gone.
    ResumeFailed {
        snapshot: Snapshot,
        why: ResumeError,
    },
}

impl Engine {
    /// Phase *boot or resume*: resumes the image's boot snapshot when there is one,
    /// else boots. A snapshot that does not load is dropped (the next job saves a new
    /// one) and the job moves on to booting.
    pub(super) async fn boot_or_resume(
        &self,
        ctx: &mut JobContext<'_>,
        prepared: &Prepared,
    ) -> Result<Running, JobError> {
        let mut snapshots = prepared.snapshots.as_ref();
        loop {
            match self.start_vm(ctx, prepared, snapshots).await? {
                Started::Running(running) => {
                    ctx.phase("start");
                    return Ok(*running);
                }
                Started::ResumeFailed { snapshot, why } => {
                    if let Some(store) = snapshots {
                        store.discard(&snapshot).await;
                    }
                    ctx.snapshot_event(SnapshotEvent::Fallback);
                    ctx.note(&format!(
                        "the boot snapshot {} did not load ({}); booting instead",
                        snapshot.key,
                        display_chain(&why)
                    ))
                    .await;
                    // The transition resume → boot: no snapshot is looked up again.
                    snapshots = None;
                }
            }
        }
    }

    /// Sets up the network and the metadata service, starts QEMU (resuming or planning
    /// to save a snapshot as `snapshots` says) and lets the guest run.
    async fn start_vm(
        &self,
        ctx: &JobContext<'_>,
        prepared: &Prepared,
        snapshots: Option<&SnapshotStore>,
    ) -> Result<Started, JobError> {
        let run_dir = self.run_dir(&ctx.name)?;
        let outbound = prepared.payload.wants_outbound();
        let (network, service, tap) = self
            .network(ctx, &run_dir, prepared.offer(), outbound)
            .await?;
        let (launch, plan) = prepare_launch_with_snapshots(
            LaunchPlan {
                name: &ctx.name,
                image: &prepared.lease,
                machine: &prepared.machine,
                run_dir,
                job_dir: ctx.dir().clone(),
                network,
                accelerator: prepared.accelerator,
                max_console: self.config.logs.max_console_size.bytes(),
                firmware: &self.config.firmware,
                boot_inputs: &prepared.boot_inputs(),
            },
            snapshots,
        )
        .await
        .map_err(JobError::Launch)?;
        let timeouts = self.vm_timeouts();
        // A resumed QEMU exits as soon as its saved state fails to load, so a start that
        // fails is the snapshot's failure as much as a load QMP reports.
        let (vm, save, resumed) = match (Vm::start(launch, timeouts).await, plan) {
            (Ok(vm), SnapshotPlan::Resume(snapshot)) => match finish_resume(vm.qmp()).await {
                Ok(()) => (vm, None, Some(snapshot)),
                Err(why) => {
                    vm.discard().await;
                    return Ok(Started::ResumeFailed { snapshot, why });
                }
            },
            (Ok(vm), SnapshotPlan::Save(key)) => {
                service.arm_park();
                (vm, Some(key), None)
            }
            (Ok(vm), SnapshotPlan::Boot) => (vm, None, None),
            (Err(e @ VmError::QemuFailed { .. }), SnapshotPlan::Resume(snapshot)) => {
                let why = ResumeError::Exited(e);
                return Ok(Started::ResumeFailed { snapshot, why });
            }
            (Err(e), _) => return Err(JobError::Start(e)),
        };
        if resumed.is_some() {
            service.hold_task();
        }
        let vm = let_run(vm).await?;
        if let Some(snapshot) = resumed {
            let agent_socket = vm.run_dir().agent_socket();
            if let Err(why) = release_resumed(Path::new(&agent_socket)).await {
                vm.discard().await;
                return Ok(Started::ResumeFailed { snapshot, why });
            }
            service.release_task();
            ctx.snapshot_event(SnapshotEvent::Resumed);
            ctx.note(&format!(
                "resumed from boot snapshot {} instead of booting",
                snapshot.key
            ))
            .await;
        }
        Ok(Started::Running(Box::new(Running {
            vm,
            service,
            tap,
            save,
        })))
    }

    /// The VM's run directory under `<stateDir>/run`, checked for socket path lengths.
    pub(super) fn run_dir(&self, name: &str) -> Result<RunDir, JobError> {
        RunDir::new(&self.config.state_dir.join("run").join(name)).map_err(JobError::RunDir)
    }

    /// The supervisor's timeouts, with worker.yml's grace for a guest's power-off.
    pub(super) fn vm_timeouts(&self) -> VmTimeouts {
        VmTimeouts {
            powerdown: Duration::from_secs(self.config.timeouts.shutdown_seconds),
            ..VmTimeouts::default()
        }
    }

    /// The metadata service's limits from worker.yml.
    fn metadata_limits(&self) -> MetadataLimits {
        MetadataLimits {
            max_connections: self.config.metadata.max_connections as usize,
            log_idle: Duration::from_secs(self.config.logs.idle_seconds),
            ..MetadataLimits::default()
        }
    }

    /// Sets up the VM's network and its metadata service; both live until the end of
    /// the job.
    async fn network(
        &self,
        ctx: &JobContext<'_>,
        run_dir: &RunDir,
        offer: Offer,
        outbound: bool,
    ) -> Result<(NetworkAttachment, MetadataHandle, Option<TapNetwork>), JobError> {
        match self.config.network.backend {
            NetworkBackend::User if outbound => Err(JobError::OutboundNeedsTap),
            NetworkBackend::User => {
                // The run dir must exist for the socket; prepare_launch keeps it.
                crate::vm::create_run_dir(run_dir.path()).map_err(JobError::RunDirCreate)?;
                let socket = run_dir.metadata_socket();
                let service = start_metadata_service(
                    Path::new(&socket),
                    offer,
                    ctx.log(),
                    self.metadata_limits(),
                )
                .await
                .map_err(JobError::Metadata)?;
                let attachment = NetworkAttachment::User {
                    guestfwd_command: vec![
                        self.helper.display().to_string(),
                        "metadata-splice".into(),
                        socket,
                    ],
                };
                Ok((attachment, service, None))
            }
            NetworkBackend::Tap => {
                let tap = TapNetwork::create(&ctx.name, outbound)
                    .await
                    .map_err(JobError::Network)?;
                let listener = tap.bind_metadata().await.map_err(JobError::Network)?;
                let service =
                    start_metadata_service_tcp(listener, offer, ctx.log(), self.metadata_limits())
                        .map_err(JobError::Metadata)?;
                let attachment = NetworkAttachment::Tap {
                    ifname: TAP_DEVICE.into(),
                    netns: tap.netns().to_owned(),
                };
                Ok((attachment, service, Some(tap)))
            }
        }
    }
}
