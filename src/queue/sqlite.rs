use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::model::{Claim, ExpiredRun, JobState, JobStatus, NewJob, Page, QueueError};
use super::{Queue, id_suffix, queue_report, token};
use crate::job::{ExceptionReason, ResultReport};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    payload TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    run_id INTEGER NOT NULL DEFAULT 0,
    token INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    lease_until INTEGER NOT NULL DEFAULT 0,
    runs INTEGER NOT NULL DEFAULT 0,
    max_runs INTEGER NOT NULL,
    deadline INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    report TEXT,
    created_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (state, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq);
CREATE INDEX IF NOT EXISTS jobs_state_seq ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS runs (
    job_id TEXT NOT NULL,
    run_id INTEGER NOT NULL,
    worker TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    PRIMARY KEY (job_id, run_id)
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    api TEXT NOT NULL,
    seen_ms INTEGER NOT NULL
);
";

/// What `status` and `list` read of a job (the worker of its latest run included).
const STATUS_SELECT: &str = "SELECT id, state, run_id, runs, report,
    (SELECT worker FROM runs WHERE runs.job_id = jobs.id AND runs.run_id = jobs.run_id)
    FROM jobs";

fn status_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobStatus> {
    Ok(JobStatus {
        job_id: r.get(0)?,
        state: JobState::parse(&r.get::<_, String>(1)?).unwrap_or(JobState::Exception),
        run_id: u32::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
        runs: u32::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
        report: r
            .get::<_, Option<String>>(4)?
            .and_then(|text| serde_json::from_str(&text).ok()),
        worker: r.get(5)?,
    })
}

/// The embedded queue: one SQLite database in WAL mode. Claims take the write lock
/// up front (`BEGIN IMMEDIATE`), so two claimers never pick the same job.
#[derive(Debug, Clone)]
pub struct SqliteQueue {
    path: PathBuf,
    /// One connection per handle; SQLite serializes writers itself.
    connection: Arc<Mutex<Connection>>,
}

fn db(source: rusqlite::Error) -> QueueError {
    QueueError::Database(source.to_string())
}

impl SqliteQueue {
    pub fn open(path: &Path) -> Result<Self, QueueError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| QueueError::Database(e.to_string()))?;
        }
        let connection = Connection::open(path).map_err(db)?;
        connection
            .busy_timeout(Duration::from_secs(30))
            .map_err(db)?;
        // Switching to WAL and creating the schema can meet another process doing the
        // same (a `serve` starting while `submit` runs): SQLite answers SQLITE_BUSY
        // there without waiting on the busy timeout, so wait here, bounded.
        let start = std::time::Instant::now();
        loop {
            match prepare(&connection) {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && start.elapsed() < Duration::from_secs(30) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                other => other.map_err(db)?,
            }
            break;
        }
        Ok(Self {
            path: path.to_path_buf(),
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        let mut connection = self
            .connection
            .lock()
            .map_err(|_| QueueError::Database("the connection lock is poisoned".into()))?;
        f(&mut connection)
    }
}

/// WAL, the schema, and the columns older databases lack.
fn prepare(connection: &Connection) -> rusqlite::Result<()> {
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    connection.execute_batch(SCHEMA)?;
    // Databases made before job deadlines existed lack the column.
    let has_deadline: bool = connection.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('jobs') WHERE name = 'deadline'",
        [],
        |r| r.get(0),
    )?;
    if !has_deadline {
        connection.execute_batch("ALTER TABLE jobs ADD COLUMN deadline INTEGER")?;
    }
    Ok(())
}

impl Queue for SqliteQueue {
    fn enqueue(&self, job: &NewJob, now_ms: u64) -> Result<String, QueueError> {
        self.with(|c| {
            let seq: i64 = c
                .query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs", [], |r| {
                    r.get(0)
                })
                .map_err(db)?;
            let id = format!("job-{seq:08}-{}", id_suffix(now_ms, seq));
            c.execute(
                "INSERT INTO jobs (id, seq, payload, priority, state, max_runs, deadline, created_ms)
                 VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6, ?7)",
                params![
                    id,
                    seq,
                    job.payload,
                    job.priority,
                    i64::from(job.max_runs),
                    job.deadline_ms.map(|d| d as i64),
                    now_ms as i64
                ],
            )
            .map_err(db)?;
            Ok(id)
        })
    }

    fn claim(
        &self,
        worker: &str,
        lease: Duration,
        now_ms: u64,
    ) -> Result<Option<Claim>, QueueError> {
        self.with(|c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let next: Option<(String, i64, String, i64)> = tx
                .query_row(
                    "SELECT id, run_id, payload, created_ms FROM jobs WHERE state = 'pending'
                     AND (deadline IS NULL OR deadline > ?1)
                     ORDER BY priority DESC, seq LIMIT 1",
                    [now_ms as i64],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()
                .map_err(db)?;
            let Some((job_id, last_run, payload, created_ms)) = next else {
                return Ok(None);
            };
            let run_id = u32::try_from(last_run + 1).unwrap_or(u32::MAX);
            let token = token(now_ms, last_run);
            let lease_until = now_ms + u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
            tx.execute(
                "UPDATE jobs SET state = 'running', run_id = ?2, token = ?3, worker = ?4,
                 lease_until = ?5, runs = runs + 1 WHERE id = ?1",
                params![
                    job_id,
                    i64::from(run_id),
                    token as i64,
                    worker,
                    lease_until as i64
                ],
            )
            .map_err(db)?;
            tx.execute(
                "INSERT INTO runs (job_id, run_id, worker, state) VALUES (?1, ?2, ?3, 'running')",
                params![job_id, i64::from(run_id), worker],
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(Some(Claim {
                job_id,
                run_id,
                token,
                payload,
                lease_until_ms: lease_until,
                created_ms: u64::try_from(created_ms).unwrap_or(0),
            }))
        })
    }

    fn heartbeat(&self, claim: &Claim, lease: Duration, now_ms: u64) -> Result<u64, QueueError> {
        self.with(|c| {
            let lease_until = now_ms + u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
            let changed = c
                .execute(
                    "UPDATE jobs SET lease_until = ?4 WHERE id = ?1 AND run_id = ?2 AND token = ?3
                     AND state = 'running'",
                    params![
                        claim.job_id,
                        i64::from(claim.run_id),
                        claim.token as i64,
                        lease_until as i64
                    ],
                )
                .map_err(db)?;
            if changed == 0 {
                return Err(QueueError::StaleClaim {
                    job_id: claim.job_id.clone(),
                    run_id: claim.run_id,
                });
            }
            let (canceled, deadline): (bool, Option<i64>) = c
                .query_row(
                    "SELECT cancel_requested, deadline FROM jobs WHERE id = ?1",
                    [&claim.job_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(db)?;
            let job_id = claim.job_id.clone();
            if canceled {
                return Err(QueueError::Canceled { job_id });
            }
            if deadline.is_some_and(|d| d <= now_ms as i64) {
                return Err(QueueError::DeadlineExceeded { job_id });
            }
            Ok(lease_until)
        })
    }

    fn resolve(&self, claim: &Claim, report: &ResultReport) -> Result<(), QueueError> {
        let state = JobState::from(report.state);
        let text =
            serde_json::to_string(report).map_err(|e| QueueError::Database(e.to_string()))?;
        self.with(|c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let changed = tx
                .execute(
                    "UPDATE jobs SET state = ?4, report = ?5, worker = NULL
                     WHERE id = ?1 AND run_id = ?2 AND token = ?3 AND state = 'running'",
                    params![
                        claim.job_id,
                        i64::from(claim.run_id),
                        claim.token as i64,
                        state.as_str(),
                        text
                    ],
                )
                .map_err(db)?;
            if changed == 0 {
                return Err(QueueError::StaleClaim {
                    job_id: claim.job_id.clone(),
                    run_id: claim.run_id,
                });
            }
            tx.execute(
                "UPDATE runs SET state = ?3, reason = ?4 WHERE job_id = ?1 AND run_id = ?2",
                params![
                    claim.job_id,
                    i64::from(claim.run_id),
                    report.state.as_str(),
                    report.reason.map(ExceptionReason::as_str)
                ],
            )
            .map_err(db)?;
            tx.commit().map_err(db)
        })
    }

    fn expire(&self, now_ms: u64) -> Result<Vec<ExpiredRun>, QueueError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
            // A job canceled while its run was lost ends canceled rather than running again.
            let expired: Vec<(String, i64, bool, bool)> = {
                let mut statement = tx
                    .prepare("SELECT id, run_id, runs < max_runs, cancel_requested FROM jobs WHERE state = 'running' AND lease_until < ?1")
                    .map_err(db)?;
                let rows = statement
                    .query_map([now_ms as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                    .map_err(db)?;
                rows.collect::<Result<_, _>>().map_err(db)?
            };
            let mut out = Vec::new();
            let expired_text = queue_report(ExceptionReason::ClaimExpired)?;
            let canceled_text = queue_report(ExceptionReason::Canceled)?;
            for (job_id, run_id, runs_left, canceled) in expired {
                let requeued = runs_left && !canceled;
                let report_text = if canceled { &canceled_text } else { &expired_text };
                end_run(&tx, &job_id, run_id, requeued, report_text, ExceptionReason::ClaimExpired)?;
                out.push(ExpiredRun {
                    job_id,
                    run_id: u32::try_from(run_id).unwrap_or(u32::MAX),
                    reason: ExceptionReason::ClaimExpired,
                    requeued,
                });
            }
            let late: Vec<(String, i64)> = {
                let mut statement = tx
                    .prepare("SELECT id, run_id FROM jobs WHERE state = 'pending' AND deadline <= ?1")
                    .map_err(db)?;
                let rows = statement
                    .query_map([now_ms as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(db)?;
                rows.collect::<Result<_, _>>().map_err(db)?
            };
            let late_report = queue_report(ExceptionReason::DeadlineExceeded)?;
            for (job_id, run_id) in late {
                tx.execute(
                    "UPDATE jobs SET state = 'exception', report = ?2 WHERE id = ?1",
                    params![job_id, late_report],
                )
                .map_err(db)?;
                out.push(ExpiredRun {
                    job_id,
                    run_id: u32::try_from(run_id).unwrap_or(u32::MAX),
                    reason: ExceptionReason::DeadlineExceeded,
                    requeued: false,
                });
            }
            tx.commit().map_err(db)?;
            Ok(out)
        })
    }

    fn cancel(&self, job_id: &str) -> Result<JobState, QueueError> {
        let text = queue_report(ExceptionReason::Canceled)?;
        self.with(|c| {
            let state = state_of(c, job_id)?;
            match state {
                JobState::Pending => {
                    c.execute(
                        "UPDATE jobs SET state = 'exception', report = ?2 WHERE id = ?1 AND state = 'pending'",
                        params![job_id, text],
                    )
                    .map_err(db)?;
                    Ok(JobState::Pending)
                }
                JobState::Running => {
                    c.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1", [job_id])
                        .map_err(db)?;
                    Ok(JobState::Running)
                }
                done => Ok(done),
            }
        })
    }

    fn release(&self, claim: &Claim) -> Result<bool, QueueError> {
        let text = queue_report(ExceptionReason::WorkerShutdown)?;
        let canceled_text = queue_report(ExceptionReason::Canceled)?;
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
            let runs_left: Option<(bool, bool)> = tx
                .query_row(
                    "SELECT runs < max_runs, cancel_requested FROM jobs WHERE id = ?1 AND run_id = ?2 AND token = ?3 AND state = 'running'",
                    params![claim.job_id, i64::from(claim.run_id), claim.token as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(db)?;
            let Some((runs_left, canceled)) = runs_left else {
                return Err(QueueError::StaleClaim {
                    job_id: claim.job_id.clone(),
                    run_id: claim.run_id,
                });
            };
            let requeue = runs_left && !canceled;
            let text = if canceled { &canceled_text } else { &text };
            end_run(
                &tx,
                &claim.job_id,
                i64::from(claim.run_id),
                requeue,
                text,
                ExceptionReason::WorkerShutdown,
            )?;
            tx.commit().map_err(db)?;
            Ok(requeue)
        })
    }

    fn list(&self, state: Option<JobState>, page: &Page) -> Result<Vec<JobStatus>, QueueError> {
        let page = page.clone();
        self.with(|c| {
            let before = match &page.after {
                Some(id) => Some(
                    c.query_row("SELECT seq FROM jobs WHERE id = ?1", [id], |r| {
                        r.get::<_, i64>(0)
                    })
                    .optional()
                    .map_err(db)?
                    .ok_or_else(|| QueueError::NotFound { job_id: id.clone() })?,
                ),
                None => None,
            };
            // LIMIT -1 is no limit.
            let limit = page
                .limit
                .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
            // Plain comparisons only (SQLite plans a statement once, so `?1 IS NULL OR
            // state = ?1` would scan): one text per filter, and no cursor as i64::MAX.
            let before = before.unwrap_or(i64::MAX);
            let filtered = state.map(JobState::as_str);
            let (sql, values): (String, Vec<&dyn rusqlite::ToSql>) = match &filtered {
                Some(state) => (
                    format!(
                        "{STATUS_SELECT} WHERE state = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
                    ),
                    vec![state, &before, &limit],
                ),
                None => (
                    format!("{STATUS_SELECT} WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2"),
                    vec![&before, &limit],
                ),
            };
            let mut statement = c.prepare(&sql).map_err(db)?;
            let rows = statement
                .query_map(values.as_slice(), status_row)
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
    }

    fn status(&self, job_id: &str) -> Result<JobStatus, QueueError> {
        self.with(|c| {
            c.query_row(
                &format!("{STATUS_SELECT} WHERE id = ?1"),
                [job_id],
                status_row,
            )
            .optional()
            .map_err(db)?
            .ok_or_else(|| QueueError::NotFound {
                job_id: job_id.to_owned(),
            })
        })
    }

    fn wait_for_work(&self, timeout: Duration) -> bool {
        // SQLite has no notifications across processes: poll.
        std::thread::sleep(timeout);
        false
    }

    fn reopen(&self) -> Result<Box<dyn Queue>, QueueError> {
        Ok(Box::new(Self::open(&self.path)?))
    }

    fn record_api(&self, worker: &str, url: &str, now_ms: u64) -> Result<(), QueueError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO workers (id, api, seen_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET api = ?2, seen_ms = ?3",
                params![worker, url, now_ms as i64],
            )
            .map(drop)
            .map_err(db)
        })
    }

    fn api_of(&self, worker: &str) -> Result<Option<String>, QueueError> {
        self.with(|c| {
            c.query_row("SELECT api FROM workers WHERE id = ?1", [worker], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db)
        })
    }
}

/// Ends a run that lost its claim or was given back: its job goes back to the queue
/// (`requeue`) or ends with `report`, and the run is recorded as an exception for
/// `run_reason`. The one place both `expire` and `release` change a job this way.
fn end_run(
    tx: &rusqlite::Transaction<'_>,
    job_id: &str,
    run_id: i64,
    requeue: bool,
    report: &str,
    run_reason: ExceptionReason,
) -> Result<(), QueueError> {
    if requeue {
        tx.execute(
            "UPDATE jobs SET state = 'pending', worker = NULL, token = 0 WHERE id = ?1",
            [job_id],
        )
    } else {
        tx.execute(
            "UPDATE jobs SET state = 'exception', worker = NULL, token = 0, report = ?2 WHERE id = ?1",
            params![job_id, report],
        )
    }
    .map_err(db)?;
    tx.execute(
        "UPDATE runs SET state = 'exception', reason = ?3 WHERE job_id = ?1 AND run_id = ?2",
        params![job_id, run_id, run_reason.as_str()],
    )
    .map_err(db)?;
    Ok(())
}

fn state_of(c: &Connection, job_id: &str) -> Result<JobState, QueueError> {
    let state: Option<String> = c
        .query_row("SELECT state FROM jobs WHERE id = ?1", [job_id], |r| {
            r.get(0)
        })
        .optional()
        .map_err(db)?;
    state
        .and_then(|s| JobState::parse(&s))
        .ok_or_else(|| QueueError::NotFound {
            job_id: job_id.to_owned(),
        })
}
