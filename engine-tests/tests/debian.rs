//! The debian-12-ci image (images/recipes/debian-12-ci.yml, built by `image build`):
//! systemd, networkd DHCP, qemu-ga and the guest tools as the documented unit, whose
//! output goes to the journal and never to the console. A CI job compiles and tests a C
//! program with its artifacts; the first job saves a boot snapshot, the next resumes it.
//! The same system as a GPT disk with no kernel member (images/recipes/
//! debian-12-ci-uefi.yml and -bios.yml: an EFI system partition with systemd-boot, and
//! syslinux for BIOS) boots with OVMF and with SeaBIOS, and resumes too. A failed job's
//! VM kept for a look takes shells (bash on a real pseudo-terminal) and goes on release.

use engine_tests::{Job, Worker, assets, base_config, with_setting};
use qemu_worker::job::ResultState;

fn worker() -> Worker {
    let config = with_setting(
        &base_config(),
        "limits",
        "{maxMemory: 512, maxCPUs: 1, defaultThreads: 1}",
    );
    Worker::with_config(&format!("{config}snapshots: {{enabled: true}}\n"))
}

/// A small C project: a Makefile whose `test` target builds with gcc, runs the program
/// and writes a report.
const BUILD_AND_TEST: &str = r#"set -e
mkdir -p /root/project/out && cd /root/project
cat > add.c <<'C'
#include <stdio.h>
int main(void) { printf("2+3=%d\n", 2 + 3); return 0; }
C
printf 'test: add\n\t./add > out/report.txt\n\tgrep -q "2+3=5" out/report.txt\nadd: add.c\n\tgcc -O2 -o add add.c\n' > Makefile
make test
gcc --version | head -1 > out/gcc.txt
echo "system=$(systemctl is-system-running --wait)"
echo "unit=$(systemctl show -p StandardOutput --value qemu-worker-guest.service)"
"#;

fn job(image: &str) -> Job {
    Job::script(BUILD_AND_TEST)
        .image(image)
        .max_run_time(600)
        .file_artifact("/root/project/out/report.txt", "report.txt")
        .directory_artifact("/root/project/out", "out")
}

#[test]
fn a_ci_job_builds_and_tests_c_and_the_second_job_resumes_the_boot_snapshot() {
    let worker = worker();
    let image = assets::debian_ci_image().display().to_string();

    let first = job(&image).run(&worker);
    assert_eq!(first.state(), ResultState::Completed, "{first}");
    let log = first.log();
    assert!(log.contains("system=running"), "{log}");
    // The unit as documented: its output goes to the journal, so the snapshot's
    // handshake cannot have been read off the console.
    assert!(log.contains("unit=journal"), "{log}");
    assert!(log.contains("saved boot snapshot"), "{log}");
    assert_eq!(first.artifact("report.txt"), Some(b"2+3=5\n".to_vec()));
    let gcc = first.artifact("out/gcc.txt").expect("out/gcc.txt");
    assert!(String::from_utf8_lossy(&gcc).starts_with("gcc"), "{gcc:?}");
    let console = std::fs::read_to_string(first.job_dir.join("console.log")).expect("console");
    assert!(
        !console.contains("qemu-worker-guest ["),
        "the tools' output reached the console: {console}"
    );

    let second = job(&image).run(&worker);
    assert_eq!(second.state(), ResultState::Completed, "{second}");
    let log = second.log();
    assert!(log.contains("resumed from boot snapshot"), "{log}");
    assert!(log.contains("system=running"), "{log}");
    assert_eq!(second.artifact("report.txt"), Some(b"2+3=5\n".to_vec()));
    worker.assert_clean();
}

/// A GPT disk variant of debian-12-ci (no kernel member) booted by `firmware`: the CI
/// job runs and saves a snapshot, the second job resumes it and sees how it booted.
fn disk_variant_runs_and_resumes(firmware: &str, efi: bool) {
    let worker = worker();
    let image = assets::debian_ci_disk_image(firmware).display().to_string();
    let probe = "echo firmware=$(test -d /sys/firmware/efi && echo efi || echo bios); \
                 echo root=$(findmnt -no SOURCE /); echo kernel-args=$(cat /proc/cmdline)";

    let first = job(&image).run(&worker);
    assert_eq!(first.state(), ResultState::Completed, "{first}");
    assert!(
        first.log().contains("saved boot snapshot"),
        "{}",
        first.log()
    );
    assert_eq!(first.artifact("report.txt"), Some(b"2+3=5\n".to_vec()));

    let second = Job::script(probe)
        .image(&image)
        .max_run_time(300)
        .run(&worker);
    assert_eq!(second.state(), ResultState::Completed, "{second}");
    let log = second.log();
    assert!(log.contains("resumed from boot snapshot"), "{log}");
    // Booted from the disk's own partitions by its boot loader.
    let expected = if efi { "firmware=efi" } else { "firmware=bios" };
    assert!(log.contains(expected), "{log}");
    assert!(log.contains("root=/dev/vda2"), "{log}");
    assert!(log.contains("root=PARTUUID="), "{log}");
    worker.assert_clean();
}

#[test]
fn the_uefi_disk_variant_boots_with_ovmf_runs_the_job_and_resumes() {
    disk_variant_runs_and_resumes("uefi", true);
}

#[test]
fn the_bios_disk_variant_boots_with_seabios_runs_the_job_and_resumes() {
    disk_variant_runs_and_resumes("bios", false);
}

const ADMIN: &str = "qwt_debian-shell-admin-token-000000000000000000000000000000000000";

/// On systemd: a failed job's VM kept for a look (payload `debug.keepAliveOnFailure`)
/// takes a shell through a real pseudo-terminal (bash as a login shell, its prompt, a
/// resize), a piped command sees systemd running, and `release` tears the VM down with
/// nothing left behind.
#[test]
fn a_failed_jobs_kept_vm_takes_a_shell_on_systemd() {
    use std::time::Duration;

    let port = engine_tests::free_port();
    let api = format!(
        "{{listen: \"127.0.0.1:{port}\", tokens: [{{name: admin, scope: admin, sha256: {}}}]}}",
        assets::sha256_hex(ADMIN.as_bytes())
    );
    let config = with_setting(
        &with_setting(
            &with_setting(
                &base_config(),
                "limits",
                "{maxMemory: 512, maxCPUs: 1, defaultThreads: 1}",
            ),
            "api",
            &api,
        ),
        "debug",
        "{maxKeepAliveMinutes: 5}",
    );
    let worker = Worker::with_config(&config);
    let _serve = worker.serve();
    let image = assets::debian_ci_image().display().to_string();
    let job = worker.submit(
        &Job::script("echo failing-on-purpose; exit 1")
            .image(&image)
            .max_run_time(600)
            .extra("debug: {keepAliveOnFailure: 5}\n"),
    );
    engine_tests::wait_until(
        "the job to fail",
        Duration::from_secs(600),
        Duration::from_millis(500),
        || (worker.status(&job)["state"] == "failed").then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}; serve said:\n{}", worker.serve_log()));

    let piped = worker
        .command(&[
            "shell",
            &job,
            "--",
            "/bin/sh",
            "-c",
            "systemctl is-system-running",
        ])
        .env("QEMU_WORKER_TOKEN", ADMIN)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("qemu-worker runs");
    assert_eq!(
        String::from_utf8_lossy(&piped.stdout).trim(),
        "running",
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );

    let mut command = worker.command(&["shell", &job]);
    command.env("QEMU_WORKER_TOKEN", ADMIN).env("TERM", "vt100");
    let mut pty = engine_tests::pty::Pty::spawn(command, 24, 80);
    let t = Duration::from_secs(60);
    pty.expect("# ", t); // bash's root prompt
    pty.type_text("echo $((6*7)) $(shopt -q login_shell && echo log''in)\r");
    pty.expect("42 login", t); // a login shell
    pty.resize(40, 100);
    // The resize travels beside the keys: ask until the guest's terminal has it.
    let resized = (0..20).any(|_| {
        let before = pty.shown().len();
        pty.type_text("stty size\r");
        engine_tests::wait_until(
            "stty size",
            Duration::from_secs(2),
            Duration::from_millis(50),
            || pty.shown()[before..].contains("40 100").then_some(()),
        )
        .is_ok()
    });
    assert!(resized, "stty size never said 40 100:\n{}", pty.shown());
    pty.type_text("exit 5\r");
    assert_eq!(pty.wait(t).code(), Some(5), "{}", pty.shown());

    let released = worker
        .command(&["release", &job])
        .env("QEMU_WORKER_TOKEN", ADMIN)
        .output()
        .expect("qemu-worker runs");
    assert!(
        released.status.success(),
        "{}",
        String::from_utf8_lossy(&released.stderr)
    );
    engine_tests::wait_until(
        "nothing left behind",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || worker.leftovers().is_empty().then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", worker.leftovers()));
}
