//! The VM runtime against real programs, without a guest: QEMU started with no disk
//! answers QMP and screendump under the supervisor; the host's own qemu-ga answers QGA;
//! the accelerator probe runs real QEMU.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qemu_worker::config::AcceleratorChoice;
use qemu_worker::qemu::{QgaClient, QgaError};
use qemu_worker::vm::{
    Accelerator, PROBE_DEADLINE, RunDir, StopStep, Vm, VmError, VmExit, VmLaunch, VmTimeouts,
    choose_accelerator, probe, take_screenshot,
};
use test_support::{processes_under, require};

fn scratch() -> tempfile::TempDir {
    // Short paths: unix socket names are limited to 108 bytes.
    tempfile::Builder::new()
        .prefix("qw-rt")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

fn quick() -> VmTimeouts {
    VmTimeouts {
        qmp: Duration::from_secs(10),
        powerdown: Duration::from_secs(1),
        powerdown_resend: Duration::from_millis(300),
        exit: Duration::from_secs(5),
    }
}

/// A VM with no disk (SeaBIOS finds nothing to boot) but a VGA display.
fn diskless(dir: &Path, name: &str, extra: &[&str]) -> VmLaunch {
    let run = dir.join(name);
    let run_dir = RunDir::new(&run).expect("run dir");
    let mut argv: Vec<String> = [
        "-S",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-m",
        "32",
        "-device",
        "VGA",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    argv.push("-chardev".into());
    argv.push(format!(
        "socket,id=qmp0,path={},server=on,wait=off",
        run_dir.qmp_socket()
    ));
    argv.extend(["-mon".into(), "chardev=qmp0,mode=control".into()]);
    argv.push("-chardev".into());
    argv.push(format!("file,id=serial0,path={}", run_dir.serial_log()));
    argv.extend(["-serial".into(), "chardev:serial0".into()]);
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    VmLaunch {
        argv,
        run_dir,
        job_dir: qemu_worker::job::JobDir::at(dir.join(format!("{name}-logs"))),
        netns: None,
        max_console: 1 << 20,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_supervisor_starts_paused_resumes_screenshots_and_stops() {
    require("qemu-system-x86_64", "qemu-system-x86");
    let dir = scratch();
    let launch = diskless(dir.path(), "vm", &[]);
    let log_dir = launch.job_dir.path().to_path_buf();
    let vm = Vm::start(launch, quick()).await.expect("QEMU starts");
    let status = vm
        .qmp()
        .query_status(Duration::from_secs(5))
        .await
        .expect("status");
    assert_eq!(
        (status.status.as_str(), status.running),
        ("prelaunch", false)
    );

    vm.resume().await.expect("cont");
    let status = vm
        .qmp()
        .query_status(Duration::from_secs(5))
        .await
        .expect("status");
    assert!(status.running, "{status:?}");
    let (history, _) = vm.qmp().subscribe().await.expect("subscribe");
    assert!(history.iter().any(|e| e.name == "RESUME"), "{history:?}");

    let shot = take_screenshot(vm.qmp(), vm.run_dir().path(), Duration::from_secs(5))
        .await
        .expect("screenshot");
    assert_eq!(&shot.png[..4], b"\x89PNG");
    assert!(
        shot.width >= 320 && shot.height >= 200,
        "{}x{}",
        shot.width,
        shot.height
    );

    let run_dir = vm.run_dir().path().to_path_buf();
    let mut vm = vm;
    // SeaBIOS with nothing to boot ignores ACPI power-down: the worker has to quit QEMU.
    let exit = vm.stop().await;
    assert_eq!(
        exit,
        VmExit::Stopped {
            step: StopStep::Quit
        }
    );
    assert_eq!(vm.teardown().await, exit);
    assert!(!run_dir.exists(), "the run dir is removed");
    assert!(log_dir.join("qemu.log").exists() && log_dir.join("console.log").exists());
    assert!(processes_under(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_qemu_that_fails_to_start_is_reported_with_its_stderr() {
    require("qemu-system-x86_64", "qemu-system-x86");
    let dir = scratch();
    let launch = diskless(
        dir.path(),
        "bad",
        &[
            "-blockdev",
            r#"{"driver":"file","filename":"/nonexistent/disk.img","node-name":"d0"}"#,
        ],
    );
    let run_dir = launch.run_dir.path().to_path_buf();
    let error = Vm::start(launch, quick()).await.expect_err("missing disk");
    match &error {
        VmError::QemuFailed { stderr_tail, .. } => {
            assert!(
                stderr_tail.contains("/nonexistent/disk.img"),
                "{stderr_tail}"
            );
        }
        other => panic!("expected a QEMU failure, got {other:?}"),
    }
    assert!(!run_dir.exists(), "nothing is left after a failed start");
    assert!(processes_under(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_exiting_on_its_own_is_classified() {
    require("qemu-system-x86_64", "qemu-system-x86");
    let dir = scratch();
    let vm = Vm::start(diskless(dir.path(), "exits", &[]), quick())
        .await
        .expect("starts");
    // Killed from outside: neither a guest shutdown nor our stop sequence.
    let pid = qemu_pid(dir.path());
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    let mut vm = vm;
    let exit = vm.wait(Duration::from_secs(10)).await.expect("exited");
    assert!(
        matches!(exit, VmExit::QemuFailed { code: None, .. }),
        "{exit:?}"
    );
    vm.teardown().await;
}

fn qemu_pid(dir: &Path) -> u32 {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .find_map(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (text.contains("qemu-system") && text.contains(&needle))
                .then(|| entry.file_name().to_string_lossy().parse().ok())
                .flatten()
        })
        .expect("QEMU is running")
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_left_after_many_vms_with_mixed_outcomes() {
    require("qemu-system-x86_64", "qemu-system-x86");
    let dir = scratch();
    for round in 0..6 {
        let name = format!("vm{round}");
        match round % 3 {
            0 => {
                let vm = Vm::start(diskless(dir.path(), &name, &[]), quick())
                    .await
                    .expect("starts");
                vm.teardown().await;
            }
            1 => {
                let launch = diskless(dir.path(), &name, &["-device", "no-such-device"]);
                Vm::start(launch, quick()).await.expect_err("bad device");
            }
            _ => {
                // Dropped without teardown, as on a panic: the guard still cleans up.
                let vm = Vm::start(diskless(dir.path(), &name, &[]), quick())
                    .await
                    .expect("starts");
                drop(vm);
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        processes_under(dir.path()).is_empty(),
        "{:?}",
        processes_under(dir.path())
    );
    let left: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .expect("scratch")
        .flatten()
        .map(|e| e.path())
        .filter(|p| !p.to_string_lossy().ends_with("-logs"))
        .collect();
    assert!(left.is_empty(), "run dirs or sockets left: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_accelerator_probe_tells_working_from_hanging() {
    require("qemu-system-x86_64", "qemu-system-x86");
    probe(Accelerator::Tcg, PROBE_DEADLINE)
        .await
        .expect("the probe guest runs under TCG");
    let kvm = probe(Accelerator::Kvm, PROBE_DEADLINE).await;
    let auto = choose_accelerator(AcceleratorChoice::Auto)
        .await
        .expect("auto always chooses");
    assert_eq!(
        auto == Accelerator::Kvm,
        kvm.is_ok(),
        "auto must follow the KVM probe ({kvm:?})"
    );
    let forced = choose_accelerator(AcceleratorChoice::Kvm).await;
    assert_eq!(
        forced.is_ok(),
        kvm.is_ok(),
        "kvm fails exactly when the probe fails"
    );
    assert_eq!(
        choose_accelerator(AcceleratorChoice::Tcg)
            .await
            .expect("tcg"),
        Accelerator::Tcg
    );
}

/// The host's qemu-ga on a unix socket, with the commands that would touch the host's
/// power or clock blocked.
struct HostAgent {
    child: Child,
    socket: PathBuf,
}

impl HostAgent {
    fn start(dir: &Path, name: &str, also_block: &[&str]) -> Self {
        require("qemu-ga", "qemu-guest-agent");
        let socket = dir.join(format!("{name}.sock"));
        let state = dir.join(format!("{name}-state"));
        std::fs::create_dir_all(&state).expect("state dir");
        let mut blocked = vec![
            "guest-shutdown",
            "guest-suspend-disk",
            "guest-suspend-ram",
            "guest-suspend-hybrid",
            "guest-set-time",
            "guest-set-user-password",
            "guest-set-vcpus",
            "guest-set-memory-blocks",
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-freeze-list",
            "guest-fstrim",
        ];
        blocked.extend_from_slice(also_block);
        let child = Command::new("qemu-ga")
            .args(["-m", "unix-listen", "-p"])
            .arg(&socket)
            .arg("-t")
            .arg(&state)
            .args(["-b", &blocked.join(",")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-ga starts");
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, socket }
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn qga_syncs_pings_and_reads_files_with_checksums_and_caps() {
    let dir = scratch();
    let agent = HostAgent::start(dir.path(), "qga", &[]);
    let mut qga = QgaClient::connect(&agent.socket, T).await.expect("sync");
    qga.ping(T).await.expect("ping");
    let info = qga.info(T).await.expect("info");
    assert!(
        info["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("7.")),
        "{info}"
    );

    let file = dir.path().join("data.bin");
    let data: Vec<u8> = (0..(9 << 20) + 123)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &data).expect("write");
    let mut sink = Vec::new();
    let read = qga
        .file_read(file.to_str().expect("utf-8"), &mut sink, 64 << 20, T)
        .await
        .expect("read");
    assert_eq!(sink, data);
    assert_eq!(read.bytes, data.len() as u64);
    use sha2::Digest;
    let digest: [u8; 32] = sha2::Sha256::digest(&data).into();
    assert_eq!(
        read.sha256,
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );

    let error = qga
        .file_read(file.to_str().expect("utf-8"), &mut Vec::new(), 1 << 20, T)
        .await
        .expect_err("over the cap");
    assert!(matches!(error, QgaError::TooLarge { .. }), "{error}");
    // The handle was closed and the agent is still in sync.
    qga.ping(T).await.expect("ping after a capped read");

    let error = qga
        .file_read("/nonexistent/file", &mut Vec::new(), 1 << 20, T)
        .await
        .expect_err("missing");
    assert!(matches!(error, QgaError::Command { .. }), "{error}");
}

#[tokio::test]
async fn qga_exec_reports_exit_codes_signals_and_output() {
    let dir = scratch();
    let agent = HostAgent::start(dir.path(), "exec", &[]);
    let mut qga = QgaClient::connect(&agent.socket, T).await.expect("sync");
    let out = qga
        .exec("/bin/sh", &["-c", "echo out; echo err >&2; exit 3"], T)
        .await
        .expect("exec");
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    let killed = qga
        .exec("/bin/sh", &["-c", "kill -9 $$"], T)
        .await
        .expect("exec");
    assert_eq!(killed.signal, Some(9), "{killed:?}");
}

#[tokio::test]
async fn qga_checks_that_a_command_is_enabled_before_using_it() {
    let dir = scratch();
    let agent = HostAgent::start(dir.path(), "blocked", &["guest-exec", "guest-exec-status"]);
    let mut qga = QgaClient::connect(&agent.socket, T).await.expect("sync");
    let error = qga.exec("/bin/true", &[], T).await.expect_err("blocked");
    assert!(
        matches!(error, QgaError::Disabled { ref command } if command == "guest-exec"),
        "{error}"
    );
    let error = qga.shutdown(T).await.expect_err("blocked");
    assert!(matches!(error, QgaError::Disabled { .. }), "{error}");
}

#[tokio::test]
async fn qga_gives_up_when_no_agent_answers() {
    let dir = scratch();
    // A socket that accepts but never answers, like a guest whose agent is not up.
    let socket = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let error = QgaClient::connect(&socket, Duration::from_millis(1500))
        .await
        .expect_err("no agent");
    assert!(matches!(error, QgaError::NoAgent(_)), "{error}");
    drop(listener);
}

#[test]
fn a_guestfwd_helper_in_a_session_of_its_own_goes_with_its_run_dir() {
    // slirp starts each helper with setsid, out of QEMU's process group; one whose
    // connection stays half open would otherwise outlive its VM.
    let dir = scratch();
    let run = dir.path().join("run/j1-0");
    std::fs::create_dir_all(&run).expect("run dir");
    let socket = run.join("meta.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let mut helper = Command::new("setsid")
        .arg(env!("CARGO_BIN_EXE_qemu-worker"))
        .arg("metadata-splice")
        .arg(&socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("setsid (util-linux) runs the helper");
    let (_connection, _) = listener.accept().expect("the helper connects");
    assert_eq!(
        processes_under(dir.path()).len(),
        1,
        "the helper runs, blocked on its connection"
    );
    // A sibling run dir's helpers are not touched.
    assert_eq!(
        qemu_worker::vm::kill_strays(&dir.path().join("run/j2-0")),
        0
    );
    assert!(helper.try_wait().expect("try_wait").is_none());

    assert_eq!(qemu_worker::vm::kill_strays(&run), 1);
    let status = helper.wait().expect("wait");
    assert!(!status.success(), "killed, not finished: {status}");
    assert_eq!(processes_under(dir.path()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_discarded_vm_is_quit_without_waiting_for_a_power_off() {
    require("qemu-system-x86_64", "qemu-system-x86");
    let dir = scratch();
    // An hour to power off: a discard that asked for one would hang here (SeaBIOS with
    // nothing to boot never answers ACPI) until nextest ends the test.
    let timeouts = VmTimeouts {
        powerdown: Duration::from_secs(3600),
        ..quick()
    };
    let launch = diskless(dir.path(), "discard", &[]);
    let run_dir = launch.run_dir.path().to_path_buf();
    let vm = Vm::start(launch, timeouts).await.expect("start");
    vm.resume().await.expect("cont");
    let exit = vm.discard().await;
    assert_eq!(
        exit,
        VmExit::Stopped {
            step: StopStep::Quit
        }
    );
    assert!(!run_dir.exists(), "the run dir is removed");
    assert!(processes_under(dir.path()).is_empty());
}
