//! The serial console, capped while the guest writes it: QEMU serves the guest's first
//! serial port on a unix socket in the run dir, and the worker copies it into the run
//! dir's serial log up to a cap. Past the cap it goes on reading (so the guest is never
//! held up) and counts what it drops. A guest controls how much it prints; the host
//! decides how much it keeps.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// What the console capture kept and dropped, readable while it runs.
#[derive(Debug, Default)]
pub struct ConsoleUsage {
    dropped: AtomicU64,
    limit: AtomicU64,
    /// The serial log could not be written (its disk is full or gone).
    write_failed: AtomicBool,
}

impl ConsoleUsage {
    /// Bytes of console output dropped past the cap.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Whether bytes were dropped because the serial log could not be written, rather
    /// than for the cap.
    pub fn write_failed(&self) -> bool {
        self.write_failed.load(Ordering::Relaxed)
    }
}

/// Copies the console socket into `log` (appended: a resumed VM's log already holds the
/// boot it was saved in) until QEMU closes it. Returns the task, which ends with QEMU.
pub(crate) async fn capture_console(
    socket: &Path,
    log: PathBuf,
    limit: u64,
    usage: Arc<ConsoleUsage>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut stream = UnixStream::connect(socket).await?;
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .await?;
    let mut written = file.metadata().await.map_or(0, |m| m.len());
    usage.limit.store(limit, Ordering::Relaxed);
    Ok(tokio::spawn(async move {
        let mut buffer = vec![0u8; 64 << 10];
        let mut noted = false;
        let mut failed = false;
        loop {
            let n = match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let room = usize::try_from(limit.saturating_sub(written)).unwrap_or(usize::MAX);
            let keep = if failed { 0 } else { n.min(room) };
            if keep > 0 {
                if file.write_all(&buffer[..keep]).await.is_ok() {
                    written += keep as u64;
                } else {
                    // The state disk is full or gone: drop the rest, still reading.
                    failed = true;
                    usage.write_failed.store(true, Ordering::Relaxed);
                }
            }
            if !failed && !noted && written >= limit {
                noted = true;
                let note = format!(
                    "\n[qemu-worker] the console reached its cap of {limit} bytes (logs.maxConsoleSize); the rest is dropped\n"
                );
                let _ = file.write_all(note.as_bytes()).await;
            }
            let kept = if failed { 0 } else { keep };
            if kept < n {
                usage
                    .dropped
                    .fetch_add((n - kept) as u64, Ordering::Relaxed);
            }
        }
        let _ = file.flush().await;
    }))
}
