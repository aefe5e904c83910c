//! What the package installs: the systemd unit passes `systemd-analyze verify`, the
//! packaged worker.yml satisfies its schema and loads, and `serve` speaks systemd's
//! notify protocol (READY=1 once its API listens, WATCHDOG=1 at half of WATCHDOG_USEC,
//! STOPPING=1 at SIGTERM) to a real datagram socket.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qemu_worker::config::load_config;
use qemu_worker::schema::Document;
use test_support::require;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    require("systemd-analyze", "systemd");
    // verify wants ExecStart's program: a root with the built worker at /usr/bin.
    let root = tempfile::tempdir().expect("tempdir");
    let bin = root.path().join("usr/bin");
    std::fs::create_dir_all(&bin).expect("usr/bin");
    std::fs::copy(env!("CARGO_BIN_EXE_qemu-worker"), bin.join("qemu-worker")).expect("binary");
    let units = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&units).expect("unit dir");
    // And the host's own units (sysinit.target, network-online.target, ...), which
    // the unit's dependencies name.
    let system = root.path().join("usr/lib/systemd");
    std::fs::create_dir_all(&system).expect("usr/lib/systemd");
    let copied = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(&system)
        .status()
        .expect("cp");
    assert!(copied.success(), "cannot copy /usr/lib/systemd/system");
    std::os::unix::fs::symlink("usr/lib", root.path().join("lib")).expect("lib link");
    // ExecStartPre's program too.
    std::fs::copy("/usr/bin/mkdir", bin.join("mkdir")).expect("mkdir");
    std::os::unix::fs::symlink("usr/bin", root.path().join("bin")).expect("bin link");
    std::fs::copy(
        repo().join("packaging/qemu-worker.service"),
        units.join("qemu-worker.service"),
    )
    .expect("unit");
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .arg("qemu-worker.service")
        .output()
        .expect("systemd-analyze runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{said}");
    // Warnings about this unit are failures too: verify exits 0 on unknown keys and
    // values it cannot parse, naming the unit's file.
    let ours: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("qemu-worker.service"))
        .collect();
    assert!(ours.is_empty(), "{said}");
}

#[test]
fn the_packaged_worker_yml_satisfies_its_schema_and_loads() {
    let path = repo().join("packaging/worker.yml");
    let text = std::fs::read_to_string(&path).expect("packaging/worker.yml");
    let document = Document::parse(&text, 1 << 20).expect("it parses");
    let schema: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo().join("schemas/worker-config.schema.json")).expect("schema"),
    )
    .expect("schema JSON");
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(document.value())
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    assert_eq!(errors, Vec::<String>::new());
    let config = load_config(Some(&path)).expect("it loads").config;
    assert_eq!(config.state_dir, Path::new("/var/lib/qemu-worker"));
    assert_eq!(
        config.cloud_init.guest_tools,
        Path::new("/usr/lib/qemu-worker/qemu-worker-guest")
    );
}

/// The datagrams that arrive within `within`, until one starts with `until`.
fn receive_until(socket: &UnixDatagram, until: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .expect("timeout");
        let Ok(n) = socket.recv(&mut buffer) else {
            break;
        };
        let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
        let done = message.starts_with(until);
        got.push(message);
        if done {
            break;
        }
    }
    got
}

#[test]
fn serve_notifies_systemd_ready_watchdog_and_stopping() {
    let dir = tempfile::Builder::new()
        .prefix("qw-notify")
        .tempdir_in("/tmp")
        .expect("tempdir");
    std::fs::write(
        dir.path().join("worker.yml"),
        "stateDir: state\naccelerator: tcg\napi: {listen: \"127.0.0.1:0\"}\n",
    )
    .expect("worker.yml");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("notify socket");
    let serve = Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
        .arg("--config")
        .arg(dir.path().join("worker.yml"))
        .arg("serve")
        .env("NOTIFY_SOCKET", &socket_path)
        // Every 0.2 s (half of it).
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve starts");
    // Killed if an assertion fails first.
    let mut serve = KillOnDrop(serve);
    let first = receive_until(&socket, "READY=1", Duration::from_secs(60));
    let ready = first.iter().find(|m| m.starts_with("READY=1"));
    assert!(
        ready.is_some_and(|m| m.contains("STATUS=serving; API at 127.0.0.1:")),
        "{first:?}"
    );
    let pings = receive_until(&socket, "never", Duration::from_secs(2));
    let watchdog = pings.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(watchdog >= 3, "WATCHDOG=1 about every 0.2 s, got {pings:?}");
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&serve.0),
        rustix::process::Signal::TERM,
    )
    .expect("SIGTERM");
    let last = receive_until(&socket, "STOPPING=1", Duration::from_secs(30));
    assert!(last.iter().any(|m| m == "STOPPING=1"), "{last:?}");
    let status = serve.0.wait().expect("serve exits");
    assert!(status.success(), "{status}");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
