//! The decision: what happened to a job → its report. Pure, so every outcome of
//! DESIGN §2.5 has its own test below; the phases only gather the facts.

use super::error::JobError;
use crate::artifacts::Collection;
use crate::job::{ExceptionReason, Resolution, ResultReport, ResultState};
use crate::metadata::MetadataUsage;
use crate::schema::Issue;
use crate::vm::VmExit;

/// How the run ended, before anything was collected.
#[derive(Debug)]
pub enum Ending {
    /// The payload, its image or its machine was refused: every problem, each with its path.
    Rejected(Vec<Issue>),
    /// The worker could not run the job.
    Error(JobError),
    /// Stopped from outside: canceled, the worker shutting down, the claim gone.
    Stopped(ExceptionReason),
    /// The guest reported the command's exit code.
    Exited(i32),
    /// maxRunTime passed without a result.
    TimedOut { max_run_time: u64 },
    /// The VM ended before the guest reported a result.
    GuestEnded(VmExit),
    /// The metadata service ended while the guest ran (a bug, not the guest's doing).
    ServiceLost,
    /// The guest tools never fetched the task.
    NeverStarted { ready_seconds: u64 },
}

impl Ending {
    /// A failure of the job itself, whose VM is worth a look (payload
    /// `debug.keepAliveOnFailure`): not a success, a refusal before any VM, a VM that
    /// ended, or a stop from outside.
    pub fn is_failure(&self) -> bool {
        match self {
            Self::Exited(code) => *code != 0,
            Self::TimedOut { .. }
            | Self::NeverStarted { .. }
            | Self::Error(_)
            | Self::ServiceLost => true,
            Self::Rejected(_) | Self::Stopped(_) | Self::GuestEnded(_) => false,
        }
    }

    /// The job-log line that says what the worker did about it, written when it happens.
    pub fn note(&self) -> Option<String> {
        match self {
            Self::TimedOut { max_run_time } => Some(format!(
                "maxRunTime of {max_run_time} seconds exceeded; the VM is stopped"
            )),
            Self::Stopped(reason) => Some(format!(
                "the job was stopped ({reason}); the VM is shut down"
            )),
            Self::NeverStarted { ready_seconds } => Some(format!(
                "the guest tools did not fetch the task within {ready_seconds} seconds (does the image have them?)"
            )),
            _ => None,
        }
    }

    /// Whether artifacts and a screenshot are collected after it: whenever the guest got
    /// as far as running (its files may explain a failure), never after a stop.
    pub fn collects(&self) -> bool {
        matches!(
            self,
            Self::Exited(_) | Self::TimedOut { .. } | Self::NeverStarted { .. }
        )
    }
}

/// What the serial console capture dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsoleSummary {
    pub dropped: u64,
    pub limit: u64,
    /// The console log could not be written (its disk is full or gone).
    pub write_failed: bool,
}

/// Everything the decision reads, gathered by the phases.
#[derive(Debug)]
pub struct Happened {
    pub ending: Ending,
    pub collection: Option<Collection>,
    /// The final screenshot, relative to the job directory.
    pub screenshot: Option<String>,
    /// Those taken while the command ran, relative to the job directory.
    pub screenshots: Vec<String>,
    /// The metadata service's budgets, counted to the end of the job.
    pub metadata: Option<MetadataUsage>,
    pub console: ConsoleSummary,
}

impl Happened {
    /// A job that ended before it had a VM.
    pub fn before_vm(ending: Ending) -> Self {
        Self {
            ending,
            collection: None,
            screenshot: None,
            screenshots: Vec::new(),
            metadata: None,
            console: ConsoleSummary::default(),
        }
    }
}

/// The report for what happened (timings are the caller's).
pub fn resolve(happened: Happened) -> ResultReport {
    let mut report = match happened.ending {
        Ending::Rejected(issues) => ResultReport::malformed_payload(issues),
        Ending::Error(error) => {
            ResultReport::new(Resolution::Exception(error.reason()), error.issues())
        }
        Ending::Stopped(reason) => ResultReport::new(Resolution::Exception(reason), Vec::new()),
        Ending::Exited(0) => ResultReport::new(Resolution::Completed, Vec::new()),
        Ending::Exited(code) => ResultReport::new(
            Resolution::Failed {
                exit_code: Some(code),
            },
            Vec::new(),
        ),
        Ending::TimedOut { .. } | Ending::NeverStarted { .. } => {
            ResultReport::new(Resolution::Failed { exit_code: None }, Vec::new())
        }
        Ending::GuestEnded(exit) => ResultReport::new(
            Resolution::Failed { exit_code: None },
            vec![Issue::new(
                "",
                format!("the VM ended before the guest reported a result: {exit}"),
            )],
        ),
        Ending::ServiceLost => ResultReport::new(
            Resolution::Exception(ExceptionReason::InternalError),
            vec![Issue::new(
                "",
                "the metadata service stopped before the guest reported a result",
            )],
        ),
    };
    if let Some(collection) = happened.collection {
        // A missing or refused artifact fails the job, as in taskcluster: completed with
        // exit code 0 becomes failed with it.
        if !collection.problems.is_empty() && report.state == ResultState::Completed {
            report.state = ResultState::Failed;
        }
        report.artifacts = collection.artifacts;
        report.skipped = collection.skipped;
        report.skipped_count = collection.skipped_count;
        report.errors.extend(collection.problems);
    }
    report.screenshot = happened.screenshot;
    report.screenshots = happened.screenshots;
    if let Some(usage) = happened.metadata.filter(|u| u.refused_connections > 0) {
        report.errors.push(Issue::new(
            "",
            format!(
                "the guest opened more than {} connections to the metadata service at once (metadata.maxConnections); {} were closed on arrival",
                usage.max_connections, usage.refused_connections
            ),
        ));
    }
    let console = happened.console;
    if console.dropped > 0 {
        let message = if console.write_failed {
            format!(
                "the serial console log could not be written (is the state directory's disk full?); {} bytes were dropped",
                console.dropped
            )
        } else {
            format!(
                "the serial console reached its cap of {} bytes (logs.maxConsoleSize); {} more bytes were dropped",
                console.limit, console.dropped
            )
        };
        report.errors.push(Issue::new("", message));
    }
    report
}

/// A failure without an exit code is explained by the end of the serial console.
pub fn needs_console(report: &ResultReport) -> bool {
    report.state == ResultState::Failed && report.exit_code.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{ArtifactRecord, SkippedRecord};
    use crate::vm::StopStep;

    fn ended(ending: Ending) -> ResultReport {
        resolve(Happened::before_vm(ending))
    }

    fn artifact(name: &str) -> ArtifactRecord {
        ArtifactRecord {
            name: name.into(),
            size: 3,
            sha256: "00".repeat(32),
            content_type: "text/plain".into(),
        }
    }

    fn collected(problems: Vec<Issue>) -> Collection {
        Collection {
            artifacts: vec![artifact("public/a.txt")],
            skipped: vec![SkippedRecord {
                name: "public/link".into(),
                reason: "a symbolic link".into(),
            }],
            skipped_count: 1,
            problems,
            notes: Vec::new(),
        }
    }

    fn usage(refused: u64) -> MetadataUsage {
        MetadataUsage {
            refused_connections: refused,
            peak_connections: 16,
            idle_logs_closed: 0,
            max_connections: 16,
            log_idle: std::time::Duration::from_secs(300),
        }
    }

    fn after_run(ending: Ending, collection: Option<Collection>) -> ResultReport {
        resolve(Happened {
            collection,
            screenshot: Some("screenshots/final.png".into()),
            metadata: Some(usage(0)),
            ..Happened::before_vm(ending)
        })
    }

    #[test]
    fn exit_zero_completes_with_its_artifacts_and_screenshot() {
        let report = after_run(Ending::Exited(0), Some(collected(Vec::new())));
        assert_eq!(report.resolution(), Resolution::Completed);
        assert_eq!(report.exit_code, Some(0));
        assert_eq!(report.artifacts, [artifact("public/a.txt")]);
        assert_eq!(report.skipped_count, 1);
        assert_eq!(report.skipped[0].name, "public/link");
        assert_eq!(report.screenshot.as_deref(), Some("screenshots/final.png"));
        assert!(report.errors.is_empty());
        assert!(!needs_console(&report));
    }

    #[test]
    fn a_non_zero_exit_fails_with_the_code() {
        let report = after_run(Ending::Exited(3), None);
        assert_eq!(
            report.resolution(),
            Resolution::Failed { exit_code: Some(3) }
        );
        assert!(!needs_console(&report));
    }

    #[test]
    fn a_failed_artifact_fails_a_completed_job_and_keeps_exit_code_zero() {
        let problem = Issue::new("/artifacts/0", "artifact /build/out.txt was not found");
        let report = after_run(Ending::Exited(0), Some(collected(vec![problem.clone()])));
        assert_eq!(report.state, ResultState::Failed);
        assert_eq!(report.exit_code, Some(0));
        assert_eq!(report.errors, [problem]);
        assert_eq!(report.artifacts.len(), 1, "the other artifacts are kept");
    }

    #[test]
    fn a_failed_artifact_leaves_a_failed_job_failed_with_its_code() {
        let problem = Issue::new("/artifacts/0", "artifact /x was not found");
        let report = after_run(Ending::Exited(2), Some(collected(vec![problem])));
        assert_eq!(
            report.resolution(),
            Resolution::Failed { exit_code: Some(2) }
        );
        assert_eq!(report.errors.len(), 1);
    }

    #[test]
    fn max_run_time_exceeded_fails_without_an_exit_code() {
        let ending = Ending::TimedOut { max_run_time: 5 };
        assert_eq!(
            ending.note().as_deref(),
            Some("maxRunTime of 5 seconds exceeded; the VM is stopped")
        );
        assert!(ending.collects());
        let report = after_run(ending, None);
        assert_eq!(report.resolution(), Resolution::Failed { exit_code: None });
        assert!(needs_console(&report));
    }

    #[test]
    fn a_guest_that_dies_before_reporting_fails_and_says_how_it_ended() {
        let ending = Ending::GuestEnded(VmExit::Panicked);
        assert!(!ending.collects());
        let report = after_run(ending, None);
        assert_eq!(report.resolution(), Resolution::Failed { exit_code: None });
        assert_eq!(report.errors.len(), 1);
        assert!(
            report.errors[0]
                .message
                .starts_with("the VM ended before the guest reported a result: "),
            "{}",
            report.errors[0].message
        );
        assert!(needs_console(&report));
    }

    #[test]
    fn guest_tools_that_never_fetch_the_task_fail_the_job() {
        let ending = Ending::NeverStarted { ready_seconds: 60 };
        assert!(
            ending
                .note()
                .is_some_and(|n| n.contains("within 60 seconds"))
        );
        let report = after_run(ending, None);
        assert_eq!(report.resolution(), Resolution::Failed { exit_code: None });
        assert!(needs_console(&report));
    }

    #[test]
    fn a_malformed_payload_is_an_exception_with_every_issue() {
        let issues = vec![
            Issue::new("/command", "command must not be empty"),
            Issue::new("/maxRunTime", "maxRunTime must be at least 1"),
        ];
        let report = ended(Ending::Rejected(issues.clone()));
        assert_eq!(
            report.resolution(),
            Resolution::Exception(ExceptionReason::MalformedPayload)
        );
        assert_eq!(report.errors, issues);
    }

    #[test]
    fn a_worker_error_is_an_internal_error_with_its_whole_chain() {
        let error = JobError::JobDir {
            path: "/state/jobs/a/run-1".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        let report = ended(Ending::Error(error));
        assert_eq!(
            report.resolution(),
            Resolution::Exception(ExceptionReason::InternalError)
        );
        assert_eq!(
            report.errors[0].message,
            "cannot create the job directory /state/jobs/a/run-1: No space left on device (os error 28)"
        );
    }

    #[test]
    fn a_lost_metadata_service_is_an_internal_error() {
        let report = after_run(Ending::ServiceLost, None);
        assert_eq!(
            report.resolution(),
            Resolution::Exception(ExceptionReason::InternalError)
        );
        assert_eq!(report.errors.len(), 1);
    }

    #[test]
    fn a_missing_resource_is_resource_unavailable() {
        let error = JobError::Network(crate::vm::NetworkError::Command {
            command: "ip netns add x".into(),
            detail: "permission denied".into(),
        });
        let report = ended(Ending::Error(error));
        assert_eq!(
            report.resolution(),
            Resolution::Exception(ExceptionReason::ResourceUnavailable)
        );
        let report = ended(Ending::Error(JobError::OutboundNeedsTap));
        assert_eq!(report.reason, Some(ExceptionReason::ResourceUnavailable));
    }

    /// A stop from outside: its own exception, no error, nothing collected, a note.
    fn assert_stopped_by(reason: ExceptionReason) {
        let ending = Ending::Stopped(reason);
        assert!(!ending.collects(), "{reason}");
        assert_eq!(
            ending.note(),
            Some(format!(
                "the job was stopped ({reason}); the VM is shut down"
            ))
        );
        let report = after_run(ending, None);
        assert_eq!(report.resolution(), Resolution::Exception(reason));
        assert!(report.errors.is_empty(), "{reason}");
        assert_eq!(report.exit_code, None);
    }

    #[test]
    fn a_canceled_job_is_canceled() {
        assert_stopped_by(ExceptionReason::Canceled);
    }

    #[test]
    fn a_job_stopped_by_a_worker_shutdown_is_worker_shutdown() {
        assert_stopped_by(ExceptionReason::WorkerShutdown);
    }

    #[test]
    fn a_job_whose_claim_expired_is_claim_expired() {
        assert_stopped_by(ExceptionReason::ClaimExpired);
    }

    #[test]
    fn a_job_past_its_deadline_is_deadline_exceeded() {
        assert_stopped_by(ExceptionReason::DeadlineExceeded);
    }

    #[test]
    fn an_image_that_cannot_be_had_is_resource_unavailable_at_image() {
        let error = crate::image::ImageError::from(crate::image::FetchError::Exhausted {
            url: "http://images.test/a.tar.zst".into(),
            attempts: 4,
            last: "HTTP 503".into(),
        });
        let report = ended(Ending::Error(JobError::Image(error)));
        assert_eq!(
            report.resolution(),
            Resolution::Exception(ExceptionReason::ResourceUnavailable)
        );
        assert_eq!(report.errors[0].path, "/image");
        assert!(report.errors[0].message.contains("after 4 attempts"));
    }

    #[test]
    fn a_refused_image_is_a_malformed_payload_at_image() {
        let error = crate::image::ImageError::from(crate::image::FetchError::TooLarge {
            size: 10,
            limit: 5,
        });
        let report = ended(Ending::Error(JobError::Image(error)));
        assert_eq!(
            report.resolution(),
            Resolution::Exception(ExceptionReason::MalformedPayload)
        );
        assert_eq!(report.errors[0].path, "/image");
    }

    #[test]
    fn no_working_accelerator_is_resource_unavailable() {
        let error = JobError::Accelerator(crate::vm::AccelError::KvmUnavailable(
            "the probe guest hung".into(),
        ));
        let report = ended(Ending::Error(error));
        assert_eq!(report.reason, Some(ExceptionReason::ResourceUnavailable));
        assert_eq!(
            report.errors[0].message,
            "no accelerator can run the VM: accelerator kvm was requested, but KVM does not work on this host: the probe guest hung"
        );
    }

    #[test]
    fn refused_metadata_connections_are_an_error_line() {
        let report = resolve(Happened {
            metadata: Some(usage(984)),
            ..Happened::before_vm(Ending::Exited(0))
        });
        assert_eq!(report.state, ResultState::Completed, "a budget line alone");
        assert_eq!(
            report.errors[0].message,
            "the guest opened more than 16 connections to the metadata service at once (metadata.maxConnections); 984 were closed on arrival"
        );
    }

    #[test]
    fn a_console_over_its_cap_or_unwritable_says_which() {
        let capped = resolve(Happened {
            console: ConsoleSummary {
                dropped: 10,
                limit: 100,
                write_failed: false,
            },
            ..Happened::before_vm(Ending::Exited(0))
        });
        assert!(capped.errors[0].message.contains("cap of 100 bytes"));
        let failed = resolve(Happened {
            console: ConsoleSummary {
                dropped: 10,
                limit: 100,
                write_failed: true,
            },
            ..Happened::before_vm(Ending::Exited(0))
        });
        assert!(failed.errors[0].message.contains("could not be written"));
    }

    #[test]
    fn a_stopped_vm_step_reads_as_words() {
        // The guest-ended message carries VmExit's own sentence, never `{:?}`.
        let report = after_run(
            Ending::GuestEnded(VmExit::Stopped {
                step: StopStep::Kill,
            }),
            None,
        );
        assert!(!report.errors[0].message.contains("Stopped {"));
    }
}
