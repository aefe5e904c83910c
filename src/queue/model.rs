use crate::job::string_enum::string_enum;
use crate::job::{ExceptionReason, ResultReport, ResultState};

string_enum! {
    /// Where a job is in its life.
    pub enum JobState {
        Pending = "pending",
        Running = "running",
        Completed = "completed",
        Failed = "failed",
        Exception = "exception",
    }
}

impl JobState {
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|s| s.as_str() == text)
    }
}

string_enum! {
    /// What a cancel did: ended a pending job, asked a running one's worker to stop it,
    /// or found the job already ended (its state says how).
    pub enum CancelOutcome {
        Canceled = "canceled",
        Requested = "requested",
        AlreadyEnded = "already-ended",
    }
}

impl CancelOutcome {
    /// The outcome of canceling a job that was in `state`.
    pub fn of(state: JobState) -> Self {
        match state {
            JobState::Pending => Self::Canceled,
            JobState::Running => Self::Requested,
            _ => Self::AlreadyEnded,
        }
    }
}

/// A job to add to the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    /// The payload as submitted (validated when a worker runs it).
    pub payload: String,
    /// Higher runs first; equal priorities run in submission order.
    pub priority: i32,
    /// How many runs the job may have in all (a run ends early when its claim expires).
    pub max_runs: u32,
    /// When the job must have ended (ms since the epoch): not claimed after it, and a
    /// running job is stopped at its next heartbeat as `exception/deadline-exceeded`.
    pub deadline_ms: Option<u64>,
}

/// A run a worker holds: the job, the run number, and the fencing token that every
/// later call must present (a run that lost its claim cannot touch the job again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub job_id: String,
    pub run_id: u32,
    pub token: u64,
    pub payload: String,
    pub lease_until_ms: u64,
    /// When the job was submitted (ms since the Unix epoch): its queue wait ends now.
    pub created_ms: u64,
}

/// A run whose lease ran out (`claim-expired`), or a pending job whose deadline passed
/// (`deadline-exceeded`, with the job's latest run, 0 if it never ran).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredRun {
    pub job_id: String,
    pub run_id: u32,
    pub reason: ExceptionReason,
    /// Whether the job went back to the queue (it had runs left).
    pub requeued: bool,
}

/// Which part of a listing: jobs older than `after` (a job id), at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub after: Option<String>,
    pub limit: Option<usize>,
}

/// A job's state and, once it ended, its result report (`status --json`, the API).
#[derive(
    Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    pub job_id: String,
    pub state: JobState,
    /// The latest run (0 before the first claim).
    pub run_id: u32,
    /// Runs the job has had.
    pub runs: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<ResultReport>,
    /// The worker of the latest run (which holds its log, artifacts and screenshot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("queue database error: {0}")]
    Database(String),
    #[error("no job {job_id}")]
    NotFound { job_id: String },
    #[error("run {run_id} of {job_id} no longer holds its claim")]
    StaleClaim { job_id: String, run_id: u32 },
    #[error("{job_id} was canceled")]
    Canceled { job_id: String },
    #[error("{job_id} passed its deadline")]
    DeadlineExceeded { job_id: String },
}

impl From<ResultState> for JobState {
    fn from(state: ResultState) -> Self {
        match state {
            ResultState::Completed => Self::Completed,
            ResultState::Failed => Self::Failed,
            ResultState::Exception => Self::Exception,
        }
    }
}
