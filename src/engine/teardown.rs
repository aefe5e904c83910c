use std::time::Duration;

use super::boot::Running;
use super::context::JobContext;
use super::resolve::ConsoleSummary;
use super::run::Engine;
use crate::metadata::MetadataUsage;
use crate::vm::VmExit;

/// What teardown learned for the resolution.
#[derive(Debug)]
pub struct TornDown {
    pub metadata: MetadataUsage,
    pub console: ConsoleSummary,
}

impl Engine {
    /// Phase *tear down*: quits the VM (its overlay is discarded, so the guest is not
    /// asked to power off), then stops its metadata service and its network.
    /// Budgets are read here, at the very end: connections refused during the
    /// collection count too.
    pub(super) async fn tear_down(&self, ctx: &mut JobContext<'_>, running: Running) -> TornDown {
        let Running {
            mut vm,
            service,
            tap,
            ..
        } = running;
        let metadata = service.usage();
        if metadata.idle_logs_closed > 0 {
            ctx.note(&format!(
                "{} log stream(s) sent nothing for {} s and were closed (logs.idleSeconds); the guest tools open a new one for more output",
                metadata.idle_logs_closed,
                metadata.log_idle.as_secs()
            ))
            .await;
        }
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
            console: ConsoleSummary {
                dropped: console.dropped(),
                limit: console.limit(),
                write_failed: console.write_failed(),
            },
        }
    }
}
