use std::time::{Duration, Instant};

use super::boot::Running;
use super::context::JobContext;
use super::resolve::Ending;
use super::run::Engine;
use crate::error_chain::display_chain;
use crate::job::{ExceptionReason, SnapshotEvent};
use crate::metadata::Park;
use crate::vm::{SnapshotStore, Vm};

impl Engine {
    /// Phases *await task* and *await result*, ended early by a cancel or a shutdown.
    pub(super) async fn await_run(
        &self,
        ctx: &mut JobContext<'_>,
        running: &mut Running,
        snapshots: Option<&SnapshotStore>,
        max_run_time: u64,
    ) -> Ending {
        let mut cancel = ctx.job.cancel.clone();
        let ending = tokio::select! {
            ending = self.await_task_then_result(ctx, running, snapshots, max_run_time) => ending,
            reason = cancel.wait_for(Option::is_some) => {
                Ending::Stopped(reason.ok().and_then(|r| *r).unwrap_or(ExceptionReason::Canceled))
            }
        };
        ctx.phase("run");
        if let Some(note) = ending.note() {
            ctx.note(&note).await;
        }
        ending
    }

    /// Waits for the task fetch (saving the boot snapshot on the way when the VM is to
    /// be saved), then for the result, within maxRunTime.
    async fn await_task_then_result(
        &self,
        ctx: &JobContext<'_>,
        running: &mut Running,
        snapshots: Option<&SnapshotStore>,
        max_run_time: u64,
    ) -> Ending {
        let ready_seconds = self.config.timeouts.guest_ready_seconds;
        let ready = Duration::from_secs(ready_seconds);
        let waiting = Instant::now();
        let Running {
            vm, service, save, ..
        } = running;
        if let (Some(key), Some(store)) = (save.as_deref(), snapshots) {
            let parked = tokio::select! {
                park = service.park_outcome() => park,
                exit = vm.wait(ready) => match exit {
                    Some(exit) => return Ending::GuestEnded(exit),
                    None => return Ending::NeverStarted { ready_seconds },
                },
            };
            save_snapshot(ctx, vm, parked, store, key).await;
        }
        let fetched = tokio::select! {
            fetched = service.task_fetched() => fetched,
            exit = vm.wait(ready.saturating_sub(waiting.elapsed())) => match exit {
                Some(exit) => return Ending::GuestEnded(exit),
                None => false,
            },
        };
        if !fetched {
            return Ending::NeverStarted { ready_seconds };
        }
        tokio::select! {
            code = service.result() => match code {
                Some(code) => Ending::Exited(code),
                None => Ending::ServiceLost,
            },
            exit = vm.wait(Duration::from_secs(max_run_time)) => match exit {
                Some(exit) => service.reported().map_or(Ending::GuestEnded(exit), Ending::Exited),
                None => Ending::TimedOut { max_run_time },
            },
        }
    }
}

/// Saves the VM as the boot snapshot `key` once its guest took the park request (the
/// guest then goes on with this job). A guest that fetched its task without offering to
/// park marks the key unsupported.
async fn save_snapshot(
    ctx: &JobContext<'_>,
    vm: &Vm,
    parked: Park,
    store: &SnapshotStore,
    key: &str,
) {
    match parked {
        Park::Sent => {
            let started = Instant::now();
            match store.take(key, vm.qmp(), vm.run_dir()).await {
                Ok(_) => {
                    ctx.snapshot_event(SnapshotEvent::Saved);
                    ctx.note(&format!(
                        "saved boot snapshot {key} in {} ms; later jobs on this image and machine resume it",
                        started.elapsed().as_millis()
                    ))
                    .await;
                }
                Err(why) => {
                    ctx.note(&format!(
                        "no boot snapshot of this machine: {}",
                        display_chain(&why)
                    ))
                    .await;
                }
            }
        }
        Park::Refused => store.refuse(key).await,
        // A VM that saves is never held (only resumed ones are).
        Park::Off | Park::Armed | Park::Held => {}
    }
}
