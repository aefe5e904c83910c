//! Boot snapshots (docs/snapshots.md): a VM saved at the moment its guest tools ask for
//! the task, resumed by later jobs on the same image and machine instead of booting.
//!
//! The first job that finds no snapshot tells its guest to park (the metadata service
//! answers the task fetch `202`), asks the guest tools on the agent port (`PARK`) whether
//! they hold still, stops the VM, migrates it into a file, copies its overlay and
//! console, and lets the same VM go on (`cont`, then `RESUME` on the agent port). Later
//! jobs start QEMU with `-incoming` on that file over an overlay on the saved disk,
//! `cont` and send `RESUME`: the guest tools fetch their task, set the clock and reseed
//! the kernel's RNG from the host's answer. Nothing is read from the console, so this
//! works whatever an image's init does with the tools' output.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};

use super::run_dir::RunDir;
use super::supervisor::VmError;
use crate::error_chain::DisplayChain;
use crate::qemu::{QmpClient, QmpError};

use crate::artifacts::{AgentClient, AgentError};
use qemu_worker_protocol::agent::{PARK, RESUME};
/// Bumped when what a snapshot holds changes meaning (the park protocol, the layout of
/// existing snapshots): v2 parks over the agent port and waits there for `RESUME`. A
/// bump orphans every saved snapshot, and orphans count against `MAX_PER_IMAGE` until
/// their image leaves the cache. UEFI machines added `uefi-vars.fd` without a bump:
/// their keys are new, and no saved snapshot changes meaning.
const FORMAT: &str = "qemu-worker boot snapshot v2";
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest tools may take to answer on the agent port (connecting includes
/// an image that loads the port's driver after starting them).
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
    #[error("the guest tools did not hold still for it")]
    NotParked {
        #[source]
        source: AgentError,
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
    #[error("the guest tools did not take RESUME after the save")]
    NotResumed {
        #[source]
        source: AgentError,
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
    /// The resumed guest tools did not take `RESUME` on the agent port.
    #[error("the resumed guest tools did not take RESUME")]
    NotResumed {
        #[source]
        source: AgentError,
    },
}

/// The snapshots of one cached image: `<cache dir>/snapshots/<image sha256>/<key>/`,
/// removed with the image.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
}

/// One saved VM: `vmstate` (QEMU's migration stream), `disk.qcow2` (the overlay at the
/// moment of the save, over the image's disk), `console.log` (the boot up to it), and a
/// UEFI machine's variable store `uefi-vars.fd`.
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

    /// The saved VM's UEFI variable store (UEFI machines only).
    pub fn uefi_vars(&self) -> PathBuf {
        self.dir.join(UEFI_VARS)
    }
}

/// A snapshot's copy of the VM's UEFI variable store.
const UEFI_VARS: &str = "uefi-vars.fd";

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
    /// devices, kernel, disk chain, QEMU binary, the UEFI firmware `ovmf_code` of a UEFI
    /// machine, and `boot_inputs` the guest reads at boot, such as a cloud-init VM's
    /// user-data), not the per-job paths and names.
    pub fn key(
        argv: &[String],
        volatile: Volatile<'_>,
        ovmf_code: Option<&Path>,
        boot_inputs: &[u8],
    ) -> String {
        let run_dir = volatile.run_dir.display().to_string();
        let mut hash = Sha256::new();
        hash.update(FORMAT);
        hash.update(qemu_binary_identity());
        // The command line names the firmware's file; a new ovmf package makes new
        // snapshots, as a new QEMU does (the saved guest runs the firmware it booted).
        if let Some(code) = ovmf_code {
            hash.update(file_identity(code).unwrap_or_default());
        }
        // Empty for a VM without cloud-init, so that its keys stay as they were.
        if !boot_inputs.is_empty() {
            hash.update(b"boot-inputs\0");
            hash.update((boot_inputs.len() as u64).to_le_bytes());
            hash.update(boot_inputs);
        }
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

    /// Removes a snapshot that failed to load (or whose saved VM did not take RESUME), so
    /// that the next job saves a new one.
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
            "the image's guest tools do not offer to park over the agent port (GET /v1/task without park=2)",
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

    /// Saves the VM whose guest was just told to park, then lets it go on (`cont`, and
    /// `RESUME` to the guest tools) whatever happened. `run_dir` is the VM's: its agent
    /// port is used, its serial log, overlay and (UEFI) variable store are saved.
    pub async fn take(
        &self,
        key: &str,
        qmp: &QmpClient,
        run_dir: &RunDir,
    ) -> Result<Snapshot, SaveError> {
        let started = Instant::now();
        // Not marked unsupported when the tools do not answer: a guest this slow may be a
        // loaded host's.
        let mut agent = AgentClient::connect(Path::new(&run_dir.agent_socket()), PARK_TIMEOUT)
            .await
            .map_err(|source| SaveError::NotParked { source })?;
        let taken = match agent.handshake(PARK, PARK_TIMEOUT).await {
            Ok(()) => self.save(key, qmp, run_dir).await,
            Err(source) => Err(SaveError::NotParked { source }),
        };
        if let Err(source) = qmp.cont(QMP_TIMEOUT).await {
            return Err(SaveError::Release { source });
        }
        // Tools that did not park may still hold still: they are told to go on too.
        let resumed = agent.handshake(RESUME, PARK_TIMEOUT).await;
        match (&taken, resumed) {
            // Every VM resumed from the snapshot would start from the state that just
            // failed to take RESUME: it is dropped, as the job's log line says.
            (Ok(snapshot), Err(source)) => {
                self.discard(snapshot).await;
                return Err(SaveError::NotResumed { source });
            }
            (Ok(snapshot), Ok(())) => tracing::info!(
                key,
                dir = %snapshot.dir.display(),
                millis = started.elapsed().as_millis() as u64,
                "boot snapshot saved"
            ),
            (Err(why), _) => tracing::warn!(key, why = %DisplayChain(why), "no boot snapshot"),
        }
        taken
    }

    /// Stops the parked VM and files it as the snapshot `key` (the caller lets it go on).
    async fn save(
        &self,
        key: &str,
        qmp: &QmpClient,
        run_dir: &RunDir,
    ) -> Result<Snapshot, SaveError> {
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
            overlay: run_dir.overlay(),
            serial_log: PathBuf::from(run_dir.serial_log()),
            uefi_vars: PathBuf::from(run_dir.uefi_vars()),
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
    /// The VM's UEFI variable store: a UEFI VM's run dir has one, a BIOS VM's none.
    uefi_vars: PathBuf,
    qemu: String,
}

impl SnapshotFiles {
    /// Copies the VM's overlay, console and UEFI variable store next to the vmstate in
    /// `tmp`, describes the snapshot, and moves it into place (blocking).
    fn persist(self, tmp: tempfile::TempDir) -> Result<Snapshot, SaveError> {
        // The migration flushed the disk and the flash and handed them over: the overlay
        // and the variable store are consistent. (The vmstate carries the flash's
        // contents too, but QEMU maps the store's file at start and must find the one
        // the state was saved with: same size, same variables.)
        let uefi_vars = Some((&self.uefi_vars, UEFI_VARS)).filter(|(vars, _)| vars.exists());
        for (from, to) in [
            (&self.overlay, "disk.qcow2"),
            (&self.serial_log, "console.log"),
        ]
        .into_iter()
        .chain(uefi_vars)
        {
            let copied = match std::fs::copy(from, tmp.path().join(to)) {
                // A machine without a serial console has no log: the snapshot's is empty.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && to == "console.log" => {
                    std::fs::write(tmp.path().join(to), b"")
                }
                copied => copied.map(drop),
            };
            copied.map_err(|source| SaveError::Copy {
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

/// Waits until QEMU, started with `-incoming`, has loaded the snapshot. The caller then
/// `cont`s and calls `release_resumed`.
pub async fn finish_resume(qmp: &QmpClient) -> Result<(), ResumeError> {
    wait_for_migration(qmp).await?;
    Ok(())
}

/// Tells the guest tools of a running, resumed VM to go on: they were parked when the
/// snapshot was saved and ask for their task on `RESUME`.
pub async fn release_resumed(agent_socket: &Path) -> Result<(), ResumeError> {
    let released = async {
        let mut agent = AgentClient::connect(agent_socket, PARK_TIMEOUT).await?;
        agent.handshake(RESUME, PARK_TIMEOUT).await
    };
    released
        .await
        .map_err(|source| ResumeError::NotResumed { source })
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

/// Bytes available to us on the file system of `dir` (or its closest existing parent).
fn free_space(dir: &Path) -> u64 {
    dir.ancestors()
        .find_map(|d| rustix::fs::statvfs(d).ok())
        .map_or(0, |s| s.f_bavail.saturating_mul(s.f_frsize))
}

/// Size and modification time of the QEMU found on PATH: another QEMU build may lay out
/// its migration stream differently.
fn qemu_binary_identity() -> String {
    crate::host_path::find_on_path("qemu-system-x86_64")
        .and_then(|qemu| file_identity(&qemu))
        .unwrap_or_default()
}

/// A file's path, size and modification time: what changes when a package replaces it.
fn file_identity(path: &Path) -> Option<String> {
    let m = std::fs::metadata(path).ok()?;
    let modified = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Some(format!("{} {} {modified}", path.display(), m.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_carries_the_vms_uefi_variable_store_when_it_has_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = dir.path().join("run");
        std::fs::create_dir(&run).expect("run dir");
        std::fs::write(run.join("overlay.qcow2"), b"disk").expect("overlay");
        std::fs::write(run.join("serial.log"), b"boot").expect("console");
        let files = |key: &str| SnapshotFiles {
            key: key.to_owned(),
            dir: dir.path().join("sha").join(key),
            overlay: run.join("overlay.qcow2"),
            serial_log: run.join("serial.log"),
            uefi_vars: run.join("uefi-vars.fd"),
            qemu: "7.2".into(),
        };
        std::fs::create_dir(dir.path().join("sha")).expect("store");
        let tmp = || tempfile::tempdir_in(dir.path().join("sha")).expect("tmp");
        let bios = files("bios").persist(tmp()).expect("saved");
        assert_eq!(std::fs::read(bios.disk()).expect("disk"), b"disk");
        assert!(!bios.uefi_vars().exists());
        std::fs::write(run.join("uefi-vars.fd"), b"vars").expect("vars");
        let uefi = files("uefi").persist(tmp()).expect("saved");
        assert_eq!(std::fs::read(uefi.uefi_vars()).expect("vars"), b"vars");
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
