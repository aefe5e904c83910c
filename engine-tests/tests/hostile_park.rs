//! Hostile guests and the boot snapshot handshake (docs/snapshots.md, docs/security.md):
//! guest tools that answer PARK or RESUME with a frame of another kind, a truncated or
//! oversized frame, or nothing (guest/src/hostile/handshake.rs, the mode baked into a
//! copy of the hostile image). Each costs the job its snapshot or its resume, never the
//! job: it completes, its log says what went wrong, nothing of a failed snapshot stays
//! in the store, and no process outlives it. Every wait on the handshake is the worker's
//! own (10 s for an answer): the jobs end although these tools never answer, and the
//! guest is released by the worker's RESUME rather than by its own 3-minute hold.

use engine_tests::{Job, Outcome, Worker, assets, base_config};
use qemu_worker::job::ResultState;

fn worker() -> Worker {
    Worker::with_config(&format!("{}snapshots: {{enabled: true}}\n", base_config()))
}

/// What the command prints: `job-42`, which its script (`$((40+2))`) does not contain.
const OUTPUT: &str = "job-42";

/// The guest's /etc/passwd, as the test image has it.
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n";

/// A job on the hostile image whose tools answer the handshake as `mode` says, with an
/// artifact collected over the agent port after it.
fn job(mode: &str) -> Job {
    let image = assets::hostile_park_image(mode);
    Job::script("echo job-$((40+2))")
        .image(&image.display().to_string())
        .file_artifact("/etc/passwd", "passwd")
}

/// Every entry of the worker's snapshot store (`<cache>/snapshots/<image>/`): a saved
/// snapshot's key, a save in progress (`.KEY.*`), or a key marked `KEY.unsupported`.
fn store(worker: &Worker) -> Vec<String> {
    let root = worker.state().join("images/snapshots");
    let mut entries = Vec::new();
    for image in std::fs::read_dir(root).into_iter().flatten().flatten() {
        for entry in std::fs::read_dir(image.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            entries.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    entries.sort();
    entries
}

fn console(outcome: &Outcome) -> String {
    std::fs::read_to_string(outcome.job_dir.join("console.log")).unwrap_or_default()
}

/// The job completed, its command ran, and the agent port served its artifact
/// afterwards (whatever the handshake left on the port was discarded by the next
/// connection's sync).
fn assert_completed(outcome: &Outcome) {
    let log = outcome.log();
    eprintln!("report: {outcome}\njob log:\n{log}");
    assert_eq!(outcome.state(), ResultState::Completed, "{outcome}\n{log}");
    assert!(
        log.contains(OUTPUT),
        "the command's output in the log:\n{log}"
    );
    assert_eq!(
        outcome.artifact("passwd").as_deref(),
        Some(PASSWD.as_bytes()),
        "{outcome}"
    );
    assert!(!log.contains("through qemu-ga"), "{log}");
}

/// One job on tools that answer PARK as `mode` says: it goes on without a snapshot, and
/// its log says `no boot snapshot of this machine: the guest tools did not hold still
/// for it: WHY`.
fn park_answered_badly(mode: &str, why: &str) {
    let worker = worker();
    let outcome = job(mode).run(&worker);
    assert_completed(&outcome);
    let log = outcome.log();
    let line = format!(
        "[qemu-worker] no boot snapshot of this machine: the guest tools did not hold still for it: {why}\n"
    );
    assert!(log.contains(&line), "{line:?} in the log:\n{log}");
    assert!(!log.contains("saved boot snapshot"), "{log}");
    // Nothing saved, nothing half-written, and the key is not marked unsupported: the
    // next job tries again.
    assert_eq!(store(&worker), Vec::<String>::new());
    let console = console(&outcome);
    assert!(
        console.contains(&format!("answering the boot snapshot handshake as {mode}")),
        "the hostile tools answered the handshake:\n{console}"
    );
    // The worker's RESUME after it gave up let the tools go on at once.
    assert!(
        console.contains("resumed after the boot snapshot"),
        "{console}"
    );
    assert!(
        !console.contains("no RESUME on the agent port"),
        "{console}"
    );
    worker.assert_clean();
}

#[test]
fn a_park_answered_with_a_frame_of_another_kind_costs_only_the_snapshot() {
    park_answered_badly(
        "park-wrong-frame",
        "the guest broke the agent protocol: a 21-byte frame of type 90 in answer to P",
    );
}

#[test]
fn a_park_answered_with_a_truncated_frame_costs_only_the_snapshot() {
    // The frame's head promises 100 bytes; 10 come: the worker's wait for the rest ends
    // with its 10 s for an answer.
    park_answered_badly(
        "park-truncated",
        "the guest tools did not answer the P frame on the agent port within 10s",
    );
}

#[test]
fn a_park_answered_with_an_oversized_frame_costs_only_the_snapshot() {
    park_answered_badly(
        "park-oversized",
        "the guest broke the agent protocol: a 65537-byte frame, over the limit of 65536",
    );
}

#[test]
fn a_park_never_answered_costs_only_the_snapshot() {
    park_answered_badly(
        "park-silent",
        "the guest tools did not answer the P frame on the agent port within 10s",
    );
}

/// Two jobs on tools that answer PARK and the saved VM's RESUME honestly, and a resumed
/// VM's RESUME as `mode` says: the first saves the snapshot; the second resumes it, is
/// refused, drops the resumed VM and the snapshot, boots, and completes, its log naming
/// `why`. Returns the second job's log.
fn resume_answered_badly(mode: &str, why: &str) -> String {
    let worker = worker();
    let first = job(mode).run(&worker);
    assert_completed(&first);
    assert!(
        first.log().contains("saved boot snapshot"),
        "{}",
        first.log()
    );
    let saved = store(&worker);
    assert_eq!(saved.len(), 1, "one saved snapshot: {saved:?}");
    let key = &saved[0];

    let second = job(mode).run(&worker);
    // The resumed tools never go on (they stay parked): the command's output is the
    // VM's that booted instead.
    assert_completed(&second);
    let log = second.log();
    let line = format!(
        "[qemu-worker] the boot snapshot {key} did not load (the resumed guest tools did not take RESUME: {why}); booting instead\n"
    );
    assert!(log.contains(&line), "{line:?} in the log:\n{log}");
    assert!(!log.contains("resumed from boot snapshot"), "{log}");
    // The snapshot is gone, and the job that booted instead saved none (the next one
    // will).
    assert_eq!(store(&worker), Vec::<String>::new());
    // The refused VM's QEMU is gone with the rest.
    worker.assert_clean();
    log
}

#[test]
fn a_resume_answered_with_a_frame_of_another_kind_drops_the_resumed_vm_and_boots() {
    let _ = resume_answered_badly(
        "resume-wrong-frame",
        "the guest broke the agent protocol: a 21-byte frame of type 90 in answer to R",
    );
}

#[test]
fn a_resume_never_answered_drops_the_resumed_vm_and_boots() {
    let _ = resume_answered_badly(
        "resume-silent",
        "the guest tools did not answer the R frame on the agent port within 10s",
    );
}

/// Tools that skip a resumed VM's RESUME echo and fetch their task at once: the task
/// is held until the worker releases the VM, which it never does, so the command runs
/// once, in the VM that booted instead, and never in the discarded one.
#[test]
fn tools_that_skip_the_resume_echo_never_run_the_command_in_the_discarded_vm() {
    let log = resume_answered_badly(
        "resume-run-silent",
        "the guest tools did not answer the R frame on the agent port within 10s",
    );
    assert_eq!(
        log.matches(OUTPUT).count(),
        1,
        "the command ran once:\n{log}"
    );
}

/// The saved VM's own RESUME answered badly (the tools go on all the same): its log
/// says there is no snapshot, and there is none — a VM resumed from it would start
/// from the state that just failed to take RESUME.
#[test]
fn a_saved_vms_resume_answered_badly_leaves_no_snapshot() {
    let worker = worker();
    let outcome = job("save-resume-wrong-frame").run(&worker);
    assert_completed(&outcome);
    let log = outcome.log();
    let line = "[qemu-worker] no boot snapshot of this machine: the guest tools did not take RESUME after the save: the guest broke the agent protocol: a 21-byte frame of type 90 in answer to R\n";
    assert!(log.contains(line), "{line:?} in the log:\n{log}");
    assert_eq!(store(&worker), Vec::<String>::new());
    worker.assert_clean();
}
