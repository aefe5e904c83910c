use std::path::PathBuf;

use crate::error_chain::display_chain;
use crate::image::ImageError;
use crate::job::ExceptionReason;
use crate::metadata::LogWriterError;
use crate::qemu::QmpError;
use crate::schema::Issue;
use crate::vm::{AccelError, NetworkError, RunDirError, VmError};

/// Why the worker could not run a job to a result. Each variant keeps its cause, so the
/// report and the log say the whole chain once ("the VM did not start: QMP failed: …"),
/// and knows how the job is resolved.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cannot create the job directory {}", path.display())]
    JobDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the job log")]
    JobLog(#[source] LogWriterError),
    #[error("no accelerator can run the VM")]
    Accelerator(#[source] AccelError),
    /// The image could not be fetched or unpacked; its own issues name the entry.
    #[error("the image is not available")]
    Image(#[source] ImageError),
    /// The image's machine breaks the limits (`vm boot`; a job's payload is refused
    /// as malformed instead).
    #[error("the image's machine is not allowed here: {}", issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Machine { issues: Vec<Issue> },
    #[error("the run directory cannot be used")]
    RunDir(#[source] RunDirError),
    #[error("the run directory cannot be created")]
    RunDirCreate(#[source] VmError),
    // Validation refuses this (allowOutbound needs tap); never run it quietly closed.
    #[error("outbound network access needs `network: {{backend: tap}}`")]
    OutboundNeedsTap,
    #[error("the VM's network cannot be set up")]
    Network(#[source] NetworkError),
    #[error("the metadata service cannot start")]
    Metadata(#[source] std::io::Error),
    /// A VM with the cloud-init datasource needs the guest tools it serves.
    #[error("the cloud-init datasource cannot be offered")]
    GuestTools(#[source] crate::cloud_init::GuestToolsError),
    #[error("the VM cannot be prepared")]
    Launch(#[source] VmError),
    #[error("the VM did not start")]
    Start(#[source] VmError),
    #[error("the VM did not resume after start")]
    Continue(#[source] QmpError),
    /// A disk to keep (an image build's `boot` step) needs a clean power-off first.
    #[error("the guest did not power off after its command ({exit}); its disk is not kept")]
    NoPowerOff { exit: crate::vm::VmExit },
    #[error("the guest's disk cannot be written to {}", path.display())]
    KeepDisk {
        path: PathBuf,
        #[source]
        source: crate::image::QemuImgError,
    },
}

impl JobError {
    /// How a job that hit this error is resolved.
    pub fn reason(&self) -> ExceptionReason {
        match self {
            Self::Image(e) => e.reason(),
            Self::Machine { .. } => ExceptionReason::MalformedPayload,
            // The host lacks OVMF (or room for a VM's copy of its variables): another
            // worker may have it.
            Self::Launch(VmError::Firmware(_)) => ExceptionReason::ResourceUnavailable,
            Self::Accelerator(_)
            | Self::OutboundNeedsTap
            | Self::Network(_)
            | Self::RunDirCreate(_)
            | Self::Metadata(_)
            | Self::GuestTools(_) => ExceptionReason::ResourceUnavailable,
            Self::JobDir { .. }
            | Self::JobLog(_)
            | Self::RunDir(_)
            | Self::Launch(_)
            | Self::Start(_)
            | Self::Continue(_)
            | Self::NoPowerOff { .. }
            | Self::KeepDisk { .. } => ExceptionReason::InternalError,
        }
    }

    /// The report's errors: the image's own issues (each names its entry), or this
    /// error's whole chain.
    pub fn issues(&self) -> Vec<Issue> {
        match self {
            Self::Image(e) => e.to_issues(),
            Self::Machine { issues } => issues.clone(),
            _ => vec![Issue::new("", display_chain(self))],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::FirmwareError;

    #[test]
    fn a_host_without_ovmf_cannot_take_a_uefi_job_but_another_may() {
        let error = JobError::Launch(VmError::Firmware(FirmwareError::Missing {
            path: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            key: "ovmfCode",
        }));
        assert_eq!(error.reason(), ExceptionReason::ResourceUnavailable);
        assert_eq!(
            error.issues()[0].message,
            "the VM cannot be prepared: the UEFI firmware file /usr/share/OVMF/OVMF_CODE_4M.fd \
             does not exist: install Debian's `ovmf` package (apt-get install ovmf), or set \
             worker.yml `firmware.ovmfCode` to where OVMF is"
        );
        let other = JobError::Launch(VmError::QmpTimeout(std::time::Duration::from_secs(10)));
        assert_eq!(other.reason(), ExceptionReason::InternalError);
    }
}
