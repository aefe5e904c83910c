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
        live: &super::live::Registered,
    ) -> Ending {
        let mut cancel = ctx.job.cancel.clone();
        let periodic = periodic_screenshots(
            running.vm.qmp().clone(),
            running.vm.run_dir().path().to_path_buf(),
            ctx.dir().clone(),
            self.config.debug.screenshot_every_seconds,
            self.config.debug.max_screenshots,
        );
        let ending = tokio::select! {
            ending = self.await_task_then_result(ctx, running, snapshots, max_run_time, live) => ending,
            ending = periodic => ending,
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
        live: &super::live::Registered,
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
        live.allow_shells();
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

/// Takes a screenshot every `every` seconds (none when 0), at most `max`, into the job
/// directory. It never ends: the run's other arms do.
async fn periodic_screenshots(
    qmp: crate::qemu::QmpClient,
    run_dir: std::path::PathBuf,
    dir: crate::job::JobDir,
    every: u32,
    max: u32,
) -> Ending {
    if every > 0 {
        let mut ticks = tokio::time::interval(Duration::from_secs(u64::from(every)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is now: the guest has shown nothing yet
        let mut taken = 0;
        while taken < max {
            ticks.tick().await;
            // A VM without a display, or one that does not answer now, is tried again.
            let Ok(shot) =
                crate::vm::take_screenshot(&qmp, &run_dir, Duration::from_secs(10)).await
            else {
                continue;
            };
            taken += 1;
            let path = dir.file(&crate::job::periodic_screenshot(taken));
            if let Some(parent) = path.parent() {
                let _ = tokio::fs::create_dir_all(parent).await;
            }
            let _ = tokio::fs::write(&path, &shot.png).await;
        }
    }
    std::future::pending().await
}

/// The periodic screenshots in the job directory, in order.
pub(super) async fn periodic_taken(dir: &crate::job::JobDir, max: u32) -> Vec<String> {
    let mut taken = Vec::new();
    for index in 1..=max {
        let name = crate::job::periodic_screenshot(index);
        if tokio::fs::try_exists(dir.file(&name))
            .await
            .unwrap_or(false)
        {
            taken.push(name);
        } else {
            break;
        }
    }
    taken
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
