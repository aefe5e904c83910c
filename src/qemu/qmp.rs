use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, mpsc, oneshot};

/// Events kept for subscribers that arrive late (QEMU may emit them at any time).
const EVENT_HISTORY: usize = 256;
/// The longest line QEMU is allowed to send us.
const MAX_LINE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("failed to connect to QMP socket {path:?}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP greeting not received within {0:?}")]
    GreetingTimeout(Duration),
    #[error("QMP sent something that is not a greeting: {0}")]
    BadGreeting(String),
    #[error("QMP command {command} did not answer within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("the QMP connection is closed (QEMU exited?)")]
    Closed,
    #[error("QMP answered {command} with something unexpected: {reply}")]
    Unexpected { command: String, reply: String },
}

/// One asynchronous event from QEMU, e.g. `SHUTDOWN`, `POWERDOWN`, `RESET`.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

/// `query-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunState {
    pub status: String,
    pub running: bool,
}

enum Request {
    Execute {
        command: Value,
        reply: oneshot::Sender<Result<Value, (String, String)>>,
    },
    Subscribe {
        reply: oneshot::Sender<(Vec<QmpEvent>, broadcast::Receiver<QmpEvent>)>,
    },
}

/// A QMP client: one task owns the socket, routes replies to their callers by id and
/// fans events out to subscribers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct QmpClient {
    requests: mpsc::Sender<Request>,
    version: String,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Execute { command, .. } => write!(f, "Execute({command})"),
            Self::Subscribe { .. } => f.write_str("Subscribe"),
        }
    }
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let greeting = tokio::time::timeout(timeout, read_line(&mut reader))
            .await
            .map_err(|_| QmpError::GreetingTimeout(timeout))?
            .ok_or(QmpError::Closed)?;
        let greeting: Value =
            serde_json::from_str(&greeting).map_err(|_| QmpError::BadGreeting(greeting.clone()))?;
        let version = greeting["QMP"]["version"]["qemu"]
            .as_object()
            .map(|v| format!("{}.{}.{}", v["major"], v["minor"], v["micro"]))
            .ok_or_else(|| QmpError::BadGreeting(greeting.to_string()))?;

        let (requests, inbox) = mpsc::channel(64);
        let (events, _) = broadcast::channel(EVENT_HISTORY);
        tokio::spawn(
            Connection {
                writer: write,
                pending: HashMap::new(),
                next_id: 0,
                events,
                history: VecDeque::new(),
            }
            .run(reader, inbox),
        );
        let client = Self { requests, version };
        client.execute("qmp_capabilities", None, timeout).await?;
        Ok(client)
    }

    /// QEMU's version from the greeting, e.g. `7.2.22`.
    pub fn qemu_version(&self) -> &str {
        &self.version
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let mut message = json!({"execute": command});
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Execute {
                command: message,
                reply,
            })
            .await
            .map_err(|_| QmpError::Closed)?;
        match tokio::time::timeout(timeout, answer).await {
            Err(_) => Err(QmpError::Timeout {
                command: command.to_owned(),
                timeout,
            }),
            Ok(Err(_)) => Err(QmpError::Closed),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                command: command.to_owned(),
                class,
                desc,
            }),
            Ok(Ok(Ok(value))) => Ok(value),
        }
    }

    /// Every event received so far (the latest 256) and a receiver for the ones to come,
    /// with nothing lost or repeated between the two.
    pub async fn subscribe(
        &self,
    ) -> Result<(Vec<QmpEvent>, broadcast::Receiver<QmpEvent>), QmpError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Subscribe { reply })
            .await
            .map_err(|_| QmpError::Closed)?;
        answer.await.map_err(|_| QmpError::Closed)
    }

    pub async fn cont(&self, timeout: Duration) -> Result<(), QmpError> {
        self.execute("cont", None, timeout).await.map(drop)
    }

    pub async fn system_powerdown(&self, timeout: Duration) -> Result<(), QmpError> {
        self.execute("system_powerdown", None, timeout)
            .await
            .map(drop)
    }

    /// Asks QEMU to exit. The connection may close before the reply arrives.
    pub async fn quit(&self, timeout: Duration) -> Result<(), QmpError> {
        match self.execute("quit", None, timeout).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(other) => Err(other),
        }
    }

    pub async fn query_status(&self, timeout: Duration) -> Result<RunState, QmpError> {
        let reply = self.execute("query-status", None, timeout).await?;
        match (reply["status"].as_str(), reply["running"].as_bool()) {
            (Some(status), Some(running)) => Ok(RunState {
                status: status.to_owned(),
                running,
            }),
            _ => Err(QmpError::Unexpected {
                command: "query-status".into(),
                reply: reply.to_string(),
            }),
        }
    }
}

/// Reads one line; `None` at end of stream or on an oversized line.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Option<String> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await.ok()?;
        if buf.is_empty() {
            return None;
        }
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..end]);
            reader.consume(end + 1);
            return Some(String::from_utf8_lossy(&line).into_owned());
        }
        let n = buf.len();
        line.extend_from_slice(buf);
        reader.consume(n);
        if line.len() > MAX_LINE {
            return None;
        }
    }
}

type Pending = HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>;

struct Connection {
    writer: OwnedWriteHalf,
    pending: Pending,
    next_id: u64,
    events: broadcast::Sender<QmpEvent>,
    history: VecDeque<QmpEvent>,
}

impl Connection {
    async fn run<R: tokio::io::AsyncRead + Unpin>(
        mut self,
        mut reader: BufReader<R>,
        mut inbox: mpsc::Receiver<Request>,
    ) {
        loop {
            tokio::select! {
                line = read_line(&mut reader) => {
                    let Some(line) = line else { break };
                    self.dispatch(&line);
                }
                request = inbox.recv() => {
                    let Some(request) = request else { break };
                    if !self.handle(request).await {
                        break;
                    }
                }
            }
        }
        // Dropping `pending` tells every caller the connection is gone.
    }

    async fn handle(&mut self, request: Request) -> bool {
        match request {
            Request::Execute { mut command, reply } => {
                let id = self.next_id;
                self.next_id += 1;
                command["id"] = json!(id);
                let mut bytes = command.to_string().into_bytes();
                bytes.push(b'\n');
                if self.writer.write_all(&bytes).await.is_err() {
                    return false;
                }
                self.pending.insert(id, reply);
            }
            Request::Subscribe { reply } => {
                let _ = reply.send((
                    self.history.iter().cloned().collect(),
                    self.events.subscribe(),
                ));
            }
        }
        true
    }

    fn dispatch(&mut self, line: &str) {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            tracing::warn!(line, "ignoring a QMP line that is not JSON");
            return;
        };
        if let Some(name) = message.get("event").and_then(Value::as_str) {
            let event = QmpEvent {
                name: name.to_owned(),
                data: message.get("data").cloned().unwrap_or(Value::Null),
            };
            if self.history.len() == EVENT_HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(event.clone());
            let _ = self.events.send(event);
            return;
        }
        let Some(id) = message.get("id").and_then(Value::as_u64) else {
            tracing::warn!(line, "ignoring a QMP reply without our id");
            return;
        };
        let Some(reply) = self.pending.remove(&id) else {
            return;
        };
        let result = match (message.get("return"), message.get("error")) {
            (Some(value), _) => Ok(value.clone()),
            (None, Some(error)) => Err((
                error["class"].as_str().unwrap_or("GenericError").to_owned(),
                error["desc"].as_str().unwrap_or("").to_owned(),
            )),
            (None, None) => Err(("Unexpected".to_owned(), message.to_string())),
        };
        let _ = reply.send(result);
    }
}
