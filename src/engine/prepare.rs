use super::context::JobContext;
use super::error::JobError;
use super::resolve::Ending;
use super::run::Engine;
use crate::config::NetworkBackend;
use crate::image::{ImageLease, ImageRequest};
use crate::job::{JobPayload, Machine, PayloadContext, validate_payload};
use crate::metadata::Task;
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
        })
    }
}
