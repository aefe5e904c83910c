//! `serve`'s API without a guest: HTTPS with a certificate openssl makes, the CLI's
//! `--server` over HTTPS and over the default unix socket, and a job (whose payload is
//! malformed, so no VM starts) submitted, resolved and read back through the API.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use test_support::require;

/// `serve`, stopped (SIGTERM, then waited for) when dropped.
struct Serve {
    child: Child,
    log: std::path::PathBuf,
}

impl Serve {
    fn start(dir: &Path) -> Self {
        let log = dir.join("serve.log");
        let child = Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
            .args(["--config", "worker.yml", "serve"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("serve starts");
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id().cast_signed()) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CLI in `dir` with `QEMU_WORKER_TOKEN` set to `token`.
fn cli(dir: &Path, token: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
        .args(["--config", "worker.yml"])
        .args(args)
        .current_dir(dir)
        .env("QEMU_WORKER_TOKEN", token)
        .output()
        .expect("qemu-worker runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A token of `scope` and its worker.yml entry, from `qemu-worker token new`.
fn token(scope: &str) -> (String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
        .args(["token", "new", "--name", scope, "--scope", scope])
        .output()
        .expect("qemu-worker runs");
    assert!(output.status.success(), "{}", text(&output.stderr));
    let out = text(&output.stdout);
    let lines: Vec<&str> = out.lines().collect();
    (
        lines[0].to_owned(),
        lines[2].trim_start_matches("- ").to_owned(),
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn wait_for<T>(what: &str, serve: &Serve, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen; serve said:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn malformed_payload() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/malformed.yml"))
        .expect("the example")
}

#[test]
fn serve_speaks_https_and_the_cli_reaches_it_with_server() {
    require("openssl", "openssl");
    require("curl", "curl");
    let dir = tempfile::tempdir().expect("tempdir");
    // A CA and a server certificate it signs, as an operator's PKI would (webpki refuses
    // a self-signed CA certificate as the server's own).
    std::fs::write(
        dir.path().join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("extensions");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for args in [
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=qemu-worker test CA",
            ],
        ]
        .concat(),
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "key.pem",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ][..]
            .to_vec(),
    ] {
        let made = Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("openssl runs");
        assert!(
            made.status.success(),
            "openssl {args:?}: {}",
            text(&made.stderr)
        );
    }
    let (submit, submit_entry) = token("submit");
    let (read, read_entry) = token("read");
    let port = free_port();
    let server = format!("https://127.0.0.1:{port}");
    std::fs::write(
        dir.path().join("worker.yml"),
        format!(
            "stateDir: state\naccelerator: tcg\ncapacity: 1\n\
             api:\n  listen: 127.0.0.1:{port}\n  tls: {{certificate: cert.pem, key: key.pem}}\n\
             \x20 tokens:\n    - {submit_entry}\n    - {read_entry}\n\
             client: {{server: \"{server}\", caFile: ca.pem}}\n"
        ),
    )
    .expect("worker.yml");
    std::fs::write(dir.path().join("malformed.yml"), malformed_payload()).expect("payload");
    let serve = Serve::start(dir.path());
    let curl = |args: &[&str]| {
        Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("curl runs")
    };
    let health = wait_for("HTTPS /healthz", &serve, || {
        let out = curl(&["--cacert", "ca.pem", &format!("{server}/healthz")]);
        out.status.success().then(|| text(&out.stdout))
    });
    assert_eq!(health, r#"{"status":"ok"}"#);
    // Only HTTPS is served, and only to clients that trust the certificate.
    let plain = curl(&[&format!("http://127.0.0.1:{port}/healthz")]);
    assert!(
        !plain.status.success(),
        "plain HTTP answered: {}",
        text(&plain.stdout)
    );
    let untrusted = curl(&[&format!("{server}/healthz")]);
    assert_eq!(
        untrusted.status.code(),
        Some(60),
        "{}",
        text(&untrusted.stderr)
    );

    // The CLI, with worker.yml's client.server: submit, then read the job back.
    let submitted = cli(dir.path(), &submit, &["submit", "malformed.yml"]);
    assert!(submitted.status.success(), "{}", text(&submitted.stderr));
    let id = text(&submitted.stdout).trim().to_owned();
    assert!(id.starts_with("job-"), "{id}");
    let status: serde_json::Value = wait_for("the job to resolve", &serve, || {
        let out = cli(dir.path(), &read, &["status", "--json", &id]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        (status["state"] == "exception").then_some(status)
    });
    assert_eq!(status["report"]["reason"], "malformed-payload", "{status}");
    assert!(
        status["report"]["errors"]
            .to_string()
            .contains("/maxRunTime"),
        "every problem named: {status}"
    );
    let human = cli(dir.path(), &read, &["status", &id]);
    assert!(
        text(&human.stdout).contains("reason malformed-payload"),
        "{}",
        text(&human.stdout)
    );
    let listed = cli(dir.path(), &read, &["jobs", "--state", "exception"]);
    assert!(
        text(&listed.stdout).contains(&id),
        "{}",
        text(&listed.stdout)
    );
    let logs = cli(dir.path(), &read, &["logs", "--follow", &id]);
    assert!(logs.status.success(), "{}", text(&logs.stderr));
    let on_disk = std::fs::read(dir.path().join(format!("state/jobs/{id}/run-1/job.log")))
        .unwrap_or_default();
    assert_eq!(logs.stdout, on_disk, "the log byte for byte");
    let out = dir.path().join("out").display().to_string();
    let artifacts = cli(dir.path(), &read, &["artifacts", &id, "--out", &out]);
    assert_eq!(
        text(&artifacts.stdout),
        format!("0 file(s) copied into {out}\n")
    );
    let canceled = cli(dir.path(), &submit, &["cancel", &id]);
    // An ended job stays as it ended, and the CLI says so.
    assert_eq!(
        text(&canceled.stdout),
        format!("{id}: already ended (exception)\n"),
        "{}",
        text(&canceled.stderr)
    );
    let after: serde_json::Value =
        serde_json::from_slice(&cli(dir.path(), &read, &["status", "--json", &id]).stdout)
            .expect("JSON");
    assert_eq!(after["report"]["reason"], "malformed-payload", "{after}");

    // Errors: each names what is wrong, with the exit status the database path gives.
    let unknown = cli(dir.path(), &read, &["status", "job-00000000-nothere"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown.stderr));
    assert!(
        text(&unknown.stderr).contains("404 no-such-job"),
        "{}",
        text(&unknown.stderr)
    );
    let low = cli(dir.path(), &read, &["submit", "malformed.yml"]);
    assert_eq!(low.status.code(), Some(3));
    assert!(
        text(&low.stderr).contains("403 forbidden"),
        "{}",
        text(&low.stderr)
    );
    let wrong = cli(dir.path(), "qwt_wrong", &["jobs"]);
    assert!(
        text(&wrong.stderr).contains("401 unauthenticated"),
        "{}",
        text(&wrong.stderr)
    );
    std::fs::write(dir.path().join("bare.yml"), "stateDir: state\n").expect("config");
    let no_ca = Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
        .args(["--config", "bare.yml", "jobs", "--server", &server])
        .current_dir(dir.path())
        .env("QEMU_WORKER_TOKEN", &read)
        .output()
        .expect("qemu-worker runs");
    let said = text(&no_ca.stderr).to_ascii_lowercase();
    assert_eq!(no_ca.status.code(), Some(3), "{said}");
    assert!(
        said.contains("does not answer") && said.contains("certificate"),
        "{said}"
    );
    let bad = cli(dir.path(), &read, &["jobs", "--server", "ftp://127.0.0.1"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("\"ftp://127.0.0.1\""),
        "{}",
        text(&bad.stderr)
    );
    let misplaced = cli(
        dir.path(),
        &read,
        &["validate", "malformed.yml", "--server", &server],
    );
    assert_eq!(misplaced.status.code(), Some(2));
    assert!(
        text(&misplaced.stderr).contains("--server applies to"),
        "{}",
        text(&misplaced.stderr)
    );

    let log = serve.log();
    for secret in [&submit, &read, "qwt_wrong"] {
        assert!(!log.contains(secret), "a token in the log:\n{log}");
    }
}

#[test]
fn the_cli_reaches_the_default_unix_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (read, read_entry) = token("read");
    std::fs::write(
        dir.path().join("worker.yml"),
        format!("stateDir: state\naccelerator: tcg\napi:\n  tokens: [{read_entry}]\n"),
    )
    .expect("worker.yml");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{read}\n")).expect("token file");
    let serve = Serve::start(dir.path());
    let socket = dir.path().join("state/api.sock");
    wait_for("the API socket", &serve, || socket.exists().then_some(()));
    std::fs::write(
        dir.path().join("client.yml"),
        format!(
            "stateDir: elsewhere\nclient: {{server: \"unix:{}\", tokenFile: token}}\n",
            socket.display()
        ),
    )
    .expect("client.yml");
    // A client whose own stateDir has no queue: it can only be answered by the API.
    let listed = Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
        .args(["--config", "client.yml", "jobs"])
        .current_dir(dir.path())
        .env_remove("QEMU_WORKER_TOKEN")
        .output()
        .expect("qemu-worker runs");
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    assert_eq!(text(&listed.stdout), "");
    assert!(
        !dir.path().join("elsewhere").exists(),
        "the client opened a database"
    );
    let unknown = Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
        .args(["--config", "client.yml", "status", "job-00000000-nothere"])
        .current_dir(dir.path())
        .env_remove("QEMU_WORKER_TOKEN")
        .output()
        .expect("qemu-worker runs");
    assert!(
        text(&unknown.stderr).contains("404 no-such-job"),
        "{}",
        text(&unknown.stderr)
    );
    let mismatched = Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
        .args(["--config", "client.yml", "jobs"])
        .current_dir(dir.path())
        .env("QEMU_WORKER_TOKEN", "two words")
        .output()
        .expect("qemu-worker runs");
    assert_eq!(mismatched.status.code(), Some(2));
    assert!(
        text(&mismatched.stderr).contains("QEMU_WORKER_TOKEN"),
        "{}",
        text(&mismatched.stderr)
    );
}
