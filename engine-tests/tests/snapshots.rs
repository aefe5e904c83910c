//! Boot snapshots (docs/snapshots.md) on the test image under TCG: the first job saves
//! its VM where the guest tools ask for the task, later jobs resume it with the host's
//! clock and fresh randomness; a snapshot that does not load is replaced; a machine
//! QEMU cannot migrate boots every time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use engine_tests::{Job, Worker, base_config};
use qemu_worker::job::ResultState;

fn worker() -> Worker {
    Worker::with_config(&format!("{}snapshots: {{enabled: true}}\n", base_config()))
}

/// The snapshot directories (`<cache>/snapshots/<image>/<key>`) that hold a snapshot.
fn snapshots(worker: &Worker) -> Vec<PathBuf> {
    let root = worker.state().join("images/snapshots");
    let mut found = Vec::new();
    for image in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for key in std::fs::read_dir(image.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if key.path().join("snapshot.json").is_file() {
                found.push(key.path());
            }
        }
    }
    found
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// The value printed after `name=` in a job log.
fn printed(log: &str, name: &str) -> String {
    log.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in the log:\n{log}"))
        .trim()
        .to_owned()
}

const PROBE: &str =
    "echo clock=$(date +%s); echo random=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')";

#[test]
fn the_first_job_saves_a_boot_snapshot_and_later_jobs_resume_it() {
    let worker = worker();
    let first = Job::script(PROBE).run(&worker);
    assert_eq!(first.state(), ResultState::Completed, "{first}");
    assert!(
        first.log().contains("saved boot snapshot"),
        "{}",
        first.log()
    );
    let saved = snapshots(&worker);
    assert_eq!(saved.len(), 1, "one snapshot: {saved:?}");
    for file in ["vmstate", "disk.qcow2", "console.log"] {
        assert!(saved[0].join(file).is_file(), "{file} in {saved:?}");
    }
    let saved_at = Instant::now();
    // Resumed guests wake with the snapshot's clock: let it fall behind the host's.
    std::thread::sleep(Duration::from_secs(12).saturating_sub(saved_at.elapsed()));

    let mut randoms = vec![printed(&first.log(), "random")];
    for n in 0..2 {
        let started = unix_now();
        let outcome = Job::script(&format!(
            "{PROBE}; mkdir -p /root/out/sub && echo resumed-{n} > /root/out/sub/note && cp /root/out/sub/note /root/note"
        ))
        .file_artifact("/root/note", "note.txt")
        .directory_artifact("/root/out", "out")
        .run(&worker);
        assert_eq!(outcome.state(), ResultState::Completed, "{outcome}");
        let log = outcome.log();
        assert!(log.contains("resumed from boot snapshot"), "{log}");
        assert!(!log.contains("saved boot snapshot"), "{log}");
        let clock: u64 = printed(&log, "clock").parse().expect("a number");
        assert!(
            clock + 3 >= started && clock <= unix_now() + 3,
            "the guest's clock {clock} is the host's ({started}..{}), not the snapshot's",
            unix_now()
        );
        randoms.push(printed(&log, "random"));
        // The agent port works in a resumed guest: both kinds of artifact come back.
        let expected = format!("resumed-{n}\n").into_bytes();
        assert_eq!(outcome.artifact("note.txt"), Some(expected.clone()));
        assert_eq!(outcome.artifact("out/sub/note"), Some(expected));
        assert!(
            outcome.job_dir.join("screenshots/final.png").is_file(),
            "{outcome}"
        );
        // The console goes on from the saved boot.
        let console =
            std::fs::read_to_string(outcome.job_dir.join("console.log")).expect("console");
        assert!(console.contains("QEMU-WORKER-INIT"), "{console}");
        assert!(
            console.contains("holding still for a boot snapshot"),
            "{console}"
        );
    }
    assert_eq!(randoms.len(), 3);
    assert!(
        randoms[0] != randoms[1] && randoms[1] != randoms[2] && randoms[0] != randoms[2],
        "every resumed guest's RNG is reseeded: {randoms:?}"
    );
    assert_eq!(snapshots(&worker).len(), 1, "resuming saves nothing new");
    worker.assert_clean();

    // The snapshot goes with its image.
    let pruned = worker.cli(&["image", "prune"]);
    assert!(pruned.status.success(), "{pruned:?}");
    assert!(snapshots(&worker).is_empty(), "{:?}", snapshots(&worker));
}

/// The handshake rides on the metadata service and the agent port, never on console
/// text: a guest whose tools write nothing to the console (systemd sends a service's
/// output to the journal) is saved and resumed all the same.
#[test]
fn a_guest_whose_tools_never_write_to_the_console_is_snapshotted_and_resumed() {
    let worker = worker();
    let image = engine_tests::assets::quiet_tools_image();
    let image = image.display().to_string();
    let first = Job::script("echo one").image(&image).run(&worker);
    assert_eq!(first.state(), ResultState::Completed, "{first}");
    assert!(
        first.log().contains("saved boot snapshot"),
        "{}",
        first.log()
    );
    let second = Job::script("echo two").image(&image).run(&worker);
    assert_eq!(second.state(), ResultState::Completed, "{second}");
    let log = second.log();
    assert!(log.contains("resumed from boot snapshot"), "{log}");
    assert!(log.contains("two"), "{log}");
    let console = std::fs::read_to_string(second.job_dir.join("console.log")).expect("console");
    assert!(console.contains("QEMU-WORKER-INIT"), "{console}");
    assert!(
        !console.contains("qemu-worker-guest ["),
        "the tools' lines reached the console: {console}"
    );
    worker.assert_clean();
}

#[test]
fn a_snapshot_that_does_not_load_is_replaced_and_the_job_boots() {
    let worker = worker();
    let first = Job::script("echo one").run(&worker);
    assert_eq!(first.state(), ResultState::Completed, "{first}");
    let saved = snapshots(&worker);
    assert_eq!(saved.len(), 1, "{}", first.log());
    truncate(&saved[0].join("vmstate"), 4096);

    let second = Job::script("echo two").run(&worker);
    assert_eq!(second.state(), ResultState::Completed, "{second}");
    let log = second.log();
    assert!(log.contains("did not load"), "{log}");
    assert!(log.contains("two"), "{log}");
    assert!(snapshots(&worker).is_empty(), "the broken snapshot is gone");

    let third = Job::script("echo three").run(&worker);
    assert_eq!(third.state(), ResultState::Completed, "{third}");
    assert!(
        third.log().contains("saved boot snapshot"),
        "{}",
        third.log()
    );
    assert_eq!(snapshots(&worker).len(), 1);
    worker.assert_clean();
}

#[test]
fn an_incomplete_snapshot_is_replaced_and_the_job_boots() {
    let worker = worker();
    let first = Job::script("echo one").run(&worker);
    assert_eq!(first.state(), ResultState::Completed, "{first}");
    let saved = snapshots(&worker);
    assert_eq!(saved.len(), 1, "{}", first.log());
    std::fs::remove_file(saved[0].join("disk.qcow2")).expect("remove the saved disk");

    let second = Job::script("echo two").run(&worker);
    assert_eq!(second.state(), ResultState::Completed, "{second}");
    assert!(!second.log().contains("resumed"), "{}", second.log());
    assert!(
        snapshots(&worker).is_empty(),
        "the incomplete snapshot is gone"
    );

    let third = Job::script("echo three").run(&worker);
    assert!(
        third.log().contains("saved boot snapshot"),
        "{}",
        third.log()
    );
    worker.assert_clean();
}

#[test]
fn a_machine_qemu_cannot_migrate_boots_every_time() {
    let worker = worker();
    // QEMU cannot migrate an NVMe controller.
    let nvme = "machine: {storage: nvme, kernel: kernel, initrd: initrd, cmdline: 'root=/dev/nvme0n1 rw init=/init console=tty0 console=ttyS0 quiet cryptomgr.notests no_timer_check'}";
    let first = Job::script("echo one").extra(nvme).run(&worker);
    assert_eq!(first.state(), ResultState::Completed, "{first}");
    let log = first.log();
    assert!(log.contains("no boot snapshot of this machine"), "{log}");
    assert!(log.contains("non-migratable"), "{log}");
    assert!(log.contains("one"), "{log}");
    assert!(snapshots(&worker).is_empty());

    let second = Job::script("echo two").extra(nvme).run(&worker);
    assert_eq!(second.state(), ResultState::Completed, "{second}");
    let log = second.log();
    assert!(
        !log.contains("boot snapshot"),
        "known not to work: not tried again\n{log}"
    );
    worker.assert_clean();
}

fn truncate(path: &Path, size: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}
