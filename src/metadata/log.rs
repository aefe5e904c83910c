use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum LogWriterError {
    #[error("failed to create the job log {path:?}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

enum LogMsg {
    Bytes(bytes::Bytes),
    Line(String),
    Flush(tokio::sync::oneshot::Sender<u64>),
}

/// The job log: one task owns the file and appends what every stream sends, in the
/// order it arrives, up to a cap. Past the cap one `[qemu-worker:error]` line says the
/// log was truncated, and the rest is dropped (never silently). Cheap to clone.
#[derive(Debug, Clone)]
pub struct LogSink {
    tx: mpsc::Sender<LogMsg>,
}

impl std::fmt::Debug for LogMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogMsg")
    }
}

impl LogSink {
    /// Creates (truncates) the log file at `path`, capped at `max_bytes`.
    pub async fn create(path: &Path, max_bytes: u64) -> Result<Self, LogWriterError> {
        Self::create_with_tee(path, max_bytes, false).await
    }

    /// Like `create`; with `tee` everything written is also copied to stderr live
    /// (what `qemu-worker run` shows its user).
    pub async fn create_with_tee(
        path: &Path,
        max_bytes: u64,
        tee: bool,
    ) -> Result<Self, LogWriterError> {
        let file =
            tokio::fs::File::create(path)
                .await
                .map_err(|source| LogWriterError::Create {
                    path: path.to_path_buf(),
                    source,
                })?;
        let (tx, mut rx) = mpsc::channel::<LogMsg>(256);
        let path = path.to_path_buf();
        tokio::spawn(async move {
            let mut file = file;
            let mut written: u64 = 0;
            let mut truncated = false;
            while let Some(msg) = rx.recv().await {
                let data = match msg {
                    LogMsg::Bytes(bytes) => bytes,
                    LogMsg::Line(line) => bytes::Bytes::from(line),
                    LogMsg::Flush(done) => {
                        let _ = file.flush().await;
                        let _ = done.send(written);
                        continue;
                    }
                };
                if truncated {
                    continue;
                }
                if tee {
                    let mut stderr = tokio::io::stderr();
                    let _ = stderr.write_all(&data).await;
                    let _ = stderr.flush().await;
                }
                let room = max_bytes.saturating_sub(written);
                let take = (data.len() as u64).min(room) as usize;
                let result = file.write_all(&data[..take]).await;
                written += take as u64;
                if take < data.len() {
                    truncated = true;
                    let note = format!(
                        "\n[qemu-worker:error] the log reached its limit of {max_bytes} bytes; the rest is dropped\n"
                    );
                    let _ = file.write_all(note.as_bytes()).await;
                }
                if let Err(error) = result {
                    tracing::error!(path = %path.display(), %error, "failed to write the job log");
                    truncated = true;
                }
            }
            let _ = file.flush().await;
        });
        Ok(Self { tx })
    }

    /// Appends bytes of command output. Returns false once the log is gone.
    pub async fn append(&self, bytes: bytes::Bytes) -> bool {
        self.tx.send(LogMsg::Bytes(bytes)).await.is_ok()
    }

    /// Appends one line from the worker itself (e.g. `[qemu-worker:error] …`).
    pub async fn line(&self, line: &str) {
        let _ = self.tx.send(LogMsg::Line(format!("{line}\n"))).await;
    }

    /// Waits until everything sent so far is on disk; returns the bytes written.
    pub async fn flush(&self) -> u64 {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.tx.send(LogMsg::Flush(done)).await.is_err() {
            return 0;
        }
        wait.await.unwrap_or(0)
    }
}
