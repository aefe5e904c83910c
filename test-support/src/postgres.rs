//! A real PostgreSQL server per test: Debian's binaries, a fresh cluster in a temporary
//! directory, listening only on a unix socket there, with fsync off. Stopped when the
//! handle drops, and killed with the test process if that dies first (parent-death
//! signal), so no server outlives its test.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian installs the server binaries.
const BIN: &str = "/usr/lib/postgresql/15/bin";

#[derive(Debug)]
pub struct TestPostgres {
    server: Child,
    dir: tempfile::TempDir,
}

fn postgres_ids() -> (u32, u32) {
    let line = |file: &str| {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("postgres:"))
            .map(str::to_owned)
    };
    let user = line("/etc/passwd")
        .expect("no `postgres` user: install PostgreSQL 15 with `apt-get install postgresql-15`");
    let fields: Vec<&str> = user.split(':').collect();
    (
        fields[2].parse().expect("postgres uid"),
        fields[3].parse().expect("postgres gid"),
    )
}

impl TestPostgres {
    /// Starts a server and creates database `queue`; panics with what to install when
    /// PostgreSQL 15 is missing.
    pub fn start() -> Self {
        assert!(
            Path::new(BIN).join("postgres").exists(),
            "PostgreSQL 15 is missing: install it with `apt-get install postgresql-15` \
             (scripts/setup-host does)"
        );
        let (uid, gid) = postgres_ids();
        let dir = tempfile::tempdir().expect("tempdir");
        // The server runs as `postgres` (initdb refuses root): it owns the directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        let data = dir.path().join("data");
        let initdb = Command::new(Path::new(BIN).join("initdb"))
            .args([
                "--no-sync",
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&data)
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        let mut command = Command::new(Path::new(BIN).join("postgres"));
        command
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(dir.path())
            .args([
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=100",
            ])
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("server.log")).expect("log"),
            ));
        // SAFETY: prctl is async-signal-safe; it only sets this child's death signal.
        unsafe {
            command.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))
                .map_err(std::io::Error::from)
            });
        }
        let server = command.spawn().expect("start postgres");
        let mut this = Self { server, dir };
        this.wait_ready();
        this
    }

    /// Waits until the server accepts connections, then creates database `queue`.
    fn wait_ready(&mut self) {
        let admin = format!(
            "postgresql://postgres@/postgres?host={}",
            self.dir.path().display()
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.server.try_wait() {
                panic!("postgres exited with {status}: {}", self.log());
            }
            // Off any async executor: the synchronous client runs a runtime of its own.
            let attempt = std::thread::scope(|s| {
                s.spawn(|| {
                    postgres::Client::connect(&admin, postgres::NoTls)
                        .and_then(|mut c| c.batch_execute("CREATE DATABASE queue"))
                })
                .join()
                .expect("connect thread")
            });
            match attempt {
                Ok(()) => return,
                Err(error) => assert!(
                    Instant::now() < deadline,
                    "postgres did not become ready: {error}\n{}",
                    self.log()
                ),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The connection URL of database `queue` (unix socket, user `postgres`).
    pub fn url(&self) -> String {
        format!(
            "postgresql://postgres@/queue?host={}",
            self.dir.path().display()
        )
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown: it ends sessions and exits at once.
        if let Some(pid) = rustix::process::Pid::from_raw(self.server.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.server.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}
