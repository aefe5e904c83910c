use super::context::JobContext;
use super::error::JobError;
use super::resolve::Ending;
use super::run::Engine;
use crate::cloud_init::{GuestTools, Seed, SeedNetwork, UserData};
use crate::config::NetworkBackend;
use crate::image::{ImageLease, ImageRequest};
use crate::job::{JobPayload, Machine, PayloadContext, validate_payload};
use crate::metadata::{Datasource, Offer, Task};
use crate::schema::Issue;
use crate::vm::{Accelerator, SnapshotStore};

/// A job ready to boot: its payload checked, its image leased, its machine resolved.
#[derive(Debug)]
pub struct Prepared {
    pub payload: JobPayload,
    pub lease: ImageLease,
    pub machine: Machine,
    pub accelerator: Accelerator,
    /// Where this image's boot snapshots are, when this job may use them.
    pub snapshots: Option<SnapshotStore>,
    /// What the VM's cloud-init reads, when it is offered the datasource.
    pub datasource: Option<Datasource>,
}

impl Prepared {
    /// What the guest tools fetch from the metadata service.
    pub fn task(&self) -> Task {
        Task {
            command: self.payload.command.clone(),
            env: self.payload.env.clone(),
            max_run_time: self.payload.max_run_time,
            working_directory: "/root".into(),
        }
    }

    /// Everything the VM's metadata service serves.
    pub fn offer(&self) -> Offer {
        Offer {
            task: self.task(),
            datasource: self.datasource.clone(),
        }
    }

    /// What the guest reads at boot that its command line does not show: a boot
    /// snapshot of one user-data is no snapshot of another.
    pub fn boot_inputs(&self) -> Vec<u8> {
        self.datasource
            .as_ref()
            .map(|d| d.user_data.bytes().to_vec())
            .unwrap_or_default()
    }
}

impl Engine {
    /// Phase *prepare*: validate before spending anything, then choose the accelerator,
    /// lease the image and resolve the machine within the limits.
    pub(super) async fn prepare(&self, ctx: &mut JobContext<'_>) -> Result<Prepared, Ending> {
        if let Some(reason) = *ctx.job.cancel.borrow() {
            return Err(Ending::Stopped(reason));
        }
        let check = validate_payload(
            &ctx.job.payload,
            &PayloadContext::from_config(&self.config),
            &ctx.identity,
        );
        ctx.phase("validate");
        let Some(payload) = check.payload.filter(|_| check.issues.is_empty()) else {
            return Err(Ending::Rejected(check.issues));
        };

        let accelerator = self.accelerator().await.map_err(Ending::Error)?;
        ctx.phase("accelerator");

        let request = ImageRequest::from_reference(&payload.image)
            .map_err(|e| Ending::Rejected(vec![Issue::new("/image", e.to_string())]))?;
        let lease = self
            .cache
            .acquire(&request, None)
            .await
            .map_err(|e| Ending::Error(JobError::Image(e)))?;
        ctx.phase("image");

        let machine = self
            .machine(
                payload.machine.clone().unwrap_or_default(),
                &lease,
                &ctx.identity,
            )
            .map_err(Ending::Rejected)?;
        ctx.phase("machine");

        if payload.user_data.is_some() && !machine.cloud_init {
            return Err(Ending::Rejected(vec![Issue::new(
                "/userData",
                "userData needs the cloud-init datasource, which this VM is not offered: its \
                 machine has cloudInit off (or auto, and the image boots a kernel directly); \
                 set machine.cloudInit: on",
            )]));
        }
        let datasource = if machine.cloud_init {
            let tools = self.guest_tools().await.map_err(Ending::Error)?;
            let network = match self.config.network.backend {
                NetworkBackend::User => SeedNetwork::Dhcp,
                NetworkBackend::Tap => SeedNetwork::Static {
                    outbound: payload.wants_outbound(),
                },
            };
            Some(Datasource {
                seed: Seed::new(&ctx.identity, &ctx.name, &machine.mac, network),
                user_data: UserData::new(&tools.sha256, payload.user_data.as_deref()),
                guest_tools: tools,
            })
        } else {
            None
        };

        // Snapshots need the user network (a tap VM's addresses are per VM); a disk that
        // is kept starts from the image itself.
        let snapshots = (self.config.snapshots.enabled
            && ctx.job.keep_disk.is_none()
            && self.config.network.backend == NetworkBackend::User
            && !payload.wants_outbound())
        .then(|| SnapshotStore::new(lease.snapshot_dir()));
        Ok(Prepared {
            payload,
            lease,
            machine,
            accelerator,
            snapshots,
            datasource,
        })
    }

    /// The guest tools this worker serves, read once (a failed read is tried again by
    /// the next job).
    async fn guest_tools(&self) -> Result<GuestTools, JobError> {
        let path = self.config.cloud_init.guest_tools.clone();
        self.guest_tools
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || GuestTools::load(&path))
                    .await
                    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
            })
            .await
            .cloned()
            .map_err(JobError::GuestTools)
    }
}
