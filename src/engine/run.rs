use std::path::PathBuf;
use std::time::Duration;

use super::context::{JobContext, write_report};
use super::resolve::{Ending, Happened, resolve};
use crate::artifacts::AgentLink;
use crate::cloud_init::GuestTools;
use crate::config::WorkerConfig;
use crate::image::ImageCache;
use crate::job::{ExceptionReason, JobDir, PhaseTiming, ResultReport};

/// One run of one job.
#[derive(Debug, Clone)]
pub struct JobRun {
    pub job_id: String,
    pub run_id: u32,
    /// The payload as submitted (YAML or JSON).
    pub payload: String,
    /// Where the job's log, report, artifacts and screenshots go.
    pub job_dir: JobDir,
    /// Copy the job log to stderr as it is written.
    pub live_log: bool,
    /// Becomes `Some(reason)` to stop the job early (canceled, worker shutting down);
    /// the VM is torn down and the job resolved with that reason.
    pub cancel: tokio::sync::watch::Receiver<Option<ExceptionReason>>,
    /// An image build's `boot` step: the job neither resumes nor saves a boot snapshot,
    /// and once its command exits 0 the guest is asked to power off (within
    /// `shutdownSeconds`) and its whole disk is written here as one raw file.
    pub keep_disk: Option<PathBuf>,
    /// Whether a failed job's VM may be kept after its result (payload
    /// `debug.keepAliveOnFailure`): jobs run by `serve`, which counts it against its
    /// capacity and lets it go.
    pub keep_failed: bool,
}

/// What the engine needs besides the job: the configuration, the image cache, and the
/// program QEMU runs as the guestfwd helper (this binary, `metadata-splice`).
#[derive(Debug, Clone)]
pub struct Engine {
    pub config: WorkerConfig,
    pub cache: ImageCache,
    pub helper: PathBuf,
    /// The guest tools served to cloud-init VMs, read when the first one starts.
    pub guest_tools: tokio::sync::OnceCell<GuestTools>,
    /// The running jobs' VMs, for the API's screenshots on demand.
    pub live: super::LiveVms,
}

impl Engine {
    /// Runs a job to its resolution and writes `report.json` in its directory. Never
    /// panics on bad input; every VM, socket and namespace it made is gone when it
    /// returns.
    pub async fn run(&self, job: &JobRun) -> ResultReport {
        let (report, kept) = self.run_keeping(job).await;
        if let Some(kept) = kept {
            kept.discard(super::Released::Stopping).await;
        }
        report
    }

    /// [`Engine::run`], except that a failed job's VM may be handed back still running
    /// (payload `debug.keepAliveOnFailure`, with `job.keep_failed`): the caller records
    /// the result, then holds it.
    pub async fn run_keeping(&self, job: &JobRun) -> (ResultReport, Option<super::KeptVm>) {
        let started = std::time::Instant::now();
        let mut ctx = match JobContext::open(job, &self.config).await {
            Ok(ctx) => ctx,
            Err(error) => {
                // No log to write to: the report alone says why.
                let mut report = resolve(Happened::before_vm(Ending::Error(error)));
                report.timings = vec![PhaseTiming {
                    phase: "total".into(),
                    millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                }];
                write_report(&job.job_dir, &report).await;
                return (report, None);
            }
        };
        let (happened, kept) = self.drive(&mut ctx).await;
        (ctx.finish(resolve(happened)).await, kept)
    }

    /// The lifecycle: prepare → boot or resume → await task and result → collect →
    /// tear down. Each phase returns what the next needs; an ending before the VM
    /// runs skips straight to the resolution.
    async fn drive(&self, ctx: &mut JobContext<'_>) -> (Happened, Option<super::KeptVm>) {
        let prepared = match self.prepare(ctx).await {
            Ok(prepared) => prepared,
            Err(ending) => return (Happened::before_vm(ending), None),
        };
        let mut running = match self.boot_or_resume(ctx, &prepared).await {
            Ok(running) => running,
            Err(error) => return (Happened::before_vm(Ending::Error(error)), None),
        };
        // One agent port connection for the collection and any shell into the VM.
        let agent = AgentLink::new(running.vm.run_dir().agent_socket().into());
        let live = self.live.register(
            &ctx.job.job_id,
            running.vm.qmp().clone(),
            running.vm.run_dir().path().to_path_buf(),
            running.vm.run_dir().vnc_socket().into(),
            agent.clone(),
        );
        let ending = self
            .await_run(
                ctx,
                &mut running,
                prepared.snapshots.as_ref(),
                prepared.payload.max_run_time,
                &live,
            )
            .await;
        let ending = match (&ctx.job.keep_disk, ending) {
            (Some(path), Ending::Exited(0)) => match self.keep_disk(&mut running, path).await {
                Ok(()) => Ending::Exited(0),
                Err(error) => Ending::Error(error),
            },
            (_, ending) => ending,
        };
        let (collection, screenshot) =
            if ending.collects() && running.vm.wait(Duration::ZERO).await.is_none() {
                let (collection, screenshot) = self.collect(ctx, &prepared, &running, &agent).await;
                (Some(collection), screenshot)
            } else {
                (None, None)
            };
        let keep = prepared
            .payload
            .debug
            .and_then(|d| d.keep_alive_on_failure)
            .filter(|_| ctx.job.keep_failed && ending.is_failure());
        let (torn, kept) = if let Some(minutes) = keep
            && running.vm.wait(Duration::ZERO).await.is_none()
        {
            let torn = self.account_kept(ctx, &running).await;
            let job = &ctx.job.job_id;
            ctx.note(&format!(
                "the job failed: its VM is kept running for {minutes} minute(s) for a look \
                 (debug.keepAliveOnFailure). `qemu-worker shell {job}` opens a shell in it, \
                 `qemu-worker screenshot {job} --out screen.png` shows its display (the web \
                 page /ui/job?id={job} shows it live); `qemu-worker release {job}` lets it go"
            ))
            .await;
            let release = live.release_signal();
            let kept = super::KeptVm {
                running,
                live,
                minutes,
                log: ctx.log(),
                release,
            };
            (torn, Some(kept))
        } else {
            drop(live);
            agent.close().await;
            (self.tear_down(ctx, running).await, None)
        };
        let screenshots =
            super::wait::periodic_taken(ctx.dir(), self.config.debug.max_screenshots).await;
        let happened = Happened {
            ending,
            collection,
            screenshot,
            screenshots,
            metadata: Some(torn.metadata),
            console: torn.console,
        };
        (happened, kept)
    }
}
