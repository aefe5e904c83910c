use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Bytes per `guest-file-read`: measured here, 4 MiB reads were the fastest (larger
/// ones cost more base64 and JSON work per round trip inside an emulated CPU).
pub const FILE_READ_CHUNK: u64 = 4 << 20;
/// Replies larger than this are not QGA replies.
const MAX_REPLY: usize = 64 << 20;
/// How often `guest-exec-status` is polled.
const EXEC_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    #[error("failed to connect to the guest agent socket {path:?}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest agent I/O failed")]
    Io {
        #[source]
        source: std::io::Error,
    },
    #[error("the guest agent did not answer guest-sync-delimited within {0:?}")]
    NoAgent(Duration),
    #[error("guest agent command {command} did not answer within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("guest agent command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("the guest agent does not offer {command} (absent or disabled in guest-info)")]
    Disabled { command: String },
    #[error("guest file {path} is larger than the limit of {limit} bytes")]
    TooLarge { path: String, limit: u64 },
    #[error("the {stream} of the guest command was truncated by the guest agent")]
    Truncated { stream: &'static str },
    #[error("the guest agent sent an unexpected reply to {command}: {reply}")]
    BadReply { command: String, reply: String },
    #[error("failed to write {path:?}")]
    Sink {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What `file_read` streamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRead {
    pub bytes: u64,
    pub sha256: String,
}

/// The result of a command run with `guest-exec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: Option<i32>,
    /// The signal that ended the command, if one did.
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A client for qemu-ga over the host end of its virtio-serial port (or any unix
/// socket qemu-ga listens on). One owner at a time; every call has a timeout, and after
/// any timeout the next call re-synchronizes with `guest-sync-delimited`.
#[derive(Debug)]
pub struct QgaClient {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    synced: bool,
    next_sync: u64,
    enabled: Option<BTreeMap<String, bool>>,
}

impl QgaClient {
    /// Connects and synchronizes, retrying for up to `wait` while the agent starts.
    pub async fn connect(path: &Path, wait: Duration) -> Result<Self, QgaError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QgaError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut client = Self {
            reader: BufReader::new(read),
            writer: write,
            synced: false,
            next_sync: u64::from(std::process::id()) << 32 | u64::from(rand_seed()),
            enabled: None,
        };
        client.sync(wait).await?;
        Ok(client)
    }

    /// `guest-sync-delimited`: discards whatever stale bytes precede the 0xFF the agent
    /// puts before its answer, and checks the answer carries our random id.
    pub async fn sync(&mut self, wait: Duration) -> Result<(), QgaError> {
        let deadline = Instant::now() + wait;
        loop {
            self.next_sync = self.next_sync.wrapping_add(1);
            let id = self.next_sync;
            let mut request = vec![0xFF];
            request.extend_from_slice(
                json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                    .to_string()
                    .as_bytes(),
            );
            request.push(b'\n');
            self.writer
                .write_all(&request)
                .await
                .map_err(|source| QgaError::Io { source })?;
            let attempt =
                Duration::from_secs(1).min(deadline.saturating_duration_since(Instant::now()));
            if let Ok(Ok(true)) = tokio::time::timeout(attempt, self.await_sync(id)).await {
                self.synced = true;
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(QgaError::NoAgent(wait));
            }
        }
    }

    async fn await_sync(&mut self, id: u64) -> Result<bool, QgaError> {
        // Skip to the delimiter, then read replies until ours (older syncs may answer).
        loop {
            let mut byte = [0u8; 1];
            self.reader
                .read_exact(&mut byte)
                .await
                .map_err(|source| QgaError::Io { source })?;
            if byte[0] == 0xFF {
                break;
            }
        }
        loop {
            let line = self.read_line().await?;
            let line = line.trim_start_matches('\u{FF}');
            if let Ok(value) = serde_json::from_str::<Value>(line)
                && value["return"].as_u64() == Some(id)
            {
                return Ok(true);
            }
        }
    }

    async fn read_line(&mut self) -> Result<String, QgaError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_REPLY as u64)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|source| QgaError::Io { source })?;
        if n == 0 {
            return Err(QgaError::Io {
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "guest agent closed the connection",
                ),
            });
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        if !self.synced {
            self.sync(timeout).await?;
        }
        let mut message = json!({"execute": command});
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut bytes = message.to_string().into_bytes();
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .await
            .map_err(|source| QgaError::Io { source })?;
        let line = match tokio::time::timeout(timeout, self.read_line()).await {
            Ok(line) => line?,
            Err(_) => {
                self.synced = false;
                return Err(QgaError::Timeout {
                    command: command.to_owned(),
                    timeout,
                });
            }
        };
        let reply: Value =
            serde_json::from_str(line.trim_start_matches('\u{FF}')).map_err(|_| {
                self.synced = false;
                QgaError::BadReply {
                    command: command.to_owned(),
                    reply: line.chars().take(200).collect(),
                }
            })?;
        if let Some(error) = reply.get("error") {
            return Err(QgaError::Command {
                command: command.to_owned(),
                class: error["class"].as_str().unwrap_or("GenericError").to_owned(),
                desc: error["desc"].as_str().unwrap_or("").to_owned(),
            });
        }
        reply
            .get("return")
            .cloned()
            .ok_or_else(|| QgaError::BadReply {
                command: command.to_owned(),
                reply: line.chars().take(200).collect(),
            })
    }

    pub async fn ping(&mut self, timeout: Duration) -> Result<(), QgaError> {
        self.execute("guest-ping", None, timeout).await.map(drop)
    }

    /// `guest-info`: the agent's version and which commands it offers (cached).
    pub async fn info(&mut self, timeout: Duration) -> Result<Value, QgaError> {
        let info = self.execute("guest-info", None, timeout).await?;
        let enabled = info["supported_commands"]
            .as_array()
            .map(|commands| {
                commands
                    .iter()
                    .filter_map(|c| Some((c["name"].as_str()?.to_owned(), c["enabled"].as_bool()?)))
                    .collect()
            })
            .unwrap_or_default();
        self.enabled = Some(enabled);
        Ok(info)
    }

    /// Fails unless `guest-info` lists every command in `commands` as enabled.
    async fn require(&mut self, commands: &[&str], timeout: Duration) -> Result<(), QgaError> {
        if self.enabled.is_none() {
            self.info(timeout).await?;
        }
        let enabled = self.enabled.as_ref();
        for command in commands {
            if enabled.and_then(|e| e.get(*command)) != Some(&true) {
                return Err(QgaError::Disabled {
                    command: (*command).to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Streams a guest file into `sink` in `FILE_READ_CHUNK` pieces, failing once more
    /// than `limit` bytes arrive, and returns its size and sha256.
    pub async fn file_read<W: AsyncWrite + Unpin>(
        &mut self,
        path: &str,
        sink: &mut W,
        limit: u64,
        timeout: Duration,
    ) -> Result<FileRead, QgaError> {
        self.require(
            &["guest-file-open", "guest-file-read", "guest-file-close"],
            timeout,
        )
        .await?;
        let handle = self
            .execute(
                "guest-file-open",
                Some(json!({"path": path, "mode": "r"})),
                timeout,
            )
            .await?;
        let handle = handle.as_i64().ok_or_else(|| QgaError::BadReply {
            command: "guest-file-open".into(),
            reply: handle.to_string(),
        })?;
        let result = self.read_handle(path, handle, sink, limit, timeout).await;
        // Close even after a failure; a failed close only matters if all else worked.
        let closed = self
            .execute("guest-file-close", Some(json!({"handle": handle})), timeout)
            .await;
        let read = result?;
        closed?;
        Ok(read)
    }

    async fn read_handle<W: AsyncWrite + Unpin>(
        &mut self,
        path: &str,
        handle: i64,
        sink: &mut W,
        limit: u64,
        timeout: Duration,
    ) -> Result<FileRead, QgaError> {
        let mut hasher = Sha256::new();
        let mut total: u64 = 0;
        loop {
            let chunk = self
                .execute(
                    "guest-file-read",
                    Some(json!({"handle": handle, "count": FILE_READ_CHUNK})),
                    timeout,
                )
                .await?;
            let data = chunk["buf-b64"]
                .as_str()
                .and_then(|b64| BASE64.decode(b64).ok())
                .ok_or_else(|| QgaError::BadReply {
                    command: "guest-file-read".into(),
                    reply: chunk.to_string().chars().take(200).collect(),
                })?;
            total += data.len() as u64;
            if total > limit {
                return Err(QgaError::TooLarge {
                    path: path.to_owned(),
                    limit,
                });
            }
            hasher.update(&data);
            sink.write_all(&data)
                .await
                .map_err(|source| QgaError::Sink {
                    path: path.to_owned(),
                    source,
                })?;
            if chunk["eof"].as_bool() == Some(true) || data.is_empty() {
                break;
            }
        }
        sink.flush().await.map_err(|source| QgaError::Sink {
            path: path.to_owned(),
            source,
        })?;
        let digest: [u8; 32] = hasher.finalize().into();
        Ok(FileRead {
            bytes: total,
            sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }

    /// Runs a program in the guest (no shell), waits up to `timeout` for it, and returns
    /// its exit status and captured output. Output the agent truncated is an error.
    pub async fn exec(
        &mut self,
        path: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput, QgaError> {
        let call = Duration::from_secs(10).min(timeout);
        self.require(&["guest-exec", "guest-exec-status"], call)
            .await?;
        let started = self
            .execute(
                "guest-exec",
                Some(json!({"path": path, "arg": args, "capture-output": true})),
                call,
            )
            .await?;
        let pid = started["pid"].as_i64().ok_or_else(|| QgaError::BadReply {
            command: "guest-exec".into(),
            reply: started.to_string(),
        })?;
        let deadline = Instant::now() + timeout;
        loop {
            let status = self
                .execute("guest-exec-status", Some(json!({"pid": pid})), call)
                .await?;
            if status["exited"].as_bool() == Some(true) {
                for (flag, stream) in [("out-truncated", "stdout"), ("err-truncated", "stderr")] {
                    if status[flag].as_bool() == Some(true) {
                        return Err(QgaError::Truncated { stream });
                    }
                }
                let decode = |key: &str| {
                    status[key]
                        .as_str()
                        .map(|b64| BASE64.decode(b64).unwrap_or_default())
                        .unwrap_or_default()
                };
                let code = |key: &str| status[key].as_i64().and_then(|v| i32::try_from(v).ok());
                return Ok(ExecOutput {
                    exit_code: code("exitcode"),
                    signal: code("signal"),
                    stdout: decode("out-data"),
                    stderr: decode("err-data"),
                });
            }
            if Instant::now() >= deadline {
                return Err(QgaError::Timeout {
                    command: format!("guest-exec {path}"),
                    timeout,
                });
            }
            tokio::time::sleep(EXEC_POLL).await;
        }
    }

    /// Asks the guest to power off. qemu-ga sends no reply when this succeeds.
    pub async fn shutdown(&mut self, timeout: Duration) -> Result<(), QgaError> {
        self.require(&["guest-shutdown"], timeout).await?;
        let message = json!({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}});
        let mut bytes = message.to_string().into_bytes();
        bytes.push(b'\n');
        self.synced = false;
        self.writer
            .write_all(&bytes)
            .await
            .map_err(|source| QgaError::Io { source })
    }
}

/// A little per-connection randomness for sync ids, without a random number crate.
fn rand_seed() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos ^ (std::process::id().rotate_left(16))
}
