use std::time::Instant;

use super::error::JobError;
use super::resolve::needs_console;
use super::run::JobRun;
use crate::config::WorkerConfig;
use crate::job::{Identity, JobDir, PhaseTiming, ResultReport, SnapshotEvent};
use crate::metadata::LogSink;

/// How much of the console's end is read to explain a failure.
const CONSOLE_TAIL: u64 = 16 << 10;

/// One job's record while it runs: who it is, where its files go, its log and the time
/// each phase took. The phases write to it; the resources they make (the image lease,
/// the VM) are handed from phase to phase and end in teardown.
#[derive(Debug)]
pub struct JobContext<'a> {
    pub job: &'a JobRun,
    pub identity: Identity,
    /// A short, unique, filesystem- and socket-friendly name for the run.
    pub name: String,
    log: LogSink,
    started: Instant,
    phase_start: Instant,
    timings: Vec<PhaseTiming>,
    /// Noted by phases that hold the context shared (boot, wait).
    snapshot: std::sync::Mutex<Vec<SnapshotEvent>>,
}

impl<'a> JobContext<'a> {
    /// Creates the job directory and opens its log.
    pub async fn open(job: &'a JobRun, config: &WorkerConfig) -> Result<Self, JobError> {
        let started = Instant::now();
        let dir = job.job_dir.path();
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| JobError::JobDir {
                path: dir.to_path_buf(),
                source,
            })?;
        let log = LogSink::create_with_tee(
            &job.job_dir.log(),
            config.logs.max_size.bytes(),
            job.live_log,
        )
        .await
        .map_err(JobError::JobLog)?;
        let identity = Identity::derive(&job.job_id, job.run_id);
        let name = format!("j{}-{}", &identity.disk_serial[2..14], job.run_id);
        Ok(Self {
            job,
            identity,
            name,
            log,
            started,
            phase_start: started,
            timings: Vec::new(),
            snapshot: Default::default(),
        })
    }

    pub fn dir(&self) -> &JobDir {
        &self.job.job_dir
    }

    pub fn log(&self) -> LogSink {
        self.log.clone()
    }

    /// Ends the phase `name`: its time goes into the report.
    pub fn phase(&mut self, name: &str) {
        let now = Instant::now();
        self.timings.push(PhaseTiming {
            phase: name.to_owned(),
            millis: millis(now - self.phase_start),
        });
        self.phase_start = now;
    }

    /// Records what happened to the boot snapshot, for the report.
    pub fn snapshot_event(&self, event: SnapshotEvent) {
        self.snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }

    /// A `[qemu-worker]` line in the job log.
    pub async fn note(&self, line: &str) {
        self.log.line(&format!("[qemu-worker] {line}")).await;
    }

    /// Writes the report's error lines (each once, whole), the console's end when it
    /// explains a failure, the timings, and `report.json`.
    pub async fn finish(mut self, mut report: ResultReport) -> ResultReport {
        if needs_console(&report) {
            // Only the end is read, however large the console grew.
            let path = self.dir().console();
            let console =
                tokio::task::spawn_blocking(move || crate::vm::read_tail(&path, CONSOLE_TAIL))
                    .await
                    .unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(20).collect();
            for line in tail.into_iter().rev() {
                self.note(&format!("console: {line}")).await;
            }
        }
        for line in report.log_lines() {
            self.log.line(&line).await;
        }
        self.log.flush().await;
        self.timings.push(PhaseTiming {
            phase: "total".into(),
            millis: millis(self.started.elapsed()),
        });
        report.timings = std::mem::take(&mut self.timings);
        report.snapshot =
            std::mem::take(self.snapshot.get_mut().unwrap_or_else(|e| e.into_inner()));
        write_report(self.dir(), &report).await;
        report
    }
}

/// `report.json`, written last: its presence says the job has ended.
pub async fn write_report(dir: &JobDir, report: &ResultReport) {
    if let Ok(text) = serde_json::to_vec_pretty(report) {
        let _ = tokio::fs::write(dir.report(), text).await;
    }
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
