//! Shells into a running guest over the agent port (docs/guest-agent.md, version 2):
//! channels multiplexed with artifact transfers on one connection. What the guest sends
//! is bounded here: frames by the connection, each shell's queue by [`QUEUE`] (a reader
//! that falls behind for [`BEHIND`] loses its shell, never the connection), and the
//! number of shells per VM by [`MAX_SHELLS`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use qemu_worker_protocol::agent::{
    self, CLOSE, Channel, Exited, INPUT, OPEN, Open, RESIZE, Resize,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::agent_port::AgentError;

/// Shells open at once on one VM.
pub const MAX_SHELLS: usize = 8;
/// Output frames queued for a shell's reader (each at most 16 KiB).
const QUEUE: usize = 256;
/// How long a full queue may stay full before its shell is closed.
const BEHIND: Duration = Duration::from_secs(5);
/// The largest rows or columns a terminal may have.
pub const MAX_TERMINAL: u16 = 1000;

/// What to start: a command (or the image's login shell), on a terminal or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellRequest {
    pub command: Option<Vec<String>>,
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
    pub term: Option<String>,
}

/// What a shell sends back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellEvent {
    /// Bytes from its stdout ([`agent::STDOUT`], the terminal's output with a tty) or
    /// stderr ([`agent::STDERR`]).
    Output { stream: u8, data: Vec<u8> },
    /// Its command ended; nothing follows.
    Exited(ShellExit),
    /// The shell is gone without an exit (the connection broke, the VM went away, its
    /// reader fell behind): why.
    Lost(String),
}

/// How a shell's command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Why it did not start.
    pub error: Option<String>,
}

struct Route {
    events: mpsc::Sender<ShellEvent>,
    why: Arc<OnceLock<String>>,
}

/// One connection's writer and shell channels, shared by its requests and its shells.
pub(super) struct Shared {
    writer: tokio::sync::Mutex<super::agent_port::Writer>,
    channels: std::sync::Mutex<HashMap<u32, Route>>,
    next_channel: AtomicU32,
    pub(super) version: u32,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(super) fn new(writer: super::agent_port::Writer, version: u32) -> Self {
        Self {
            writer: tokio::sync::Mutex::new(writer),
            channels: std::sync::Mutex::new(HashMap::new()),
            next_channel: AtomicU32::new(1),
            version,
        }
    }

    /// One frame, whole, between any others.
    pub(super) async fn send(&self, kind: u8, payload: &[u8]) -> Result<(), AgentError> {
        let len = u32::try_from(payload.len())
            .map_err(|_| AgentError::Protocol("request too large".into()))?;
        let mut writer = self.writer.lock().await;
        writer.write_all(&agent::head(kind, len)).await?;
        writer.write_all(payload).await?;
        writer.flush().await?;
        Ok(())
    }

    fn route(&self, channel: u32) -> Option<(mpsc::Sender<ShellEvent>, Arc<OnceLock<String>>)> {
        let channels = self.channels.lock().ok()?;
        channels
            .get(&channel)
            .map(|r| (r.events.clone(), Arc::clone(&r.why)))
    }

    fn unroute(&self, channel: u32) {
        if let Ok(mut channels) = self.channels.lock() {
            channels.remove(&channel);
        }
    }

    /// An `OUTPUT` frame: to its shell, unless the channel is unknown (it ended, or the
    /// guest made it up). A shell whose reader does not take it in time is closed.
    pub(super) async fn output(&self, payload: &[u8]) {
        let Some((channel, rest)) = agent::split_channel(payload) else {
            return;
        };
        let Some((&stream, data)) = rest.split_first() else {
            return;
        };
        if data.len() > agent::MAX_SHELL_DATA || !matches!(stream, agent::STDOUT | agent::STDERR) {
            return self
                .end(channel, "the guest sent a malformed shell frame")
                .await;
        }
        let Some((events, why)) = self.route(channel) else {
            return;
        };
        let event = ShellEvent::Output {
            stream,
            data: data.to_vec(),
        };
        if tokio::time::timeout(BEHIND, events.send(event))
            .await
            .is_err()
        {
            let _ = why.set(format!(
                "its output was not read for {} s: the shell was closed",
                BEHIND.as_secs()
            ));
            self.end(channel, "").await;
        }
    }

    /// Closes a channel from the host's side: its shell hears `why` (when not empty).
    async fn end(&self, channel: u32, why: &str) {
        if let Some((_, reason)) = self.route(channel)
            && !why.is_empty()
        {
            let _ = reason.set(why.to_owned());
        }
        self.unroute(channel);
        if let Ok(close) = serde_json::to_vec(&Channel { channel }) {
            let _ = self.send(CLOSE, &close).await;
        }
    }

    /// An `EXITED` frame ends its channel.
    pub(super) fn exited(&self, payload: &[u8]) {
        let Ok(exited) = serde_json::from_slice::<Exited>(payload) else {
            return;
        };
        let Some((events, _)) = self.route(exited.channel) else {
            return;
        };
        self.unroute(exited.channel);
        let exit = ShellExit {
            code: exited.code,
            signal: exited.signal,
            error: exited
                .error
                .map(|e| e.chars().take(512).collect::<String>()),
        };
        // The queue may be full: the exit must not be lost, nor wait on the reader.
        tokio::spawn(async move {
            let _ = events.send(ShellEvent::Exited(exit)).await;
        });
    }

    /// The connection is gone: every shell on it hears why.
    pub(super) fn lose(&self, why: &str) {
        if let Ok(mut channels) = self.channels.lock() {
            for (_, route) in channels.drain() {
                let _ = route.why.set(why.to_owned());
            }
        }
    }
}

/// Opens shells on a connection while it lasts.
#[derive(Debug, Clone)]
pub struct ShellOpener(pub(super) Weak<Shared>);

impl ShellOpener {
    /// Whether its connection is still up.
    pub fn is_alive(&self) -> bool {
        self.0.strong_count() > 0
    }

    /// Starts `request` in the guest. The guest answers with output and an exit; a
    /// command that cannot start exits with an `error`.
    pub async fn open(&self, request: &ShellRequest) -> Result<Shell, AgentError> {
        let shared = self.0.upgrade().ok_or_else(gone)?;
        if shared.version < agent::SHELL_VERSION {
            return Err(AgentError::Protocol(format!(
                "the image's guest tools speak agent protocol {}; shells need {} \
                 (rebuild the image with the current qemu-worker-guest)",
                shared.version,
                agent::SHELL_VERSION
            )));
        }
        let channel = shared.next_channel.fetch_add(1, Ordering::Relaxed);
        let (events, receiver) = mpsc::channel(QUEUE);
        let why = Arc::new(OnceLock::new());
        {
            let mut channels = shared
                .channels
                .lock()
                .map_err(|_| AgentError::Protocol("the shell table is poisoned".into()))?;
            if channels.len() >= MAX_SHELLS {
                return Err(AgentError::Protocol(format!(
                    "{MAX_SHELLS} shells are already open on this VM"
                )));
            }
            channels.insert(
                channel,
                Route {
                    events,
                    why: Arc::clone(&why),
                },
            );
        }
        let open = Open {
            channel,
            command: request.command.clone(),
            tty: request.tty,
            rows: request.rows.clamp(1, MAX_TERMINAL),
            cols: request.cols.clamp(1, MAX_TERMINAL),
            term: request.term.clone(),
        };
        let payload = serde_json::to_vec(&open).map_err(|e| AgentError::Protocol(e.to_string()))?;
        if payload.len() > agent::MAX_CONTROL {
            shared.unroute(channel);
            return Err(AgentError::Protocol(format!(
                "the command is {} bytes as JSON, over the limit of {}",
                payload.len(),
                agent::MAX_CONTROL
            )));
        }
        if let Err(e) = shared.send(OPEN, &payload).await {
            shared.unroute(channel);
            return Err(e);
        }
        Ok(Shell {
            channel,
            shared: self.0.clone(),
            events: receiver,
            why,
            ended: false,
        })
    }
}

fn gone() -> AgentError {
    AgentError::Io(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "the agent port connection is closed",
    ))
}

/// A shell in the guest. Dropping it before it exits kills its processes.
#[derive(Debug)]
pub struct Shell {
    channel: u32,
    shared: Weak<Shared>,
    events: mpsc::Receiver<ShellEvent>,
    why: Arc<OnceLock<String>>,
    ended: bool,
}

impl Shell {
    /// The next thing the shell sends: output, then its exit (or why it was lost).
    pub async fn next(&mut self) -> ShellEvent {
        match self.events.recv().await {
            Some(event) => {
                if matches!(event, ShellEvent::Exited(_)) {
                    self.ended = true;
                }
                event
            }
            None => {
                self.ended = true;
                ShellEvent::Lost(
                    self.why
                        .get()
                        .cloned()
                        .unwrap_or_else(|| "the agent port connection was closed".into()),
                )
            }
        }
    }

    /// Bytes for its stdin (split into frames as they must be).
    pub async fn write(&self, data: &[u8]) -> Result<(), AgentError> {
        let shared = self.shared.upgrade().ok_or_else(gone)?;
        for chunk in data.chunks(agent::MAX_SHELL_DATA - 4) {
            let mut frame = Vec::with_capacity(chunk.len() + 4);
            frame.extend_from_slice(&self.channel.to_be_bytes());
            frame.extend_from_slice(chunk);
            shared.send(INPUT, &frame).await?;
        }
        Ok(())
    }

    /// Closes its stdin (what `Ctrl-D` is on a terminal, for commands on pipes).
    pub async fn close_stdin(&self) -> Result<(), AgentError> {
        let shared = self.shared.upgrade().ok_or_else(gone)?;
        shared.send(INPUT, &self.channel.to_be_bytes()).await
    }

    /// Its terminal is now `rows` × `cols`.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), AgentError> {
        let shared = self.shared.upgrade().ok_or_else(gone)?;
        let resize = Resize {
            channel: self.channel,
            rows: rows.clamp(1, MAX_TERMINAL),
            cols: cols.clamp(1, MAX_TERMINAL),
        };
        let payload =
            serde_json::to_vec(&resize).map_err(|e| AgentError::Protocol(e.to_string()))?;
        shared.send(RESIZE, &payload).await
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        shared.unroute(self.channel);
        let channel = self.channel;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { shared.end(channel, "").await });
        }
    }
}
