//! The HTTP API of `qemu-worker serve` on a real PostgreSQL queue, each figure next to
//! its baseline in the same run:
//!
//! 1. Submit → claim: from the moment a client starts submitting to the worker's
//!    `claimed` log line (JSON, microseconds), through `POST /v1/jobs` next to the CLI's
//!    direct database path (`qemu-worker submit`, a process of its own), interleaved.
//!    The jobs' payloads are malformed, so each ends at once without a VM.
//! 2. `GET /v1/jobs` with 10,000 jobs in the queue: the first page of 100, and a page
//!    in the middle of the `completed` listing (p50 and p99), next to the queue's own
//!    `list` of all of them in this process.
//! 3. One `/metrics` scrape next to a `/healthz` request (the HTTP round trip alone).
//! 4. Worker RSS with 100 concurrent live-log followers of a running job (the test
//!    image, `sleep`), next to the same worker and job with none.
//!
//! `cargo bench --bench api` (needs images/build-test-image for part 4). Prints one
//! `RESULT {json}` line per figure for bench/run.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use qemu_worker::job::{Resolution, ResultReport};
use qemu_worker::queue::{JobState, NewJob, Page, PostgresQueue, Queue};
use sha2::{Digest, Sha256};
use test_support::figure;

const TOKEN: &str = "qwt_bench0000000000000000000000000000000000000000000000000000000000";
const FILL: usize = 10_000;
const SAMPLES: usize = 200;
const ROUNDS: usize = 15;
const FOLLOWERS: usize = 100;

fn test_image() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/out/qemu-worker-test.tar.zst");
    assert!(
        path.is_file(),
        "the test image is missing: run images/build-test-image"
    );
    path
}

/// One request with the bench's token: the status and the body.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let reply = test_support::http::request(port, method, path, Some(TOKEN), body);
    (reply.status, reply.body)
}

fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Milliseconds each call of `f` takes, `SAMPLES` times.
fn timed(mut f: impl FnMut()) -> Vec<f64> {
    (0..SAMPLES)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1000.0
        })
        .collect()
}

fn unix_micros(at: SystemTime) -> i64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// `2026-12-03T18:38:09.808828Z` (tracing's JSON timestamp) as Unix microseconds.
fn parse_timestamp(text: &str) -> Option<i64> {
    let (date, time) = text.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>());
    let (h, min, s) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let micros: i64 = format!("{fraction:0<6}")[..6].parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + min * 60 + s) * 1_000_000) + micros)
}

/// The Unix microseconds of serve's `claimed` line for `job`, once it is logged.
fn claimed_at(log: &Path, job: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text.lines() {
            let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if event["message"] == "claimed" && event["job_id"] == job {
                return event["timestamp"]
                    .as_str()
                    .and_then(parse_timestamp)
                    .expect("a timestamp");
            }
        }
        assert!(
            Instant::now() < deadline,
            "{job} was never claimed:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `serve`, stopped with SIGTERM when dropped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.0.wait();
    }
}

/// Fills the queue with `FILL` jobs that ended (claimed and resolved here, as workers
/// would have), so that the listing has a history to page through.
fn fill(queue: &PostgresQueue) {
    for n in 0..FILL {
        let job = NewJob {
            payload: format!("{{\"n\": {n}}}"),
            priority: 0,
            max_runs: 1,
            deadline_ms: None,
        };
        queue.enqueue(&job, 0).expect("enqueue");
    }
    let done = ResultReport::new(Resolution::Completed, Vec::new());
    std::thread::scope(|scope| {
        for worker in 0..4 {
            let handle = queue.reopen().expect("connection");
            let done = done.clone();
            scope.spawn(move || {
                let name = format!("filler-{worker}");
                while let Some(claim) = handle
                    .claim(&name, Duration::from_secs(60), 1)
                    .expect("claim")
                {
                    handle.resolve(&claim, &done).expect("resolve");
                }
            });
        }
    });
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = test_support::postgres::TestPostgres::start();
    let queue = PostgresQueue::open(&server.url()).expect("open");
    let start = Instant::now();
    fill(&queue);
    println!(
        "api: {FILL} ended jobs in the queue ({:.1} s to fill)",
        start.elapsed().as_secs_f64()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a port")
        .port();
    let sha256: String = Sha256::digest(TOKEN.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let config = dir.path().join("worker.yml");
    std::fs::write(
        &config,
        format!(
            "stateDir: {}\naccelerator: tcg\ncapacity: 1\n\
             queue: {{backend: postgres, url: {:?}}}\n\
             limits: {{maxMemory: 256, maxCPUs: 1, defaultThreads: 1}}\n\
             timeouts: {{shutdownSeconds: 5, graceSeconds: 1}}\n\
             images: {{allowedLocalDirs: [{}]}}\n\
             api: {{listen: 127.0.0.1:{port}, tokens: [{{name: bench, scope: admin, sha256: {sha256}}}]}}\n",
            dir.path().join("state").display(),
            server.url(),
            test_image().parent().expect("dir").display(),
        ),
    )
    .expect("worker.yml");
    let log = dir.path().join("serve.log");
    let serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
            .arg("--config")
            .arg(&config)
            .args(["--log-format", "json", "serve"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("serve"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err()
        || http(port, "GET", "/readyz", b"").0 != 200
    {
        assert!(Instant::now() < deadline, "serve never got ready");
        std::thread::sleep(Duration::from_millis(100));
    }

    submit_to_claim(port, &config, &log, dir.path());
    listing(port, &queue);
    metrics(port);
    followers(port, &serve, dir.path());
    drop(serve);
}

fn submit_to_claim(port: u16, config: &Path, log: &Path, dir: &Path) {
    let payload = dir.join("malformed.yml");
    std::fs::write(&payload, "image: not-a-url\n").expect("payload");
    let (mut api, mut cli) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t0 = unix_micros(SystemTime::now());
        let (status, body) = http(port, "POST", "/v1/jobs", b"image: not-a-url\n");
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
        let reply: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        let id = reply["jobId"].as_str().expect("jobId").to_owned();
        api.push((claimed_at(log, &id) - t0) as f64 / 1000.0);

        let t0 = unix_micros(SystemTime::now());
        let out = Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
            .arg("--config")
            .arg(config)
            .arg("submit")
            .arg(&payload)
            .output()
            .expect("submit");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        cli.push((claimed_at(log, &id) - t0) as f64 / 1000.0);
    }
    println!(
        "  submit -> claim: API p50 {:.1} ms (p99 {:.1}), CLI on the database p50 {:.1} ms (p99 {:.1})",
        percentile(&api, 0.5),
        percentile(&api, 0.99),
        percentile(&cli, 0.5),
        percentile(&cli, 0.99)
    );
    figure::Figure {
        figure: "submit -> claim through POST /v1/jobs (PostgreSQL, NOTIFY)",
        unit: "ms",
        samples: &api,
        baseline_name: "qemu-worker submit (its own process, straight to the database)",
        baseline: &cli,
        goal: "no slower than the CLI's database path",
        met: Some(figure::median(&api) <= figure::median(&cli)),
        ..Default::default()
    }
    .emit();
}

fn listing(port: u16, queue: &PostgresQueue) {
    let direct = timed(|| {
        queue.list(None, &Page::default()).expect("list");
    });
    let first = timed(|| {
        let (status, _) = http(port, "GET", "/v1/jobs?limit=100", b"");
        assert_eq!(status, 200);
    });
    let completed = queue
        .list(Some(JobState::Completed), &Page::default())
        .expect("list");
    let middle = completed[completed.len() / 2].job_id.clone();
    let paged = timed(|| {
        let (status, _) = http(
            port,
            "GET",
            &format!("/v1/jobs?state=completed&limit=100&after={middle}"),
            b"",
        );
        assert_eq!(status, 200);
    });
    for (what, samples) in [
        ("first page", &first),
        ("a middle page of completed", &paged),
    ] {
        println!(
            "  GET /v1/jobs, {FILL} jobs, {what}: p50 {:.1} ms, p99 {:.1} ms (queue.list in-process p50 {:.1} ms)",
            percentile(samples, 0.5),
            percentile(samples, 0.99),
            percentile(&direct, 0.5)
        );
    }
    for (figure, samples) in [
        (
            "GET /v1/jobs?limit=100 with 10,000 jobs, p50",
            percentile(&first, 0.5),
        ),
        (
            "GET /v1/jobs?limit=100 with 10,000 jobs, p99",
            percentile(&first, 0.99),
        ),
        (
            "GET /v1/jobs?state=completed&after=(middle) with 10,000 jobs, p50",
            percentile(&paged, 0.5),
        ),
        (
            "GET /v1/jobs?state=completed&after=(middle) with 10,000 jobs, p99",
            percentile(&paged, 0.99),
        ),
    ] {
        figure::Figure {
            figure,
            unit: "ms",
            samples: &[samples],
            baseline_name: "the queue's list of all 10,000 in-process (no page), p50",
            baseline: &[percentile(&direct, 0.5)],
            note: "one indexed query per page (LIMIT, seq < the after job's)",
            ..Default::default()
        }
        .emit();
    }
}

fn metrics(port: u16) {
    let health = timed(|| {
        assert_eq!(http(port, "GET", "/healthz", b"").0, 200);
    });
    let mut size = 0;
    let scrapes = timed(|| {
        let (status, body) = http(port, "GET", "/metrics", b"");
        assert_eq!(status, 200);
        size = body.len();
    });
    println!(
        "  /metrics: p50 {:.2} ms for {size} bytes (/healthz p50 {:.2} ms)",
        percentile(&scrapes, 0.5),
        percentile(&health, 0.5)
    );
    figure::Figure {
        figure: "one /metrics scrape",
        unit: "ms",
        samples: &scrapes,
        baseline_name: "GET /healthz (the HTTP round trip alone)",
        baseline: &health,
        note: &format!("{size} bytes of exposition"),
        ..Default::default()
    }
    .emit();
}

fn followers(port: u16, serve: &Serve, dir: &Path) {
    let payload = format!(
        "image: {}\ncommand: [/bin/sh, -c, 'echo running; sleep 600']\nmaxRunTime: 900\n",
        test_image().display()
    );
    let (status, body) = http(port, "POST", "/v1/jobs", payload.as_bytes());
    assert_eq!(status, 201);
    let reply: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    let id = reply["jobId"].as_str().expect("jobId").to_owned();
    let job_log = dir.join(format!("state/jobs/{id}/run-1/job.log"));
    let deadline = Instant::now() + Duration::from_secs(240);
    while !std::fs::read_to_string(&job_log).is_ok_and(|l| l.contains("running")) {
        assert!(Instant::now() < deadline, "the followed job never ran");
        std::thread::sleep(Duration::from_millis(200));
    }
    let sample = || {
        (0..10)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(300));
                test_support::rss_kib(serve.0.id())
            })
            .max()
            .unwrap_or(0) as f64
            / 1024.0
    };
    let without = sample();
    let streams: Vec<TcpStream> = (0..FOLLOWERS)
        .map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .expect("timeout");
            write!(
                stream,
                "GET /v1/jobs/{id}/log?follow=true HTTP/1.1\r\nHost: bench\r\n\
                 Authorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
            )
            .expect("request");
            stream
        })
        .collect();
    for mut stream in &streams {
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("running") {
            let n = stream.read(&mut chunk).expect("the log streams");
            assert!(n > 0, "a follower's stream ended early");
            seen.extend_from_slice(&chunk[..n]);
        }
    }
    let with = sample();
    drop(streams);
    let (status, _) = http(port, "POST", &format!("/v1/jobs/{id}/cancel"), b"");
    assert_eq!(status, 200);
    println!(
        "  worker RSS with {FOLLOWERS} live-log followers: {with:.1} MiB (none: {without:.1} MiB; {:.0} KiB each)",
        (with - without) * 1024.0 / FOLLOWERS as f64
    );
    figure::Figure {
        figure: "worker RSS with 100 live-log followers of a running job",
        unit: "MiB",
        samples: &[with],
        baseline_name: "the same worker and job, no followers",
        baseline: &[without],
        ..Default::default()
    }
    .emit();
}
