use std::path::Path;
use std::time::Duration;

use super::boot::Running;
use super::context::JobContext;
use super::error::JobError;
use super::resolve::ConsoleSummary;
use super::run::Engine;
use crate::image::flatten_to_raw;
use crate::metadata::MetadataUsage;
use crate::vm::VmExit;

/// Writing a kept disk reads all of it: allow for a big one on a slow disk.
const FLATTEN_TIMEOUT: Duration = Duration::from_secs(3600);

/// What teardown learned for the resolution.
#[derive(Debug)]
pub struct TornDown {
    pub metadata: MetadataUsage,
    pub console: ConsoleSummary,
}

impl Engine {
    /// An image build's `boot` step after its command succeeded: the guest powers off
    /// (ACPI, repeated, within `shutdownSeconds`: its file systems must be clean), then
    /// the image's disk with the job's overlay on top is written to `path` as one raw
    /// disk. The VM has ended either way; tear down releases the rest.
    pub(super) async fn keep_disk(
        &self,
        running: &mut Running,
        path: &Path,
    ) -> Result<(), JobError> {
        let exit = running.vm.stop().await;
        if !matches!(exit, VmExit::PoweredOff { .. }) {
            return Err(JobError::NoPowerOff { exit });
        }
        // The overlay's backing chain is the leased image's disk: `drive` holds the
        // lease until the job ends.
        flatten_to_raw(&running.vm.run_dir().overlay(), path, FLATTEN_TIMEOUT)
            .await
            .map_err(|source| JobError::KeepDisk {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Phase *tear down*: quits the VM (its overlay is discarded, so the guest is not
    /// asked to power off), then stops its metadata service and its network.
    /// Budgets are read here, at the very end: connections refused during the
    /// collection count too.
    pub(super) async fn tear_down(&self, ctx: &mut JobContext<'_>, running: Running) -> TornDown {
        let metadata = metadata_usage(ctx, &running).await;
        let Running {
            mut vm,
            service,
            tap,
            ..
        } = running;
        let known_exit = vm.wait(Duration::ZERO).await.is_some();
        let console = vm.console();
        // The job's disk is thrown away: no power-off to wait for.
        let exit = vm.discard().await;
        if !known_exit && matches!(exit, VmExit::QemuFailed { .. }) {
            ctx.note(&format!("after the result: {exit}")).await;
        }
        drop(service);
        drop(tap);
        ctx.phase("teardown");
        TornDown {
            metadata,
            console: console_summary(&console),
        }
    }

    /// What the report says of a VM that is kept running after its job failed: its
    /// budgets so far. It is torn down later ([`super::KeptVm`]).
    pub(super) async fn account_kept(&self, ctx: &JobContext<'_>, running: &Running) -> TornDown {
        TornDown {
            metadata: metadata_usage(ctx, running).await,
            console: console_summary(&running.vm.console()),
        }
    }
}

/// The metadata service's budgets, with a job-log line for closed idle log streams.
async fn metadata_usage(ctx: &JobContext<'_>, running: &Running) -> MetadataUsage {
    let metadata = running.service.usage();
    if metadata.idle_logs_closed > 0 {
        ctx.note(&format!(
            "{} log stream(s) sent nothing for {} s and were closed (logs.idleSeconds); the guest tools open a new one for more output",
            metadata.idle_logs_closed,
            metadata.log_idle.as_secs()
        ))
        .await;
    }
    metadata
}

fn console_summary(console: &crate::vm::ConsoleUsage) -> ConsoleSummary {
    ConsoleSummary {
        dropped: console.dropped(),
        limit: console.limit(),
        write_failed: console.write_failed(),
    }
}
