use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::resolve::Machine;
use super::string_enum::string_enum;
use crate::schema::Issue;

string_enum! {
    /// Why a job ended as an exception rather than with the command's own outcome.
    pub enum ExceptionReason {
        MalformedPayload = "malformed-payload",
        InternalError = "internal-error",
        WorkerShutdown = "worker-shutdown",
        Canceled = "canceled",
        ClaimExpired = "claim-expired",
        DeadlineExceeded = "deadline-exceeded",
        ResourceUnavailable = "resource-unavailable",
    }
}

string_enum! {
    /// What happened to the image's boot snapshot in a job (docs/snapshots.md):
    /// `resumed` (the saved VM instead of a boot), `fallback` (the snapshot did not
    /// load, was dropped, and the job booted), `saved` (the job booted and saved the
    /// snapshot later jobs resume).
    pub enum SnapshotEvent {
        Resumed = "resumed",
        Fallback = "fallback",
        Saved = "saved",
    }
}

string_enum! {
    /// The final state of a job run.
    pub enum ResultState {
        Completed = "completed",
        Failed = "failed",
        Exception = "exception",
    }
}

/// How a job ended; kept apart from the guest's exit code, which is only one input to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Completed,
    /// Non-zero exit (`Some`), or no exit code at all: maxRunTime exceeded, or the guest
    /// died before reporting.
    Failed {
        exit_code: Option<i32>,
    },
    Exception(ExceptionReason),
}

impl Resolution {
    /// The CLI's exit status: 0 completed, 1 failed, 2 malformed payload, 3 other exception.
    pub fn cli_exit_code(self) -> u8 {
        match self {
            Self::Completed => 0,
            Self::Failed { .. } => 1,
            Self::Exception(ExceptionReason::MalformedPayload) => 2,
            Self::Exception(_) => 3,
        }
    }
}

/// The machine-readable result of a job run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "Job result report")]
pub struct ResultReport {
    pub state: ResultState,
    /// Set when `state` is `exception`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ExceptionReason>,
    /// The command's exit code, when the guest reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Every problem that made the job malformed (or other errors worth a line each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<Issue>,
    /// The artifacts stored, one entry per file. Only these are complete: nothing else
    /// is kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<ArtifactRecord>,
    /// Entries of directory artifacts the guest did not send (symbolic links, special
    /// files, unreadable files, names that are not UTF-8), the first few by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedRecord>,
    /// How many entries were skipped in all (`skipped` names at most 20 of them).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_count: u64,
    /// The final screenshot (PNG), relative to the job directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screenshot: Option<String>,
    /// The screenshots taken while the command ran (worker.yml
    /// `debug.screenshotEverySeconds`), relative to the job directory, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub screenshots: Vec<String>,
    /// Milliseconds spent in each phase of the job, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timings: Vec<PhaseTiming>,
    /// What happened to the boot snapshot, in order (none when snapshots are off).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshot: Vec<SnapshotEvent>,
}

/// One stored artifact file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ArtifactRecord {
    /// The stored name, e.g. `public/logs/a.txt`.
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub content_type: String,
}

/// An entry of a directory artifact that was not stored, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SkippedRecord {
    /// The name it would have had, e.g. `public/logs/latest` (at most 256 characters
    /// of it).
    pub name: String,
    pub reason: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How long one phase of a job took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PhaseTiming {
    pub phase: String,
    pub millis: u64,
}

impl ResultReport {
    pub fn new(resolution: Resolution, errors: Vec<Issue>) -> Self {
        let (state, reason, exit_code) = match resolution {
            Resolution::Completed => (ResultState::Completed, None, Some(0)),
            Resolution::Failed { exit_code } => (ResultState::Failed, None, exit_code),
            Resolution::Exception(reason) => (ResultState::Exception, Some(reason), None),
        };
        Self {
            state,
            reason,
            exit_code,
            errors,
            artifacts: Vec::new(),
            skipped: Vec::new(),
            skipped_count: 0,
            screenshot: None,
            screenshots: Vec::new(),
            timings: Vec::new(),
            snapshot: Vec::new(),
        }
    }

    pub fn malformed_payload(errors: Vec<Issue>) -> Self {
        Self::new(
            Resolution::Exception(ExceptionReason::MalformedPayload),
            errors,
        )
    }

    pub fn resolution(&self) -> Resolution {
        match self.state {
            ResultState::Completed => Resolution::Completed,
            ResultState::Failed => Resolution::Failed {
                exit_code: self.exit_code,
            },
            ResultState::Exception => {
                Resolution::Exception(self.reason.unwrap_or(ExceptionReason::InternalError))
            }
        }
    }

    /// The lines written to the job log for this report's errors.
    pub fn log_lines(&self) -> impl Iterator<Item = String> + '_ {
        self.errors
            .iter()
            .map(|issue| format!("[qemu-worker:error] {issue}"))
    }
}

/// What `qemu-worker validate` prints: every problem, or the machine the job would get.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(title = "Payload validation report")]
pub struct ValidationReport {
    pub valid: bool,
    pub errors: Vec<Issue>,
    /// The machine after layering and limits (before the image's machine.json is known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine: Option<Machine>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_payload_report_has_the_documented_shape() {
        let report = ResultReport::malformed_payload(vec![Issue::new(
            "/machine/memory",
            "machine memory 4096 MiB is larger than the allowed 2048 MiB",
        )]);
        assert_eq!(
            serde_json::to_value(&report).expect("serializes"),
            serde_json::json!({
                "state": "exception",
                "reason": "malformed-payload",
                "errors": [{"path": "/machine/memory",
                            "message": "machine memory 4096 MiB is larger than the allowed 2048 MiB"}]
            })
        );
        assert_eq!(report.resolution().cli_exit_code(), 2);
        assert_eq!(
            report.log_lines().collect::<Vec<_>>(),
            [
                "[qemu-worker:error] /machine/memory: machine memory 4096 MiB is larger than the allowed 2048 MiB"
            ]
        );
    }

    #[test]
    fn exit_codes_follow_the_cli_contract() {
        assert_eq!(Resolution::Completed.cli_exit_code(), 0);
        assert_eq!(Resolution::Failed { exit_code: Some(3) }.cli_exit_code(), 1);
        assert_eq!(Resolution::Failed { exit_code: None }.cli_exit_code(), 1);
        assert_eq!(
            Resolution::Exception(ExceptionReason::WorkerShutdown).cli_exit_code(),
            3
        );
    }

    #[test]
    fn reports_round_trip() {
        let report = ResultReport::new(Resolution::Failed { exit_code: Some(7) }, vec![]);
        let text = serde_json::to_string(&report).expect("serializes");
        assert_eq!(text, r#"{"state":"failed","exitCode":7}"#);
        let back: ResultReport = serde_json::from_str(&text).expect("parses");
        assert_eq!(back.resolution(), Resolution::Failed { exit_code: Some(7) });
    }
}
