//! Boot snapshots (docs/snapshots.md): a VM saved at the moment its guest tools ask for
//! the task, resumed by later jobs on the same image and machine instead of booting.
//!
//! The first job that finds no snapshot tells its guest to park (the metadata service
//! answers the task fetch `202`), takes the NIC's link down once the guest says on its
//! console that it got the answer, waits for its `parked` line, stops the VM, migrates it into a file, copies its overlay and
//! console, and lets the same VM go on with its job. Later jobs start QEMU with
//! `-incoming` on that file over an overlay on the saved disk, bring the link up and
//! `cont`: the guest tools see the link, fetch their task, set the clock and reseed the
//! kernel's RNG from the host's answer.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

use serde_json::json;
use sha2::{Digest, Sha256};

use super::supervisor::VmError;
use crate::error_chain::DisplayChain;
use crate::qemu::{QmpClient, QmpError};

use qemu_worker_protocol::snapshot::{PARKED_LINE, PARKING_LINE};
/// The NIC's netdev id in every command line (see argv.rs).
const NIC: &str = "net0";
/// Bumped when what a snapshot holds changes meaning (the park protocol, the layout).
const FORMAT: &str = "qemu-worker boot snapshot v1";
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest may take to say it parked once the link is down.
const PARK_TIMEOUT: Duration = Duration::from_secs(10);
/// Snapshots kept per image: each machine a payload asks for may save one (~100 MB),
/// so this bounds what payloads can make the cache hold.
pub const MAX_PER_IMAGE: usize = 4;
/// Free space the cache's file system must keep after a save (besides the image
/// cache's own floor, which the worker checks before claiming).
const MIN_FREE_AFTER_SAVE: u64 = 1 << 30;
/// How long saving or loading the VM state may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a migration (the save into a file, or the load from one) did not complete.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("the migration {status}: {reason}")]
    Failed { status: String, reason: String },
    #[error("the migration did not complete within {timeout:?}")]
    Timeout { timeout: Duration },
}

/// Why no boot snapshot was saved (the VM goes on with its job unless `Release`).
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("the guest did not print '{line}' on its serial console within {timeout:?}")]
    NotParked {
        line: &'static str,
        timeout: Duration,
    },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("copying {}", from.display())]
    Copy {
        from: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the snapshot's files were not written")]
    Interrupted {
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("the VM did not go on after the save")]
    Release {
        #[source]
        source: QmpError,
    },
}

/// Why a VM started from a boot snapshot is not running it.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// QEMU exited at once: it does as soon as the saved state fails to load.
    #[error(transparent)]
    Exited(VmError),
    #[error(transparent)]
    Load(#[from] MigrationError),
    #[error(transparent)]
    Link(QmpError),
}

/// The snapshots of one cached image: `<cache dir>/snapshots/<image sha256>/<key>/`,
/// removed with the image.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
}

/// One saved VM: `vmstate` (QEMU's migration stream), `disk.qcow2` (the overlay at the
/// moment of the save, over the image's disk), `console.log` (the boot up to it).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub key: String,
    dir: PathBuf,
}

impl Snapshot {
    pub fn vmstate(&self) -> PathBuf {
        self.dir.join("vmstate")
    }

    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }

    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

/// What the store has for a key.
#[derive(Debug, Clone)]
pub enum Lookup {
    Ready(Snapshot),
    Missing,
    /// No room for another: the image has `MAX_PER_IMAGE` already, or the disk is short
    /// of space.
    Full,
    /// A save was tried and cannot work for this machine (the reason QEMU or the guest
    /// gave); jobs boot.
    Unsupported(String),
}

/// Identity values that differ per job but do not change the saved guest: left out of
/// the key (a resumed guest keeps the ones it booted with, see docs/snapshots.md).
#[derive(Debug, Clone, Copy)]
pub struct Volatile<'a> {
    pub run_dir: &'a Path,
    pub name: &'a str,
    pub mac: &'a str,
    pub uuid: &'a str,
    pub disk_serial: &'a str,
}

impl SnapshotStore {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The key of a cold boot's command line: everything that shapes the guest (machine,
    /// devices, kernel, disk chain, QEMU binary), not the per-job paths and names.
    pub fn key(argv: &[String], volatile: Volatile<'_>) -> String {
        let run_dir = volatile.run_dir.display().to_string();
        let mut hash = Sha256::new();
        hash.update(FORMAT);
        hash.update(qemu_binary_identity());
        for arg in argv {
            let mut arg = arg.replace(&run_dir, "{run}");
            for (value, placeholder) in [
                (volatile.name, "{name}"),
                (volatile.mac, "{mac}"),
                (volatile.uuid, "{uuid}"),
                (volatile.disk_serial, "{serial}"),
            ] {
                if !value.is_empty() {
                    arg = arg.replace(value, placeholder);
                }
            }
            hash.update((arg.len() as u64).to_le_bytes());
            hash.update(arg);
        }
        hash.finalize()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub fn lookup(&self, key: &str) -> Lookup {
        if let Ok(why) = std::fs::read_to_string(self.unsupported_marker(key)) {
            return Lookup::Unsupported(why);
        }
        let dir = self.dir.join(key);
        if dir.join("snapshot.json").is_file() {
            return Lookup::Ready(Snapshot {
                key: key.to_owned(),
                dir,
            });
        }
        let saved = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("snapshot.json").is_file())
            .count();
        let free = free_space(&self.dir);
        if saved >= MAX_PER_IMAGE || free < MIN_FREE_AFTER_SAVE {
            tracing::debug!(
                saved,
                free,
                "no room for another boot snapshot of this image"
            );
            return Lookup::Full;
        }
        Lookup::Missing
    }

    /// Removes a snapshot that failed to load, so that the next job saves a new one.
    pub async fn discard(&self, snapshot: &Snapshot) {
        let dir = snapshot.dir.clone();
        // A saved disk and vmstate are large: removed on the blocking pool.
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(error) = removed {
            tracing::warn!(dir = %snapshot.dir.display(), %error, "cannot remove a broken boot snapshot");
        }
    }

    fn unsupported_marker(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.unsupported"))
    }

    /// The guest fetched its task without offering to park: its guest tools predate
    /// boot snapshots.
    pub async fn refuse(&self, key: &str) {
        self.note_unsupported(
            key,
            "the image's guest tools do not offer to park (GET /v1/task without park=1)",
        )
        .await;
    }

    /// `mark_unsupported` on the blocking pool.
    async fn note_unsupported(&self, key: &str, why: &str) {
        let (store, key, why) = (self.clone(), key.to_owned(), why.to_owned());
        let _ = tokio::task::spawn_blocking(move || store.mark_unsupported(&key, &why)).await;
    }

    fn mark_unsupported(&self, key: &str, why: &str) {
        let _ = std::fs::create_dir_all(&self.dir);
        let _ = std::fs::write(self.unsupported_marker(key), why);
    }

    /// Saves the VM whose guest was just told to park, then lets it go on (link up,
    /// `cont`) whatever happened. `serial_log` and `overlay` are the VM's own files.
    pub async fn take(
        &self,
        key: &str,
        qmp: &QmpClient,
        serial_log: &Path,
        overlay: &Path,
    ) -> Result<Snapshot, SaveError> {
        let started = Instant::now();
        let taken = self.save(key, qmp, serial_log, overlay).await;
        let released = async {
            qmp.cont(QMP_TIMEOUT).await?;
            set_link(qmp, true).await
        }
        .await;
        match (&taken, released) {
            (_, Err(source)) => return Err(SaveError::Release { source }),
            (Ok(snapshot), Ok(())) => tracing::info!(
                key,
                dir = %snapshot.dir.display(),
                millis = started.elapsed().as_millis() as u64,
                "boot snapshot saved"
            ),
            (Err(why), Ok(())) => tracing::warn!(key, why = %DisplayChain(why), "no boot snapshot"),
        }
        taken
    }

    async fn save(
        &self,
        key: &str,
        qmp: &QmpClient,
        serial_log: &Path,
        overlay: &Path,
    ) -> Result<Snapshot, SaveError> {
        // The park answer must reach the guest before the link goes down.
        let mut console = ConsoleFollower::new(serial_log);
        for (line, link_down) in [(PARKING_LINE, true), (PARKED_LINE, false)] {
            if !console.wait_for(line, PARK_TIMEOUT).await {
                // Not marked unsupported: a guest this slow may be a loaded host's.
                return Err(SaveError::NotParked {
                    line,
                    timeout: PARK_TIMEOUT,
                });
            }
            if link_down {
                set_link(qmp, false).await?;
            }
        }
        qmp.execute("stop", None, QMP_TIMEOUT).await?;
        let in_dir = |source: std::io::Error| SaveError::Io {
            path: self.dir.clone(),
            source,
        };
        tokio::fs::create_dir_all(&self.dir).await.map_err(in_dir)?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{key}."))
            .tempdir_in(&self.dir)
            .map_err(in_dir)?;
        let migrated = self
            .migrate_into(key, qmp, &tmp.path().join("vmstate"))
            .await;
        let files = SnapshotFiles {
            key: key.to_owned(),
            dir: self.dir.join(key),
            overlay: overlay.to_path_buf(),
            serial_log: serial_log.to_path_buf(),
            qemu: qmp.qemu_version().to_owned(),
        };
        // Copying the overlay, or removing a part-written vmstate with `tmp`, is large
        // file I/O.
        tokio::task::spawn_blocking(move || {
            migrated?;
            files.persist(tmp)
        })
        .await
        .map_err(|source| SaveError::Interrupted { source })?
    }

    /// Migrates the stopped VM into `vmstate`.
    async fn migrate_into(
        &self,
        key: &str,
        qmp: &QmpClient,
        vmstate: &Path,
    ) -> Result<(), SaveError> {
        let uri = format!(
            "exec:cat > {}",
            super::argv::shell_quote(&vmstate.display().to_string())
        );
        if let Err(e) = qmp
            .execute("migrate", Some(json!({"uri": uri})), QMP_TIMEOUT)
            .await
        {
            // QEMU refuses at once when a device cannot be migrated (NVMe, for one).
            if let QmpError::Command { .. } = e {
                self.note_unsupported(key, &e.to_string()).await;
            }
            return Err(e.into());
        }
        wait_for_migration(qmp).await?;
        Ok(())
    }
}

/// What goes into a snapshot besides its vmstate, and where it goes.
struct SnapshotFiles {
    key: String,
    dir: PathBuf,
    overlay: PathBuf,
    serial_log: PathBuf,
    qemu: String,
}

impl SnapshotFiles {
    /// Copies the VM's overlay and console next to the vmstate in `tmp`, describes the
    /// snapshot, and moves it into place (blocking).
    fn persist(self, tmp: tempfile::TempDir) -> Result<Snapshot, SaveError> {
        // The migration flushed the disk and handed it over: the overlay is consistent.
        for (from, to) in [
            (&self.overlay, "disk.qcow2"),
            (&self.serial_log, "console.log"),
        ] {
            std::fs::copy(from, tmp.path().join(to)).map_err(|source| SaveError::Copy {
                from: from.clone(),
                source,
            })?;
        }
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let about = json!({"format": FORMAT, "key": self.key, "createdUnixSeconds": created, "qemu": self.qemu});
        std::fs::write(tmp.path().join("snapshot.json"), about.to_string()).map_err(|source| {
            SaveError::Io {
                path: "snapshot.json".into(),
                source,
            }
        })?;
        let dir = self.dir;
        let tmp = tmp.keep();
        if let Err(e) = std::fs::rename(&tmp, &dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            // Another job saved the same snapshot first: use theirs.
            if !dir.join("snapshot.json").is_file() {
                return Err(SaveError::Io {
                    path: dir,
                    source: e,
                });
            }
        }
        Ok(Snapshot { key: self.key, dir })
    }
}

/// Completes a resume: waits until QEMU has loaded the snapshot (it was started with
/// `-incoming`), then brings the NIC's link up so that the parked guest tools go on.
/// The caller then `cont`s.
pub async fn finish_resume(qmp: &QmpClient) -> Result<(), ResumeError> {
    wait_for_migration(qmp).await?;
    set_link(qmp, true).await.map_err(ResumeError::Link)
}

async fn set_link(qmp: &QmpClient, up: bool) -> Result<(), QmpError> {
    qmp.execute(
        "set_link",
        Some(json!({"name": NIC, "up": up})),
        QMP_TIMEOUT,
    )
    .await
    .map(drop)
}

/// Polls `query-migrate` until the migration (either way) completed.
async fn wait_for_migration(qmp: &QmpClient) -> Result<(), MigrationError> {
    let start = Instant::now();
    loop {
        let state = qmp.execute("query-migrate", None, QMP_TIMEOUT).await?;
        match state["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("failed" | "cancelled") => {
                return Err(MigrationError::Failed {
                    status: state["status"].as_str().unwrap_or("failed").to_owned(),
                    reason: state["error-desc"]
                        .as_str()
                        .unwrap_or("no reason given")
                        .to_owned(),
                });
            }
            _ if start.elapsed() > MIGRATION_TIMEOUT => {
                return Err(MigrationError::Timeout {
                    timeout: MIGRATION_TIMEOUT,
                });
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Follows the serial log as QEMU appends to it, reading each byte once (a guest's
/// console may be large).
struct ConsoleFollower {
    file: Option<tokio::fs::File>,
    path: PathBuf,
    /// What was read and not yet matched: the last, unfinished line.
    pending: Vec<u8>,
}

impl ConsoleFollower {
    fn new(path: &Path) -> Self {
        Self {
            file: None,
            path: path.to_path_buf(),
            pending: Vec::new(),
        }
    }

    /// Waits until a line containing `needle` is appended (polling: the file is QEMU's).
    /// Lines after it stay for the next wait.
    async fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            if self.take_line_with(needle) {
                return true;
            }
            if self.file.is_none() {
                self.file = tokio::fs::File::open(&self.path).await.ok();
            }
            let read = match self.file.as_mut() {
                Some(file) => file.read(&mut chunk).await.ok(),
                None => None,
            };
            match read {
                Some(n) if n > 0 => self.pending.extend_from_slice(&chunk[..n]),
                _ if start.elapsed() < timeout => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                _ => return false,
            }
        }
    }

    /// Drops the complete lines read so far up to and including the first that contains
    /// `needle` (true), or all complete lines (false).
    fn take_line_with(&mut self, needle: &str) -> bool {
        let mut consumed = 0;
        while let Some(end) = self.pending[consumed..].iter().position(|&b| b == b'\n') {
            let line = &self.pending[consumed..consumed + end];
            consumed += end + 1;
            if String::from_utf8_lossy(line).contains(needle) {
                self.pending.drain(..consumed);
                return true;
            }
        }
        self.pending.drain(..consumed);
        false
    }
}

/// Bytes available to us on the file system of `dir` (or its closest existing parent).
fn free_space(dir: &Path) -> u64 {
    dir.ancestors()
        .find_map(|d| rustix::fs::statvfs(d).ok())
        .map_or(0, |s| s.f_bavail.saturating_mul(s.f_frsize))
}

/// Size and modification time of the QEMU found on PATH: another QEMU build may lay out
/// its migration stream differently.
fn qemu_binary_identity() -> String {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find_map(|candidate| std::fs::metadata(&candidate).ok().map(|m| (candidate, m)))
        .map(|(path, m)| {
            let modified = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!("{} {} {modified}", path.display(), m.len())
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_console_follower_finds_lines_as_they_are_appended_once_each() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("serial.log");
        let mut console = ConsoleFollower::new(&path);
        let short = Duration::from_millis(50);
        assert!(!console.wait_for(PARKING_LINE, short).await, "no file yet");
        let mut file = std::fs::File::create(&path).expect("create");
        write!(file, "boot\nqemu-worker-guest [1.5]: parking for a boot sn").expect("write");
        assert!(
            !console.wait_for(PARKING_LINE, short).await,
            "an unfinished line"
        );
        writeln!(file, "apshot").expect("write");
        assert!(console.wait_for(PARKING_LINE, short).await);
        assert!(
            !console.wait_for(PARKING_LINE, short).await,
            "a line is matched once"
        );
        writeln!(file, "x: {PARKED_LINE}").expect("write");
        assert!(console.wait_for(PARKED_LINE, short).await);
        // Two lines in one read: the second is still there for the next wait.
        writeln!(file, "{PARKING_LINE}\n{PARKED_LINE}").expect("write");
        assert!(console.wait_for(PARKING_LINE, short).await);
        assert!(console.wait_for(PARKED_LINE, short).await);
    }

    #[test]
    fn an_image_keeps_at_most_max_per_image_snapshots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SnapshotStore::new(dir.path().join("sha"));
        assert!(matches!(store.lookup("k0"), Lookup::Missing));
        for n in 0..MAX_PER_IMAGE {
            let saved = dir.path().join("sha").join(format!("k{n}"));
            std::fs::create_dir_all(&saved).expect("dir");
            std::fs::write(saved.join("snapshot.json"), "{}").expect("file");
        }
        assert!(matches!(store.lookup("k0"), Lookup::Ready(_)));
        assert!(matches!(store.lookup("another"), Lookup::Full));
        store.mark_unsupported("another", "why");
        assert!(matches!(store.lookup("another"), Lookup::Unsupported(w) if w == "why"));
    }
}
