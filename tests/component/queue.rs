//! Queue conformance: the semantics every backend must have, each case run against the
//! embedded SQLite queue and against a real PostgreSQL server started for the test.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qemu_worker::job::{ExceptionReason, Resolution, ResultReport, ResultState};
use qemu_worker::queue::{JobState, NewJob, Page, PostgresQueue, Queue, QueueError, SqliteQueue};
use test_support::postgres::TestPostgres;

const LEASE: Duration = Duration::from_secs(60);

/// What keeps a backend alive for one test (its directory or its server).
type Keep = Box<dyn std::any::Any>;

fn sqlite() -> (Keep, Box<dyn Queue>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = SqliteQueue::open(&dir.path().join("queue.sqlite")).expect("open");
    (Box::new(dir), Box::new(queue))
}

fn postgres() -> (Keep, Box<dyn Queue>) {
    let server = TestPostgres::start();
    let queue = PostgresQueue::open(&server.url()).expect("open");
    (Box::new(server), Box::new(queue))
}

/// Each case becomes one test per backend: `sqlite::case` and `postgres::case`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $case() {
                let (keep, queue) = super::sqlite();
                super::$case(&*queue);
                drop(queue);
                drop(keep);
            })*
        }
        mod postgres {
            $(#[test]
            fn $case() {
                let (keep, queue) = super::postgres();
                super::$case(&*queue);
                drop(queue);
                drop(keep);
            })*
        }
    };
}

conformance!(
    claims_go_by_priority_then_submission_order,
    a_claim_is_fenced_by_its_token,
    expired_leases_requeue_until_the_retry_limit,
    cancel_ends_pending_jobs_and_signals_running_ones,
    concurrent_claimers_never_claim_a_job_twice,
    a_shutting_down_worker_gives_its_jobs_back,
    jobs_are_listed_newest_first_and_by_state,
    listings_are_paged_by_the_database,
    deadlines_end_pending_and_running_jobs,
    a_canceled_job_whose_run_is_lost_or_released_is_not_run_again,
    a_status_names_the_worker_of_the_latest_run_and_workers_record_their_api,
);

fn job(payload: &str, priority: i32) -> NewJob {
    NewJob {
        payload: payload.into(),
        priority,
        max_runs: 2,
        deadline_ms: None,
    }
}

fn claims_go_by_priority_then_submission_order(q: &dyn Queue) {
    for (payload, priority) in [("low-1", 0), ("high-1", 5), ("low-2", 0), ("high-2", 5)] {
        q.enqueue(&job(payload, priority), 1).expect("enqueue");
    }
    let order: Vec<String> =
        std::iter::from_fn(|| q.claim("w", LEASE, 2).expect("claim").map(|c| c.payload)).collect();
    assert_eq!(order, ["high-1", "high-2", "low-1", "low-2"]);
}

fn a_claim_is_fenced_by_its_token(q: &dyn Queue) {
    let id = q.enqueue(&job("p", 0), 1).expect("enqueue");
    let claim = q.claim("w1", LEASE, 10).expect("claim").expect("a job");
    assert_eq!((claim.job_id.as_str(), claim.run_id), (id.as_str(), 1));
    assert!(q.heartbeat(&claim, LEASE, 20).expect("heartbeat") > claim.lease_until_ms);

    let mut forged = claim.clone();
    forged.token ^= 1;
    assert!(matches!(
        q.heartbeat(&forged, LEASE, 30),
        Err(QueueError::StaleClaim { .. })
    ));
    let done = ResultReport::new(Resolution::Completed, Vec::new());
    assert!(matches!(
        q.resolve(&forged, &done),
        Err(QueueError::StaleClaim { .. })
    ));

    q.resolve(&claim, &done).expect("resolve");
    let status = q.status(&id).expect("status");
    assert_eq!(status.state, JobState::Completed);
    assert_eq!(status.report.expect("report").state, ResultState::Completed);
    assert!(
        matches!(q.resolve(&claim, &done), Err(QueueError::StaleClaim { .. })),
        "resolved once"
    );
    assert!(q.claim("w1", LEASE, 40).expect("claim").is_none());
}

fn expired_leases_requeue_until_the_retry_limit(q: &dyn Queue) {
    let id = q.enqueue(&job("p", 0), 0).expect("enqueue");
    let first = q
        .claim("w1", Duration::from_millis(100), 1_000)
        .expect("claim")
        .expect("job");
    assert!(
        q.expire(1_050).expect("expire").is_empty(),
        "the lease still runs"
    );
    let expired = q.expire(1_200).expect("expire");
    assert_eq!(expired.len(), 1);
    assert!(expired[0].requeued);
    assert_eq!(q.status(&id).expect("status").state, JobState::Pending);

    // The expired run can no longer act; the job runs again as run 2.
    assert!(matches!(
        q.heartbeat(&first, LEASE, 1_300),
        Err(QueueError::StaleClaim { .. })
    ));
    let second = q
        .claim("w2", Duration::from_millis(100), 1_300)
        .expect("claim")
        .expect("job again");
    assert_eq!(second.run_id, 2);
    assert!(matches!(
        q.resolve(
            &first,
            &ResultReport::new(Resolution::Completed, Vec::new())
        ),
        Err(QueueError::StaleClaim { .. })
    ));

    // With max_runs 2, the second expiry ends the job.
    let expired = q.expire(2_000).expect("expire");
    assert!(!expired[0].requeued);
    let status = q.status(&id).expect("status");
    assert_eq!(status.state, JobState::Exception);
    assert_eq!(
        status.report.expect("report").reason,
        Some(ExceptionReason::ClaimExpired)
    );
    assert_eq!(status.runs, 2);
}

fn cancel_ends_pending_jobs_and_signals_running_ones(q: &dyn Queue) {
    let pending = q.enqueue(&job("a", 0), 0).expect("enqueue");
    let running = q.enqueue(&job("b", 0), 0).expect("enqueue");
    // The state before: pending (now canceled).
    assert_eq!(q.cancel(&pending).expect("cancel"), JobState::Pending);
    assert_eq!(
        q.status(&pending).expect("status").state,
        JobState::Exception
    );
    // Once ended, a cancel changes nothing and says how it ended.
    assert_eq!(q.cancel(&pending).expect("cancel"), JobState::Exception);
    assert_eq!(
        q.status(&pending)
            .expect("status")
            .report
            .expect("report")
            .reason,
        Some(ExceptionReason::Canceled)
    );
    let claim = q
        .claim("w", LEASE, 1)
        .expect("claim")
        .expect("the other job");
    assert_eq!(claim.job_id, running);
    assert_eq!(q.cancel(&running).expect("cancel"), JobState::Running);
    assert!(matches!(
        q.heartbeat(&claim, LEASE, 2),
        Err(QueueError::Canceled { .. })
    ));
    assert!(matches!(
        q.cancel("job-nope"),
        Err(QueueError::NotFound { .. })
    ));
}

fn concurrent_claimers_never_claim_a_job_twice(q: &dyn Queue) {
    const JOBS: usize = 300;
    for n in 0..JOBS {
        q.enqueue(&job(&n.to_string(), 0), 0).expect("enqueue");
    }
    let claimed = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|scope| {
        for worker in 0..8 {
            let q = q.reopen().expect("own connection");
            let claimed = Arc::clone(&claimed);
            scope.spawn(move || {
                while let Some(claim) = q.claim(&format!("w{worker}"), LEASE, 1).expect("claim") {
                    q.resolve(
                        &claim,
                        &ResultReport::new(Resolution::Completed, Vec::new()),
                    )
                    .expect("resolve");
                    claimed.lock().expect("lock").push(claim.job_id);
                }
            });
        }
    });
    let claimed = claimed.lock().expect("lock");
    let unique: HashSet<&String> = claimed.iter().collect();
    assert_eq!(claimed.len(), JOBS, "every job claimed");
    assert_eq!(unique.len(), JOBS, "no job claimed twice");
}

fn a_shutting_down_worker_gives_its_jobs_back(q: &dyn Queue) {
    let id = q.enqueue(&job("p", 0), 0).expect("enqueue");
    let first = q.claim("w1", LEASE, 1).expect("claim").expect("job");
    assert!(q.release(&first).expect("release"), "requeued: runs left");
    assert_eq!(q.status(&id).expect("status").state, JobState::Pending);
    let second = q.claim("w2", LEASE, 2).expect("claim").expect("job again");
    assert!(!q.release(&second).expect("release"), "no runs left");
    let status = q.status(&id).expect("status");
    assert_eq!(status.state, JobState::Exception);
    assert_eq!(
        status.report.expect("report").reason,
        Some(ExceptionReason::WorkerShutdown)
    );
    assert!(matches!(
        q.release(&second),
        Err(QueueError::StaleClaim { .. })
    ));
}

fn jobs_are_listed_newest_first_and_by_state(q: &dyn Queue) {
    let a = q.enqueue(&job("a", 0), 0).expect("enqueue");
    let b = q.enqueue(&job("b", 0), 0).expect("enqueue");
    let claim = q.claim("w", LEASE, 1).expect("claim").expect("job");
    assert_eq!(claim.job_id, a);
    let all: Vec<String> = q
        .list(None, &Page::default())
        .expect("list")
        .into_iter()
        .map(|s| s.job_id)
        .collect();
    assert_eq!(all, [b.clone(), a.clone()]);
    let pending: Vec<String> = q
        .list(Some(JobState::Pending), &Page::default())
        .expect("list")
        .into_iter()
        .map(|s| s.job_id)
        .collect();
    assert_eq!(pending, [b]);
}

fn listings_are_paged_by_the_database(q: &dyn Queue) {
    // The middle one first in line: claimed (running); the rest stay pending.
    let ids: Vec<String> = (0..5)
        .map(|n| {
            let priority = if n == 2 { 9 } else { 0 };
            q.enqueue(&job(&format!("p{n}"), priority), 0)
                .expect("enqueue")
        })
        .collect();
    let claim = q.claim("w", LEASE, 1).expect("claim").expect("job");
    assert_eq!(claim.job_id, ids[2]);
    let listed = |state, after: Option<&String>, limit| -> Vec<String> {
        let page = Page {
            after: after.cloned(),
            limit,
        };
        q.list(state, &page)
            .expect("list")
            .into_iter()
            .map(|s| s.job_id)
            .collect()
    };
    assert_eq!(
        listed(None, None, Some(2)),
        [ids[4].clone(), ids[3].clone()]
    );
    assert_eq!(
        listed(None, Some(&ids[3]), Some(2)),
        [ids[2].clone(), ids[1].clone()]
    );
    assert_eq!(listed(None, Some(&ids[1]), None), [ids[0].clone()]);
    assert!(listed(None, Some(&ids[0]), Some(10)).is_empty());
    // `after` need not be in the filtered state: the running one pages pending jobs too.
    assert_eq!(
        listed(Some(JobState::Pending), Some(&ids[2]), None),
        [ids[1].clone(), ids[0].clone()]
    );
    assert_eq!(
        listed(Some(JobState::Running), None, None),
        [ids[2].clone()]
    );
    assert_eq!(
        listed(Some(JobState::Pending), Some(&ids[4]), Some(1)),
        [ids[3].clone()]
    );
    let unknown = q.list(
        None,
        &Page {
            after: Some("job-00000000-nothere".into()),
            limit: None,
        },
    );
    assert!(
        matches!(unknown, Err(QueueError::NotFound { .. })),
        "{unknown:?}"
    );
}

fn deadlines_end_pending_and_running_jobs(q: &dyn Queue) {
    let late = q
        .enqueue(
            &NewJob {
                deadline_ms: Some(100),
                ..job("late", 5)
            },
            0,
        )
        .expect("enqueue");
    let timely = q
        .enqueue(
            &NewJob {
                deadline_ms: Some(1_000),
                ..job("timely", 0)
            },
            0,
        )
        .expect("enqueue");
    // Past its deadline, the higher-priority job is skipped, then ended by `expire`.
    let claim = q.claim("w", LEASE, 200).expect("claim").expect("a job");
    assert_eq!(claim.job_id, timely);
    let ended = q.expire(200).expect("expire");
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].job_id, late);
    assert_eq!(ended[0].reason, ExceptionReason::DeadlineExceeded);
    assert!(!ended[0].requeued);
    let status = q.status(&late).expect("status");
    assert_eq!(status.state, JobState::Exception);
    assert_eq!(
        status.report.expect("report").reason,
        Some(ExceptionReason::DeadlineExceeded)
    );

    // The running job learns it at the heartbeat after its deadline, and its worker
    // still holds the claim to record that.
    q.heartbeat(&claim, LEASE, 999)
        .expect("before the deadline");
    assert!(matches!(
        q.heartbeat(&claim, LEASE, 1_000),
        Err(QueueError::DeadlineExceeded { .. })
    ));
    q.resolve(
        &claim,
        &ResultReport::new(
            Resolution::Exception(ExceptionReason::DeadlineExceeded),
            Vec::new(),
        ),
    )
    .expect("resolve");
    assert_eq!(
        q.status(&timely).expect("status").state,
        JobState::Exception
    );
}

/// A PostgreSQL worker waiting for work wakes when a job is submitted elsewhere, and
/// when an expired job goes back to the queue (the trigger's NOTIFY), instead of
/// waiting out its timeout.
#[test]
fn postgres_wakes_idle_workers_on_new_and_requeued_jobs() {
    let server = TestPostgres::start();
    let waiter = PostgresQueue::open(&server.url()).expect("open");
    let submitter = PostgresQueue::open(&server.url()).expect("open");
    // The first wait subscribes; nothing is pending, so it times out.
    assert!(
        !waiter.wait_for_work(Duration::from_millis(50)),
        "no work yet"
    );
    std::thread::scope(|scope| {
        let woken = scope.spawn(|| waiter.wait_for_work(Duration::from_secs(600)));
        submitter.enqueue(&job("p", 0), 0).expect("enqueue");
        assert!(woken.join().expect("waiter"), "woken by the submission");
    });
    let claim = submitter
        .claim("w", Duration::from_millis(10), 0)
        .expect("claim")
        .expect("job");
    assert!(
        !waiter.wait_for_work(Duration::from_millis(50)),
        "claiming wakes no one"
    );
    std::thread::scope(|scope| {
        let woken = scope.spawn(|| waiter.wait_for_work(Duration::from_secs(600)));
        let expired = submitter.expire(1_000).expect("expire");
        assert_eq!((expired.len(), expired[0].requeued), (1, true));
        assert!(woken.join().expect("waiter"), "woken by the re-queue");
    });
    assert_eq!(claim.run_id, 1);
}

/// Bad connection settings are a clear error, not a hang or a panic.
#[test]
fn postgres_reports_an_unreachable_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("postgresql://postgres@/queue?host={}", dir.path().display());
    let error = PostgresQueue::open(&url).expect_err("no server there");
    let text = error.to_string();
    assert!(text.contains("PostgreSQL"), "{text}");
}

fn a_canceled_job_whose_run_is_lost_or_released_is_not_run_again(q: &dyn Queue) {
    let lost = q.enqueue(&job("lost", 0), 0).expect("enqueue");
    let claim = q
        .claim("w1", Duration::from_millis(100), 0)
        .expect("claim")
        .expect("job");
    assert_eq!(q.cancel(&lost).expect("cancel"), JobState::Running);
    // The worker died before its heartbeat could see the cancel.
    let expired = q.expire(1_000).expect("expire");
    assert_eq!(expired.len(), 1);
    assert!(
        !expired[0].requeued,
        "runs were left, but the job was canceled"
    );
    let status = q.status(&lost).expect("status");
    assert_eq!(status.state, JobState::Exception);
    assert_eq!(
        status.report.expect("report").reason,
        Some(ExceptionReason::Canceled)
    );
    assert!(matches!(
        q.heartbeat(&claim, LEASE, 1_000),
        Err(QueueError::StaleClaim { .. })
    ));

    let released = q.enqueue(&job("released", 0), 0).expect("enqueue");
    let claim = q.claim("w2", LEASE, 2_000).expect("claim").expect("job");
    assert_eq!(claim.job_id, released);
    q.cancel(&released).expect("cancel");
    assert!(!q.release(&claim).expect("release"), "not given back");
    let status = q.status(&released).expect("status");
    assert_eq!(
        (status.state, status.report.expect("report").reason),
        (JobState::Exception, Some(ExceptionReason::Canceled))
    );
    assert!(q.claim("w3", LEASE, 3_000).expect("claim").is_none());
}

/// Processes opening a new database at once (a `serve` starting while `submit` runs)
/// all get it: the switch to WAL and the schema wait for each other.
#[test]
fn sqlite_databases_opened_at_once_by_many_processes_all_open() {
    for _ in 0..5 {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("worker.yml");
        std::fs::write(&config, "stateDir: state\n").expect("config");
        let children: Vec<_> = (0..8)
            .map(|_| {
                std::process::Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
                    .arg("--config")
                    .arg(&config)
                    .arg("jobs")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("qemu-worker jobs")
            })
            .collect();
        for child in children {
            let output = child.wait_with_output().expect("wait");
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

fn a_status_names_the_worker_of_the_latest_run_and_workers_record_their_api(q: &dyn Queue) {
    let id = q.enqueue(&job("a", 0), 1).expect("enqueue");
    assert_eq!(q.status(&id).expect("status").worker, None, "never claimed");
    let first = q
        .claim("worker-a", LEASE, 1)
        .expect("claim")
        .expect("the job");
    assert_eq!(first.created_ms, 1);
    assert_eq!(
        q.status(&id).expect("status").worker.as_deref(),
        Some("worker-a")
    );
    // Its lease runs out; worker-b's run is now the latest, and stays named once it ended.
    q.expire(1 + LEASE.as_millis() as u64 + 1).expect("expire");
    let second = q
        .claim("worker-b", LEASE, 1 + LEASE.as_millis() as u64 + 2)
        .expect("claim")
        .expect("the job again");
    q.resolve(
        &second,
        &ResultReport::new(Resolution::Completed, Vec::new()),
    )
    .expect("resolve");
    let status = q.status(&id).expect("status");
    assert_eq!(
        (status.run_id, status.worker.as_deref()),
        (2, Some("worker-b"))
    );
    assert_eq!(
        q.list(None, &Page::default()).expect("list")[0]
            .worker
            .as_deref(),
        Some("worker-b")
    );

    assert_eq!(q.api_of("worker-a").expect("api_of"), None);
    q.record_api("worker-a", "http://10.0.0.1:9477", 5)
        .expect("record");
    q.record_api("worker-a", "http://10.0.0.2:9477", 6)
        .expect("record again");
    assert_eq!(
        q.api_of("worker-a").expect("api_of").as_deref(),
        Some("http://10.0.0.2:9477")
    );
    assert_eq!(q.api_of("worker-b").expect("api_of"), None);
}
