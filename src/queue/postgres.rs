//! The shared queue: PostgreSQL, for many hosts on one queue. Claims take the next
//! pending row with `FOR UPDATE SKIP LOCKED`, so concurrent claimers skip each other's
//! rows instead of waiting; every operation is one statement (data-modifying CTEs), so
//! it is atomic under the default READ COMMITTED isolation. A trigger NOTIFYs
//! `qemu_worker_jobs` whenever a job becomes pending, and idle workers LISTEN on it.

use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};

use super::model::{Claim, ExpiredRun, JobState, JobStatus, NewJob, Page, QueueError};
use super::{Queue, id_suffix, queue_report, token};
use crate::job::{ExceptionReason, ResultReport};

/// The channel idle workers listen on.
const CHANNEL: &str = "qemu_worker_jobs";

/// Tables are prefixed so the queue can share a database with other applications. The
/// whole set-up runs under an advisory lock: workers starting together would otherwise
/// race on `CREATE … IF NOT EXISTS`, whose NOTICEs ("already exists, skipping") are
/// kept off every command's stderr.
const SCHEMA: &str = "
SET LOCAL client_min_messages = warning;
SELECT pg_advisory_xact_lock(7239044417);
CREATE SEQUENCE IF NOT EXISTS qw_job_seq;
CREATE TABLE IF NOT EXISTS qw_jobs (
    id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    payload TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    run_id INTEGER NOT NULL DEFAULT 0,
    token BIGINT NOT NULL DEFAULT 0,
    worker TEXT,
    lease_until BIGINT NOT NULL DEFAULT 0,
    runs INTEGER NOT NULL DEFAULT 0,
    max_runs INTEGER NOT NULL,
    deadline BIGINT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    report TEXT,
    created_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS qw_jobs_pending ON qw_jobs (priority DESC, seq) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS qw_jobs_running ON qw_jobs (lease_until) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS qw_jobs_seq ON qw_jobs (seq);
CREATE INDEX IF NOT EXISTS qw_jobs_state_seq ON qw_jobs (state, seq);
CREATE TABLE IF NOT EXISTS qw_runs (
    job_id TEXT NOT NULL,
    run_id INTEGER NOT NULL,
    worker TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    PRIMARY KEY (job_id, run_id)
);
CREATE TABLE IF NOT EXISTS qw_workers (
    id TEXT PRIMARY KEY,
    api TEXT NOT NULL,
    seen_ms BIGINT NOT NULL
);
CREATE OR REPLACE FUNCTION qw_notify_pending() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('qemu_worker_jobs', '');
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER qw_jobs_pending_notify AFTER INSERT OR UPDATE OF state ON qw_jobs
    FOR EACH ROW WHEN (NEW.state = 'pending') EXECUTE FUNCTION qw_notify_pending();
";

type Call = Box<dyn FnOnce(Result<&mut Client, QueueError>) + Send>;

/// One connection, owned by a thread of its own. The synchronous `postgres` client runs
/// a runtime inside, which must neither be entered nor dropped on an async executor;
/// behind a thread, handles can be used and dropped anywhere.
#[derive(Debug)]
struct Connection {
    calls: mpsc::Sender<Call>,
}

fn db(source: postgres::Error) -> QueueError {
    // `Display` of a server error is only "db error"; the source has the message.
    let detail = source
        .as_db_error()
        .map_or_else(|| source.to_string(), ToString::to_string);
    QueueError::Database(format!("PostgreSQL: {detail}"))
}

fn connect(url: &str) -> Result<Client, QueueError> {
    Client::connect(url, NoTls).map_err(db)
}

impl Connection {
    /// `reconnect`: make a connection the server closed anew before the next call (not
    /// for a listener: a new session would silently have lost its LISTEN).
    fn open(url: &str, reconnect: bool) -> Result<Self, QueueError> {
        let (calls, incoming) = mpsc::channel::<Call>();
        let (ready, connected) = mpsc::sync_channel(1);
        let url = url.to_owned();
        std::thread::Builder::new()
            .name("queue-postgres".into())
            .spawn(move || {
                let mut client = match connect(&url) {
                    Ok(client) => {
                        let _ = ready.send(Ok(()));
                        Some(client)
                    }
                    Err(error) => {
                        let _ = ready.send(Err(error));
                        return;
                    }
                };
                while let Ok(call) = incoming.recv() {
                    // A connection the server closed (restart, failover) is made anew.
                    if reconnect && client.as_ref().is_none_or(Client::is_closed) {
                        client = connect(&url).ok();
                    }
                    match client.as_mut() {
                        Some(c) => call(Ok(c)),
                        None => call(Err(QueueError::Database(
                            "PostgreSQL: the connection is lost and reconnecting failed".into(),
                        ))),
                    }
                }
            })
            .map_err(|e| QueueError::Database(format!("cannot start a queue thread: {e}")))?;
        connected
            .recv()
            .map_err(|_| QueueError::Database("the queue connection thread is gone".into()))??;
        Ok(Self { calls })
    }

    fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let call: Call = Box::new(move |client| {
            let _ = reply.send(client.and_then(f));
        });
        let gone = || QueueError::Database("the queue connection thread is gone".into());
        self.calls.send(call).map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}

/// The PostgreSQL queue. Each handle has one connection for its calls and, once it
/// waits for work, a second one that LISTENs.
#[derive(Debug)]
pub struct PostgresQueue {
    url: String,
    connection: Connection,
    listener: Mutex<Option<Connection>>,
    listen_warned: std::sync::atomic::AtomicBool,
}

impl PostgresQueue {
    /// Connects and creates the tables when they are missing.
    pub fn open(url: &str) -> Result<Self, QueueError> {
        let connection = Connection::open(url, true)?;
        connection.with(|c| {
            c.batch_execute(&format!("BEGIN; {SCHEMA} COMMIT;"))
                .map_err(db)
        })?;
        Ok(Self {
            url: url.to_owned(),
            connection,
            listener: Mutex::new(None),
            listen_warned: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Waits on the listening connection (`true` when notified); `Err` when
    /// notifications are unavailable.
    fn wait_notified(&self, timeout: Duration) -> Result<bool, QueueError> {
        let mut listener = self
            .listener
            .lock()
            .map_err(|_| QueueError::Database("the listener lock is poisoned".into()))?;
        // Taken out while waiting, and put back only if it still works.
        let connection = match listener.take() {
            Some(connection) => connection,
            None => {
                let connection = Connection::open(&self.url, false)?;
                connection.with(|c| c.batch_execute(&format!("LISTEN {CHANNEL}")).map_err(db))?;
                connection
            }
        };
        let outcome = connection.with(move |c| {
            let mut notifications = c.notifications();
            let woken = notifications.timeout_iter(timeout).next().map_err(db)?;
            if woken.is_some() {
                // Drain what else arrived: one wake-up is enough.
                while notifications.iter().next().map_err(db)?.is_some() {}
            }
            Ok(woken.is_some())
        });
        if outcome.is_ok() {
            *listener = Some(connection);
        }
        outcome
    }
}

/// The SET clause that ends a run which lost its claim or was given back: its job goes
/// back to the queue while it has runs left and nobody asked to cancel it; otherwise it
/// ends with the report in placeholder `report` (or `canceled`). Shared by `expire` and
/// `release`.
fn end_run_set(report: &str, canceled: &str) -> String {
    format!(
        "state = CASE WHEN runs < max_runs AND NOT cancel_requested THEN 'pending' ELSE 'exception' END,
         report = CASE WHEN cancel_requested THEN {canceled}
             WHEN runs < max_runs THEN report ELSE {report} END,
         worker = NULL, token = 0"
    )
}

fn i64_of(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn lease_end(now_ms: u64, lease: Duration) -> u64 {
    now_ms.saturating_add(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX))
}

fn stale(claim: &Claim) -> QueueError {
    QueueError::StaleClaim {
        job_id: claim.job_id.clone(),
        run_id: claim.run_id,
    }
}

impl Queue for PostgresQueue {
    fn enqueue(&self, job: &NewJob, now_ms: u64) -> Result<String, QueueError> {
        let job = job.clone();
        let suffix = id_suffix(now_ms, i64_of(now_ms));
        self.connection.with(move |c| {
            let row = c
                .query_one(
                    "WITH s AS (SELECT nextval('qw_job_seq') AS seq)
                     INSERT INTO qw_jobs (id, seq, payload, priority, state, max_runs, deadline, created_ms)
                     SELECT 'job-' || lpad(s.seq::text, 8, '0') || '-' || $1, s.seq, $2, $3,
                            'pending', $4, $5, $6
                     FROM s RETURNING id",
                    &[
                        &suffix,
                        &job.payload,
                        &job.priority,
                        &i32::try_from(job.max_runs).unwrap_or(i32::MAX),
                        &job.deadline_ms.map(i64_of),
                        &i64_of(now_ms),
                    ],
                )
                .map_err(db)?;
            Ok(row.get(0))
        })
    }

    fn claim(
        &self,
        worker: &str,
        lease: Duration,
        now_ms: u64,
    ) -> Result<Option<Claim>, QueueError> {
        let worker = worker.to_owned();
        let token = token(now_ms, 0);
        let lease_until = lease_end(now_ms, lease);
        self.connection.with(move |c| {
            let row = c
                .query_opt(
                    "WITH next AS (
                        SELECT id FROM qw_jobs
                        WHERE state = 'pending' AND (deadline IS NULL OR deadline > $4)
                        ORDER BY priority DESC, seq LIMIT 1
                        FOR UPDATE SKIP LOCKED
                     ), claimed AS (
                        UPDATE qw_jobs j SET state = 'running', run_id = j.run_id + 1, token = $2,
                            worker = $1, lease_until = $3, runs = j.runs + 1
                        FROM next WHERE j.id = next.id
                        RETURNING j.id, j.run_id, j.payload, j.created_ms
                     ), logged AS (
                        INSERT INTO qw_runs (job_id, run_id, worker, state)
                        SELECT id, run_id, $1, 'running' FROM claimed
                     )
                     SELECT id, run_id, payload, created_ms FROM claimed",
                    &[
                        &worker,
                        &i64_of(token),
                        &i64_of(lease_until),
                        &i64_of(now_ms),
                    ],
                )
                .map_err(db)?;
            Ok(row.map(|row| Claim {
                job_id: row.get(0),
                run_id: u32::try_from(row.get::<_, i32>(1)).unwrap_or(0),
                token,
                payload: row.get(2),
                lease_until_ms: lease_until,
                created_ms: u64::try_from(row.get::<_, i64>(3)).unwrap_or(0),
            }))
        })
    }

    fn heartbeat(&self, claim: &Claim, lease: Duration, now_ms: u64) -> Result<u64, QueueError> {
        let owned = claim.clone();
        let lease_until = lease_end(now_ms, lease);
        let row = self.connection.with(move |c| {
            c.query_opt(
                "UPDATE qw_jobs SET lease_until = $4
                 WHERE id = $1 AND run_id = $2 AND token = $3 AND state = 'running'
                 RETURNING cancel_requested, deadline",
                &[
                    &owned.job_id,
                    &i32::try_from(owned.run_id).unwrap_or(i32::MAX),
                    &i64_of(owned.token),
                    &i64_of(lease_until),
                ],
            )
            .map_err(db)
        })?;
        let row = row.ok_or_else(|| stale(claim))?;
        let job_id = claim.job_id.clone();
        if row.get::<_, bool>(0) {
            return Err(QueueError::Canceled { job_id });
        }
        if row
            .get::<_, Option<i64>>(1)
            .is_some_and(|d| d <= i64_of(now_ms))
        {
            return Err(QueueError::DeadlineExceeded { job_id });
        }
        Ok(lease_until)
    }

    fn resolve(&self, claim: &Claim, report: &ResultReport) -> Result<(), QueueError> {
        let text =
            serde_json::to_string(report).map_err(|e| QueueError::Database(e.to_string()))?;
        let state = JobState::from(report.state).as_str();
        let reason = report.reason.map(ExceptionReason::as_str);
        let owned = claim.clone();
        let row = self.connection.with(move |c| {
            c.query_opt(
                "WITH done AS (
                    UPDATE qw_jobs SET state = $4, report = $5, worker = NULL
                    WHERE id = $1 AND run_id = $2 AND token = $3 AND state = 'running'
                    RETURNING id, run_id
                 )
                 UPDATE qw_runs r SET state = $4, reason = $6 FROM done
                 WHERE r.job_id = done.id AND r.run_id = done.run_id RETURNING 1",
                &[
                    &owned.job_id,
                    &i32::try_from(owned.run_id).unwrap_or(i32::MAX),
                    &i64_of(owned.token),
                    &state,
                    &text,
                    &reason,
                ],
            )
            .map_err(db)
        })?;
        row.map(drop).ok_or_else(|| stale(claim))
    }

    fn expire(&self, now_ms: u64) -> Result<Vec<ExpiredRun>, QueueError> {
        let expired = queue_report(ExceptionReason::ClaimExpired)?;
        let late = queue_report(ExceptionReason::DeadlineExceeded)?;
        // A job canceled while its run was lost ends canceled rather than running again.
        let canceled = queue_report(ExceptionReason::Canceled)?;
        self.connection.with(move |c| {
            let mut out = Vec::new();
            let rows = c
                .query(
                    &format!(
                        "WITH gone AS (
                        UPDATE qw_jobs SET {}
                        WHERE state = 'running' AND lease_until < $1
                        RETURNING id, run_id, state
                     ), logged AS (
                        UPDATE qw_runs r SET state = 'exception', reason = 'claim-expired'
                        FROM gone WHERE r.job_id = gone.id AND r.run_id = gone.run_id
                     )
                     SELECT id, run_id, state = 'pending' FROM gone",
                        end_run_set("$2", "$3")
                    ),
                    &[&i64_of(now_ms), &expired, &canceled],
                )
                .map_err(db)?;
            out.extend(rows.iter().map(|row| ExpiredRun {
                job_id: row.get(0),
                run_id: u32::try_from(row.get::<_, i32>(1)).unwrap_or(0),
                reason: ExceptionReason::ClaimExpired,
                requeued: row.get(2),
            }));
            let rows = c
                .query(
                    "UPDATE qw_jobs SET state = 'exception', report = $2
                     WHERE state = 'pending' AND deadline <= $1 RETURNING id, run_id",
                    &[&i64_of(now_ms), &late],
                )
                .map_err(db)?;
            out.extend(rows.iter().map(|row| ExpiredRun {
                job_id: row.get(0),
                run_id: u32::try_from(row.get::<_, i32>(1)).unwrap_or(0),
                reason: ExceptionReason::DeadlineExceeded,
                requeued: false,
            }));
            Ok(out)
        })
    }

    fn cancel(&self, job_id: &str) -> Result<JobState, QueueError> {
        let text = queue_report(ExceptionReason::Canceled)?;
        let id = job_id.to_owned();
        let row = self.connection.with(move |c| {
            // The state before: the row locked, then changed (SET reads the old row).
            c.query_opt(
                "UPDATE qw_jobs j SET
                    state = CASE WHEN j.state = 'pending' THEN 'exception' ELSE j.state END,
                    report = CASE WHEN j.state = 'pending' THEN $2 ELSE j.report END,
                    cancel_requested = j.cancel_requested OR j.state = 'running'
                 FROM (SELECT id, state FROM qw_jobs WHERE id = $1 FOR UPDATE) was
                 WHERE j.id = was.id RETURNING was.state",
                &[&id, &text],
            )
            .map_err(db)
        })?;
        let not_found = || QueueError::NotFound {
            job_id: job_id.to_owned(),
        };
        let row = row.ok_or_else(not_found)?;
        JobState::parse(row.get(0)).ok_or_else(not_found)
    }

    fn release(&self, claim: &Claim) -> Result<bool, QueueError> {
        let text = queue_report(ExceptionReason::WorkerShutdown)?;
        let canceled = queue_report(ExceptionReason::Canceled)?;
        let owned = claim.clone();
        let row = self.connection.with(move |c| {
            c.query_opt(
                &format!(
                    "WITH gone AS (
                    UPDATE qw_jobs SET {}
                    WHERE id = $1 AND run_id = $2 AND token = $3 AND state = 'running'
                    RETURNING id, run_id, state
                 ), logged AS (
                    UPDATE qw_runs r SET state = 'exception', reason = 'worker-shutdown'
                    FROM gone WHERE r.job_id = gone.id AND r.run_id = gone.run_id
                 )
                 SELECT state = 'pending' FROM gone",
                    end_run_set("$4", "$5")
                ),
                &[
                    &owned.job_id,
                    &i32::try_from(owned.run_id).unwrap_or(i32::MAX),
                    &i64_of(owned.token),
                    &text,
                    &canceled,
                ],
            )
            .map_err(db)
        })?;
        row.map(|row| row.get(0)).ok_or_else(|| stale(claim))
    }

    fn list(&self, state: Option<JobState>, page: &Page) -> Result<Vec<JobStatus>, QueueError> {
        let state = state.map(JobState::as_str);
        let page = page.clone();
        let rows = self.connection.with(move |c| {
            let before: Option<i64> = match &page.after {
                Some(id) => Some(
                    c.query_opt("SELECT seq FROM qw_jobs WHERE id = $1", &[id])
                        .map_err(db)?
                        .ok_or_else(|| QueueError::NotFound { job_id: id.clone() })?
                        .get(0),
                ),
                None => None,
            };
            // LIMIT NULL is no limit.
            let limit = page.limit.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
            c.query(
                &format!(
                    "{STATUS_SELECT} WHERE ($1::text IS NULL OR state = $1)
                     AND ($2::bigint IS NULL OR seq < $2) ORDER BY seq DESC LIMIT $3"
                ),
                &[&state, &before, &limit],
            )
            .map_err(db)
        })?;
        Ok(rows.iter().map(status_of).collect())
    }

    fn status(&self, job_id: &str) -> Result<JobStatus, QueueError> {
        let id = job_id.to_owned();
        let row = self.connection.with(move |c| {
            c.query_opt(&format!("{STATUS_SELECT} WHERE id = $1"), &[&id])
                .map_err(db)
        })?;
        row.as_ref()
            .map(status_of)
            .ok_or_else(|| QueueError::NotFound {
                job_id: job_id.to_owned(),
            })
    }

    fn wait_for_work(&self, timeout: Duration) -> bool {
        use std::sync::atomic::Ordering;
        match self.wait_notified(timeout) {
            Ok(woken) => {
                if self.listen_warned.swap(false, Ordering::Relaxed) {
                    tracing::info!("queue notifications are back");
                }
                woken
            }
            Err(error) => {
                if !self.listen_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "queue notifications unavailable: polling instead");
                }
                std::thread::sleep(timeout);
                false
            }
        }
    }

    fn reopen(&self) -> Result<Box<dyn Queue>, QueueError> {
        Ok(Box::new(Self::open(&self.url)?))
    }

    fn record_api(&self, worker: &str, url: &str, now_ms: u64) -> Result<(), QueueError> {
        let (worker, url) = (worker.to_owned(), url.to_owned());
        self.connection.with(move |c| {
            c.execute(
                "INSERT INTO qw_workers (id, api, seen_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET api = $2, seen_ms = $3",
                &[&worker, &url, &i64_of(now_ms)],
            )
            .map(drop)
            .map_err(db)
        })
    }

    fn api_of(&self, worker: &str) -> Result<Option<String>, QueueError> {
        let worker = worker.to_owned();
        self.connection.with(move |c| {
            c.query_opt("SELECT api FROM qw_workers WHERE id = $1", &[&worker])
                .map(|row| row.map(|r| r.get(0)))
                .map_err(db)
        })
    }
}

/// What `status` and `list` read of a job (the worker of its latest run included).
const STATUS_SELECT: &str = "SELECT id, state, run_id, runs, report,
    (SELECT worker FROM qw_runs r WHERE r.job_id = qw_jobs.id AND r.run_id = qw_jobs.run_id)
    FROM qw_jobs";

fn status_of(row: &postgres::Row) -> JobStatus {
    JobStatus {
        job_id: row.get(0),
        state: JobState::parse(row.get(1)).unwrap_or(JobState::Exception),
        run_id: u32::try_from(row.get::<_, i32>(2)).unwrap_or(0),
        runs: u32::try_from(row.get::<_, i32>(3)).unwrap_or(0),
        report: row
            .get::<_, Option<String>>(4)
            .and_then(|r| serde_json::from_str(&r).ok()),
        worker: row.get(5),
    }
}
