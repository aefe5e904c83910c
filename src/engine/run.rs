use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::agent::AgentClient;
use crate::config::{NetworkBackend, WorkerConfig};
use crate::image::{ImageCache, ImageLease, ImageRequest};
use crate::job::{
    ArtifactKind, ArtifactRecord, ExceptionReason, Identity, JobPayload, MachineLayers,
    PayloadContext, PhaseTiming, Resolution, ResultReport, validate_payload,
};
use crate::metadata::{
    LogSink, MetadataHandle, MetadataLimits, Park, Task, start_metadata_service,
    start_metadata_service_tcp,
};
use crate::schema::Issue;
use crate::vm::{
    LaunchPlan, NetworkAttachment, RunDir, SnapshotPlan, SnapshotStore, TAP_DEVICE, TapNetwork, Vm,
    VmExit, VmTimeouts, choose_accelerator_cached, finish_resume, prepare_launch_with_snapshots,
    take_screenshot,
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
        let mut vm = match Vm::start(launch, timeouts).await {
            Ok(vm) => vm,
            Err(e) => return exception(ExceptionReason::InternalError, e.to_string()),
        };
        if let (SnapshotPlan::Resume(saved), Some(store)) = (&snapshot, snapshots) {
            if let Err(why) = finish_resume(vm.qmp()).await {
                // A snapshot that does not load is dropped (the next job saves a new
                // one); this job boots.
                vm.teardown().await;
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
            Outcome::GuestEnded(exit) => {
                progress
                    .note(&format!(
                        "the guest ended before reporting a result ({exit:?})"
                    ))
                    .await;
                ResultReport::new(Resolution::Failed { exit_code: None }, Vec::new())
            }
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
            let failures = self
                .collect_artifacts(
                    &vm,
                    payload,
                    machine.guest_agent,
                    &job.job_dir,
                    &mut report,
                    progress,
                )
                .await;
            if !failures.is_empty() && report.state == crate::job::ResultState::Completed {
                report = ResultReport {
                    artifacts: report.artifacts,
                    ..ResultReport::new(Resolution::Failed { exit_code: Some(0) }, Vec::new())
                };
            }
            report.errors.extend(failures);
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
        let exit = vm.teardown().await;
        if matches!(exit, VmExit::QemuFailed { .. }) {
            progress
                .note(&format!("QEMU ended abnormally: {exit:?}"))
                .await;
        }
        if needs_console(&report) {
            let console = tokio::fs::read_to_string(job.job_dir.join("console.log"))
                .await
                .unwrap_or_default();
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
                let service = start_metadata_service(
                    Path::new(&socket),
                    task,
                    log,
                    MetadataLimits::default(),
                )
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
                    start_metadata_service_tcp(listener, task, log, MetadataLimits::default())
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

    /// Pulls every declared artifact through the agent port, or through qemu-ga when the
    /// image has no guest tools answering there (files only: qemu-ga cannot list a
    /// directory). Returns the problems (a missing artifact fails the job, as in
    /// taskcluster).
    async fn collect_artifacts(
        &self,
        vm: &Vm,
        payload: &JobPayload,
        qga: bool,
        job_dir: &Path,
        report: &mut ResultReport,
        progress: &Progress,
    ) -> Vec<Issue> {
        if payload.artifacts.is_empty() {
            return Vec::new();
        }
        let mut problems = Vec::new();
        let socket = PathBuf::from(vm.run_dir().agent_socket());
        // Idle guest tools answer in milliseconds even under TCG; with qemu-ga to fall
        // back on, do not make every such job wait long for tools the image lacks.
        let wait = Duration::from_secs(if qga { 10 } else { 30 });
        let mut agent = match AgentClient::connect(&socket, wait).await {
            Ok(agent) => agent,
            Err(e) if qga => {
                progress
                    .note(&format!("the guest tools did not answer on the agent port ({e}); collecting artifacts through qemu-ga"))
                    .await;
                return self.collect_through_qga(vm, payload, job_dir, report).await;
            }
            Err(e) => {
                problems.push(Issue::new(
                    "/artifacts",
                    format!("the guest tools did not answer on the agent port: {e}"),
                ));
                return problems;
            }
        };
        let store = job_dir.join("artifacts");
        let mut budget = self.config.artifacts.max_total_size.bytes();
        for (index, spec) in payload.artifacts.iter().enumerate() {
            let dest = store.join(&spec.name);
            if let Some(parent) = dest.parent() {
                let _ = tokio::fs::create_dir_all(parent).await;
            }
            let cap = budget.min(match spec.kind {
                ArtifactKind::File => self.config.artifacts.max_file_size.bytes(),
                ArtifactKind::Directory => budget,
            });
            match agent
                .fetch(
                    &spec.path,
                    spec.kind,
                    &dest,
                    cap,
                    false,
                    Duration::from_secs(60),
                )
                .await
            {
                Ok(tree) => {
                    for file in tree.files {
                        budget = budget.saturating_sub(file.size);
                        let name = if file.name.is_empty() {
                            spec.name.clone()
                        } else {
                            format!("{}/{}", spec.name, file.name)
                        };
                        report.artifacts.push(ArtifactRecord {
                            content_type: content_type(&name).into(),
                            name,
                            size: file.size,
                            sha256: file.sha256,
                        });
                    }
                }
                Err(e) => {
                    // A refusal is a whole answer; anything else may leave the rest of
                    // an interrupted one on the port: start afresh. QEMU's socket takes
                    // one connection at a time, so the old one goes first.
                    let in_sync = matches!(
                        e,
                        crate::agent::AgentError::NotFound { .. }
                            | crate::agent::AgentError::Refused { .. }
                    );
                    problems.push(Issue::new(
                        format!("/artifacts/{index}"),
                        format!("artifact {}: {e}", spec.name),
                    ));
                    if !in_sync {
                        drop(agent);
                        match AgentClient::connect(&socket, Duration::from_secs(30)).await {
                            Ok(fresh) => agent = fresh,
                            Err(e) => {
                                problems.push(Issue::new(
                                    "/artifacts",
                                    format!("the agent port did not answer again after an error, so the remaining artifacts were not collected: {e}"),
                                ));
                                break;
                            }
                        }
                    }
                }
            }
        }
        problems
    }
}

impl Engine {
    /// The qemu-ga fallback of `collect_artifacts`.
    async fn collect_through_qga(
        &self,
        vm: &Vm,
        payload: &JobPayload,
        job_dir: &Path,
        report: &mut ResultReport,
    ) -> Vec<Issue> {
        let mut problems = Vec::new();
        let socket = PathBuf::from(vm.run_dir().qga_socket());
        let mut qga = match crate::qemu::QgaClient::connect(&socket, Duration::from_secs(30)).await
        {
            Ok(qga) => qga,
            Err(e) => {
                problems.push(Issue::new(
                    "/artifacts",
                    format!("neither the guest tools nor qemu-ga answered: {e}"),
                ));
                return problems;
            }
        };
        let store = job_dir.join("artifacts");
        let mut budget = self.config.artifacts.max_total_size.bytes();
        for (index, spec) in payload.artifacts.iter().enumerate() {
            let at = format!("/artifacts/{index}");
            if spec.kind == ArtifactKind::Directory {
                problems.push(Issue::new(
                    at,
                    format!(
                        "artifact {}: directory artifacts need the guest tools (qemu-ga cannot list a directory)",
                        spec.name
                    ),
                ));
                continue;
            }
            let dest = store.join(&spec.name);
            if let Some(parent) = dest.parent() {
                let _ = tokio::fs::create_dir_all(parent).await;
            }
            let cap = budget.min(self.config.artifacts.max_file_size.bytes());
            let read = match tokio::fs::File::create(&dest).await {
                Ok(mut file) => qga
                    .file_read(&spec.path, &mut file, cap, Duration::from_secs(60))
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(format!("cannot create {}: {e}", dest.display())),
            };
            match read {
                Ok(read) => {
                    budget = budget.saturating_sub(read.bytes);
                    report.artifacts.push(ArtifactRecord {
                        content_type: content_type(&spec.name).into(),
                        name: spec.name.clone(),
                        size: read.bytes,
                        sha256: read.sha256,
                    });
                }
                Err(e) => {
                    let _ = tokio::fs::remove_file(&dest).await;
                    problems.push(Issue::new(at, format!("artifact {}: {e}", spec.name)));
                }
            }
        }
        problems
    }
}

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

/// A content type from the file name; enough for browsers to show common CI outputs.
fn content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map_or("", |(_, ext)| ext)
        .to_ascii_lowercase();
    match ext.as_str() {
        "txt" | "log" => "text/plain; charset=utf-8",
        "json" => "application/json",
        "xml" => "application/xml",
        "html" | "htm" => "text/html; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "svg" => "image/svg+xml",
        "gz" | "tgz" => "application/gzip",
        "zst" => "application/zstd",
        "tar" => "application/x-tar",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}
