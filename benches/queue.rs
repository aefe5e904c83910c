//! Queue claims per second with 8 concurrent claimers (each claim resolved, as a
//! worker would), with a check that no job is claimed twice, on SQLite and on a real
//! PostgreSQL server started for the run. Goals: SQLite ≥ 2,000/s, PostgreSQL ≥ 1,000/s.
//! The baseline is one claimer on the same backend: what concurrency costs or gains.
//!
//! `cargo bench --bench queue`. Prints one `RESULT {json}` line per figure for bench/run.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qemu_worker::job::{Resolution, ResultReport};
use qemu_worker::queue::{NewJob, PostgresQueue, Queue, SqliteQueue};
use test_support::figure;

const JOBS: usize = 4000;
const REPETITIONS: usize = 3;

/// Fills a fresh queue and lets `claimers` handles claim and resolve until it is empty.
/// Returns claims per second, claims made, and distinct jobs claimed.
fn run(queue: &dyn Queue, claimers: usize) -> (f64, usize, usize) {
    for n in 0..JOBS {
        let job = NewJob {
            payload: format!("{{\"n\": {n}}}"),
            priority: 0,
            max_runs: 1,
            deadline_ms: None,
        };
        queue.enqueue(&job, 0).expect("enqueue");
    }
    let handles: Vec<Box<dyn Queue>> = (0..claimers)
        .map(|_| queue.reopen().expect("connection"))
        .collect();
    let claimed = Arc::new(Mutex::new(Vec::with_capacity(JOBS)));
    let done = ResultReport::new(Resolution::Completed, Vec::new());
    let start = Instant::now();
    std::thread::scope(|scope| {
        for (worker, handle) in handles.iter().enumerate() {
            let claimed = Arc::clone(&claimed);
            let done = done.clone();
            scope.spawn(move || {
                let name = format!("w{worker}");
                while let Some(claim) = handle
                    .claim(&name, Duration::from_secs(60), 1)
                    .expect("claim")
                {
                    handle.resolve(&claim, &done).expect("resolve");
                    claimed.lock().expect("lock").push(claim.job_id);
                }
            });
        }
    });
    let seconds = start.elapsed().as_secs_f64();
    let claimed = claimed.lock().expect("lock");
    let unique = claimed.iter().collect::<HashSet<_>>().len();
    (claimed.len() as f64 / seconds, claimed.len(), unique)
}

fn measure(backend: &str, goal: f64, fresh: &dyn Fn() -> (Box<dyn std::any::Any>, Box<dyn Queue>)) {
    let (keep, queue) = fresh();
    let (single, _, _) = run(&*queue, 1);
    drop(queue);
    drop(keep);
    let mut rates = Vec::new();
    let mut double_claims = 0;
    for _ in 0..REPETITIONS {
        let (keep, queue) = fresh();
        let (rate, claimed, unique) = run(&*queue, 8);
        assert_eq!(claimed, JOBS, "every job claimed");
        double_claims += claimed - unique;
        rates.push(rate);
        drop(queue);
        drop(keep);
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[REPETITIONS / 2];
    let met = median >= goal && double_claims == 0;
    println!(
        "  {backend}, 8 claimers: median {median:.0}/s (min {:.0}, max {:.0}), double claims: {double_claims}",
        rates[0],
        rates[REPETITIONS - 1]
    );
    println!("  {backend}, baseline 1 claimer: {single:.0}/s");
    println!(
        "  goal >= {goal:.0}/s with zero double claims: {}",
        if met { "met" } else { "NOT met" }
    );
    figure::Figure {
        figure: &format!("queue claims/s, {backend}, 8 claimers"),
        unit: "claims/s",
        samples: &rates,
        baseline_name: "1 claimer, same backend",
        baseline: &[single],
        goal: &format!(">= {goal:.0}/s with 0 double claims"),
        met: Some(met),
        note: &format!("double claims found: {double_claims}"),
        ..Default::default()
    }
    .emit();
}

fn main() {
    println!("queue claims per second (claim + resolve), {JOBS} jobs");
    measure("SQLite (WAL, BEGIN IMMEDIATE)", 2000.0, &|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = SqliteQueue::open(&dir.path().join("queue.sqlite")).expect("open");
        (Box::new(dir), Box::new(queue))
    });
    measure("PostgreSQL 15 (SKIP LOCKED, unix socket)", 1000.0, &|| {
        let server = test_support::postgres::TestPostgres::start();
        let queue = PostgresQueue::open(&server.url()).expect("open");
        (Box::new(server), Box::new(queue))
    });
}
