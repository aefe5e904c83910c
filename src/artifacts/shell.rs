//! Shells into a running guest over the agent port (docs/guest-agent.md, version 2):
//! channels multiplexed with artifact transfers on one connection. What the guest sends
//! is bounded here: frames by the connection, each shell's queue by [`QUEUE`] (a reader
//! that lets it fill loses its shell, never the connection: the task that reads the port
//! never waits for a shell's reader), and the number of shells per VM by [`MAX_SHELLS`].
//! Every write to the port has [`SEND_TIMEOUT`]: a guest that stops reading cannot hold
//! a caller, nor the connection open, for longer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
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
/// Output frames queued for a shell's reader (each at most 16 KiB, 4 MiB in all).
const QUEUE: usize = 256;
/// How long one frame may take to go to the guest.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Channel numbers, never reused in a worker: an exit the guest sends late for a shell
/// of an earlier connection can never end a shell of this one.
static NEXT_CHANNEL: AtomicU32 = AtomicU32::new(1);
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
    /// Set when the connection is gone: no shell opens on it any more.
    closed: AtomicBool,
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
            closed: AtomicBool::new(false),
            version,
        }
    }

    /// One frame, whole, between any others.
    pub(super) async fn send(&self, kind: u8, payload: &[u8]) -> Result<(), AgentError> {
        let len = u32::try_from(payload.len())
            .map_err(|_| AgentError::Protocol("request too large".into()))?;
        let written = tokio::time::timeout(SEND_TIMEOUT, async {
            let mut writer = self.writer.lock().await;
            writer.write_all(&agent::head(kind, len)).await?;
            writer.write_all(payload).await?;
            writer.flush().await
        })
        .await;
        match written {
            Ok(result) => Ok(result?),
            Err(_) => {
                // The guest does not read: this connection is no use any more.
                self.lose("the guest tools stopped reading the agent port");
                Err(AgentError::NoAnswer {
                    frame: kind as char,
                    wait: SEND_TIMEOUT,
                })
            }
        }
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
    /// guest made it up). A shell whose reader let its queue fill is closed: this is the
    /// task that reads the port, and it never waits for one shell's reader.
    pub(super) fn output(self: &Arc<Self>, payload: &[u8]) {
        let Some((channel, rest)) = agent::split_channel(payload) else {
            return;
        };
        let Some((&stream, data)) = rest.split_first() else {
            return;
        };
        if data.len() > agent::MAX_SHELL_DATA || !matches!(stream, agent::STDOUT | agent::STDERR) {
            return self.end_later(channel, "the guest sent a malformed shell frame");
        }
        let Some((events, _)) = self.route(channel) else {
            return;
        };
        let event = ShellEvent::Output {
            stream,
            data: data.to_vec(),
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = events.try_send(event) {
            self.end_later(
                channel,
                &format!("its reader let {QUEUE} frames of output pile up: the shell was closed"),
            );
        }
    }

    /// Ends a channel from the host's side (its shell hears `why`), the guest told in a
    /// task of its own: the port's reader never waits on a write.
    fn end_later(self: &Arc<Self>, channel: u32, why: &str) {
        if let Some((_, reason)) = self.route(channel) {
            let _ = reason.set(why.to_owned());
        }
        self.unroute(channel);
        let shared = Arc::clone(self);
        tokio::spawn(async move { shared.end(channel).await });
    }

    /// Closes a channel from the host's side: the guest kills its processes.
    async fn end(&self, channel: u32) {
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

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The connection is gone: every shell on it hears why, and no other opens on it.
    pub(super) fn lose(&self, why: &str) {
        self.closed.store(true, Ordering::SeqCst);
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
        self.0
            .upgrade()
            .is_some_and(|shared| !shared.closed.load(Ordering::SeqCst))
    }

    /// Starts `request` in the guest. The guest answers with output and an exit; a
    /// command that cannot start exits with an `error`.
    pub async fn open(&self, request: &ShellRequest) -> Result<Shell, AgentError> {
        let shared = self.0.upgrade().ok_or_else(gone)?;
        if shared.version < agent::SHELL_VERSION {
            return Err(AgentError::TooOld {
                found: shared.version,
                needed: agent::SHELL_VERSION,
            });
        }
        let channel = NEXT_CHANNEL.fetch_add(1, Ordering::Relaxed);
        let (events, receiver) = mpsc::channel(QUEUE);
        let why = Arc::new(OnceLock::new());
        {
            let mut channels = shared
                .channels
                .lock()
                .map_err(|_| AgentError::Protocol("the shell table is poisoned".into()))?;
            // Under the lock `lose` drains: a shell never opens on a connection gone.
            if shared.closed.load(Ordering::SeqCst) {
                return Err(gone());
            }
            if channels.len() >= MAX_SHELLS {
                return Err(AgentError::TooManyShells(MAX_SHELLS));
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
            runtime.spawn(async move { shared.end(channel).await });
        }
    }
}

#[cfg(test)]
mod tests {
    //! The host's side against fake guest tools on a unix socket: the previous release's
    //! tools (version 1, which the current ones cannot be made to act as) and tools that
    //! send malformed shell frames.

    use std::time::Duration;

    use qemu_worker_protocol::agent::{self, EXITED, OUTPUT, REFUSE, SYNC, VERSION};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{UnixListener, UnixStream};

    use super::*;
    use crate::artifacts::AgentClient;

    async fn read_frame(stream: &mut UnixStream) -> Option<(u8, Vec<u8>)> {
        let mut head = [0u8; agent::HEAD_LEN];
        stream.read_exact(&mut head).await.ok()?;
        let (kind, len) = agent::parse_head(head);
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await.ok()?;
        Some((kind, payload))
    }

    async fn write_frame(stream: &mut UnixStream, kind: u8, payload: &[u8]) {
        let len = u32::try_from(payload.len()).expect("small");
        stream
            .write_all(&agent::head(kind, len))
            .await
            .expect("write");
        stream.write_all(payload).await.expect("write");
    }

    type Frame = (u8, Vec<u8>);

    /// Fake tools: echo SYNC, answer VERSION with `version` (refuse it for 1; first,
    /// with `late_exit`, send the exit of a shell of an earlier connection), and hand
    /// every other frame to the receiver; frames given to the sender are sent.
    fn fake_tools(
        dir: &std::path::Path,
        version: u32,
        late_exit: bool,
    ) -> (
        std::path::PathBuf,
        mpsc::Receiver<Frame>,
        mpsc::Sender<Frame>,
    ) {
        let socket = dir.join("agent.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let (seen, frames) = mpsc::channel(64);
        let (send, mut to_send) = mpsc::channel::<(u8, Vec<u8>)>(64);
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            loop {
                tokio::select! {
                    frame = read_frame(&mut stream) => {
                        let Some((kind, payload)) = frame else { return };
                        match kind {
                            SYNC => write_frame(&mut stream, SYNC, &payload).await,
                            VERSION if version == 1 => {
                                write_frame(&mut stream, REFUSE,
                                    br#"{"code":"bad-request","message":"unknown frame type"}"#).await;
                            }
                            VERSION => {
                                if late_exit {
                                    write_frame(&mut stream, EXITED,
                                        br#"{"channel":4000000000,"code":null,"signal":9,"error":null}"#).await;
                                }
                                let hello = format!(r#"{{"version":{version}}}"#);
                                write_frame(&mut stream, VERSION, hello.as_bytes()).await;
                            }
                            _ => { let _ = seen.send((kind, payload)).await; }
                        }
                    }
                    Some((kind, payload)) = to_send.recv() => write_frame(&mut stream, kind, &payload).await,
                }
            }
        });
        (socket, frames, send)
    }

    fn request() -> ShellRequest {
        ShellRequest {
            command: None,
            tty: true,
            rows: 24,
            cols: 80,
            term: None,
        }
    }

    #[tokio::test]
    async fn tools_of_version_1_get_no_shell_and_a_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, _frames, _send) = fake_tools(dir.path(), 1, false);
        let client = AgentClient::connect(&socket, Duration::from_secs(5))
            .await
            .expect("version 1 tools still serve artifacts");
        assert_eq!(client.version(), 1);
        let refused = client
            .shells()
            .open(&request())
            .await
            .expect_err("no shells on version 1");
        assert!(
            refused
                .to_string()
                .contains("speak agent protocol 1; shells need 2"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn malformed_and_stray_shell_frames_end_only_their_channel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, mut frames, send) = fake_tools(dir.path(), 2, false);
        let client = AgentClient::connect(&socket, Duration::from_secs(5))
            .await
            .expect("connect");
        let shells = client.shells();
        let mut first = shells.open(&request()).await.expect("a shell");
        let (kind, open) = frames.recv().await.expect("the OPEN");
        assert_eq!(kind, agent::OPEN);
        let open: Open = serde_json::from_slice(&open).expect("an Open");
        let channel = open.channel.to_be_bytes();
        // Output for a channel never opened is dropped; then good output arrives.
        send.send((OUTPUT, [&999u32.to_be_bytes()[..], &[1], b"stray"].concat()))
            .await
            .expect("send");
        send.send((OUTPUT, [&channel[..], &[1], b"hello"].concat()))
            .await
            .expect("send");
        assert_eq!(
            first.next().await,
            ShellEvent::Output {
                stream: 1,
                data: b"hello".to_vec()
            }
        );
        // A stream that is neither stdout nor stderr closes the channel.
        send.send((OUTPUT, [&channel[..], &[7], b"x"].concat()))
            .await
            .expect("send");
        match first.next().await {
            ShellEvent::Lost(why) => assert!(why.contains("malformed"), "{why}"),
            other => panic!("not lost: {other:?}"),
        }
        let (kind, close) = frames.recv().await.expect("the CLOSE");
        assert_eq!(kind, CLOSE);
        let close: Channel = serde_json::from_slice(&close).expect("a Channel");
        assert_eq!(close.channel, open.channel);
        // The connection is fine: another shell opens and exits with its code.
        let mut second = shells.open(&request()).await.expect("another shell");
        let (_, open) = frames.recv().await.expect("the OPEN");
        let open: Open = serde_json::from_slice(&open).expect("an Open");
        let exited = format!(
            r#"{{"channel":{},"code":3,"signal":null,"error":null}}"#,
            open.channel
        );
        send.send((EXITED, exited.into_bytes()))
            .await
            .expect("send");
        assert_eq!(
            second.next().await,
            ShellEvent::Exited(ShellExit {
                code: Some(3),
                signal: None,
                error: None
            })
        );
    }

    #[tokio::test]
    async fn a_late_exit_from_an_earlier_connection_does_not_break_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, _frames, _send) = fake_tools(dir.path(), 2, true);
        let client = AgentClient::connect(&socket, Duration::from_secs(5))
            .await
            .expect("the exit before the version's answer is passed over");
        assert_eq!(client.version(), 2);
    }

    #[tokio::test]
    async fn a_vm_has_at_most_max_shells_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, _frames, _send) = fake_tools(dir.path(), 2, false);
        let client = AgentClient::connect(&socket, Duration::from_secs(5))
            .await
            .expect("connect");
        let mut open = Vec::new();
        for _ in 0..MAX_SHELLS {
            open.push(client.shells().open(&request()).await.expect("a shell"));
        }
        let refused = client
            .shells()
            .open(&request())
            .await
            .expect_err("one too many");
        assert!(
            refused.to_string().contains("8 shells are already open"),
            "{refused}"
        );
        drop(open.pop());
        client
            .shells()
            .open(&request())
            .await
            .expect("a closed shell frees its place");
    }
}
