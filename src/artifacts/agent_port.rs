//! The host side of the guest agent port (docs/guest-agent.md): the bulk channel over
//! the virtio-serial port `org.qemu-worker.agent.0`. The guest tools on its other end
//! are hostile until checked: every frame is bounded, every file goes through a
//! `Receiver`, and a broken answer is left behind by resynchronising.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qemu_worker_protocol::agent::{
    self, DATA, DONE, END, EXITED, FILE, FileEnd, FileHeader, Get, GetKind, Hello, OUTPUT, REFUSE,
    Refusal, SKIP, SYNC, Skipped, VERSION,
};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;

use super::budget::Budget;
use super::receive::{ReceiveError, Received, Receiver};
use super::shell::{Shared, ShellOpener};
use crate::config::ArtifactStoreConfig;
use crate::error_chain::DisplayChain;
use crate::job::ArtifactKind;

/// Largest control frame (headers, errors) accepted from the guest.
const MAX_CONTROL_FRAME: usize = agent::MAX_CONTROL;
/// Largest data frame the guest tools send.
const MAX_DATA_FRAME: usize = agent::MAX_DATA;

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
    #[error("the guest tools did not answer the {frame} frame on the agent port within {wait:?}")]
    NoAnswer { frame: char, wait: Duration },
    #[error("the agent port failed")]
    Io(#[from] std::io::Error),
    #[error("the guest sent nothing for {0:?} in the middle of an answer (artifacts.stallSeconds)")]
    Stalled(Duration),
    #[error("the collection deadline of {0} s was spent (artifacts.collectSeconds)")]
    Deadline(u64),
    #[error("{path} was not found in the guest")]
    NotFound { path: String },
    #[error("the guest refused {path}: {code}: {message}")]
    Refused {
        path: String,
        code: String,
        message: String,
    },
    #[error("{path} is larger than the limit of {limit} bytes ({budget})")]
    TooLarge {
        path: String,
        limit: u64,
        budget: &'static str,
    },
    #[error(transparent)]
    Receive(#[from] ReceiveError),
    #[error("the guest broke the agent protocol: {0}")]
    Protocol(String),
    #[error(
        "the image's guest tools speak agent protocol {found}; shells need {needed} \
         (rebuild the image with the current qemu-worker-guest)"
    )]
    TooOld { found: u32, needed: u32 },
    #[error("{0} shells are already open on this VM")]
    TooManyShells(usize),
    #[error(
        "the VM is being saved as a boot snapshot (its agent port is the handshake's): \
         a shell opens once the command starts"
    )]
    Saving,
}

impl AgentError {
    /// Whether the answer ended cleanly, so the connection is still in step. After any
    /// other error the rest of an answer may still be on its way: resynchronise.
    pub fn in_step(&self) -> bool {
        matches!(
            self,
            Self::NotFound { .. } | Self::Refused { .. } | Self::TooLarge { .. }
        )
    }
}

/// A connection to the guest tools' agent port. A task reads every frame the guest
/// sends: shells' frames go to their channels, everything else to the one request in
/// progress (requests are answered one at a time, in order).
#[derive(Debug)]
pub struct AgentClient {
    answers: tokio::sync::mpsc::Receiver<Result<(u8, Vec<u8>), AgentError>>,
    shared: Arc<Shared>,
    demux: tokio::task::JoinHandle<()>,
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        // The demux task holds the other strong reference: with it gone, the
        // connection closes (QEMU takes one at a time) and every shell on it ends.
        self.demux.abort();
        self.shared.lose("the agent port connection was closed");
    }
}

impl AgentClient {
    /// Connects and synchronizes: a SYNC with a fresh nonce is sent (again every second)
    /// and every byte before its echo is discarded, so bytes left over from an earlier,
    /// interrupted answer never pass for a new one, whatever they look like. Then asks
    /// the tools' protocol version (tools of version 1 refuse the question).
    pub async fn connect(path: &Path, wait: Duration) -> Result<Self, AgentError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| AgentError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut reader = BufReader::with_capacity(MAX_DATA_FRAME + 5, read);
        let mut writer = BufWriter::new(write);
        let deadline = Instant::now() + wait;
        loop {
            let nonce = nonce();
            write_frame(&mut writer, SYNC, &nonce).await?;
            let attempt =
                Duration::from_secs(1).min(deadline.saturating_duration_since(Instant::now()));
            match tokio::time::timeout(attempt, skip_to_sync(&mut reader, &nonce)).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) => return Err(e),
                Err(_) if Instant::now() >= deadline => return Err(AgentError::NoAgent(wait)),
                Err(_) => {}
            }
        }
        let hello = serde_json::to_vec(&Hello {
            version: agent::PROTOCOL_VERSION,
        })
        .map_err(|e| AgentError::Protocol(e.to_string()))?;
        write_frame(&mut writer, VERSION, &hello).await?;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(2));
        let version = match tokio::time::timeout(left, version_answer(&mut reader)).await {
            Err(_) => {
                return Err(AgentError::NoAnswer {
                    frame: VERSION as char,
                    wait: left,
                });
            }
            Ok(answer) => match answer? {
                (VERSION, payload) => control::<Hello>(&payload)?.version,
                // Tools before version 2 answer an unknown frame with a refusal.
                (REFUSE, _) => 1,
                (other, payload) => {
                    return Err(AgentError::Protocol(format!(
                        "a {}-byte frame of type {other} in answer to V",
                        payload.len()
                    )));
                }
            },
        };
        let shared = Arc::new(Shared::new(writer, version));
        let (answer, answers) = tokio::sync::mpsc::channel(2);
        let demux = tokio::spawn(demux(reader, Arc::clone(&shared), answer));
        Ok(Self {
            answers,
            shared,
            demux,
        })
    }

    /// Whether the connection is gone (a broken frame, the guest tools went away).
    pub fn is_closed(&self) -> bool {
        self.demux.is_finished() || self.shared.is_closed()
    }

    /// The agent protocol version the guest tools speak (1 for tools without shells).
    pub fn version(&self) -> u32 {
        self.shared.version
    }

    /// Opens shells on this connection, at the same time as its requests.
    pub fn shells(&self) -> ShellOpener {
        ShellOpener(Arc::downgrade(&self.shared))
    }

    async fn send(&mut self, kind: u8, payload: &[u8]) -> Result<(), AgentError> {
        self.shared.send(kind, payload).await
    }

    /// The next frame of the answer in progress.
    async fn frame(&mut self, max: usize) -> Result<(u8, Vec<u8>), AgentError> {
        match self.answers.recv().await {
            Some(Ok((kind, payload))) if payload.len() > max => Err(AgentError::Protocol(format!(
                "a {}-byte frame of type {kind}, over the limit of {max}",
                payload.len()
            ))),
            Some(answer) => answer,
            None => Err(AgentError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        }
    }

    /// Sends a handshake frame (`PARK` or `RESUME`, no payload) and waits up to `wait`
    /// for the guest tools' echo; a refusal or anything else is an error.
    pub async fn handshake(&mut self, kind: u8, wait: Duration) -> Result<(), AgentError> {
        self.send(kind, &[]).await?;
        let Ok(answer) = tokio::time::timeout(wait, self.frame(MAX_CONTROL_FRAME)).await else {
            return Err(AgentError::NoAnswer {
                frame: kind as char,
                wait,
            });
        };
        match answer? {
            (echo, payload) if echo == kind && payload.is_empty() => Ok(()),
            (REFUSE, payload) => {
                let refusal: Refusal = control(&payload)?;
                Err(AgentError::Refused {
                    path: format!("{} frame", kind as char),
                    code: refusal.code.chars().take(64).collect(),
                    message: refusal.message.chars().take(512).collect(),
                })
            }
            (other, payload) => Err(AgentError::Protocol(format!(
                "a {}-byte frame of type {other} in answer to {}",
                payload.len(),
                kind as char
            ))),
        }
    }

    /// Fetches a guest file or folder into `receiver`, which checks and counts every
    /// file against the job's budget. The host hashes every file it receives and checks
    /// its size against the guest's; with `verify` the guest hashes it too and the two
    /// must agree (end to end, at ~5x the cost under TCG). Each frame must come within
    /// the budget's stall limit and before its deadline. After an error that is not
    /// `in_step`, reconnect.
    pub async fn fetch(
        &mut self,
        path: &str,
        kind: ArtifactKind,
        verify: bool,
        receiver: &mut Receiver<'_>,
    ) -> Result<(), AgentError> {
        let max_bytes = receiver.budget().bytes_for(kind);
        let request = Get {
            path: path.to_owned(),
            kind: match kind {
                ArtifactKind::File => GetKind::File,
                ArtifactKind::Directory => GetKind::Directory,
            },
            max_bytes,
            verify,
        };
        let request = serde_json::to_vec(&request)
            .map_err(|e| AgentError::Protocol(format!("the request cannot be encoded: {e}")))?;
        self.send(agent::GET, &request).await?;
        loop {
            let wait = receiver.budget().frame_wait();
            let Ok(frame) = tokio::time::timeout(wait, self.frame(MAX_DATA_FRAME)).await else {
                return Err(if receiver.budget().deadline_passed() {
                    AgentError::Deadline(receiver.budget().limits().collect_seconds)
                } else {
                    AgentError::Stalled(wait)
                });
            };
            let (frame, payload) = frame?;
            match frame {
                DATA => receiver.data(&payload).await?,
                FILE => {
                    let header: FileHeader = control(&payload)?;
                    receiver.begin(&header.name, header.size).await?;
                }
                END => {
                    let end: FileEnd = control(&payload)?;
                    receiver.end(end.size, end.sha256.as_deref()).await?;
                }
                SKIP => {
                    let skipped: Skipped = control(&payload)?;
                    receiver.skip(&skipped.name, &skipped.reason)?;
                }
                REFUSE => {
                    let refusal: Refusal = control(&payload)?;
                    return Err(match refusal.code.as_str() {
                        agent::NOT_FOUND => AgentError::NotFound {
                            path: path.to_owned(),
                        },
                        agent::TOO_LARGE => AgentError::TooLarge {
                            path: path.to_owned(),
                            limit: max_bytes,
                            budget: receiver.budget().limit_name(kind),
                        },
                        _ => AgentError::Refused {
                            path: path.to_owned(),
                            code: refusal.code.chars().take(64).collect(),
                            message: refusal.message.chars().take(512).collect(),
                        },
                    });
                }
                DONE => {
                    receiver.check_complete()?;
                    return Ok(());
                }
                other => {
                    return Err(AgentError::Protocol(format!("unknown frame type {other}")));
                }
            }
        }
    }
}

impl AgentClient {
    /// Fetches one artifact, stored as `name` under `store`, with a budget of its own
    /// (`vm boot`, tests and benchmarks; jobs go through `collect_artifacts`).
    pub async fn fetch_one(
        &mut self,
        path: &str,
        kind: ArtifactKind,
        store: &Path,
        name: &str,
        limits: &ArtifactStoreConfig,
        verify: bool,
    ) -> Result<Received, AgentError> {
        let mut budget = Budget::new(limits);
        // Beside the store, not in it: only complete files are ever in the store.
        let partial = store.with_extension("partial");
        let mut receiver = Receiver::new(&mut budget, store, &partial, name, kind);
        let fetched = self.fetch(path, kind, verify, &mut receiver).await;
        let received = match fetched {
            Ok(()) => Ok(receiver.finish()),
            Err(e) => {
                receiver.abandon().await;
                Err(e)
            }
        };
        let _ = tokio::fs::remove_dir_all(&partial).await;
        received
    }
}

/// The answer to `V`, past the frames of shells the guest ended when it saw this
/// connection's SYNC (their exits and last output may follow the echo).
async fn version_answer(reader: &mut Reader) -> Result<(u8, Vec<u8>), AgentError> {
    loop {
        let (kind, payload) = read_frame(reader, MAX_CONTROL_FRAME).await?;
        if !matches!(kind, OUTPUT | EXITED) {
            return Ok((kind, payload));
        }
    }
}

/// Reads until the echo of `nonce`, as raw bytes: what comes before it is not read as
/// frames (a left-over length would otherwise be taken for one).
async fn skip_to_sync(reader: &mut Reader, nonce: &[u8]) -> Result<(), AgentError> {
    // The sync frame: its head, then the nonce.
    let mut pattern = agent::head(SYNC, agent::NONCE_LEN as u32).to_vec();
    pattern.extend_from_slice(nonce);
    let mut carry: Vec<u8> = Vec::with_capacity(pattern.len());
    loop {
        let buffer = reader.fill_buf().await?;
        if buffer.is_empty() {
            return Err(AgentError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let read = buffer.len();
        let mut hay = std::mem::take(&mut carry);
        let before = hay.len();
        hay.extend_from_slice(buffer);
        if let Some(at) = hay.windows(pattern.len()).position(|w| w == pattern) {
            reader.consume(at + pattern.len() - before);
            return Ok(());
        }
        reader.consume(read);
        carry = hay[hay.len().saturating_sub(pattern.len() - 1)..].to_vec();
    }
}

type Reader = BufReader<tokio::net::unix::OwnedReadHalf>;
pub(super) type Writer = BufWriter<tokio::net::unix::OwnedWriteHalf>;

async fn write_frame(writer: &mut Writer, kind: u8, payload: &[u8]) -> Result<(), AgentError> {
    let len = u32::try_from(payload.len())
        .map_err(|_| AgentError::Protocol("request too large".into()))?;
    writer.write_all(&agent::head(kind, len)).await?;
    writer.write_all(payload).await?;
    writer.flush().await?;
    Ok(())
}

/// The largest frame of `kind` the guest may send: data (a file's, a shell's) in
/// [`DATA`] and [`OUTPUT`] frames, control frames within [`MAX_CONTROL_FRAME`]; refused
/// at the head, before waiting for bytes that may never come.
fn limit_of(kind: u8) -> usize {
    match kind {
        DATA => MAX_DATA_FRAME,
        OUTPUT => agent::MAX_SHELL_DATA + 1,
        _ => MAX_CONTROL_FRAME,
    }
}

async fn read_frame(reader: &mut Reader, max: usize) -> Result<(u8, Vec<u8>), AgentError> {
    let mut head = [0u8; agent::HEAD_LEN];
    reader.read_exact(&mut head).await?;
    let (kind, len) = agent::parse_head(head);
    let max = max.min(limit_of(kind));
    if len > max {
        return Err(AgentError::Protocol(format!(
            "a {len}-byte frame, over the limit of {max}"
        )));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    Ok((kind, payload))
}

/// Reads every frame the guest sends: shells' frames to their channels, the rest to
/// the request in progress. Ends at the first broken frame, which the request (if
/// any) is told of; every shell is told the connection is lost.
async fn demux(
    mut reader: Reader,
    shared: Arc<Shared>,
    answers: tokio::sync::mpsc::Sender<Result<(u8, Vec<u8>), AgentError>>,
) {
    loop {
        match read_frame(&mut reader, MAX_DATA_FRAME).await {
            Ok((OUTPUT, payload)) => shared.output(&payload),
            Ok((EXITED, payload)) => shared.exited(&payload),
            // Tools announce themselves when they open the port: these restarted, and
            // the shells of the tools before them are gone. The connection is given up
            // (a request in progress stalls; the next one connects afresh).
            Ok((VERSION, _)) => {
                shared.lose("the guest tools restarted; their shells ended with them")
            }
            Ok(frame) => {
                if answers.send(Ok(frame)).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                shared.lose(&format!("the agent port failed: {}", DisplayChain(&e)));
                let _ = answers.send(Err(e)).await;
                break;
            }
        }
    }
}

fn control<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, AgentError> {
    if payload.len() > MAX_CONTROL_FRAME {
        return Err(AgentError::Protocol(format!(
            "a {}-byte control frame, over the limit of {MAX_CONTROL_FRAME}",
            payload.len()
        )));
    }
    serde_json::from_slice(payload).map_err(|e| AgentError::Protocol(e.to_string()))
}

fn nonce() -> Vec<u8> {
    let mut nonce = [0u8; 8];
    // A short read leaves zeros and the time below still makes the nonce fresh.
    let _ = rustix::rand::getrandom(&mut nonce, rustix::rand::GetRandomFlags::empty());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (u64::from_be_bytes(nonce) ^ nanos).to_be_bytes().to_vec()
}
