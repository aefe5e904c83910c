//! The HTTP API of `qemu-worker serve` (docs/api.md): `/healthz`, `/readyz`, Prometheus
//! `/metrics`, and the jobs in the queue (list, status, submit, cancel, the live log),
//! each behind a bearer token with a scope.

mod auth;
pub mod client;
mod display;
mod metrics;
pub mod model;
mod openapi;
mod socket;
mod tls;
mod ui;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::task::JoinSet;

pub use auth::{Refusal, Tokens, new_token};
pub use metrics::Metrics;
pub use openapi::openapi_document;
pub use tls::{TlsError, load_tls};

use crate::config::{ApiListen, Scope};
use crate::image::ImageCache;
use crate::job::{JobDir, ResultReport};
use crate::queue::{JobState, NewJob, Queue, QueueError, blocking};

/// The largest payload `POST /v1/jobs` takes (the CLI's `submit` reads no more).
const MAX_PAYLOAD: usize = 1 << 20;
/// Most jobs in one `GET /v1/jobs` page, and the default.
const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;
/// The furthest `deadline` a submission takes (the queue stores milliseconds in an i64).
const MAX_DEADLINE_SECONDS: u64 = 10 * 365 * 24 * 3600;
/// How often a followed log is looked at again.
const FOLLOW_POLL: Duration = Duration::from_millis(500);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 512;
/// How long a passed-on request waits for the holder's answer to begin.
const PASS_ON_TIMEOUT: Duration = Duration::from_secs(30);

/// Bodies fail (an upstream that broke off, a file that shrank) by aborting the
/// connection, so a client never takes a short body for a whole one.
type Body = UnsyncBoxBody<Bytes, std::io::Error>;
type Chunks = tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>;
type Reply = Response<Body>;

/// What the API serves from.
#[derive(Debug)]
pub struct ApiState {
    pub queue: Arc<dyn Queue>,
    pub cache: ImageCache,
    pub metrics: Arc<Metrics>,
    pub tokens: Tokens,
    pub state_dir: PathBuf,
    /// This worker's id in the queue: a job whose latest run was another worker's is
    /// passed on to that worker's API.
    pub worker_id: String,
    /// For passing requests on (trusting worker.yml `client.caFile` too).
    pub client: reqwest::Client,
    /// The VMs of the jobs running here, for screenshots on demand.
    pub live: crate::engine::LiveVms,
    /// noVNC, for the web page's view of a job's display.
    pub novnc: PathBuf,
}

/// The running API; dropping it stops it and removes its socket.
#[derive(Debug)]
pub struct ApiHandle {
    accept: tokio::task::JoinHandle<()>,
    socket: Option<PathBuf>,
    /// Where it listens: `unix:PATH` or `HOST:PORT` (the port the kernel chose, for `:0`).
    pub address: String,
}

impl Drop for ApiHandle {
    fn drop(&mut self) {
        self.accept.abort();
        if let Some(socket) = &self.socket {
            let _ = std::fs::remove_file(socket);
        }
    }
}

enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

/// Starts the API where `listen` says (`None` for `off`); HTTPS on TCP with `tls`.
pub async fn start_api(
    listen: &ApiListen,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: ApiState,
) -> std::io::Result<Option<ApiHandle>> {
    let (listener, socket, address) = match listen {
        ApiListen::Off => return Ok(None),
        ApiListen::Unix(path) => {
            // The state directory belongs to one worker (the image cache's lock says so):
            // a socket here is a dead worker's.
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)?;
            // Only the worker's user: the socket is as private as the queue database.
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            (
                Listener::Unix(listener),
                Some(path.clone()),
                format!("unix:{}", path.display()),
            )
        }
        ApiListen::Tcp(address) => {
            let listener = tokio::net::TcpListener::bind(address.as_str()).await?;
            let bound = listener.local_addr()?.to_string();
            (Listener::Tcp(listener), None, bound)
        }
    };
    let state = Arc::new(state);
    let accept = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            if connections.len() >= MAX_CONNECTIONS {
                let _ = connections.join_next().await;
                continue;
            }
            let state = Arc::clone(&state);
            match &listener {
                Listener::Unix(l) => {
                    let Some(stream) = accepted(l.accept().await).await else {
                        continue;
                    };
                    connections.spawn(serve_connection(TokioIo::new(stream), state));
                }
                Listener::Tcp(l) => {
                    let Some(stream) = accepted(l.accept().await).await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    match &tls {
                        None => {
                            connections.spawn(serve_connection(TokioIo::new(stream), state));
                        }
                        Some(config) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(config));
                            connections.spawn(async move {
                                // A client that never finishes its handshake holds a
                                // connection slot for no longer than a request head may.
                                let handshake = tokio::time::timeout(
                                    Duration::from_secs(10),
                                    acceptor.accept(stream),
                                );
                                if let Ok(Ok(stream)) = handshake.await {
                                    serve_connection(TokioIo::new(stream), state).await;
                                }
                            });
                        }
                    }
                }
            }
        }
    });
    tracing::info!(%address, "API listening");
    Ok(Some(ApiHandle {
        accept,
        socket,
        address,
    }))
}

/// The accepted stream; after a failed accept (out of file descriptors, say) a pause,
/// so the loop does not spin, and a log line.
async fn accepted<S, A>(result: std::io::Result<(S, A)>) -> Option<S> {
    match result {
        Ok((stream, _)) => Some(stream),
        Err(error) => {
            tracing::warn!(%error, "the API cannot accept a connection");
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

async fn serve_connection<I>(io: I, state: Arc<ApiState>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(route(&state, request).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(io, service)
        .with_upgrades()
        .await;
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Reply {
    let body =
        serde_json::to_vec(value).unwrap_or_else(|e| unreachable!("replies always serialize: {e}"));
    full(status, "application/json", body)
}

/// `{"code": …, "message": …}`, the same shape as the metadata service's errors.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Reply {
    json(
        status,
        &model::ApiError {
            code: code.to_owned(),
            message: message.into(),
        },
    )
}

fn query(request: &Request<Incoming>) -> Vec<(String, String)> {
    request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (p.to_owned(), String::new()),
        })
        .collect()
}

fn queue_error(error: &QueueError) -> Reply {
    match error {
        QueueError::NotFound { .. } => error_reply(StatusCode::NOT_FOUND, "no-such-job", error),
        _ => error_reply(StatusCode::SERVICE_UNAVAILABLE, "queue-unavailable", error),
    }
}

fn error_reply(status: StatusCode, code: &str, e: &impl std::fmt::Display) -> Reply {
    error(status, code, e.to_string())
}

/// The scope each route needs (none for health).
fn needed_scope(method: &Method, segments: &[&str]) -> Option<Scope> {
    match (method, segments) {
        (_, ["healthz"] | ["readyz"]) => None,
        // The pages hold no data; their script calls the API with the user's token.
        (&Method::GET, ["ui", ..] | ["favicon.ico"]) => None,
        (&Method::GET, ["v1", "jobs", _, "shell"]) => Some(Scope::Admin),
        (&Method::POST, ["v1", "jobs"] | ["v1", "jobs", _, "cancel" | "release"]) => {
            Some(Scope::Submit)
        }
        _ => Some(Scope::Read),
    }
}

async fn route(state: &Arc<ApiState>, request: Request<Incoming>) -> Reply {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = request.method().clone();
    let authorization = request
        .headers()
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes().to_vec())
        .or_else(|| socket::subprotocol_token(&request));
    if let Some(needed) = needed_scope(&method, &segments) {
        match state.tokens.check(authorization.as_deref(), needed) {
            Ok(_) => {}
            Err(Refusal::Unauthenticated) => {
                tracing::info!(%method, %path, "API request refused: no valid bearer token");
                let mut reply = error(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "send `Authorization: Bearer TOKEN` with a token listed in worker.yml api.tokens",
                );
                reply
                    .headers_mut()
                    .insert("www-authenticate", HeaderValue::from_static("Bearer"));
                return reply;
            }
            Err(Refusal::Forbidden { name, has }) => {
                tracing::info!(%method, %path, token = %name, "API request refused: scope");
                return error(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!(
                        "the token {name:?} has scope {}; this needs {}",
                        scope_name(has),
                        scope_name(needed)
                    ),
                );
            }
        }
    }
    match (&method, segments.as_slice()) {
        (&Method::GET, ["ui", ..]) => ui::serve(&state.novnc, &segments, &request).await,
        (&Method::GET, ["healthz"]) => json(
            StatusCode::OK,
            &model::Health {
                status: "ok".to_owned(),
            },
        ),
        (&Method::GET, ["readyz"]) => readyz(state).await,
        (&Method::GET, ["metrics"]) => {
            let exposition = state.metrics.render(&state.cache).await;
            // OpenMetrics for those who ask for it (Prometheus does), else the classic
            // text format, as Prometheus' own client libraries negotiate.
            let openmetrics = request
                .headers()
                .get_all(hyper::header::ACCEPT)
                .iter()
                .any(|v| {
                    v.to_str()
                        .is_ok_and(|v| v.contains("application/openmetrics-text"))
                });
            if openmetrics {
                full(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    exposition,
                )
            } else {
                full(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    metrics::to_text_format(&exposition),
                )
            }
        }
        (&Method::GET, ["v1", "jobs"]) => list(state, &query(&request)).await,
        (&Method::POST, ["v1", "jobs"]) => submit(state, request).await,
        (&Method::GET, ["v1", "jobs", id]) => {
            let (queue, id) = (Arc::clone(&state.queue), (*id).to_owned());
            match blocking(move || queue.status(&id)).await {
                Ok(status) => json(StatusCode::OK, &status),
                Err(e) => queue_error(&e),
            }
        }
        (&Method::POST, ["v1", "jobs", id, "cancel"]) => {
            let (queue, id) = (Arc::clone(&state.queue), (*id).to_owned());
            match blocking(move || queue.cancel(&id)).await {
                Ok(job_state) => json(
                    StatusCode::OK,
                    &model::Canceled {
                        outcome: crate::queue::CancelOutcome::of(job_state),
                        was: job_state,
                    },
                ),
                Err(e) => queue_error(&e),
            }
        }
        (&Method::GET, ["v1", "jobs", id, "log"]) => {
            log(state, id, &query(&request), &request).await
        }
        (&Method::GET, ["v1", "jobs", id, "artifacts"]) => match ended_run(state, id, None).await {
            Ok((_, report)) => json(StatusCode::OK, &report.artifacts),
            Err(reply) => reply,
        },
        (&Method::GET, ["v1", "jobs", id, "artifacts", name @ ..]) => {
            artifact(state, id, name, &request).await
        }
        (&Method::GET, ["v1", "jobs", id, "screenshot"]) => {
            screenshot(state, id, None, &request).await
        }
        (&Method::GET, ["v1", "jobs", id, "screenshots", name]) => {
            screenshot(state, id, Some(name), &request).await
        }
        (&Method::POST, ["v1", "jobs", id, "screenshots"]) => {
            screenshot_now(state, id, &request).await
        }
        (&Method::POST, ["v1", "jobs", id, "release"]) => release(state, id, &request).await,
        (&Method::GET, ["v1", "jobs", id, "shell"]) => {
            let id = (*id).to_owned();
            socket::shell(state, &id, request).await
        }
        (&Method::GET, ["v1", "jobs", id, "display"]) => {
            let id = (*id).to_owned();
            let control = state
                .tokens
                .check(authorization.as_deref(), Scope::Admin)
                .is_ok();
            socket::display(state, &id, request, control).await
        }
        (
            _,
            ["healthz"]
            | ["readyz"]
            | ["metrics"]
            | ["v1", "jobs", _]
            | [
                "v1",
                "jobs",
                _,
                "log" | "artifacts" | "screenshot" | "shell",
            ]
            | ["v1", "jobs", _, "artifacts", ..]
            | ["v1", "jobs", _, "screenshots", _],
        ) => allow(&path, "GET"),
        (_, ["v1", "jobs"]) => allow(&path, "GET, POST"),
        (_, ["v1", "jobs", _, "cancel" | "screenshots" | "release"]) => allow(&path, "POST"),
        _ => error(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no API path {path}"),
        ),
    }
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Read => "read",
        Scope::Submit => "submit",
        Scope::Admin => "admin",
    }
}

fn allow(path: &str, methods: &'static str) -> Reply {
    let mut reply = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        format!("{path} takes {methods}"),
    );
    reply
        .headers_mut()
        .insert("allow", HeaderValue::from_static(methods));
    reply
}

/// Ready when the queue answers, the image cache's directory takes a file, and the
/// accelerator is decided.
async fn readyz(state: &ApiState) -> Reply {
    let queue = Arc::clone(&state.queue);
    let queue_check = match blocking(move || queue.status("readyz-probe")).await {
        Ok(_) | Err(QueueError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.to_string()),
    };
    let tmp = state.cache.settings().dir.join("tmp");
    let cache_check = tokio::task::spawn_blocking(move || {
        let file = tempfile::NamedTempFile::new_in(&tmp)
            .map_err(|e| format!("cannot write in {}: {e}", tmp.display()))?;
        drop(file);
        Ok::<(), String>(())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let accelerator = state.metrics.accelerator_in_use();
    let accelerator_check = accelerator
        .clone()
        .ok_or_else(|| "not decided yet (or no accelerator works)".to_owned());
    let ready = queue_check.is_ok() && cache_check.is_ok() && accelerator_check.is_ok();
    let show = |r: &Result<(), String>| match r {
        Ok(()) => "ok".to_owned(),
        Err(e) => e.clone(),
    };
    json(
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &model::Readiness {
            ready,
            queue: show(&queue_check),
            image_cache: show(&cache_check),
            accelerator: accelerator.unwrap_or_else(|| show(&accelerator_check.map(drop))),
        },
    )
}

async fn list(state: &ApiState, query: &[(String, String)]) -> Reply {
    let mut filter = None;
    let mut limit = DEFAULT_PAGE;
    let mut after = None;
    for (key, value) in query {
        match key.as_str() {
            "state" => match JobState::parse(value) {
                Some(s) => filter = Some(s),
                None => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad-query",
                        format!(
                            "state={value:?}: pending, running, completed, failed or exception"
                        ),
                    );
                }
            },
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => limit = n,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad-query",
                        format!("limit={value:?}: a number from 1 to {MAX_PAGE}"),
                    );
                }
            },
            "after" => after = Some(value.clone()),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad-query",
                    format!("unknown query parameter {key:?} (state, limit, after)"),
                );
            }
        }
    }
    // One more than the page: whether there is a next one.
    let (queue, asked) = (
        Arc::clone(&state.queue),
        crate::queue::Page {
            after: after.clone(),
            limit: Some(limit + 1),
        },
    );
    let mut page = match blocking(move || queue.list(filter, &asked)).await {
        Ok(jobs) => jobs,
        Err(QueueError::NotFound { job_id }) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad-query",
                format!("after={job_id:?} is not a job"),
            );
        }
        Err(e) => return queue_error(&e),
    };
    let next = (page.len() > limit)
        .then(|| {
            page.truncate(limit);
            page.last().map(|j| j.job_id.clone())
        })
        .flatten();
    json(StatusCode::OK, &model::JobPage { jobs: page, next })
}

async fn submit(state: &ApiState, request: Request<Incoming>) -> Reply {
    let query = query(&request);
    let mut job = NewJob {
        payload: String::new(),
        priority: 0,
        max_runs: 3,
        deadline_ms: None,
    };
    for (key, value) in &query {
        let bad = |what: &str| {
            error(
                StatusCode::BAD_REQUEST,
                "bad-query",
                format!("{key}={value:?}: {what}"),
            )
        };
        match key.as_str() {
            "priority" => match value.parse() {
                Ok(p) => job.priority = p,
                Err(_) => return bad("an integer"),
            },
            "maxRuns" => match value.parse::<u32>() {
                Ok(n) if n >= 1 => job.max_runs = n,
                _ => return bad("a positive integer"),
            },
            "deadline" => match value.parse::<u64>() {
                Ok(s) if s <= MAX_DEADLINE_SECONDS => {
                    job.deadline_ms = Some(now_ms() + s * 1000);
                }
                _ => return bad("seconds from now, at most 10 years"),
            },
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad-query",
                    format!("unknown query parameter {key:?} (priority, maxRuns, deadline)"),
                );
            }
        }
    }
    let body = match Limited::new(request.into_body(), MAX_PAYLOAD)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!("a payload is at most {MAX_PAYLOAD} bytes"),
            );
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad-body",
                format!("the payload did not arrive whole: {e}"),
            );
        }
    };
    job.payload = match String::from_utf8(body.to_vec()) {
        Ok(text) if !text.trim().is_empty() => text,
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "empty-payload",
                "the body is the job payload (YAML or JSON)",
            );
        }
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "not-utf8",
                "a payload is UTF-8 text (YAML or JSON)",
            );
        }
    };
    let queue = Arc::clone(&state.queue);
    match blocking(move || queue.enqueue(&job, now_ms())).await {
        Ok(id) => json(StatusCode::CREATED, &model::Submitted { job_id: id }),
        Err(e) => queue_error(&e),
    }
}

/// The job log of the latest run from `offset`; with `follow`, kept open and fed until
/// the job ends (a new run starts again from its first byte, as `logs --follow` does).
async fn log(
    state: &Arc<ApiState>,
    id: &str,
    query: &[(String, String)],
    request: &Request<Incoming>,
) -> Reply {
    let mut offset = 0u64;
    let mut follow = false;
    for (key, value) in query {
        match (key.as_str(), value.as_str()) {
            ("offset", v) => match v.parse() {
                Ok(n) => offset = n,
                Err(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad-query",
                        format!("offset={v:?}: a byte offset"),
                    );
                }
            },
            ("follow", "" | "true" | "1") => follow = true,
            ("follow", "false" | "0") => follow = false,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad-query",
                    format!("{key}={value:?}: the log takes offset=N and follow=true|false"),
                );
            }
        }
    }
    let (queue, job) = (Arc::clone(&state.queue), id.to_owned());
    let mut status = match blocking(move || queue.status(&job)).await {
        Ok(status) => status,
        Err(e) => return queue_error(&e),
    };
    // A followed job that no worker has claimed yet: wait to see which one does.
    while follow && status.state == JobState::Pending {
        tokio::time::sleep(FOLLOW_POLL).await;
        let (queue, job) = (Arc::clone(&state.queue), id.to_owned());
        status = match blocking(move || queue.status(&job)).await {
            Ok(status) => status,
            Err(e) => return queue_error(&e),
        };
    }
    if let Some(reply) = pass_on(state, &status, request).await {
        return reply;
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let run = status.run_id;
    let feed = Feed {
        state: Arc::clone(state),
        authorization: request.headers().get(AUTHORIZATION).cloned(),
        passed_on: request.headers().contains_key(PASSED_ON),
    };
    tokio::spawn(async move {
        let _ = feed.log(status, offset, follow, tx).await;
    });
    let mut response = streamed(rx);
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert("x-qemu-worker-run", HeaderValue::from(run));
    response
}

/// A reply whose body is what arrives on `rx`, chunk by chunk, until it closes (or an
/// error aborts it).
fn streamed(rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Reply {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk.map(Frame::data), rx))
    });
    Response::new(StreamBody::new(stream.boxed()).boxed_unsync())
}

/// What a log stream needs after its request: the API's state, and the caller's token
/// for following a retried run onto another worker.
struct Feed {
    state: Arc<ApiState>,
    authorization: Option<HeaderValue>,
    /// This request was passed on to us: never pass it on again.
    passed_on: bool,
}

impl Feed {
    /// Sends the log's bytes from `offset` into `tx` until the job has ended and all of
    /// it went (or at once without `follow`); stops when the client goes away. A retried
    /// run that another worker took is followed from that worker's API.
    async fn log(
        self,
        mut status: crate::queue::JobStatus,
        mut offset: u64,
        follow: bool,
        tx: Chunks,
    ) -> Option<()> {
        let mut run = status.run_id;
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            let finished = !matches!(status.state, JobState::Pending | JobState::Running);
            let path = JobDir::of_run(&self.state.state_dir, &status.job_id, run).log();
            if let Ok(mut file) = tokio::fs::File::open(&path).await {
                file.seek(std::io::SeekFrom::Start(offset)).await.ok()?;
                loop {
                    let n = file.read(&mut buffer).await.ok()?;
                    if n == 0 {
                        break;
                    }
                    offset += n as u64;
                    tx.send(Ok(Bytes::copy_from_slice(&buffer[..n])))
                        .await
                        .ok()?;
                }
            }
            if !follow || finished {
                return Some(());
            }
            tokio::select! {
                () = tokio::time::sleep(FOLLOW_POLL) => {}
                () = tx.closed() => return None,
            }
            let (q, job) = (Arc::clone(&self.state.queue), status.job_id.clone());
            status = blocking(move || q.status(&job)).await.ok()?;
            if status.run_id != run {
                run = status.run_id;
                offset = 0;
                if !self.passed_on && !held_here(&self.state, &status) {
                    return self.elsewhere(&status, tx).await;
                }
            }
        }
    }

    /// The rest of a followed log from the worker that holds its latest run; an error
    /// aborts the stream when that worker cannot be reached.
    async fn elsewhere(&self, status: &crate::queue::JobStatus, tx: Chunks) -> Option<()> {
        let broken = |why: String| Err(std::io::Error::other(why));
        let Some(holder) = status.worker.clone() else {
            return Some(());
        };
        let queue = Arc::clone(&self.state.queue);
        let base = match blocking(move || queue.api_of(&holder)).await {
            Ok(Some(base)) => base,
            _ => {
                let _ = tx
                    .send(broken(
                        "the retried run's worker recorded no API address".into(),
                    ))
                    .await;
                return None;
            }
        };
        let url = format!("{base}/v1/jobs/{}/log?follow=true", status.job_id);
        let mut request = self.state.client.get(&url).header(PASSED_ON, "1");
        if let Some(value) = &self.authorization {
            request = request.header(AUTHORIZATION.as_str(), value.as_bytes());
        }
        let answer = match tokio::time::timeout(PASS_ON_TIMEOUT, request.send()).await {
            Ok(Ok(answer)) if answer.status().is_success() => answer,
            _ => {
                let _ = tx
                    .send(broken(format!(
                        "the retried run's worker at {base} does not answer"
                    )))
                    .await;
                return None;
            }
        };
        let mut body = answer.bytes_stream();
        while let Some(chunk) = body.next().await {
            tx.send(chunk.map_err(std::io::Error::other)).await.ok()?;
        }
        Some(())
    }
}

/// Whether this worker holds the files of the job's latest run: its run directory is in
/// our state directory (whoever ran it, under whatever worker id: a restarted worker
/// keeps its state directory and gets a new id).
fn held_here(state: &ApiState, status: &crate::queue::JobStatus) -> bool {
    JobDir::of_run(&state.state_dir, &status.job_id, status.run_id)
        .path()
        .is_dir()
}

/// The latest run of a job that has ended, and its report; else the reply that says why
/// not (404 unknown job, 409 still pending or running).
async fn ended_run(
    state: &ApiState,
    id: &str,
    files: Option<&Request<Incoming>>,
) -> Result<(JobDir, ResultReport), Reply> {
    let (queue, job) = (Arc::clone(&state.queue), id.to_owned());
    let status = blocking(move || queue.status(&job))
        .await
        .map_err(|e| queue_error(&e))?;
    // The files are on the worker that ran the job.
    if let Some(request) = files
        && status.report.is_some()
        && let Some(reply) = pass_on(state, &status, request).await
    {
        return Err(reply);
    }
    let Some(report) = status.report else {
        return Err(error(
            StatusCode::CONFLICT,
            "not-ended",
            format!(
                "{id} is {}: its artifacts and screenshot are collected when it ends",
                status.state
            ),
        ));
    };
    Ok((
        JobDir::of_run(&state.state_dir, &status.job_id, status.run_id),
        report,
    ))
}

/// Marks a request one worker passed on to another: it is never passed on again.
const PASSED_ON: &str = "x-qemu-worker-passed-on";

/// When another worker holds the files of the job's latest run: its API's answer to
/// the same request, streamed through; or a 502 naming it when it recorded no address
/// or does not answer. `None` when this worker holds them.
async fn pass_on(
    state: &ApiState,
    status: &crate::queue::JobStatus,
    request: &Request<Incoming>,
) -> Option<Reply> {
    let base = match holder_api(state, status, request).await? {
        Ok(base) => base,
        Err(reply) => return Some(reply),
    };
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", hyper::http::uri::PathAndQuery::as_str);
    let url = format!("{base}{path}");
    let method = reqwest::Method::from_bytes(request.method().as_str().as_bytes())
        .unwrap_or(reqwest::Method::GET);
    let mut forwarded = state.client.request(method, &url).header(PASSED_ON, "1");
    for name in [AUTHORIZATION, hyper::header::RANGE] {
        if let Some(value) = request.headers().get(&name) {
            forwarded = forwarded.header(name.as_str(), value.as_bytes());
        }
    }
    let why = match tokio::time::timeout(PASS_ON_TIMEOUT, forwarded.send()).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(crate::error_chain::display_chain(&e)),
        Err(_) => Err(format!("no answer within {} s", PASS_ON_TIMEOUT.as_secs())),
    };
    match why {
        Ok(answer) => Some(passed_back(answer).await),
        Err(why) => Some(holder_unreachable(status, &base, &why)),
    }
}

/// The API of the worker that holds the job, when it is another's: `None` to answer
/// here, or the reply that says why it cannot be reached.
async fn holder_api(
    state: &ApiState,
    status: &crate::queue::JobStatus,
    request: &Request<Incoming>,
) -> Option<Result<String, Reply>> {
    let holder = status.worker.as_deref().filter(|h| *h != state.worker_id)?;
    if held_here(state, status) {
        return None;
    }
    if request.headers().contains_key(PASSED_ON) {
        // Passed on to us as the holder, yet the queue says another worker ran the job
        // (a newer run): answer from here rather than ping-pong.
        return None;
    }
    let (queue, worker) = (Arc::clone(&state.queue), holder.to_owned());
    Some(match blocking(move || queue.api_of(&worker)).await {
        Ok(Some(base)) => Ok(base),
        Ok(None) => Err(error(
            StatusCode::BAD_GATEWAY,
            "holder-unknown",
            format!(
                "the job ran on worker {holder}, which recorded no API address \
                 (worker.yml api.advertise) to fetch its files from"
            ),
        )),
        Err(e) => Err(queue_error(&e)),
    })
}

fn holder_unreachable(status: &crate::queue::JobStatus, base: &str, why: &str) -> Reply {
    let holder = status.worker.as_deref().unwrap_or("?");
    error(
        StatusCode::BAD_GATEWAY,
        "holder-unreachable",
        format!("the job ran on worker {holder}, whose API at {base} does not answer: {why}"),
    )
}

/// The holder's answer, streamed on.
async fn passed_back(answer: reqwest::Response) -> Reply {
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = hyper::HeaderMap::new();
    for name in [
        "content-type",
        "content-length",
        "content-range",
        "accept-ranges",
        "x-artifact-sha256",
        "x-qemu-worker-run",
        "www-authenticate",
    ] {
        if let Some(value) = answer.headers().get(name)
            && let Ok(value) = HeaderValue::from_bytes(value.as_bytes())
        {
            headers.insert(hyper::header::HeaderName::from_static(name), value);
        }
    }
    // Streamed, not buffered: a chunk goes on as it comes; a broken upstream aborts
    // the reply, so the client never takes a short body for a whole one.
    let stream = answer
        .bytes_stream()
        .map(|chunk| chunk.map(Frame::data).map_err(std::io::Error::other));
    let mut response = Response::new(StreamBody::new(stream.boxed()).boxed_unsync());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// One artifact the report lists, by its stored name (`public/logs/a.txt`; the path's
/// segments percent-decoded): its bytes, or the `Range` asked for.
async fn artifact(state: &ApiState, id: &str, name: &[&str], request: &Request<Incoming>) -> Reply {
    let Some(name) = name
        .iter()
        .map(|s| percent_decode(s))
        .collect::<Option<Vec<String>>>()
        .map(|parts| parts.join("/"))
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad-path",
            "a malformed %-escape in the artifact name",
        );
    };
    let (dir, report) = match ended_run(state, id, Some(request)).await {
        Ok(run) => run,
        Err(reply) => return reply,
    };
    // Only what the report lists is complete; nothing else is handed out (and a listed
    // name is a plain relative path: the store checked it).
    let Some(record) = report.artifacts.iter().find(|a| a.name == name) else {
        return error(
            StatusCode::NOT_FOUND,
            "no-such-artifact",
            format!("{id} has no artifact {name:?} (GET /v1/jobs/{id}/artifacts lists them)"),
        );
    };
    let content_type = HeaderValue::from_str(&record.content_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    let mut reply = file_reply(&dir.artifacts().join(&record.name), content_type, request).await;
    if let Ok(sha) = HeaderValue::from_str(&record.sha256) {
        reply.headers_mut().insert("x-artifact-sha256", sha);
    }
    reply
}

async fn screenshot(
    state: &ApiState,
    id: &str,
    name: Option<&str>,
    request: &Request<Incoming>,
) -> Reply {
    let (dir, report) = match ended_run(state, id, Some(request)).await {
        Ok(run) => run,
        Err(reply) => return reply,
    };
    // Without a name, the final one; with one, one the run took while its command
    // ran, by the name the report lists.
    let relative = match name {
        None => report.screenshot.ok_or_else(|| {
            format!("{id}'s run took no screenshot (its VM never ran, or QMP did not answer)")
        }),
        Some(name) => report
            .screenshots
            .into_iter()
            .find(|s| s.strip_prefix("screenshots/") == Some(name))
            .ok_or_else(|| {
                format!(
                    "{id}'s report lists no screenshot {name:?} (its `screenshots` has those taken while it ran)"
                )
            }),
    };
    match relative {
        Ok(relative) => {
            file_reply(
                &dir.file(&relative),
                HeaderValue::from_static("image/png"),
                request,
            )
            .await
        }
        Err(why) => error(StatusCode::NOT_FOUND, "no-screenshot", why),
    }
}

/// Lets a failed job's VM kept for debugging go (on the worker that keeps it).
async fn release(state: &ApiState, id: &str, request: &Request<Incoming>) -> Reply {
    if state.live.release(id) {
        return json(StatusCode::OK, &model::Released { released: true });
    }
    let (queue, job) = (Arc::clone(&state.queue), id.to_owned());
    let status = match blocking(move || queue.status(&job)).await {
        Ok(status) => status,
        Err(e) => return queue_error(&e),
    };
    if status.report.is_some()
        && let Some(reply) = pass_on(state, &status, request).await
    {
        return reply;
    }
    error(
        StatusCode::CONFLICT,
        "not-kept",
        format!(
            "{id} has no VM kept for debugging ({}; only a failed job with debug.keepAliveOnFailure keeps one, until its time is up)",
            status.state
        ),
    )
}

/// A screenshot of a running job's VM, taken now (on the worker that runs it).
async fn screenshot_now(state: &ApiState, id: &str, request: &Request<Incoming>) -> Reply {
    if let Some(taken) = state.live.screenshot(id).await {
        return match taken {
            Ok(shot) => full(StatusCode::OK, "image/png", shot.png),
            Err(crate::vm::ScreenshotError::NoDisplay) => error(
                StatusCode::CONFLICT,
                "no-display",
                format!("{id}'s machine has no display (machine.graphics: none)"),
            ),
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "screenshot-failed",
                format!(
                    "{id}'s VM did not give a screenshot: {}",
                    crate::error_chain::display_chain(&e)
                ),
            ),
        };
    }
    let (queue, job) = (Arc::clone(&state.queue), id.to_owned());
    let status = match blocking(move || queue.status(&job)).await {
        Ok(status) => status,
        Err(e) => return queue_error(&e),
    };
    if status.state == JobState::Running
        && let Some(reply) = pass_on(state, &status, request).await
    {
        return reply;
    }
    let why = match (status.state, status.report.is_some()) {
        (JobState::Running, _) => "its VM is not up (starting, or being torn down)".to_owned(),
        (_, true) => format!("it ended; GET /v1/jobs/{id}/screenshot has its final screenshot"),
        (state, false) => format!("it is {state}"),
    };
    error(
        StatusCode::CONFLICT,
        "not-running",
        format!("{id} has no VM running now: {why}"),
    )
}

/// A file streamed with `Content-Length`, honouring one `Range: bytes=…` (206, or 416
/// for a range outside the file).
async fn file_reply(
    path: &std::path::Path,
    content_type: HeaderValue,
    request: &Request<Incoming>,
) -> Reply {
    let file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(e) => {
            return error(
                StatusCode::GONE,
                "file-gone",
                format!("the stored file is not readable on this host: {e}"),
            );
        }
    };
    let size = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => return error(StatusCode::GONE, "file-gone", e.to_string()),
    };
    let range = request
        .headers()
        .get(hyper::header::RANGE)
        .map(|v| parse_range(v.as_bytes(), size));
    let (status, start, length) = match range {
        None => (StatusCode::OK, 0, size),
        Some(Some((start, end))) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        Some(None) => {
            let mut reply = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "bad-range",
                format!("one range of bytes=START-END within the file's {size} bytes"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                reply.headers_mut().insert(hyper::header::CONTENT_RANGE, v);
            }
            return reply;
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let _ = send_file(file, start, length, tx).await;
    });
    let mut response = streamed(rx);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, content_type);
    headers.insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(
        hyper::header::ACCEPT_RANGES,
        HeaderValue::from_static("bytes"),
    );
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) =
            HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + length - 1))
    {
        headers.insert(hyper::header::CONTENT_RANGE, v);
    }
    response
}

async fn send_file(mut file: tokio::fs::File, start: u64, mut left: u64, tx: Chunks) -> Option<()> {
    file.seek(std::io::SeekFrom::Start(start)).await.ok()?;
    let mut buffer = vec![0u8; 64 << 10];
    while left > 0 {
        let want = usize::try_from(left.min(buffer.len() as u64)).unwrap_or(buffer.len());
        let n = file.read(&mut buffer[..want]).await.ok()?;
        if n == 0 {
            // The file shrank under us: abort the reply.
            let shrank = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file shrank");
            let _ = tx.send(Err(shrank)).await;
            return None;
        }
        left -= n as u64;
        tx.send(Ok(Bytes::copy_from_slice(&buffer[..n])))
            .await
            .ok()?;
    }
    Some(())
}

/// `bytes=A-B`, `bytes=A-` or `bytes=-N` within a file of `size` bytes, as the first and
/// last byte; `None` for anything else (several ranges, other units, out of the file).
fn parse_range(value: &[u8], size: u64) -> Option<(u64, u64)> {
    let spec = std::str::from_utf8(value)
        .ok()?
        .trim()
        .strip_prefix("bytes=")?;
    let (first, last) = spec.split_once('-')?;
    let (start, end) = match (first.trim(), last.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            (size.checked_sub(n.min(size))?, size.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, size.checked_sub(1)?),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(size.checked_sub(1)?),
        ),
    };
    (start <= end && end < size).then_some((start, end))
}

/// `%XX` escapes decoded; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_within_the_file_and_nothing_else() {
        let r = |v: &str| parse_range(v.as_bytes(), 100);
        assert_eq!(r("bytes=0-9"), Some((0, 9)));
        assert_eq!(r("bytes=90-"), Some((90, 99)));
        assert_eq!(r("bytes=-10"), Some((90, 99)));
        assert_eq!(r("bytes=-1000"), Some((0, 99)));
        assert_eq!(r("bytes=50-1000"), Some((50, 99)));
        for bad in [
            "bytes=100-",
            "bytes=9-0",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=a-b",
            "bytes=-",
        ] {
            assert_eq!(r(bad), None, "{bad}");
        }
        assert_eq!(parse_range(b"bytes=0-0", 0), None);
    }

    #[test]
    fn escapes_decode_and_broken_ones_are_refused() {
        assert_eq!(percent_decode("a%20b.txt").as_deref(), Some("a b.txt"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
