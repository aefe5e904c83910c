//! Hostile guests (docs/security.md): guest tools that answer the agent port as an
//! adversary would (guest/src/hostile.rs, built into a copy of the test image). Each
//! attack must end within its budget with the worker's memory bounded, a precise error
//! line, nothing of the failed artifact left on the host, and the artifacts after it
//! still collected.

use engine_tests::{Job, Outcome, Watched, Worker, assets, base_config};
use qemu_worker::job::ResultState;

/// The worker's own memory may grow this much during an attack: far above what it
/// needs (~30 MiB), far below what an unbounded list or buffer reaches (the skipped
/// frames flood once drove it to 8 GiB in 25 s).
const RSS_BUDGET_KIB: u64 = 256 << 10;

/// The guest's /etc/passwd, as the test image has it.
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n";

fn worker(artifacts: &str) -> Worker {
    Worker::with_config(&format!("{}artifacts: {artifacts}\n", base_config()))
}

const LIMITS: &str = "{maxFileSize: 4 MiB, maxTotalSize: 16 MiB, maxEntries: 1000, maxSkipped: 100, stallSeconds: 5, collectSeconds: 120}";

/// A job on the hostile image whose tools misbehave for `modes` (`PATH MODE` lines).
fn hostile_job(modes: &[(&str, &str)]) -> Job {
    let lines: String = modes
        .iter()
        .map(|(path, mode)| format!("{path} {mode}\\n"))
        .collect();
    Job::script(&format!(
        "printf '{lines}' > /tmp/qw-hostile && mkdir -p /h && echo later > /tmp/later.txt && echo ready"
    ))
    .image(&assets::hostile_image().display().to_string())
}

fn error_for(outcome: &Outcome, index: usize) -> String {
    outcome
        .report
        .errors
        .iter()
        .find(|e| e.path == format!("/artifacts/{index}"))
        .map(|e| e.message.clone())
        .unwrap_or_else(|| panic!("no error for /artifacts/{index}: {outcome}"))
}

/// What every attack must leave: the job failed, memory within budget, no file in
/// progress, nothing of the failed artifacts, each error in the job log.
fn assert_contained(outcome: &Outcome, watched: Watched, failed: &[&str]) {
    eprintln!(
        "worker peak RSS {} KiB; report: {outcome}\njob log:\n{}",
        watched.peak_rss_kib,
        outcome.log()
    );
    assert_eq!(outcome.state(), ResultState::Failed, "{outcome}");
    assert_eq!(outcome.exit_code, Some(1));
    assert!(
        watched.peak_rss_kib > 0 && watched.peak_rss_kib < RSS_BUDGET_KIB,
        "the worker's peak RSS was {} KiB, over the budget of {RSS_BUDGET_KIB} KiB",
        watched.peak_rss_kib
    );
    assert!(
        !outcome.job_dir.join(".partial").exists(),
        "files in progress are gone"
    );
    for name in failed {
        assert!(
            !outcome.job_dir.join("artifacts").join(name).exists(),
            "nothing of the failed artifact {name} is kept"
        );
        assert!(
            !outcome.artifact_names().iter().any(|n| n.starts_with(name)),
            "the report lists nothing of {name}: {:?}",
            outcome.artifact_names()
        );
    }
    let log = outcome.log();
    for error in &outcome.report.errors {
        let message = error.message.as_str();
        assert!(
            log.contains(&format!("[qemu-worker:error] {}", error.path)) && log.contains(message),
            "the job log has the error {message:?}: {log}"
        );
    }
}

#[test]
fn answers_that_end_badly_fail_their_artifact_and_the_port_resynchronises() {
    let worker = worker(LIMITS);
    let job = hostile_job(&[
        ("/h/lie", "lying-size"),
        ("/h/frame", "oversized-frame"),
        ("/h/names", "bad-names"),
        ("/h/dup", "duplicate-names"),
        ("/h/many", "many-entries"),
    ])
    .file_artifact("/h/lie", "lie.bin")
    .file_artifact("/etc/passwd", "later/passwd")
    .file_artifact("/h/frame", "frame.bin")
    .file_artifact("/tmp/later.txt", "later/later.txt")
    .directory_artifact("/h/names", "names")
    .directory_artifact("/h/dup", "dup")
    .directory_artifact("/h/many", "many")
    .file_artifact("/etc/passwd", "last/passwd");
    let (outcome, watched) = job.run_watched(&worker);
    assert_contained(
        &outcome,
        watched,
        &["lie.bin", "frame.bin", "names", "dup", "many"],
    );
    assert!(
        error_for(&outcome, 0).contains("lie.bin arrived with 5 bytes, the guest said 10"),
        "{}",
        error_for(&outcome, 0)
    );
    assert!(
        error_for(&outcome, 2).contains("a 4294967280-byte frame, over the limit of 1048576"),
        "{}",
        error_for(&outcome, 2)
    );
    assert!(
        error_for(&outcome, 4).contains("unsafe file name \"../escape\""),
        "{}",
        error_for(&outcome, 4)
    );
    assert!(
        error_for(&outcome, 5).contains("the guest sent dup/same twice"),
        "{}",
        error_for(&outcome, 5)
    );
    assert!(
        error_for(&outcome, 6).contains("more than 1000 files in the job's artifacts"),
        "{}",
        error_for(&outcome, 6)
    );
    // Each broken answer was left behind: everything after it still came through the
    // agent port, not the fallback.
    assert_eq!(
        outcome.artifact("later/passwd").as_deref(),
        Some(PASSWD.as_bytes())
    );
    assert_eq!(
        outcome.artifact("later/later.txt").as_deref(),
        Some(&b"later\n"[..])
    );
    assert_eq!(
        outcome.artifact("last/passwd").as_deref(),
        Some(PASSWD.as_bytes())
    );
    assert!(
        !outcome.log().contains("through qemu-ga"),
        "{}",
        outcome.log()
    );
    // No name from the guest reached outside the job's artifacts.
    assert!(!outcome.job_dir.join("escape").exists());
    assert!(!worker.dir().join("escape").exists());
    worker.assert_clean();
}

/// One attack (the artifact at `path`, stored as `name`, answered in `mode`), then /etc/passwd as a
/// later artifact: the attack fails its artifact with `error`, the later one arrives
/// (through qemu-ga when the port cannot be resynchronised, which `log` may require the
/// job log to say).
fn attack_then_later(
    path: &str,
    mode: &str,
    directory: bool,
    name: &str,
    error: &str,
    log: Option<&str>,
) {
    let worker = worker(LIMITS);
    let job = hostile_job(&[(path, mode)]);
    let job = if directory {
        job.directory_artifact(path, name)
    } else {
        job.file_artifact(path, name)
    };
    let (outcome, watched) = job
        .file_artifact("/etc/passwd", "later/passwd")
        .run_watched(&worker);
    assert_contained(&outcome, watched, &[name]);
    assert!(
        error_for(&outcome, 0).contains(error),
        "{}",
        error_for(&outcome, 0)
    );
    assert_eq!(
        outcome.artifact("later/passwd").as_deref(),
        Some(PASSWD.as_bytes())
    );
    if let Some(line) = log {
        assert!(outcome.log().contains(line), "{}", outcome.log());
    }
    worker.assert_clean();
}

#[test]
fn endless_skipped_entries_stop_at_their_budget_and_the_rest_comes_through_qemu_ga() {
    attack_then_later(
        "/h",
        "skipped-flood",
        true,
        "flood",
        "more than 100 skipped entries (artifacts.maxSkipped)",
        Some("collecting the remaining artifacts through qemu-ga"),
    );
}

#[test]
fn an_endless_file_stops_at_the_file_cap() {
    attack_then_later(
        "/h/endless",
        "endless-data",
        false,
        "endless.bin",
        "endless.bin is larger than the limit of 4194304 bytes for one file",
        None,
    );
}

#[test]
fn a_trickle_is_cut_by_the_stall_limit() {
    attack_then_later(
        "/h/slow",
        "slow",
        false,
        "slow.bin",
        "the guest sent nothing for 5s in the middle of an answer",
        None,
    );
}

#[test]
fn a_trickle_under_the_stall_limit_is_cut_by_the_collection_deadline() {
    // Stalls are allowed for longer than the guest waits between bytes; the deadline
    // for the whole collection still ends it.
    let worker = worker("{stallSeconds: 60, collectSeconds: 8}");
    let job = hostile_job(&[("/h/slow", "slow")])
        .file_artifact("/h/slow", "slow.bin")
        .file_artifact("/etc/passwd", "later/passwd");
    let (outcome, watched) = job.run_watched(&worker);
    assert_contained(&outcome, watched, &["slow.bin", "later"]);
    assert!(
        error_for(&outcome, 0).contains("the collection deadline of 8 s was spent"),
        "{}",
        error_for(&outcome, 0)
    );
    assert!(
        error_for(&outcome, 1).contains("not collected: the collection deadline of 8 s was spent"),
        "{}",
        error_for(&outcome, 1)
    );
    worker.assert_clean();
}

// With the real guest tools: the job's own command is the adversary.

#[test]
fn a_console_flood_stays_within_its_cap() {
    let worker = Worker::with_config(&format!(
        "{}logs: {{maxConsoleSize: 256 KiB}}\n",
        base_config()
    ));
    let (outcome, watched) = Job::script(
        "yes 'flooding the serial console' | head -c 2000000 > /dev/ttyS0; echo flooded",
    )
    .run_watched(&worker);
    assert_eq!(outcome.state(), ResultState::Completed, "{outcome}");
    assert!(watched.peak_rss_kib < RSS_BUDGET_KIB);
    let console = std::fs::metadata(outcome.job_dir.join("console.log"))
        .expect("console.log")
        .len();
    let note = 200; // the line that says the console was capped
    assert!(
        console <= (256 << 10) + note,
        "console.log is {console} bytes, over its cap"
    );
    let error = outcome.error_messages();
    assert!(
        error.contains("the serial console reached its cap of 262144 bytes (logs.maxConsoleSize)"),
        "{outcome}"
    );
    assert!(
        outcome
            .log()
            .contains("[qemu-worker:error] (document): the serial console reached its cap"),
        "{}",
        outcome.log()
    );
    worker.assert_clean();
}

#[test]
fn a_thousand_metadata_connections_cost_at_most_the_cap_in_helpers() {
    let worker = Worker::with_config(&format!(
        "{}metadata: {{maxConnections: 8}}\n",
        base_config()
    ));
    // 1,000 connections, each held open by an nc reading a FIFO that never speaks;
    // then wait for every one to be closed by the host.
    let (outcome, watched) = Job::script(
        "mkfifo /tmp/hold && exec 3<>/tmp/hold; i=0; \
         while [ $i -lt 1000 ]; do nc 169.254.169.254 80 <&3 >/dev/null 2>&1 & i=$((i+1)); done; \
         wait; echo all closed",
    )
    .max_run_time(300)
    .run_watched(&worker);
    eprintln!("{watched:?}; report: {outcome}");
    assert_eq!(outcome.state(), ResultState::Completed, "{outcome}");
    assert!(outcome.log().contains("all closed"), "{}", outcome.log());
    // A refused connection's helper lives only until the service closes it (a few ms):
    // the 20 ms samples see those few at most, on top of the ones held open.
    assert!(
        watched.peak_helpers <= 8 + TRANSIENT_HELPERS,
        "{} helper processes at once, over the cap of 8",
        watched.peak_helpers
    );
    assert!(watched.peak_rss_kib < RSS_BUDGET_KIB);
    assert!(
        outcome.error_messages().contains(
            "the guest opened more than 8 connections to the metadata service at once (metadata.maxConnections)"
        ),
        "{outcome}"
    );
    worker.assert_clean();
}

/// Helpers of refused connections that a sample may catch before they exit.
const TRANSIENT_HELPERS: usize = 4;

#[test]
fn skipped_entries_are_named_in_the_report_and_the_log_and_bad_names_never_merge() {
    let worker = Worker::new();
    // Two names that are not UTF-8 (they would both read `a\u{fffd}` if decoded lossily),
    // a symbolic link and a FIFO beside a regular file.
    let outcome = Job::script(
        "mkdir -p /out && echo kept > /out/kept.txt && touch \"/out/$(printf 'a\\377')\" \
         \"/out/$(printf 'a\\376')\" && ln -s /etc/passwd /out/link && mkfifo /out/fifo",
    )
    .directory_artifact("/out", "public/out")
    .run(&worker);
    assert_eq!(outcome.state(), ResultState::Completed, "{outcome}");
    assert_eq!(outcome.artifact_names(), ["public/out/kept.txt"]);
    assert_eq!(outcome.report.skipped_count, 4, "{outcome}");
    let skipped: Vec<(String, String)> = outcome
        .report
        .skipped
        .iter()
        .map(|s| (s.name.clone(), s.reason.clone()))
        .collect();
    let names: Vec<&str> = skipped.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "public/out/a\\xfe",
            "public/out/a\\xff",
            "public/out/fifo",
            "public/out/link"
        ],
        "{skipped:?}"
    );
    assert!(skipped[0].1.contains("not valid UTF-8"), "{skipped:?}");
    assert!(skipped[3].1.contains("symbolic link"), "{skipped:?}");
    let log = outcome.log();
    for name in names {
        assert!(
            log.contains(&format!("skipped {name}: ")),
            "{name} in the log: {log}"
        );
    }
    worker.assert_clean();
}
