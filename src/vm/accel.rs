use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::OnceCell;

use super::argv::Accelerator;
use crate::config::AcceleratorChoice;

/// How long the probe guest has to reach long mode: a few milliseconds under a working
/// KVM or TCG, forever under a KVM that hangs.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// The probe guest's code (`accel_probe.S`, assembled with GNU as and linked at 0): it
/// prints `R` on COM1 in real mode, `P` after entering 32-bit protected mode and `L`
/// after enabling paging and 64-bit long mode, then halts. A kernel needs all three;
/// on our CI hosts KVM runs real mode and hangs entering protected mode, which a
/// real-mode-only probe would miss.
const PROBE_CODE: &[u8] = &[
    0xfa, 0xba, 0xf8, 0x03, 0xb0, 0x52, 0xee, 0x2e, 0x66, 0x0f, 0x01, 0x16, 0xb8, 0x00, 0x0f, 0x20,
    0xc0, 0x66, 0x83, 0xc8, 0x01, 0x0f, 0x22, 0xc0, 0x66, 0xea, 0x20, 0x00, 0x0f, 0x00, 0x08, 0x00,
    0x66, 0xb8, 0x10, 0x00, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x50,
    0xee, 0xbf, 0x00, 0x10, 0x00, 0x00, 0x31, 0xc0, 0xb9, 0x00, 0x0c, 0x00, 0x00, 0xf3, 0xab, 0xc7,
    0x05, 0x00, 0x10, 0x00, 0x00, 0x03, 0x20, 0x00, 0x00, 0xc7, 0x05, 0x00, 0x20, 0x00, 0x00, 0x03,
    0x30, 0x00, 0x00, 0xc7, 0x05, 0x00, 0x30, 0x00, 0x00, 0x83, 0x00, 0x00, 0x00, 0xb8, 0x00, 0x10,
    0x00, 0x00, 0x0f, 0x22, 0xd8, 0x0f, 0x20, 0xe0, 0x83, 0xc8, 0x20, 0x0f, 0x22, 0xe0, 0xb9, 0x80,
    0x00, 0x00, 0xc0, 0x0f, 0x32, 0x0d, 0x00, 0x01, 0x00, 0x00, 0x0f, 0x30, 0x0f, 0x20, 0xc0, 0x0d,
    0x00, 0x00, 0x00, 0x80, 0x0f, 0x22, 0xc0, 0xea, 0x8e, 0x00, 0x0f, 0x00, 0x18, 0x00, 0x66, 0xba,
    0xf8, 0x03, 0xb0, 0x4c, 0xee, 0xf4, 0xeb, 0xfd, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xcf, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00,
    0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xaf, 0x00, 0x1f, 0x00, 0x98, 0x00, 0x0f,
];
/// At the reset vector (0xFFFF0): `ljmp $0xf000, $0`.
const PROBE_RESET: &[u8] = &[0xea, 0x00, 0x00, 0x00, 0xf0];
/// What the probe prints as it reaches each mode.
const PROBE_STAGES: [(u8, &str); 3] = [
    (b'R', "real mode"),
    (b'P', "32-bit protected mode"),
    (b'L', "64-bit long mode"),
];

/// The 64 KiB probe BIOS image.
fn probe_bios() -> Vec<u8> {
    let mut bios = vec![0u8; 64 << 10];
    bios[..PROBE_CODE.len()].copy_from_slice(PROBE_CODE);
    bios[0xFFF0..0xFFF0 + PROBE_RESET.len()].copy_from_slice(PROBE_RESET);
    bios
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AccelError {
    #[error("accelerator kvm was requested, but KVM does not work on this host: {0}")]
    KvmUnavailable(String),
}

/// Why a probe did not pass, in words for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeFailure(pub String);

/// Starts a tiny guest under `accelerator` and waits for it to print; returns how long
/// that took. QEMU is killed afterwards in every case.
pub async fn probe(accelerator: Accelerator, deadline: Duration) -> Result<Duration, ProbeFailure> {
    if accelerator == Accelerator::Kvm {
        if !Path::new("/dev/kvm").exists() {
            return Err(ProbeFailure("/dev/kvm does not exist".into()));
        }
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            return Err(ProbeFailure(format!("/dev/kvm cannot be opened: {e}")));
        }
    }
    let dir =
        tempfile::tempdir().map_err(|e| ProbeFailure(format!("no scratch directory: {e}")))?;
    let bios = dir.path().join("probe.bin");
    std::fs::write(&bios, probe_bios())
        .map_err(|e| ProbeFailure(format!("cannot write the probe: {e}")))?;
    let accel = accelerator.as_str();
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            accel,
            "-machine",
            "pc",
            "-m",
            "16",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-serial", "stdio", "-bios"])
        .arg(&bios)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0)
        .spawn()
        .map_err(|e| ProbeFailure(format!("qemu-system-x86_64 cannot be started: {e}")))?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| ProbeFailure("no stdout".into()))?;
    let mut reached = 0;
    let outcome = tokio::time::timeout(deadline, async {
        let mut byte = [0u8; 1];
        while reached < PROBE_STAGES.len() {
            stdout.read_exact(&mut byte).await?;
            if byte[0] == PROBE_STAGES[reached].0 {
                reached += 1;
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    match outcome {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(_)) => {
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), err.read_to_string(&mut stderr))
                        .await;
            }
            Err(ProbeFailure(format!(
                "the probe guest under {accel} exited early: {}",
                stderr.trim()
            )))
        }
        Err(_) => Err(ProbeFailure(match reached {
            0 => format!("a probe guest under {accel} printed nothing within {deadline:?}"),
            n => format!(
                "a probe guest under {accel} ran in {} but hung entering {} (waited {deadline:?})",
                PROBE_STAGES[n - 1].1,
                PROBE_STAGES[n].1
            ),
        })),
    }
}

/// The KVM verdict, probed once per process.
static KVM_VERDICT: OnceCell<Result<Duration, ProbeFailure>> = OnceCell::const_new();

/// The probe's verdict as kept in `<stateDir>/accelerator-probe.json`: valid for the
/// same host boot and the same QEMU binary.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredVerdict {
    boot_id: String,
    qemu: String,
    kvm_works: bool,
    why: String,
}

/// What identifies this boot and this QEMU binary.
fn verdict_key() -> Option<(String, String)> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let qemu = crate::host_path::find_on_path("qemu-system-x86_64")?;
    let meta = std::fs::metadata(&qemu).ok()?;
    use std::os::unix::fs::MetadataExt;
    Some((
        boot_id.trim().to_owned(),
        format!("{} {} {}", qemu.display(), meta.len(), meta.mtime()),
    ))
}

/// Like `choose_accelerator`, but a KVM verdict probed earlier on this boot with this
/// QEMU (by any qemu-worker process using `state_dir`) is reused instead of probing
/// again: the probe costs its full deadline on hosts whose KVM hangs.
pub async fn choose_accelerator_cached(
    choice: AcceleratorChoice,
    state_dir: &Path,
) -> Result<Accelerator, AccelError> {
    if choice == AcceleratorChoice::Tcg || KVM_VERDICT.initialized() {
        return choose_accelerator(choice).await;
    }
    let file = state_dir.join("accelerator-probe.json");
    let key = tokio::task::spawn_blocking(verdict_key)
        .await
        .ok()
        .flatten();
    if let Some((boot_id, qemu)) = key {
        let stored: Option<StoredVerdict> = tokio::fs::read(&file)
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(stored) = stored.filter(|s| s.boot_id == boot_id && s.qemu == qemu) {
            let verdict = if stored.kvm_works {
                Ok(Duration::ZERO)
            } else {
                Err(ProbeFailure(stored.why.clone()))
            };
            let _ = KVM_VERDICT.set(verdict);
            tracing::info!(file = %file.display(), "accelerator: using the KVM probe verdict from earlier on this boot");
            return choose_accelerator(choice).await;
        }
        let chosen = choose_accelerator(choice).await;
        if let Some(verdict) = KVM_VERDICT.get() {
            let stored = StoredVerdict {
                boot_id,
                qemu,
                kvm_works: verdict.is_ok(),
                why: verdict
                    .as_ref()
                    .err()
                    .map(|f| f.0.clone())
                    .unwrap_or_default(),
            };
            if let Ok(bytes) = serde_json::to_vec_pretty(&stored) {
                let _ = tokio::fs::create_dir_all(state_dir).await;
                let _ = tokio::fs::write(&file, bytes).await;
            }
        }
        return chosen;
    }
    choose_accelerator(choice).await
}

/// Decides the accelerator for this process's VMs. `auto` uses KVM only if the probe
/// guest proves it works, and says in the log, once, what it tried and chose; `kvm`
/// fails (the job is resource-unavailable) rather than hang when KVM does not work.
pub async fn choose_accelerator(choice: AcceleratorChoice) -> Result<Accelerator, AccelError> {
    if choice == AcceleratorChoice::Tcg {
        return Ok(Accelerator::Tcg);
    }
    let mut first = false;
    let verdict = KVM_VERDICT
        .get_or_init(|| {
            first = true;
            probe(Accelerator::Kvm, PROBE_DEADLINE)
        })
        .await;
    match (choice, verdict) {
        (_, Ok(took)) => {
            if first {
                tracing::info!(
                    probe_ms = took.as_millis() as u64,
                    "accelerator: KVM works (probe guest answered); using KVM"
                );
            }
            Ok(Accelerator::Kvm)
        }
        (AcceleratorChoice::Kvm, Err(ProbeFailure(why))) => {
            Err(AccelError::KvmUnavailable(why.clone()))
        }
        (_, Err(ProbeFailure(why))) => {
            if first {
                tracing::info!(
                    "accelerator: tried KVM, but {why}; using TCG (software emulation, slower)"
                );
            }
            Ok(Accelerator::Tcg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded bytes are exactly what the committed source assembles to.
    #[test]
    fn the_probe_matches_its_assembly_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/vm/accel_probe.S");
        let object = dir.path().join("probe.o");
        let binary = dir.path().join("probe.bin");
        let assembled = std::process::Command::new("as")
            .args(["--32", "-o"])
            .arg(&object)
            .arg(&source)
            .status()
            .expect("`as` is missing: install it with `apt-get install binutils`");
        assert!(assembled.success());
        let linked = std::process::Command::new("ld")
            .args(["-m", "elf_i386", "-Ttext=0", "--oformat", "binary", "-o"])
            .arg(&binary)
            .arg(&object)
            .status()
            .expect("`ld` is missing: install it with `apt-get install binutils`");
        assert!(linked.success());
        assert_eq!(std::fs::read(&binary).expect("binary"), probe_bios());
    }
}
