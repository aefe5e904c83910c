use super::boot::let_run;
use super::error::JobError;
use super::run::Engine;
use crate::image::{ImageLease, ImageRequest, Progress};
use crate::job::{Identity, JobDir, Machine, MachineDefinition, MachineLayers};
use crate::vm::{
    Accelerator, LaunchPlan, NetworkAttachment, Vm, choose_accelerator_cached, prepare_launch,
};

/// An image booted with no job (`qemu-worker vm boot`): the steps of a job's prepare and
/// boot without a payload, a metadata service or a boot snapshot.
#[derive(Debug)]
pub struct BareVm {
    pub vm: Vm,
    /// Held until the VM is torn down (the cache keeps the image meanwhile).
    pub lease: ImageLease,
    pub accelerator: Accelerator,
    /// Where its qemu.log and console.log go.
    pub dir: JobDir,
}

impl Engine {
    /// The accelerator jobs run under (probed once per boot of the host).
    /// The accelerator `serve` decides before its first claim (the same cached probe
    /// each job asks).
    pub async fn accelerator_for_serve(&self) -> Result<Accelerator, crate::vm::AccelError> {
        choose_accelerator_cached(self.config.accelerator, &self.config.state_dir).await
    }

    pub(super) async fn accelerator(&self) -> Result<Accelerator, JobError> {
        choose_accelerator_cached(self.config.accelerator, &self.config.state_dir)
            .await
            .map_err(JobError::Accelerator)
    }

    /// The machine a job gets: payload over the image's machine.json over worker.yml,
    /// within the limits.
    pub(super) fn machine(
        &self,
        payload: MachineDefinition,
        lease: &ImageLease,
        identity: &Identity,
    ) -> Result<Machine, Vec<crate::schema::Issue>> {
        let layers = MachineLayers {
            payload,
            image: lease.contents().machine.clone(),
            worker_config: self.config.machine.clone(),
        };
        layers.resolve(&self.config.limits, identity)
    }

    /// Boots `request`'s image as a job would, with the guest's network going nowhere
    /// (its connections to 169.254.169.254 fail), and lets it run.
    pub async fn boot_bare(
        &self,
        request: &ImageRequest,
        progress: Option<Progress>,
        name: &str,
    ) -> Result<BareVm, JobError> {
        let accelerator = self.accelerator().await?;
        let lease = self
            .cache
            .acquire(request, progress)
            .await
            .map_err(JobError::Image)?;
        let machine = self
            .machine(
                MachineDefinition::default(),
                &lease,
                &Identity::derive(name, 0),
            )
            .map_err(|issues| JobError::Machine { issues })?;
        let dir = JobDir::at(self.config.state_dir.join("vm-boot"));
        let run_dir = self.run_dir(name)?;
        let launch = prepare_launch(LaunchPlan {
            name,
            image: &lease,
            machine: &machine,
            run_dir,
            job_dir: dir.clone(),
            network: NetworkAttachment::User {
                guestfwd_command: vec!["/bin/false".into()],
            },
            accelerator,
            max_console: self.config.logs.max_console_size.bytes(),
            firmware: &self.config.firmware,
            boot_inputs: &[],
        })
        .await
        .map_err(JobError::Launch)?;
        let vm = Vm::start(launch, self.vm_timeouts())
            .await
            .map_err(JobError::Start)?;
        let vm = let_run(vm).await?;
        Ok(BareVm {
            vm,
            lease,
            accelerator,
            dir,
        })
    }
}
