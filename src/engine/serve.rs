use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::run::{Engine, JobRun};
use crate::api::Metrics;
use crate::job::{ExceptionReason, JobDir};
use crate::queue::{Claim, Queue, QueueError, blocking};

/// How long an idle worker waits for work before it looks for expired leases again (a
/// PostgreSQL queue wakes it earlier when a job becomes pending).
const POLL: Duration = Duration::from_secs(1);

/// The worker loop of `qemu-worker serve`.
#[derive(Debug)]
pub struct Worker {
    pub engine: Engine,
    pub queue: Arc<dyn Queue>,
    pub worker_id: String,
    /// How long running jobs may finish after a shutdown request.
    pub grace: Duration,
    /// What `/metrics` reports.
    pub metrics: Arc<Metrics>,
}

/// Milliseconds since the Unix epoch (the queue's clock).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Worker {
    /// Serves until `shutdown` becomes true: claims jobs while there is capacity and
    /// image-cache room, runs them, heartbeats their claims, and resolves them. On
    /// shutdown it stops claiming, lets running jobs finish within the grace period,
    /// then stops the rest and gives them back to the queue.
    pub async fn serve(&self, mut shutdown: watch::Receiver<bool>) {
        // Killing strays waits for them and removes directories: off the executor.
        let state_dir = self.engine.config.state_dir.clone();
        let _ = tokio::task::spawn_blocking(move || cleanup_orphans(&state_dir)).await;
        let capacity = self.engine.config.capacity as usize;
        let (stop_jobs, stop_rx) = watch::channel(false);
        let mut running: JoinSet<()> = JoinSet::new();
        let mut room_warned = false;
        // Decided before the first claim: `/readyz` waits for it, and a host whose
        // accelerator cannot be chosen claims nothing (it would fail every job), asking
        // again every half minute.
        loop {
            match self.engine.accelerator_for_serve().await {
                Ok(accelerator) => {
                    self.metrics.accelerator(accelerator.as_str());
                    break;
                }
                Err(error) => {
                    tracing::error!(%error, "no accelerator: claiming nothing; trying again in 30 s")
                }
            }
            self.metrics.loop_tick();
            tokio::select! {
                _ = shutdown.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
            if *shutdown.borrow() {
                tracing::info!("worker stopped");
                return;
            }
        }
        tracing::info!(worker = %self.worker_id, capacity, "worker started");
        let mut waiter: Option<tokio::task::JoinHandle<bool>> = None;
        while !*shutdown.borrow() {
            self.metrics.loop_tick();
            let queue = self.queue.clone();
            match blocking(move || queue.expire(now_ms())).await {
                Ok(expired) => {
                    for run in expired {
                        tracing::info!(job_id = %run.job_id, run_id = run.run_id, reason = %run.reason, requeued = run.requeued, "ended by the queue");
                    }
                }
                Err(error) => tracing::error!(%error, "failed to expire leases"),
            }
            while running.len() < capacity {
                if let Err(error) = self.engine.cache.ensure_room().await {
                    if !room_warned {
                        tracing::warn!(%error, "not claiming: the image cache has no room");
                        room_warned = true;
                    }
                    break;
                }
                room_warned = false;
                let queue = self.queue.clone();
                let worker = self.worker_id.clone();
                let lease = Duration::from_secs(self.engine.config.timeouts.lease_seconds);
                let claim = match blocking(move || queue.claim(&worker, lease, now_ms())).await {
                    Ok(Some(claim)) => claim,
                    Ok(None) => break,
                    Err(error) => {
                        tracing::error!(%error, "failed to claim a job");
                        break;
                    }
                };
                tracing::info!(job_id = %claim.job_id, run_id = claim.run_id, "claimed");
                self.metrics
                    .claimed(now_ms().saturating_sub(claim.created_ms));
                let metrics = Arc::clone(&self.metrics);
                let job = run_claimed(
                    self.engine.clone(),
                    self.queue.clone(),
                    claim,
                    stop_rx.clone(),
                    shutdown.clone(),
                );
                running.spawn(async move {
                    let report = job.await;
                    metrics.ended(&report);
                });
            }
            let idle = running.len() < capacity;
            // One wait for work at a time, kept across turns of the loop: a wait that a
            // job's end interrupted may already have taken the queue's notification,
            // and a new wait would sleep through it (the claim would then come a POLL
            // late).
            if idle && waiter.is_none() {
                let queue = self.queue.clone();
                waiter = Some(tokio::task::spawn_blocking(move || {
                    queue.wait_for_work(POLL)
                }));
            }
            let mut woken = false;
            tokio::select! {
                _ = shutdown.changed() => {}
                Some(_) = running.join_next(), if !running.is_empty() => {}
                _ = async { waiter.as_mut().expect("a waiter while idle").await }, if idle => {
                    woken = true;
                }
                () = tokio::time::sleep(POLL), if !idle => {}
            }
            if woken {
                waiter = None;
            }
        }
        tracing::info!(running = running.len(), grace = ?self.grace, "shutting down: no more claims");
        let finished = tokio::time::timeout(self.grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            tracing::info!(
                running = running.len(),
                "grace period over: stopping the remaining jobs"
            );
            let _ = stop_jobs.send(true);
            while running.join_next().await.is_some() {}
        }
        tracing::info!("worker stopped");
    }
}

/// Runs one claimed job: heartbeats its claim, stops it when the claim is lost, the job
/// is canceled or the worker stops, and records its outcome; then holds a failed job's
/// VM kept for debugging until it is let go (its slot stays taken meanwhile).
async fn run_claimed(
    engine: Engine,
    queue: Arc<dyn Queue>,
    claim: Claim,
    mut stop: watch::Receiver<bool>,
    // The worker's shutdown: a kept VM is let go at once, not after the grace period.
    stopping: watch::Receiver<bool>,
) -> crate::job::ResultReport {
    let (cancel, cancel_rx) = watch::channel(None);
    let heartbeat = Duration::from_secs(engine.config.timeouts.heartbeat_seconds);
    let lease = Duration::from_secs(engine.config.timeouts.lease_seconds);
    let watcher = {
        let queue = queue.clone();
        let claim = claim.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.wait_for(|stop| *stop) => {
                        let _ = cancel.send(Some(ExceptionReason::WorkerShutdown));
                        return;
                    }
                    () = tokio::time::sleep(heartbeat) => {}
                }
                let (q, c) = (queue.clone(), claim.clone());
                match blocking(move || q.heartbeat(&c, lease, now_ms())).await {
                    Ok(_) => {}
                    Err(QueueError::Canceled { .. }) => {
                        let _ = cancel.send(Some(ExceptionReason::Canceled));
                        return;
                    }
                    Err(QueueError::StaleClaim { .. }) => {
                        let _ = cancel.send(Some(ExceptionReason::ClaimExpired));
                        return;
                    }
                    Err(QueueError::DeadlineExceeded { .. }) => {
                        let _ = cancel.send(Some(ExceptionReason::DeadlineExceeded));
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(job_id = %claim.job_id, %error, "heartbeat failed")
                    }
                }
            }
        })
    };
    let job_dir = JobDir::of_run(&engine.config.state_dir, &claim.job_id, claim.run_id);
    let (report, kept) = engine
        .run_keeping(&JobRun {
            job_id: claim.job_id.clone(),
            run_id: claim.run_id,
            payload: claim.payload.clone(),
            job_dir,
            live_log: false,
            cancel: cancel_rx,
            keep_disk: None,
            keep_failed: true,
        })
        .await;
    watcher.abort();
    let outcome = match report.reason {
        // The queue already ended this run; nothing more to record.
        Some(ExceptionReason::ClaimExpired) => Ok(()),
        Some(ExceptionReason::WorkerShutdown) => {
            let (q, c) = (queue.clone(), claim.clone());
            blocking(move || q.release(&c)).await.map(drop)
        }
        _ => {
            let (q, c, r) = (queue.clone(), claim.clone(), report.clone());
            blocking(move || q.resolve(&c, &r)).await
        }
    };
    match outcome {
        Ok(()) => {
            tracing::info!(job_id = %claim.job_id, run_id = claim.run_id, state = %report.state, "resolved")
        }
        Err(error) => {
            tracing::warn!(job_id = %claim.job_id, %error, "could not record the outcome")
        }
    }
    // Kept after its failure: the job has its result; its VM (and this slot) waits.
    if let Some(kept) = kept {
        tracing::info!(job_id = %claim.job_id, run_id = claim.run_id, "VM kept for debugging");
        let why = kept.hold(stopping).await;
        tracing::info!(job_id = %claim.job_id, run_id = claim.run_id, released = ?why, "kept VM torn down");
    }
    report
}

/// Kills QEMU processes and guestfwd helpers and removes run dirs left under
/// `<stateDir>/run` by a worker that crashed (QEMU normally dies with its worker through
/// its parent-death signal): their jobs' claims expire and run elsewhere.
pub fn cleanup_orphans(state_dir: &Path) {
    let run = state_dir.join("run");
    let killed = crate::vm::kill_strays(&run);
    let mut removed = 0;
    if let Ok(entries) = std::fs::read_dir(&run) {
        for entry in entries.flatten() {
            if std::fs::remove_dir_all(entry.path()).is_ok() {
                removed += 1;
            }
        }
    }
    if killed + removed > 0 {
        tracing::info!(
            killed,
            removed,
            "cleaned up after an earlier worker: orphan QEMU processes and run dirs"
        );
    }
}
