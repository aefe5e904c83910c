use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;

use crate::job::{ArtifactKind, artifact_name_problem};

/// Largest control frame (headers, errors) accepted from the guest.
const MAX_CONTROL_FRAME: usize = 64 << 10;
/// Largest data frame the guest tools send.
const MAX_DATA_FRAME: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("failed to connect to the agent port socket {path:?}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest tools did not answer on the agent port within {0:?}")]
    NoAgent(Duration),
    #[error("agent port I/O failed")]
    Io(#[from] std::io::Error),
    #[error("no answer from the guest within {0:?}")]
    Timeout(Duration),
    #[error("{path} was not found in the guest")]
    NotFound { path: String },
    #[error("the guest refused {path}: {code}: {message}")]
    Refused {
        path: String,
        code: String,
        message: String,
    },
    #[error("{path} is larger than the limit of {limit} bytes")]
    TooLarge { path: String, limit: u64 },
    #[error("the guest sent an unsafe file name {name:?}: {problem}")]
    UnsafeName { name: String, problem: String },
    #[error("{name} arrived corrupted: sha256 {actual}, the guest computed {expected}")]
    Checksum {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("the guest broke the agent protocol: {0}")]
    Protocol(String),
}

/// One file received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedFile {
    /// Relative name inside a fetched folder; empty for a single file.
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// Something the guest did not send, and why (a symbolic link, a device, …).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SkippedEntry {
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchedTree {
    pub files: Vec<FetchedFile>,
    pub skipped: Vec<SkippedEntry>,
}

/// A connection to the guest tools' agent port.
#[derive(Debug)]
pub struct AgentClient {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: BufWriter<tokio::net::unix::OwnedWriteHalf>,
}

impl AgentClient {
    /// Connects and synchronizes: a SYNC with a fresh nonce is sent (again every second)
    /// and everything before its echo is discarded, so bytes left over from an earlier,
    /// interrupted exchange never pass for an answer.
    pub async fn connect(path: &Path, wait: Duration) -> Result<Self, AgentError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| AgentError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut client = Self {
            reader: BufReader::with_capacity(MAX_DATA_FRAME + 5, read),
            writer: BufWriter::new(write),
        };
        let deadline = Instant::now() + wait;
        loop {
            let nonce = nonce();
            client.send(b'S', &nonce).await?;
            let attempt =
                Duration::from_secs(1).min(deadline.saturating_duration_since(Instant::now()));
            let synced = tokio::time::timeout(attempt, async {
                loop {
                    let (kind, payload) = client.frame(MAX_DATA_FRAME).await?;
                    if kind == b'S' && payload == nonce {
                        return Ok::<(), AgentError>(());
                    }
                }
            })
            .await;
            match synced {
                Ok(Ok(())) => return Ok(client),
                Ok(Err(e)) => return Err(e),
                Err(_) if Instant::now() >= deadline => return Err(AgentError::NoAgent(wait)),
                Err(_) => {}
            }
        }
    }

    async fn send(&mut self, kind: u8, payload: &[u8]) -> Result<(), AgentError> {
        let len = u32::try_from(payload.len())
            .map_err(|_| AgentError::Protocol("request too large".into()))?;
        self.writer.write_all(&[kind]).await?;
        self.writer.write_all(&len.to_be_bytes()).await?;
        self.writer.write_all(payload).await?;
        self.writer.flush().await?;
        Ok(())
    }

    async fn frame(&mut self, max: usize) -> Result<(u8, Vec<u8>), AgentError> {
        let mut head = [0u8; 5];
        self.reader.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > max {
            return Err(AgentError::Protocol(format!("a {len}-byte frame")));
        }
        let mut payload = vec![0u8; len];
        self.reader.read_exact(&mut payload).await?;
        Ok((head[0], payload))
    }

    /// Fetches a guest file (written to `dest`) or folder (its files written under the
    /// directory `dest`), at most `max_bytes` in all. The host hashes every file it
    /// receives and checks its size against the guest's; with `verify` the guest hashes
    /// it too and the two must agree (end to end, at ~5x the cost under TCG).
    /// `timeout` bounds the wait for each frame. After an error, reconnect.
    pub async fn fetch(
        &mut self,
        path: &str,
        kind: ArtifactKind,
        dest: &Path,
        max_bytes: u64,
        verify: bool,
        timeout: Duration,
    ) -> Result<FetchedTree, AgentError> {
        let request = serde_json::json!({
            "path": path, "kind": kind.as_str(), "maxBytes": max_bytes, "verify": verify
        });
        self.send(b'G', request.to_string().as_bytes()).await?;
        if kind == ArtifactKind::Directory {
            tokio::fs::create_dir_all(dest).await?;
        }
        let mut tree = FetchedTree::default();
        let mut current: Option<(tokio::fs::File, FetchedFile, Sha256)> = None;
        let mut total: u64 = 0;
        loop {
            let (frame, payload) = tokio::time::timeout(timeout, self.frame(MAX_DATA_FRAME))
                .await
                .map_err(|_| AgentError::Timeout(timeout))??;
            match frame {
                b'D' => {
                    let Some((file, entry, hasher)) = current.as_mut() else {
                        return Err(AgentError::Protocol("data outside a file".into()));
                    };
                    total += payload.len() as u64;
                    if total > max_bytes {
                        return Err(AgentError::TooLarge {
                            path: path.to_owned(),
                            limit: max_bytes,
                        });
                    }
                    hasher.update(&payload);
                    entry.size += payload.len() as u64;
                    file.write_all(&payload).await?;
                }
                b'F' => {
                    let header: FileHeader = control(&payload)?;
                    let target = target_path(dest, kind, &header.name)?;
                    if let Some(parent) = target.parent() {
                        tokio::fs::create_dir_all(parent).await?;
                    }
                    let file = tokio::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&target)
                        .await?;
                    current = Some((
                        file,
                        FetchedFile {
                            name: header.name,
                            size: 0,
                            sha256: String::new(),
                        },
                        Sha256::new(),
                    ));
                }
                b'E' => {
                    let end: FileEnd = control(&payload)?;
                    let Some((mut file, mut entry, hasher)) = current.take() else {
                        return Err(AgentError::Protocol("a file end without a file".into()));
                    };
                    file.flush().await?;
                    let digest: [u8; 32] = hasher.finalize().into();
                    entry.sha256 = digest.iter().map(|b| format!("{b:02x}")).collect();
                    if end.size != entry.size {
                        return Err(AgentError::Protocol(format!(
                            "{} arrived with {} bytes, the guest sent {}",
                            entry.name, entry.size, end.size
                        )));
                    }
                    if let Some(expected) = end.sha256
                        && expected != entry.sha256
                    {
                        return Err(AgentError::Checksum {
                            name: entry.name,
                            expected,
                            actual: entry.sha256,
                        });
                    }
                    tree.files.push(entry);
                }
                b'K' => tree.skipped.push(control(&payload)?),
                b'X' => {
                    let refusal: Refusal = control(&payload)?;
                    return Err(match refusal.code.as_str() {
                        "not-found" => AgentError::NotFound {
                            path: path.to_owned(),
                        },
                        "too-large" => AgentError::TooLarge {
                            path: path.to_owned(),
                            limit: max_bytes,
                        },
                        _ => AgentError::Refused {
                            path: path.to_owned(),
                            code: refusal.code,
                            message: refusal.message,
                        },
                    });
                }
                b'Z' => return Ok(tree),
                other => return Err(AgentError::Protocol(format!("unknown frame type {other}"))),
            }
        }
    }
}

#[derive(Deserialize)]
struct FileHeader {
    name: String,
}

#[derive(Deserialize)]
struct FileEnd {
    size: u64,
    sha256: Option<String>,
}

#[derive(Deserialize)]
struct Refusal {
    code: String,
    message: String,
}

fn control<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, AgentError> {
    if payload.len() > MAX_CONTROL_FRAME {
        return Err(AgentError::Protocol("an oversized control frame".into()));
    }
    serde_json::from_slice(payload).map_err(|e| AgentError::Protocol(e.to_string()))
}

/// Where a received file goes. Names come from the guest and are hostile until checked:
/// the same rules as artifact names (relative, no `..`, no empty segments).
fn target_path(dest: &Path, kind: ArtifactKind, name: &str) -> Result<PathBuf, AgentError> {
    match kind {
        ArtifactKind::File if name.is_empty() => Ok(dest.to_path_buf()),
        ArtifactKind::File => Err(AgentError::Protocol(
            "a named file in a single-file answer".into(),
        )),
        ArtifactKind::Directory => match artifact_name_problem(name) {
            None => Ok(dest.join(name)),
            Some(problem) => Err(AgentError::UnsafeName {
                name: name.to_owned(),
                problem,
            }),
        },
    }
}

fn nonce() -> Vec<u8> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mixed = (nanos as u64) ^ (u64::from(std::process::id()) << 40);
    mixed.to_be_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_names_cannot_escape_the_destination() {
        let dest = Path::new("/tmp/out");
        assert_eq!(
            target_path(dest, ArtifactKind::Directory, "a/b.txt").ok(),
            Some(dest.join("a/b.txt"))
        );
        for bad in ["../x", "/etc/passwd", "a/../../x", "", "a//b"] {
            assert!(
                target_path(dest, ArtifactKind::Directory, bad).is_err(),
                "{bad:?}"
            );
        }
        assert!(target_path(dest, ArtifactKind::File, "x").is_err());
    }
}
