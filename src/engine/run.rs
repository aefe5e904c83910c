use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::artifacts::{ArtifactSources, collect_artifacts};
use crate::config::{NetworkBackend, WorkerConfig};
use crate::error_chain::display_chain;
use crate::image::{ImageCache, ImageLease, ImageRequest};
use crate::job::{
    ExceptionReason, Identity, JobPayload, MachineLayers, PayloadContext, PhaseTiming, Resolution,
    ResultReport, validate_payload,
};
use crate::metadata::{
    LogSink, MetadataHandle, MetadataLimits, MetadataUsage, Park, Task, start_metadata_service,
    start_metadata_service_tcp,
};
use crate::schema::Issue;
use crate::vm::{
    LaunchPlan, NetworkAttachment, RunDir, SnapshotPlan, SnapshotStore, TAP_DEVICE, TapNetwork, Vm,
    VmError, VmExit, VmTimeouts, choose_accelerator_cached, finish_resume,
    prepare_launch_with_snapshots, take_screenshot,
};

/// One run of one job.
#[derive(Debug, Clone)]
pub struct JobRun {
    pub job_id: String,
    pub run_id: u32,
    /// The payload as submitted (YAML or JSON).
    pub payload: String,
    /// Where the job's log, report, artifacts and screenshots go.
    pub job_dir: PathBuf,
    /// Copy the job log to stderr as it is written.
    pub live_log: bool,
    /// Becomes `Some(reason)` to stop the job early (canceled, worker shutting down);
    /// the VM is torn down and the job resolved with that reason.
    pub cancel: tokio::sync::watch::Receiver<Option<ExceptionReason>>,
}

/// What the engine needs besides the job: the configuration, the image cache, and the
/// program QEMU runs as the guestfwd helper (this binary, `metadata-splice`).
#[derive(Debug, Clone)]
pub struct Engine {
    pub config: WorkerConfig,
    pub cache: ImageCache,
    pub helper: PathBuf,
}

/// Accumulates the report while a job runs.
struct Progress {
    started: Instant,
    phase_start: Instant,
    timings: Vec<PhaseTiming>,
    log: Option<LogSink>,
}

impl Progress {
    fn phase(&mut self, name: &str) {
        let now = Instant::now();
        self.timings.push(PhaseTiming {
            phase: name.to_owned(),
            millis: u64::try_from((now - self.phase_start).as_millis()).unwrap_or(u64::MAX),
        });
        self.phase_start = now;
    }

    async fn error(&self, issue: &Issue) {
        if let Some(log) = &self.log {
            log.line(&format!("[qemu-worker:error] {issue}")).await;
        }
    }

    async fn note(&self, line: &str) {
        if let Some(log) = &self.log {
            log.line(&format!("[qemu-worker] {line}")).await;
        }
    }
}

impl Engine {
    /// Runs a job to its resolution and writes `report.json` in its directory. Never
    /// panics on bad input; every VM, socket and namespace it made is gone when it
    /// returns.
    pub async fn run(&self, job: &JobRun) -> ResultReport {
        let mut progress = Progress {
            started: Instant::now(),
            phase_start: Instant::now(),
            timings: Vec::new(),
            log: None,
        };
        let mut report = self.run_inner(job, &mut progress).await;
        for issue in &report.errors {
            progress.error(issue).await;
        }
        if let Some(log) = &progress.log {
            log.flush().await;
        }
        progress.timings.push(PhaseTiming {
            phase: "total".into(),
            millis: u64::try_from(progress.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
        report.timings = progress.timings;
        if let Ok(text) = serde_json::to_vec_pretty(&report) {
            let _ = tokio::fs::write(job.job_dir.join("report.json"), text).await;
        }
        report
    }

    async fn run_inner(&self, job: &JobRun, progress: &mut Progress) -> ResultReport {
        if let Err(e) = tokio::fs::create_dir_all(&job.job_dir).await {
            return exception(
                ExceptionReason::InternalError,
                format!("cannot create the job directory: {e}"),
            );
        }
        match LogSink::create_with_tee(
            &job.job_dir.join("job.log"),
            self.config.logs.max_size.bytes(),
            job.live_log,
        )
        .await
        {
            Ok(log) => progress.log = Some(log),
            Err(e) => return exception(ExceptionReason::InternalError, e.to_string()),
        }

        if let Some(reason) = *job.cancel.borrow() {
            return ResultReport::new(Resolution::Exception(reason), Vec::new());
        }
        // Validate before spending anything.
        let identity = Identity::derive(&job.job_id, job.run_id);
        let check = validate_payload(
            &job.payload,
            &PayloadContext::from_config(&self.config),
            &identity,
        );
        progress.phase("validate");
        let Some(payload) = check.payload.filter(|_| check.issues.is_empty()) else {
            return ResultReport::malformed_payload(check.issues);
        };

        let accelerator = match choose_accelerator_cached(
            self.config.accelerator,
            &self.config.state_dir,
        )
        .await
        {
            Ok(accelerator) => accelerator,
            Err(e) => return exception(ExceptionReason::ResourceUnavailable, e.to_string()),
        };
        progress.phase("accelerator");

        let request = match ImageRequest::from_reference(&payload.image) {
            Ok(request) => request,
            Err(message) => {
                return ResultReport::malformed_payload(vec![Issue::new("/image", message)]);
            }
        };
        let lease = match self.cache.acquire(&request, None).await {
            Ok(lease) => lease,
            Err(e) => return ResultReport::new(Resolution::Exception(e.reason()), e.to_issues()),
        };
        progress.phase("image");

        let layers = MachineLayers {
            payload: payload.machine.clone().unwrap_or_default(),
            image: lease.contents().machine.clone(),
            worker_config: self.config.machine.clone(),
        };
        let machine = match layers.resolve(&self.config.limits, &identity) {
            Ok(machine) => machine,
            Err(issues) => return ResultReport::malformed_payload(issues),
        };
        progress.phase("machine");

        // Snapshots need the user network (a tap VM's addresses are per VM) and the serial
        // console (where the guest says it parked).
        let snapshots = (self.config.snapshots.enabled
            && self.config.network.backend == NetworkBackend::User
            && !payload.wants_outbound()
            && machine.serial_console)
            .then(|| SnapshotStore::new(lease.snapshot_dir()));
        self.boot_and_run(
            job,
            &payload,
            &lease,
            &machine,
            accelerator,
            snapshots.as_ref(),
            progress,
        )
        .await
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the job's resolved parts, passed down once"
    )]
    async fn boot_and_run(
        &self,
        job: &JobRun,
        payload: &JobPayload,
        lease: &ImageLease,
        machine: &crate::job::Machine,
        accelerator: crate::vm::Accelerator,
        snapshots: Option<&SnapshotStore>,
        progress: &mut Progress,
    ) -> ResultReport {
        let Some(log) = progress.log.clone() else {
            return exception(
                ExceptionReason::InternalError,
                "the job log is not open".into(),
            );
        };
        let name = short_name(&job.job_id, job.run_id);
        let run_dir = match RunDir::new(&self.config.state_dir.join("run").join(&name)) {
            Ok(run_dir) => run_dir,
            Err(e) => return exception(ExceptionReason::InternalError, e.to_string()),
        };
        let task = Task {
            command: payload.command.clone(),
            env: payload.env.clone(),
            max_run_time: payload.max_run_time,
            working_directory: "/root".into(),
        };
        // The network, and the metadata service on it; both live until the end of the job.
        let outbound = payload.wants_outbound();
        let (network, service, _tap) = match self
            .network(&name, &run_dir, &task, outbound, log.clone())
            .await
        {
            Ok(parts) => parts,
            Err(message) => return exception(ExceptionReason::ResourceUnavailable, message),
        };
        let mut service = service;
        let (launch, snapshot) = match prepare_launch_with_snapshots(
            LaunchPlan {
                name: &name,
                image: lease,
                machine,
                run_dir,
                log_dir: job.job_dir.clone(),
                network,
                accelerator,
                max_console: self.config.logs.max_console_size.bytes(),
            },
            snapshots,
        ) {
            Ok(launch) => launch,
            Err(e) => return exception(ExceptionReason::InternalError, e.to_string()),
        };
        let timeouts = VmTimeouts {
            powerdown: Duration::from_secs(self.config.timeouts.shutdown_seconds),
            ..VmTimeouts::default()
        };
        let started = Vm::start(launch, timeouts).await;
        // A resumed QEMU exits as soon as its saved state fails to load, so a start that
        // fails is the snapshot's failure as much as a load QMP reports.
        let (vm, resume_failure) = match (started, &snapshot) {
            (Ok(vm), SnapshotPlan::Resume(_)) => match finish_resume(vm.qmp()).await {
                Ok(()) => (Some(vm), None),
                Err(why) => {
                    vm.teardown().await;
                    (None, Some(why))
                }
            },
            (Ok(vm), _) => (Some(vm), None),
            (Err(e @ VmError::QemuFailed { .. }), SnapshotPlan::Resume(_)) => {
                (None, Some(display_chain(&e)))
            }
            (Err(e), _) => {
                return exception(ExceptionReason::InternalError, display_chain(&e));
            }
        };
        if let (SnapshotPlan::Resume(saved), Some(store)) = (&snapshot, snapshots) {
            if let Some(why) = resume_failure {
                // A snapshot that does not load is dropped (the next job saves a new
                // one); this job boots.
                store.discard(saved);
                progress
                    .note(&format!(
                        "the boot snapshot {} did not load ({why}); booting instead",
                        saved.key
                    ))
                    .await;
                drop((service, _tap));
                return Box::pin(self.boot_and_run(
                    job,
                    payload,
                    lease,
                    machine,
                    accelerator,
                    None,
                    progress,
                ))
                .await;
            }
            progress
                .note(&format!(
                    "resumed from boot snapshot {} instead of booting",
                    saved.key
                ))
                .await;
        }
        let Some(mut vm) = vm else {
            return exception(
                ExceptionReason::InternalError,
                "the VM did not start".into(),
            );
        };
        if let SnapshotPlan::Save(_) = &snapshot {
            service.arm_park();
        }
        if let Err(e) = vm.resume().await {
            vm.teardown().await;
            return exception(ExceptionReason::InternalError, e.to_string());
        }
        progress.phase("start");

        let save = match (&snapshot, snapshots) {
            (SnapshotPlan::Save(key), Some(store)) => Some((store, key.as_str())),
            _ => None,
        };
        let mut cancel = job.cancel.clone();
        let outcome = tokio::select! {
            outcome = self.wait_for_result(&mut vm, &mut service, payload, save, progress) => outcome,
            reason = cancel.wait_for(Option::is_some) => match reason.ok().and_then(|r| *r) {
                Some(reason) => Outcome::Canceled(reason),
                None => Outcome::Canceled(ExceptionReason::Canceled),
            },
        };
        progress.phase("run");

        let mut report = match outcome {
            Outcome::Exited(0) => ResultReport::new(Resolution::Completed, Vec::new()),
            Outcome::Exited(code) => ResultReport::new(
                Resolution::Failed {
                    exit_code: Some(code),
                },
                Vec::new(),
            ),
            Outcome::TimedOut => {
                progress
                    .note(&format!(
                        "maxRunTime of {} seconds exceeded; the VM is stopped",
                        payload.max_run_time
                    ))
                    .await;
                ResultReport::new(Resolution::Failed { exit_code: None }, Vec::new())
            }
            Outcome::GuestEnded(exit) => ResultReport::new(
                Resolution::Failed { exit_code: None },
                vec![Issue::new(
                    "",
                    format!("the VM ended before the guest reported a result: {exit}"),
                )],
            ),
            Outcome::ServiceLost => ResultReport::new(
                Resolution::Exception(ExceptionReason::InternalError),
                vec![Issue::new(
                    "",
                    "the metadata service stopped before the guest reported a result",
                )],
            ),
            Outcome::Canceled(reason) => {
                progress
                    .note(&format!(
                        "the job was stopped ({reason}); the VM is shut down"
                    ))
                    .await;
                ResultReport::new(Resolution::Exception(reason), Vec::new())
            }
            Outcome::NeverStarted => {
                progress
                    .note(&format!(
                        "the guest tools did not fetch the task within {} seconds (does the image have them?)",
                        self.config.timeouts.guest_ready_seconds
                    ))
                    .await;
                ResultReport::new(Resolution::Failed { exit_code: None }, Vec::new())
            }
        };

        let canceled = report.state == crate::job::ResultState::Exception;
        if !canceled && vm.wait(Duration::ZERO).await.is_none() {
            let sources = ArtifactSources {
                agent: PathBuf::from(vm.run_dir().agent_socket()),
                qga: machine
                    .guest_agent
                    .then(|| PathBuf::from(vm.run_dir().qga_socket())),
            };
            let collection = collect_artifacts(
                &payload.artifacts,
                &sources,
                &job.job_dir,
                &self.config.artifacts,
            )
            .await;
            for line in &collection.notes {
                progress.note(line).await;
            }
            report.artifacts = collection.artifacts;
            report.skipped = collection.skipped;
            report.skipped_count = collection.skipped_count;
            // A missing or refused artifact fails the job, as in taskcluster: completed
            // with exit code 0 becomes failed with it.
            if !collection.problems.is_empty() && report.state == crate::job::ResultState::Completed
            {
                report.state = crate::job::ResultState::Failed;
            }
            report.errors.extend(collection.problems);
            progress.phase("artifacts");
            if let Ok(shot) =
                take_screenshot(vm.qmp(), vm.run_dir().path(), Duration::from_secs(10)).await
            {
                let dir = job.job_dir.join("screenshots");
                if tokio::fs::create_dir_all(&dir).await.is_ok()
                    && tokio::fs::write(dir.join("final.png"), &shot.png)
                        .await
                        .is_ok()
                {
                    report.screenshot = Some("screenshots/final.png".into());
                }
            }
            progress.phase("screenshot");
        }
        // Counted to the end: connections refused during the collection count too.
        report
            .errors
            .extend(metadata_budget_errors(&service.usage()));
        for line in metadata_budget_notes(&service.usage()) {
            progress.note(&line).await;
        }
        let known_exit = vm.wait(Duration::ZERO).await.is_some();
        let console = vm.console();
        let exit = vm.teardown().await;
        if console.dropped() > 0 {
            let message = if console.write_failed() {
                format!(
                    "the serial console log could not be written (is the state directory's disk full?); {} bytes were dropped",
                    console.dropped()
                )
            } else {
                format!(
                    "the serial console reached its cap of {} bytes (logs.maxConsoleSize); {} more bytes were dropped",
                    console.limit(),
                    console.dropped()
                )
            };
            report.errors.push(Issue::new("", message));
        }
        if !known_exit && matches!(exit, VmExit::QemuFailed { .. }) {
            progress.note(&format!("after the result: {exit}")).await;
        }
        if needs_console(&report) {
            // Only the end is read, however large the console grew.
            let console = crate::vm::read_tail(&job.job_dir.join("console.log"), CONSOLE_TAIL);
            let tail: Vec<&str> = console.lines().rev().take(20).collect();
            for line in tail.into_iter().rev() {
                progress.note(&format!("console: {line}")).await;
            }
        }
        progress.phase("teardown");
        report
    }

    /// Saves the VM as the boot snapshot `key` once its guest took the park request
    /// (the guest then goes on with this job). A guest that fetched its task without
    /// offering to park marks the key unsupported.
    async fn save_snapshot(
        vm: &Vm,
        parked: Park,
        store: &SnapshotStore,
        key: &str,
        progress: &Progress,
    ) {
        match parked {
            Park::Sent => {
                let started = Instant::now();
                let serial = PathBuf::from(vm.run_dir().serial_log());
                let overlay = vm.run_dir().path().join("overlay.qcow2");
                match store.take(key, vm.qmp(), &serial, &overlay).await {
                    Ok(_) => {
                        progress
                            .note(&format!(
                                "saved boot snapshot {key} in {} ms; later jobs on this image and machine resume it",
                                started.elapsed().as_millis()
                            ))
                            .await;
                    }
                    Err(why) => {
                        progress
                            .note(&format!("no boot snapshot of this machine: {why}"))
                            .await;
                    }
                }
            }
            Park::Refused => store.refuse(key),
            Park::Off | Park::Armed => {}
        }
    }

    /// The metadata service's limits from worker.yml.
    fn metadata_limits(&self) -> MetadataLimits {
        MetadataLimits {
            max_connections: self.config.metadata.max_connections as usize,
            log_idle: Duration::from_secs(self.config.logs.idle_seconds),
            ..MetadataLimits::default()
        }
    }

    /// Sets up the VM's network and its metadata service.
    async fn network(
        &self,
        name: &str,
        run_dir: &RunDir,
        task: &Task,
        outbound: bool,
        log: LogSink,
    ) -> Result<(NetworkAttachment, MetadataHandle, Option<TapNetwork>), String> {
        match self.config.network.backend {
            NetworkBackend::User if outbound => {
                // Validation refuses this (allowOutbound needs tap); never run it quietly closed.
                Err("outbound network access needs `network: {backend: tap}`".into())
            }
            NetworkBackend::User => {
                // The run dir must exist for the socket; prepare_launch keeps it.
                crate::vm::create_run_dir(run_dir.path()).map_err(|e| e.to_string())?;
                let socket = run_dir.metadata_socket();
                let service =
                    start_metadata_service(Path::new(&socket), task, log, self.metadata_limits())
                        .await
                        .map_err(|e| format!("the metadata service cannot start: {e}"))?;
                let attachment = NetworkAttachment::User {
                    guestfwd_command: vec![
                        self.helper.display().to_string(),
                        "metadata-splice".into(),
                        socket,
                    ],
                };
                Ok((attachment, service, None))
            }
            NetworkBackend::Tap => {
                let tap = TapNetwork::create(name, outbound).map_err(|e| e.to_string())?;
                let listener = tap.bind_metadata().map_err(|e| e.to_string())?;
                let service =
                    start_metadata_service_tcp(listener, task, log, self.metadata_limits())
                        .map_err(|e| format!("the metadata service cannot start: {e}"))?;
                let attachment = NetworkAttachment::Tap {
                    ifname: TAP_DEVICE.into(),
                    netns: tap.netns().to_owned(),
                };
                Ok((attachment, service, Some(tap)))
            }
        }
    }

    /// Waits for the task fetch (saving the boot snapshot on the way when `save` names
    /// one), then for the result, within maxRunTime.
    async fn wait_for_result(
        &self,
        vm: &mut Vm,
        service: &mut MetadataHandle,
        payload: &JobPayload,
        save: Option<(&SnapshotStore, &str)>,
        progress: &Progress,
    ) -> Outcome {
        let ready = Duration::from_secs(self.config.timeouts.guest_ready_seconds);
        let waiting = Instant::now();
        if let Some((store, key)) = save {
            let parked = tokio::select! {
                park = service.park_outcome() => park,
                exit = vm.wait(ready) => match exit {
                    Some(exit) => return Outcome::GuestEnded(exit),
                    None => return Outcome::NeverStarted,
                },
            };
            Self::save_snapshot(vm, parked, store, key, progress).await;
        }
        let fetched = tokio::select! {
            fetched = service.task_fetched() => fetched,
            exit = vm.wait(ready.saturating_sub(waiting.elapsed())) => match exit {
                Some(exit) => return Outcome::GuestEnded(exit),
                None => false,
            },
        };
        if !fetched {
            return Outcome::NeverStarted;
        }
        let max_run_time = Duration::from_secs(payload.max_run_time);
        tokio::select! {
            code = service.result() => match code {
                Some(code) => Outcome::Exited(code),
                None => Outcome::ServiceLost,
            },
            exit = vm.wait(max_run_time) => match exit {
                Some(exit) => service.reported().map_or(Outcome::GuestEnded(exit), Outcome::Exited),
                None => Outcome::TimedOut,
            },
        }
    }
}

/// The metadata budgets the guest ran into that it should hear about as errors.
fn metadata_budget_errors(usage: &MetadataUsage) -> Vec<Issue> {
    let mut errors = Vec::new();
    if usage.refused_connections > 0 {
        errors.push(Issue::new(
            "",
            format!(
                "the guest opened more than {} connections to the metadata service at once (metadata.maxConnections); {} were closed on arrival",
                usage.max_connections, usage.refused_connections
            ),
        ));
    }
    errors
}

/// The metadata budgets an honest guest can meet too (a long silent command), as lines.
fn metadata_budget_notes(usage: &MetadataUsage) -> Vec<String> {
    let mut notes = Vec::new();
    if usage.idle_logs_closed > 0 {
        notes.push(format!(
            "{} log stream(s) sent nothing for {} s and were closed (logs.idleSeconds); the guest tools open a new one for more output",
            usage.idle_logs_closed,
            usage.log_idle.as_secs()
        ));
    }
    notes
}

/// How much of the console's end is read to explain a failure.
const CONSOLE_TAIL: u64 = 16 << 10;

enum Outcome {
    Exited(i32),
    /// The metadata service ended while the guest ran (a bug, not the guest's doing).
    ServiceLost,
    Canceled(ExceptionReason),
    TimedOut,
    GuestEnded(VmExit),
    NeverStarted,
}

/// A failure without an exit code is explained by the end of the serial console.
fn needs_console(report: &ResultReport) -> bool {
    report.state == crate::job::ResultState::Failed && report.exit_code.is_none()
}

fn exception(reason: ExceptionReason, message: String) -> ResultReport {
    ResultReport::new(Resolution::Exception(reason), vec![Issue::new("", message)])
}

/// A short, unique, filesystem- and socket-friendly name for a run.
fn short_name(job_id: &str, run_id: u32) -> String {
    let id = Identity::derive(job_id, run_id);
    format!("j{}-{run_id}", &id.disk_serial[2..14])
}
