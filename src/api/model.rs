//! The API's JSON replies: what the handlers send, what `--server` clients read, and
//! what schemas/worker-api.openapi.json describes (generated from these types).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::queue::{CancelOutcome, JobState, JobStatus};

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Health {
    /// Always `ok`: the process serves.
    pub status: String,
}

/// `GET /readyz`: each check is `ok` or says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Readiness {
    pub ready: bool,
    pub queue: String,
    pub image_cache: String,
    /// The accelerator jobs run with (`kvm` or `tcg`), or why none is decided.
    pub accelerator: String,
}

/// One page of `GET /v1/jobs`, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct JobPage {
    pub jobs: Vec<JobStatus>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<String>,
}

/// `POST /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Submitted {
    pub job_id: String,
}

/// `POST /v1/jobs/ID/cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Canceled {
    /// `canceled` (it was pending: now `exception/canceled`), `requested` (it is
    /// running: its worker stops it at the next heartbeat), or `already-ended`.
    pub outcome: CancelOutcome,
    /// The job's state before the cancel.
    pub was: JobState,
}

/// `POST /v1/jobs/ID/release`: the kept VM is being torn down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Released {
    pub released: bool,
}

/// Every error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApiError {
    /// Stable and machine-readable (`no-such-job`, `forbidden`, ...: docs/api.md).
    pub code: String,
    /// For people: names the parameter, token, worker or file at fault.
    pub message: String,
}

/// A text message from a shell WebSocket's client (docs/api.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum ShellClientControl {
    /// The terminal is now this size.
    Resize { rows: u16, cols: u16 },
    /// No more stdin.
    Eof,
}

/// The last text message a shell WebSocket sends before its close (docs/api.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ShellServerControl {
    /// The command ended: its code, the signal that killed it, or why it did not start.
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        error: Option<String>,
    },
    /// The shell went without an exit (its VM was torn down, the tools restarted).
    Lost { reason: String },
}
