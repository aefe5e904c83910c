use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::disk::DiskFormat;

/// `qemu-img` must never hang a job: info and create answer in milliseconds.
const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    #[error("failed to run qemu-img (install the qemu-utils package)")]
    Spawn {
        #[source]
        source: io::Error,
    },
    #[error("qemu-img did not finish within {timeout:?}")]
    Timeout { timeout: Duration },
    #[error("qemu-img {action} {path:?} failed: {stderr}")]
    Failed {
        action: &'static str,
        path: PathBuf,
        stderr: String,
    },
    #[error("qemu-img info printed output that is not the expected JSON")]
    BadOutput {
        #[source]
        source: serde_json::Error,
    },
}

/// What `qemu-img info --output json` says about one image (the fields we check).
#[derive(Debug, Clone, Deserialize)]
pub struct QemuImgInfo {
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    pub actual_size: Option<u64>,
    #[serde(rename = "dirty-flag", default)]
    pub dirty: bool,
    #[serde(default)]
    pub encrypted: bool,
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
    #[serde(rename = "backing-filename-format", default)]
    pub backing_format: Option<String>,
    #[serde(rename = "format-specific", default)]
    pub format_specific: Option<serde_json::Value>,
}

/// Runs `qemu-img info -f FORMAT --output json PATH`: the format is given, never probed,
/// and qemu-img does not open backing files for `info`. Blocking: images are checked on
/// the unpacking thread.
pub fn info(path: &Path, format: DiskFormat) -> Result<QemuImgInfo, QemuImgError> {
    let mut command = Command::new("qemu-img");
    command
        .args(["info", "-f", format.as_str(), "--output", "json"])
        .arg(path);
    let output = run(command, "info", path)?;
    serde_json::from_slice(&output.stdout).map_err(|source| QemuImgError::BadOutput { source })
}

/// Creates a qcow2 overlay whose backing file is `backing` (of `backing_format`). Runs
/// in a job's async path, so qemu-img is awaited rather than polled.
pub async fn create_overlay(
    overlay: &Path,
    backing: &Path,
    backing_format: DiskFormat,
) -> Result<(), QemuImgError> {
    let mut command = tokio::process::Command::new("qemu-img");
    command
        .args(["create", "-q", "-f", DiskFormat::Qcow2.as_str()])
        .args(["-F", backing_format.as_str(), "-b"])
        .arg(backing)
        .arg(overlay);
    run_async(command, "create", overlay, QEMU_IMG_TIMEOUT).await
}

/// Writes the whole chain under the qcow2 `top` (its backing files included) as one
/// sparse raw disk at `out`: an image build's booted disk. Bounded by `timeout`, which
/// must allow for the disk's size.
pub async fn flatten_to_raw(top: &Path, out: &Path, timeout: Duration) -> Result<(), QemuImgError> {
    let mut command = tokio::process::Command::new("qemu-img");
    command
        .args(["convert", "-q", "-f", DiskFormat::Qcow2.as_str()])
        .args(["-O", DiskFormat::Raw.as_str(), "-S", "4k"])
        .arg(top)
        .arg(out);
    run_async(command, "convert", top, timeout).await
}

async fn run_async(
    mut command: tokio::process::Command,
    action: &'static str,
    path: &Path,
    timeout: Duration,
) -> Result<(), QemuImgError> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Killed if it outlives the timeout below.
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| QemuImgError::Spawn { source })?;
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| QemuImgError::Timeout { timeout })?
        .map_err(|source| QemuImgError::Spawn { source })?;
    succeeded(output, action, path).map(drop)
}

fn run(mut command: Command, action: &'static str, path: &Path) -> Result<Output, QemuImgError> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| QemuImgError::Spawn { source })?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() < QEMU_IMG_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(2));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(QemuImgError::Timeout {
                    timeout: QEMU_IMG_TIMEOUT,
                });
            }
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|source| QemuImgError::Spawn { source })?;
    succeeded(output, action, path)
}

fn succeeded(output: Output, action: &'static str, path: &Path) -> Result<Output, QemuImgError> {
    if output.status.success() {
        Ok(output)
    } else {
        Err(QemuImgError::Failed {
            action,
            path: path.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// The parts of a qcow2 header that decide which other files QEMU would open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub backing_file: Option<String>,
    /// Incompatible feature bit 2: the guest data lives in another (host) file.
    pub external_data_file: bool,
}

/// Reads the qcow2 header directly, before any QEMU code opens the file, so that an
/// external data file (which even `qemu-img info` would open) is refused up front.
pub fn read_qcow2_header(path: &Path) -> io::Result<Option<Qcow2Header>> {
    let mut file = File::open(path)?;
    let mut head = [0u8; 104];
    let read = read_up_to(&mut file, &mut head)?;
    if read < 72 || &head[0..4] != b"QFI\xfb" {
        return Ok(None);
    }
    let be32 = |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    let be64 = |at: usize| (u64::from(be32(at)) << 32) | u64::from(be32(at + 4));
    let version = be32(4);
    let backing_offset = be64(8);
    let backing_size = be32(16);
    let external_data_file = version >= 3 && read >= 80 && (be64(72) & (1 << 2)) != 0;
    let backing_file = if backing_offset != 0 && backing_size != 0 {
        if backing_size > 1023 {
            return Ok(Some(Qcow2Header {
                version,
                backing_file: Some(String::from("<over 1023 bytes>")),
                external_data_file,
            }));
        }
        let mut name = vec![0u8; backing_size as usize];
        file.seek(SeekFrom::Start(backing_offset))?;
        file.read_exact(&mut name)?;
        Some(String::from_utf8_lossy(&name).into_owned())
    } else {
        None
    };
    Ok(Some(Qcow2Header {
        version,
        backing_file,
        external_data_file,
    }))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        match file.read(&mut buf[total..])? {
            0 => break,
            n => total += n,
        }
    }
    Ok(total)
}
