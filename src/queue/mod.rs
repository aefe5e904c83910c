//! The job queue behind one trait, with two backends that pass one conformance suite
//! (`tests/component/queue.rs`): SQLite embedded in the worker (the default) and PostgreSQL for
//! many hosts sharing one queue.
//!
//! Every call takes the caller's clock (`now_ms`, milliseconds since the Unix epoch) so
//! the semantics are testable without sleeping; hosts sharing a queue keep their clocks
//! in sync (NTP), as leases are compared across hosts.

mod model;
mod postgres;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

pub use model::{CancelOutcome, Claim, ExpiredRun, JobState, JobStatus, NewJob, Page, QueueError};
pub use postgres::PostgresQueue;
pub use sqlite::SqliteQueue;

/// Runs a blocking queue call off the async executor (a panic in it is a database error).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, QueueError> + Send + 'static,
) -> Result<T, QueueError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(QueueError::Database(format!("a queue call panicked: {e}"))))
}

use crate::config::{QueueConfig, WorkerConfig};
use crate::job::ResultReport;

/// What a worker and the job CLI need from a queue. Calls block (callers on an async
/// executor use `spawn_blocking`); one handle serializes its own calls, and handles made
/// with [`Queue::reopen`] work concurrently.
pub trait Queue: Send + Sync + std::fmt::Debug {
    /// Adds a job; returns its id.
    fn enqueue(&self, job: &NewJob, now_ms: u64) -> Result<String, QueueError>;

    /// Claims the pending job with the highest priority (oldest first) whose deadline
    /// has not passed, starting a new run with a fresh fencing token and a lease until
    /// `now + lease`.
    fn claim(
        &self,
        worker: &str,
        lease: Duration,
        now_ms: u64,
    ) -> Result<Option<Claim>, QueueError>;

    /// Extends the lease of a run that still holds its claim; returns the new lease end.
    /// Fails with `StaleClaim` when the run lost it (expired and re-queued, resolved, or
    /// a newer run), `Canceled` when someone asked to cancel the job, and
    /// `DeadlineExceeded` when the job's deadline has passed.
    fn heartbeat(&self, claim: &Claim, lease: Duration, now_ms: u64) -> Result<u64, QueueError>;

    /// Records a run's result, if the run still holds its claim.
    fn resolve(&self, claim: &Claim, report: &ResultReport) -> Result<(), QueueError>;

    /// Resolves every run whose lease ran out as `exception/claim-expired` (re-queuing
    /// its job while it has runs left, unless someone asked to cancel it: then the job
    /// ends `exception/canceled`), then ends every pending job whose deadline passed as
    /// `exception/deadline-exceeded`. Returns what it ended.
    fn expire(&self, now_ms: u64) -> Result<Vec<ExpiredRun>, QueueError>;

    /// Cancels a job: a pending one ends at once as `exception/canceled`; a running one
    /// is flagged, and its worker learns it at the next heartbeat. Returns the job's
    /// state before the call (`CancelOutcome::of` says what that means).
    fn cancel(&self, job_id: &str) -> Result<JobState, QueueError>;

    /// Gives a run's job back (the worker is shutting down): the run ends as
    /// `exception/worker-shutdown`, and the job runs again if it has runs left and was
    /// not canceled (`true`).
    fn release(&self, claim: &Claim) -> Result<bool, QueueError>;

    /// Jobs, newest first, optionally in one state: at most `page.limit` of them, those
    /// older than the job `page.after` (which need not be in `state`; an unknown one is
    /// `NotFound`). One query, paged by the database.
    fn list(&self, state: Option<JobState>, page: &Page) -> Result<Vec<JobStatus>, QueueError>;

    fn status(&self, job_id: &str) -> Result<JobStatus, QueueError>;

    /// Blocks until new work may be there or `timeout` passes; `true` when woken by a
    /// notification. PostgreSQL wakes on LISTEN/NOTIFY (falling back to the timeout when
    /// notifications are unavailable); SQLite, which has no notifications across
    /// processes, waits out the timeout.
    fn wait_for_work(&self, timeout: Duration) -> bool;

    /// Another handle on the same queue with its own connection.
    fn reopen(&self) -> Result<Box<dyn Queue>, QueueError>;

    /// Records where `worker`'s HTTP API answers (a base URL), for the other workers to
    /// pass requests about its jobs on to.
    fn record_api(&self, worker: &str, url: &str, now_ms: u64) -> Result<(), QueueError>;

    /// Where `worker`'s HTTP API answers, if it recorded one.
    fn api_of(&self, worker: &str) -> Result<Option<String>, QueueError>;
}

/// Opens the queue a worker.yml names (paths already resolved).
pub fn open(config: &WorkerConfig) -> Result<Arc<dyn Queue>, QueueError> {
    match (&config.queue, config.sqlite_path()) {
        (QueueConfig::Postgres { url }, _) => Ok(Arc::new(PostgresQueue::open(url)?)),
        (QueueConfig::Sqlite { .. }, Some(path)) => Ok(Arc::new(SqliteQueue::open(&path)?)),
        (QueueConfig::Sqlite { .. }, None) => {
            Err(QueueError::Database("no SQLite path is configured".into()))
        }
    }
}

/// A fencing token: unique per claim, not guessable from the job id alone, and positive
/// as a signed 64-bit integer (both databases store it that way).
pub(crate) fn token(now_ms: u64, salt: i64) -> u64 {
    use sha2::Digest;
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut hasher = sha2::Sha256::new();
    hasher.update(now_ms.to_be_bytes());
    hasher.update(salt.to_be_bytes());
    hasher.update(std::process::id().to_be_bytes());
    hasher.update(
        COUNTER
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_be_bytes(),
    );
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    hasher.update(nanos.to_be_bytes());
    let digest: [u8; 32] = hasher.finalize().into();
    u64::from_be_bytes([
        digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
    ]) >> 1
}

/// The random part of a job id.
pub(crate) fn id_suffix(now_ms: u64, seq: i64) -> String {
    format!("{:016x}", token(now_ms, seq))[..8].to_owned()
}

/// The stored report of a job the queue itself ended (no run got to report).
pub(crate) fn queue_report(reason: crate::job::ExceptionReason) -> Result<String, QueueError> {
    let report = ResultReport::new(crate::job::Resolution::Exception(reason), Vec::new());
    serde_json::to_string(&report).map_err(|e| QueueError::Database(e.to_string()))
}
