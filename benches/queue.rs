//! Queue claims per second with 8 concurrent claimers (each claim resolved, as a
//! worker would), with a check that no job is claimed twice. Goal (SQLite): ≥ 2,000/s.
//! The baseline is one claimer on the same database: what concurrency costs or gains.
//!
//! `cargo bench --bench queue`. (PostgreSQL joins when its backend lands.)

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qemu_worker::job::{Resolution, ResultReport};
use qemu_worker::queue::{NewJob, SqliteQueue};

const JOBS: usize = 4000;

fn run(claimers: usize) -> (f64, usize, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = SqliteQueue::open(&dir.path().join("queue.sqlite")).expect("open");
    for n in 0..JOBS {
        let job = NewJob {
            payload: format!("{{\"n\": {n}}}"),
            priority: 0,
            max_runs: 1,
        };
        queue.enqueue(&job, 0).expect("enqueue");
    }
    let claimed = Arc::new(Mutex::new(Vec::with_capacity(JOBS)));
    let done = ResultReport::new(Resolution::Completed, Vec::new());
    let start = Instant::now();
    std::thread::scope(|scope| {
        for worker in 0..claimers {
            let queue = queue.reopen().expect("connection");
            let claimed = Arc::clone(&claimed);
            let done = done.clone();
            scope.spawn(move || {
                let name = format!("w{worker}");
                while let Some(claim) = queue
                    .claim(&name, Duration::from_secs(60), 1)
                    .expect("claim")
                {
                    queue.resolve(&claim, &done).expect("resolve");
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

fn main() {
    println!(
        "queue claims per second (claim + resolve), {JOBS} jobs, SQLite (WAL, BEGIN IMMEDIATE)"
    );
    let (single, _, _) = run(1);
    let mut rates = Vec::new();
    let mut double_claims = 0;
    for _ in 0..3 {
        let (rate, claimed, unique) = run(8);
        assert_eq!(claimed, JOBS, "every job claimed");
        double_claims += claimed - unique;
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "  8 claimers: median {:.0}/s (min {:.0}, max {:.0}), double claims: {double_claims}",
        rates[1], rates[0], rates[2]
    );
    println!("  baseline, 1 claimer: {single:.0}/s");
    println!(
        "  goal >= 2000/s with zero double claims: {}",
        if rates[1] >= 2000.0 && double_claims == 0 {
            "met"
        } else {
            "NOT met"
        }
    );
}
