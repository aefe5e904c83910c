//! Shells into a running job (`qemu-worker shell`) on the test image under `serve`,
//! driven through a real pseudo-terminal as a user would: typed arithmetic comes back
//! computed, a resize reaches the guest's terminal, Ctrl-C interrupts the guest's
//! command, `exit 3` is the CLI's exit status; piped stdin works without a terminal;
//! two shells at once and an artifact collection during a shell all work; the failed
//! job's kept VM still takes shells until its time is up, which ends them and leaves
//! nothing behind; a shell on a job that has no VM is a clear error, as is one without
//! the admin scope.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use engine_tests::pty::Pty;
use engine_tests::{Job, Worker, base_config, free_port, wait_until, with_setting};

const ADMIN: &str = "qwt_shell-test-admin-token-00000000000000000000000000000000000000";
const READER: &str = "qwt_shell-test-read-token-000000000000000000000000000000000000000";
const T: Duration = Duration::from_secs(60);

/// `qemu-worker shell JOB ARGS…` on a terminal of its own.
fn shell_on_pty(worker: &Worker, job: &str, args: &[&str]) -> Pty {
    let mut all = vec!["shell", job];
    all.extend_from_slice(args);
    let mut command = worker.command(&all);
    command.env("QEMU_WORKER_TOKEN", ADMIN).env("TERM", "vt100");
    let mut pty = Pty::spawn(command, 24, 80);
    pty.expect("# ", T); // busybox sh's prompt
    pty
}

/// Types `stty size` until the guest's terminal says `rows cols` (the resize travels
/// beside the keystrokes, so the first may overtake it).
fn expect_size(pty: &mut Pty, rows: u16, cols: u16) {
    let wanted = format!("{rows} {cols}");
    for _ in 0..20 {
        pty.type_text("stty size\r");
        let shown = pty.shown();
        if wait_until(
            "the size",
            Duration::from_secs(2),
            Duration::from_millis(50),
            || pty.shown()[shown.len()..].contains(&wanted).then_some(()),
        )
        .is_ok()
        {
            return;
        }
    }
    panic!("stty size never said {wanted}:\n{}", pty.shown());
}

#[test]
fn a_shell_reaches_a_running_job_and_its_kept_vm() {
    let port = free_port();
    let tokens = format!(
        "[{{name: admin, scope: admin, sha256: {}}}, {{name: reader, scope: read, sha256: {}}}]",
        engine_tests::assets::sha256_hex(ADMIN.as_bytes()),
        engine_tests::assets::sha256_hex(READER.as_bytes())
    );
    let config = with_setting(
        &with_setting(
            &with_setting(&base_config(), "capacity", "1"),
            "api",
            &format!("{{listen: \"127.0.0.1:{port}\", tokens: {tokens}}}"),
        ),
        "debug",
        "{maxKeepAliveMinutes: 5}",
    );
    let worker = Worker::with_config(&config);
    let _serve = worker.serve();
    let cli = |token: &str, args: &[&str]| {
        worker
            .command(args)
            .env("QEMU_WORKER_TOKEN", token)
            .stdin(Stdio::null())
            .output()
            .expect("qemu-worker runs")
    };

    // The job waits for a shell to tell it to go on, then writes an artifact and fails
    // (its VM kept for a minute).
    let job = worker.submit(
        &Job::script(
            "echo waiting-for-go; while [ ! -e /tmp/go ]; do sleep 0.2; done; \
             head -c 3000000 /dev/urandom > /tmp/big.bin; sha256sum /tmp/big.bin > /tmp/big.sum; \
             echo collected-next; exit 1",
        )
        .max_run_time(600)
        .file_artifact("/tmp/big.bin", "public/big.bin")
        .extra("debug: {keepAliveOnFailure: 1}\n"),
    );
    worker.wait_for("the job to start waiting", 240, || {
        worker.job_log(&job).contains("waiting-for-go")
    });

    // Without admin: refused before anything starts.
    let refused = cli(READER, &["shell", &job, "--", "true"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(3), "{said}");
    assert!(said.contains("403") && said.contains("admin"), "{said}");

    // A terminal: arithmetic, a resize, Ctrl-C.
    let mut first = shell_on_pty(&worker, &job, &[]);
    first.type_text("echo $((6*7))\r");
    first.expect("42", T);
    expect_size(&mut first, 24, 80);
    first.resize(50, 132);
    expect_size(&mut first, 50, 132);
    first.type_text("sleep 600\r");
    std::thread::sleep(Duration::from_millis(300));
    first.type_text("\x03");
    first.type_text("echo after-ctrl-c-$((1+1))\r");
    first.expect("after-ctrl-c-2", T);

    // A second one at the same time, each answering for itself.
    let mut second = shell_on_pty(&worker, &job, &[]);
    second.type_text("echo second-$((2*5))\r");
    second.expect("second-10", T);
    first.type_text("echo first-$((3*5))\r");
    first.expect("first-15", T);

    // Piped, no terminal: stdin is the script, stdout comes back apart from stderr.
    let mut piped = worker
        .command(&["shell", &job])
        .env("QEMU_WORKER_TOKEN", ADMIN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("shell starts");
    piped
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"echo piped-$((2*3)); echo to-stderr >&2; exit 4\n")
        .expect("stdin takes the script");
    let piped = piped.wait_with_output().expect("shell ends");
    assert_eq!(
        piped.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&piped.stdout), "piped-6\n");
    assert_eq!(String::from_utf8_lossy(&piped.stderr), "to-stderr\n");

    // A client that goes away takes its command with it (taskcluster's
    // TestAbortSleepCommand): the guest has no `sleep 987` left.
    let mut aborted = worker
        .command(&["shell", &job, "--", "/bin/sleep", "987"])
        .env("QEMU_WORKER_TOKEN", ADMIN)
        .stdin(Stdio::null())
        .spawn()
        .expect("shell starts");
    let sleeping = |pty: &mut Pty| {
        pty.type_text("ps | grep -c '[s]leep 987'\r");
        let before = pty.shown().len();
        wait_until(
            "ps",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || {
                let shown = pty.shown();
                let tail = &shown[before..];
                ["\n0\r", "\n1\r"]
                    .iter()
                    .find(|c| tail.contains(**c))
                    .map(|c| *c == "\n1\r")
            },
        )
        .unwrap_or_else(|e| panic!("{e}:\n{}", pty.shown()))
    };
    wait_until("the sleep to start", T, Duration::from_millis(200), || {
        sleeping(&mut first).then_some(())
    })
    .expect("sleep 987 runs in the guest");
    aborted.kill().expect("kill");
    let _ = aborted.wait();
    wait_until(
        "the sleep to be killed",
        T,
        Duration::from_millis(200),
        || (!sleeping(&mut first)).then_some(()),
    )
    .expect("sleep 987 is gone once its client went away");

    // A command as it is, its status the CLI's.
    let seven = cli(ADMIN, &["shell", &job, "--", "/bin/sh", "-c", "exit 7"]);
    assert_eq!(seven.status.code(), Some(7));
    let missing = cli(ADMIN, &["shell", &job, "--", "/no/such/program"]);
    assert_eq!(missing.status.code(), Some(127));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("/no/such/program cannot be started"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    // The job goes on while both shells are open: its artifact is collected on the same
    // agent port, whole, and both shells still answer afterwards.
    second.type_text("while true; do echo tick; sleep 0.1; done\r");
    second.expect("tick", T);
    first.type_text("touch /tmp/go\r");
    worker.wait_for("the job to fail", 240, || {
        worker.status(&job)["state"] == "failed"
    });
    let status = worker.status(&job);
    let artifacts = status["report"]["artifacts"].as_array().expect("artifacts");
    let big = artifacts
        .iter()
        .find(|a| a["name"] == "public/big.bin")
        .unwrap_or_else(|| panic!("collected: {status}"));
    assert_eq!(big["size"], 3_000_000, "{status}");
    first.type_text("cat /tmp/big.sum\r");
    first.expect(big["sha256"].as_str().expect("sha256"), T);
    second.type_text("\x03");
    second.type_text("echo still-$((3+4))\r");
    second.expect("still-7", T);

    // The kept VM takes new shells; `exit 3` is the status.
    let mut third = shell_on_pty(&worker, &job, &[]);
    third.type_text("exit 3\r");
    assert_eq!(third.wait(T).code(), Some(3), "{}", third.shown());

    // When its time is up, the VM goes and its shells end with it.
    worker.wait_for("the kept VM's time to run out", 180, || {
        worker.job_log(&job).contains("torn down: its time was up")
    });
    let ended = first.wait(T);
    assert_eq!(ended.code(), Some(3), "{}", first.shown());
    assert!(
        first.shown().contains("the shell was lost"),
        "{}",
        first.shown()
    );
    drop(second);
    worker.wait_for("nothing left behind", 30, || worker.leftovers().is_empty());

    // No VM: a clear refusal, for an ended job; and a job that does not exist.
    let late = cli(ADMIN, &["shell", &job, "--", "true"]);
    let said = String::from_utf8_lossy(&late.stderr);
    assert_eq!(late.status.code(), Some(2), "{said}");
    assert!(
        said.contains("409 not-running") && said.contains("it ended"),
        "{said}"
    );
    let unknown = cli(ADMIN, &["shell", "no-such-job", "--", "true"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("404"));
}

/// Guest tools that die and are restarted by the image's init take their shells with
/// them; the new tools say so when they open the port, and the shell's client is told
/// instead of waiting for the VM to end.
#[test]
fn a_shell_ends_when_the_guest_tools_restart() {
    let port = free_port();
    let tokens = format!(
        "[{{name: admin, scope: admin, sha256: {}}}]",
        engine_tests::assets::sha256_hex(ADMIN.as_bytes())
    );
    let config = with_setting(
        &base_config(),
        "api",
        &format!("{{listen: \"127.0.0.1:{port}\", tokens: {tokens}}}"),
    );
    let worker = Worker::with_config(&config);
    let _serve = worker.serve();
    let job = worker.submit(&Job::script("echo waiting; sleep 600").max_run_time(600));
    worker.wait_for("the job to run", 240, || {
        worker.job_log(&job).contains("waiting")
    });
    // The command's parent is the guest tools: it kills them, and waits.
    let ended = worker
        .command(&[
            "shell",
            &job,
            "--",
            "/bin/sh",
            "-c",
            "kill -9 $PPID; sleep 300",
        ])
        .env("QEMU_WORKER_TOKEN", ADMIN)
        .stdin(Stdio::null())
        .output()
        .expect("qemu-worker runs");
    let said = String::from_utf8_lossy(&ended.stderr);
    assert_eq!(ended.status.code(), Some(3), "{said}");
    assert!(
        said.contains("the shell was lost") && said.contains("the guest tools restarted"),
        "{said}"
    );
    // The restarted tools still serve the port: a new shell works.
    let again = worker
        .command(&["shell", &job, "--", "/bin/sh", "-c", "echo back-$((2+3))"])
        .env("QEMU_WORKER_TOKEN", ADMIN)
        .stdin(Stdio::null())
        .output()
        .expect("qemu-worker runs");
    assert_eq!(
        (
            again.status.code(),
            String::from_utf8_lossy(&again.stdout).as_ref()
        ),
        (Some(0), "back-5\n"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let _ = worker.cli(&["cancel", &job]);
    worker.wait_for("the job to end", 60, || {
        worker.status(&job)["state"] == "exception"
    });
}
