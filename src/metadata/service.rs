use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::datasource::{self, Datasource, Sessions};
use super::log::LogSink;
use super::{ApiError, LogReceipt, Ping, Task, TaskReply, TaskResult};
use qemu_worker_protocol::metadata::{LOG_PATH, PARK_QUERY, PING_PATH, RESULT_PATH, TASK_PATH};

/// Size and time limits of the metadata service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataLimits {
    /// Largest JSON request body (the result report).
    pub max_json_body: usize,
    /// Largest request head (request line and headers).
    pub max_head: usize,
    /// Longest wait for a request head.
    pub head_timeout: Duration,
    /// Connections open at once; more are closed as they arrive (worker.yml
    /// `metadata.maxConnections`).
    pub max_connections: usize,
    /// Longest silence inside a log stream before it is closed (worker.yml
    /// `logs.idleSeconds`).
    pub log_idle: Duration,
}

impl Default for MetadataLimits {
    fn default() -> Self {
        Self {
            max_json_body: 64 << 10,
            max_head: 16 << 10,
            head_timeout: Duration::from_secs(10),
            max_connections: 16,
            log_idle: Duration::from_secs(300),
        }
    }
}

/// Where a boot snapshot's park request stands (see `MetadataHandle::arm_park`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Park {
    /// Not asked for.
    Off,
    /// The next task fetch that can park is answered `202`.
    Armed,
    /// The guest was told to park.
    Sent,
    /// The guest fetched its task without offering to park (guest tools too old).
    Refused,
    /// A VM resumed from a boot snapshot that the worker has not released yet: a task
    /// fetch waits (bounded by `TASK_HOLD`) until it is, so that tools which skip the
    /// RESUME echo cannot run the command in a VM that is then discarded.
    Held,
}

/// The longest a task fetch waits for a held VM's release: beyond the worker's own wait
/// for the RESUME echo, after which it discards the VM.
const TASK_HOLD: Duration = Duration::from_secs(30);

struct State {
    task: Task,
    /// The cloud-init datasource, for a VM that is offered one.
    datasource: Option<Datasource>,
    sessions: Sessions,
    /// Per VM: guests resumed from one snapshot must not share RNG state.
    entropy: String,
    park: Arc<watch::Sender<Park>>,
    log: LogSink,
    result: watch::Sender<Option<i32>>,
    fetched: watch::Sender<bool>,
    limits: MetadataLimits,
    counters: Arc<Counters>,
}

/// A running metadata service for one VM. Dropping it stops the service and every
/// connection it has open.
#[derive(Debug)]
pub struct MetadataHandle {
    park: Arc<watch::Sender<Park>>,
    result: watch::Receiver<Option<i32>>,
    fetched: watch::Receiver<bool>,
    accept: tokio::task::JoinHandle<()>,
    socket: Option<PathBuf>,
    counters: Arc<Counters>,
    limits: MetadataLimits,
}

/// What the service refused the guest, counted for the job's error lines.
#[derive(Debug, Default)]
struct Counters {
    /// Connections closed on arrival because the VM had `max_connections` open.
    refused_connections: AtomicU64,
    /// The most connections open at once.
    peak_connections: AtomicU64,
    /// Log streams closed for idling.
    idle_logs: AtomicU64,
}

/// The guest's use of the service, as counted on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataUsage {
    pub refused_connections: u64,
    pub peak_connections: u64,
    pub idle_logs_closed: u64,
    pub max_connections: usize,
    pub log_idle: Duration,
}

impl MetadataHandle {
    /// The unix socket it listens on (none for a TCP listener in a namespace).
    pub fn socket(&self) -> Option<&Path> {
        self.socket.as_deref()
    }

    /// Waits until the guest has fetched its task; false if the service stopped.
    pub async fn task_fetched(&mut self) -> bool {
        self.fetched.wait_for(|fetched| *fetched).await.is_ok()
    }

    /// Answers the guest's next task fetch with a request to park for a boot snapshot
    /// (if it offers to; see `Park`).
    pub fn arm_park(&self) {
        self.park.send_replace(Park::Armed);
    }

    /// Holds the task of a VM resumed from a boot snapshot until `release_task`.
    pub fn hold_task(&self) {
        self.park.send_replace(Park::Held);
    }

    /// Serves the task of a held VM (its guest tools took the RESUME), and the fetches
    /// waiting for it.
    pub fn release_task(&self) {
        self.park
            .send_if_modified(|park| std::mem::replace(park, Park::Off) == Park::Held);
    }

    /// Waits until the guest was told to park, or fetched its task without offering to;
    /// `Park::Off` if the service stopped.
    pub async fn park_outcome(&self) -> Park {
        let mut park = self.park.subscribe();
        match park
            .wait_for(|p| matches!(p, Park::Sent | Park::Refused))
            .await
        {
            Ok(p) => *p,
            Err(_) => Park::Off,
        }
    }

    /// Waits for the guest's result report; `None` if the service stopped first.
    pub async fn result(&mut self) -> Option<i32> {
        self.result
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|r| *r)
    }

    /// The result reported so far, if any.
    pub fn reported(&self) -> Option<i32> {
        *self.result.borrow()
    }

    /// What the guest was refused so far.
    pub fn usage(&self) -> MetadataUsage {
        MetadataUsage {
            refused_connections: self.counters.refused_connections.load(Ordering::Relaxed),
            peak_connections: self.counters.peak_connections.load(Ordering::Relaxed),
            idle_logs_closed: self.counters.idle_logs.load(Ordering::Relaxed),
            max_connections: self.limits.max_connections,
            log_idle: self.limits.log_idle,
        }
    }
}

impl Drop for MetadataHandle {
    fn drop(&mut self) {
        self.accept.abort();
        if let Some(socket) = &self.socket {
            let _ = std::fs::remove_file(socket);
        }
    }
}

/// Where the service listens: a unix socket in the run dir (user networking, reached
/// through the guestfwd helper), or a TCP socket on 169.254.169.254:80 inside the VM's
/// network namespace (tap networking).
enum Listener {
    Unix(UnixListener),
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Connection> {
        match self {
            Self::Unix(listener) => listener.accept().await.map(|(s, _)| Connection::Unix(s)),
            Self::Tcp(listener) => listener.accept().await.map(|(s, _)| Connection::Tcp(s)),
        }
    }
}

enum Connection {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

/// What a VM's metadata service offers it: the task, and a cloud-init datasource when
/// the VM has one.
#[derive(Debug, Clone)]
pub struct Offer {
    pub task: Task,
    pub datasource: Option<Datasource>,
}

impl From<&Task> for Offer {
    fn from(task: &Task) -> Self {
        Self {
            task: task.clone(),
            datasource: None,
        }
    }
}

/// Starts the metadata service of one VM on `socket`, serving `offer` and appending the
/// guest's log streams to `log`.
pub async fn start_metadata_service(
    socket: &Path,
    offer: impl Into<Offer>,
    log: LogSink,
    limits: MetadataLimits,
) -> std::io::Result<MetadataHandle> {
    let _ = std::fs::remove_file(socket);
    let listener = Listener::Unix(UnixListener::bind(socket)?);
    Ok(start(
        listener,
        Some(socket.to_path_buf()),
        offer.into(),
        log,
        limits,
    ))
}

/// Starts the metadata service of one VM on a TCP listener made inside its network
/// namespace (see `TapNetwork::bind_metadata`).
pub fn start_metadata_service_tcp(
    listener: std::net::TcpListener,
    offer: impl Into<Offer>,
    log: LogSink,
    limits: MetadataLimits,
) -> std::io::Result<MetadataHandle> {
    let listener = Listener::Tcp(tokio::net::TcpListener::from_std(listener)?);
    Ok(start(listener, None, offer.into(), log, limits))
}

fn start(
    listener: Listener,
    socket: Option<PathBuf>,
    offer: Offer,
    log: LogSink,
    limits: MetadataLimits,
) -> MetadataHandle {
    let (result, result_rx) = watch::channel(None);
    let (fetched, fetched_rx) = watch::channel(false);
    let mut seed = [0u8; 32];
    // The kernel's RNG does not fail once initialized; a short read leaves zeros, which
    // only weakens what the guest adds to its own entropy.
    let _ = rustix::rand::getrandom(&mut seed, rustix::rand::GetRandomFlags::empty());
    let entropy = seed.iter().map(|b| format!("{b:02x}")).collect();
    let park = Arc::new(watch::Sender::new(Park::Off));
    let counters = Arc::new(Counters::default());
    let state = Arc::new(State {
        task: offer.task,
        datasource: offer.datasource,
        sessions: Sessions::default(),
        entropy,
        park: Arc::clone(&park),
        log,
        result,
        fetched,
        limits,
        counters: Arc::clone(&counters),
    });
    let accept = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok(connection) = accepted else { continue };
                    // Reap what has ended, so the count below is of open connections.
                    while connections.try_join_next().is_some() {}
                    if connections.len() >= state.limits.max_connections {
                        // Closing it ends the guestfwd helper too (it exits when the
                        // service's side closes), so the host holds at most the cap.
                        state.counters.refused_connections.fetch_add(1, Ordering::Relaxed);
                        drop(connection);
                        continue;
                    }
                    state
                        .counters
                        .peak_connections
                        .fetch_max(connections.len() as u64 + 1, Ordering::Relaxed);
                    let state = Arc::clone(&state);
                    let limits = state.limits;
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            let state = Arc::clone(&state);
                            async move { Ok::<_, Infallible>(route(&state, request).await) }
                        });
                        let mut builder = hyper::server::conn::http1::Builder::new();
                        builder
                            .timer(TokioTimer::new())
                            .header_read_timeout(limits.head_timeout)
                            // The guestfwd helper shuts its write side at the guest's EOF
                            // and still wants the answer.
                            .half_close(true)
                            // hyper's smallest allowed buffer is 8 KiB.
                            .max_buf_size(limits.max_head.max(8192));
                        let _ = match connection {
                            Connection::Unix(s) => builder.serve_connection(TokioIo::new(s), service).await,
                            Connection::Tcp(s) => builder.serve_connection(TokioIo::new(s), service).await,
                        };
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    });
    MetadataHandle {
        park,
        result: result_rx,
        fetched: fetched_rx,
        accept,
        socket,
        counters,
        limits,
    }
}

pub(super) type Reply = Response<Full<Bytes>>;

fn json(status: StatusCode, value: &impl serde::Serialize) -> Reply {
    let body =
        serde_json::to_vec(value).unwrap_or_else(|e| unreachable!("replies always serialize: {e}"));
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `405` for `path`, with `Allow`.
pub(super) fn method_not_allowed(path: &str, allowed: Method) -> Reply {
    let mut reply = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        format!("{path} accepts {allowed} only"),
    );
    if let Ok(value) = HeaderValue::from_str(allowed.as_str()) {
        reply.headers_mut().insert(ALLOW, value);
    }
    reply
}

pub(super) fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Reply {
    json(
        status,
        &ApiError {
            code: code.to_owned(),
            message: message.into(),
        },
    )
}

async fn route(state: &State, request: Request<Incoming>) -> Reply {
    let path = request.uri().path().to_owned();
    if datasource::is_datasource_path(&path) {
        return datasource::route(
            state.datasource.as_ref(),
            &state.sessions,
            request.method(),
            &path,
            request.headers(),
        );
    }
    let allowed = match path.as_str() {
        PING_PATH | TASK_PATH => Method::GET,
        LOG_PATH => Method::POST,
        RESULT_PATH => Method::PUT,
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("no such endpoint: {path}"),
            );
        }
    };
    if request.method() != allowed {
        return method_not_allowed(&path, allowed);
    }
    match path.as_str() {
        PING_PATH => json(
            StatusCode::OK,
            &Ping {
                status: "ok".into(),
            },
        ),
        TASK_PATH => serve_task(state, request.uri().query()).await,
        LOG_PATH => stream_log(state, request.into_body()).await,
        _ => report_result(state, request.into_body()).await,
    }
}

async fn serve_task(state: &State, query: Option<&str>) -> Reply {
    let mut park = state.park.subscribe();
    // The guard `wait_for` returns is dropped at once: it holds the value's read lock.
    let released = tokio::time::timeout(TASK_HOLD, park.wait_for(|p| *p != Park::Held))
        .await
        .is_ok_and(|changed| changed.is_ok());
    if !released {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "held",
            "this VM was resumed from a boot snapshot and the worker has not released it: echo RESUME on the agent port first",
        );
    }
    let can_park = query.is_some_and(|q| q.split('&').any(|pair| pair == PARK_QUERY));
    let mut parked = false;
    state.park.send_if_modified(|park| match (*park, can_park) {
        (Park::Armed, true) => {
            *park = Park::Sent;
            parked = true;
            true
        }
        (Park::Armed, false) => {
            *park = Park::Refused;
            true
        }
        _ => false,
    });
    if parked {
        let mut reply = error(
            StatusCode::ACCEPTED,
            "park",
            "hold still for a boot snapshot: the worker sends PARK, then RESUME, on the agent port; ask again after RESUME",
        );
        reply
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return reply;
    }
    state.fetched.send_replace(true);
    let unix_time_millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    json(
        StatusCode::OK,
        &TaskReply {
            task: state.task.clone(),
            unix_time_millis,
            entropy: state.entropy.clone(),
            hostname: state
                .datasource
                .as_ref()
                .map(|d| d.seed.hostname.clone())
                .unwrap_or_default(),
        },
    )
}

/// Appends a (chunked) body to the job log as it arrives.
async fn stream_log(state: &State, mut body: Incoming) -> Reply {
    let mut bytes: u64 = 0;
    loop {
        let Ok(next) = tokio::time::timeout(state.limits.log_idle, body.frame()).await else {
            state.counters.idle_logs.fetch_add(1, Ordering::Relaxed);
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "log-idle",
                format!(
                    "the log stream sent nothing for {} s; open a new one for more output",
                    state.limits.log_idle.as_secs()
                ),
            );
        };
        let Some(frame) = next else { break };
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    bytes += data.len() as u64;
                    if !state.log.append(data).await {
                        return error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "log-closed",
                            "the job log is closed",
                        );
                    }
                }
            }
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad-body",
                    format!("the log stream broke: {e}"),
                );
            }
        }
    }
    json(StatusCode::OK, &LogReceipt { bytes })
}

/// The first result wins; the same result again is fine; a different one is a conflict.
async fn report_result(state: &State, body: Incoming) -> Reply {
    let limit = state.limits.max_json_body;
    let wait = state.limits.head_timeout;
    let collected = tokio::time::timeout(wait, Limited::new(body, limit).collect()).await;
    let body = match collected {
        Ok(Ok(collected)) => collected.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "slow-body",
                format!("a result body must arrive within {} ms", wait.as_millis()),
            );
        }
        Ok(Err(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!("a result body is at most {limit} bytes"),
            );
        }
    };
    let reported: TaskResult = match serde_json::from_slice(&body) {
        Ok(result) => result,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad-result",
                format!("expected {{\"exitCode\": <integer>}}: {e}"),
            );
        }
    };
    let mut previous = None;
    state.result.send_if_modified(|current| match current {
        Some(code) => {
            previous = Some(*code);
            false
        }
        None => {
            *current = Some(reported.exit_code);
            true
        }
    });
    match previous {
        Some(code) if code != reported.exit_code => error(
            StatusCode::CONFLICT,
            "conflict",
            format!("the result was already reported as exit code {code}"),
        ),
        _ => json(StatusCode::OK, &reported),
    }
}
