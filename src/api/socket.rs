//! The API's WebSockets (docs/api.md): `GET /v1/jobs/ID/shell`, a shell in a running
//! job's guest, and `GET /v1/jobs/ID/display`, its screen (`display.rs`). A job that runs
//! on another worker is passed on to it, byte for byte after both upgrades. Browsers
//! cannot set `Authorization` on a WebSocket: they may offer the token as a
//! subprotocol `bearer.TOKEN` instead.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderValue, UPGRADE};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, handshake::derive_accept_key};

use super::model::{ShellClientControl as ClientControl, ShellServerControl as ServerControl};
use super::{ApiState, PASSED_ON, Reply, error, query};
use crate::artifacts::{MAX_TERMINAL, Shell, ShellEvent, ShellRequest};
use crate::queue::{JobState, blocking};

/// The largest message a client sends (stdin comes in pieces anyway).
const MAX_MESSAGE: usize = 1 << 20;
/// The most arguments a command has, and their total size.
const MAX_ARGS: usize = 256;
const MAX_COMMAND_BYTES: usize = 32 << 10;

/// The client's `Sec-WebSocket-Key` when `request` asks for a WebSocket.
fn websocket_key(request: &Request<Incoming>) -> Option<HeaderValue> {
    let headers = request.headers();
    let has = |name, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    (has(UPGRADE, "websocket") && has(CONNECTION, "upgrade"))
        .then(|| headers.get("sec-websocket-key").cloned())
        .flatten()
}

/// The subprotocols the client offers.
fn offered(request: &Request<Incoming>) -> Vec<String> {
    request
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// `Bearer TOKEN` from a WebSocket's `bearer.TOKEN` subprotocol, for a browser.
pub(super) fn subprotocol_token(request: &Request<Incoming>) -> Option<Vec<u8>> {
    websocket_key(request)?;
    offered(request)
        .iter()
        .find_map(|p| p.strip_prefix("bearer."))
        .map(|token| format!("Bearer {token}").into_bytes())
}

/// The subprotocol the answer names: `binary` when offered (noVNC), else the first
/// that is not a token. Never the token: a browser that offered only that fails the
/// handshake (offer `binary` beside it) rather than see it in a header.
fn chosen(offered: &[String]) -> Option<String> {
    offered
        .iter()
        .find(|p| *p == "binary")
        .or_else(|| offered.iter().find(|p| !p.starts_with("bearer.")))
        .cloned()
}

fn switching(key: &HeaderValue, protocol: Option<&str>) -> Reply {
    let mut reply = super::full(StatusCode::SWITCHING_PROTOCOLS, "text/plain", Bytes::new());
    reply.headers_mut().remove(hyper::header::CONTENT_TYPE);
    let headers = reply.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert("sec-websocket-accept", accept);
    }
    if let Some(protocol) = protocol.and_then(|p| HeaderValue::from_str(p).ok()) {
        headers.insert("sec-websocket-protocol", protocol);
    }
    reply
}

fn not_websocket(path: &str) -> Reply {
    error(
        StatusCode::BAD_REQUEST,
        "not-websocket",
        format!("{path} is a WebSocket: send `Connection: Upgrade` and `Upgrade: websocket`"),
    )
}

/// What `?tty=…&rows=…&cols=…&term=…&command=…` asks for (`command` once per argument).
fn shell_request(query: &[(String, String)]) -> Result<ShellRequest, String> {
    let mut request = ShellRequest {
        command: None,
        tty: false,
        rows: 24,
        cols: 80,
        term: None,
    };
    let mut bytes = 0;
    for (key, value) in query {
        let value = super::percent_decode(&value.replace('+', " "))
            .ok_or_else(|| format!("{key}: not valid UTF-8"))?;
        let size = |v: &str| {
            v.parse::<u16>()
                .ok()
                .filter(|n| (1..=MAX_TERMINAL).contains(n))
                .ok_or_else(|| format!("{key}: {v:?} is not a number from 1 to {MAX_TERMINAL}"))
        };
        match key.as_str() {
            "tty" => {
                request.tty = match value.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    other => return Err(format!("tty: {other:?} is not true or false")),
                };
            }
            "rows" => request.rows = size(&value)?,
            "cols" => request.cols = size(&value)?,
            "term" if value.len() <= 64 && value.bytes().all(|b| b.is_ascii_graphic()) => {
                request.term = Some(value);
            }
            "term" => return Err("term: at most 64 printable ASCII characters".into()),
            "command" => {
                bytes += value.len();
                let command = request.command.get_or_insert_with(Vec::new);
                command.push(value);
                if command.len() > MAX_ARGS || bytes > MAX_COMMAND_BYTES {
                    return Err(format!(
                        "command: at most {MAX_ARGS} arguments of {MAX_COMMAND_BYTES} bytes in all"
                    ));
                }
            }
            other => return Err(format!("{other}: not a parameter of this path")),
        }
    }
    Ok(request)
}

/// `GET /v1/jobs/ID/shell`.
pub(super) async fn shell(
    state: &Arc<ApiState>,
    id: &str,
    mut request: Request<Incoming>,
) -> Reply {
    let path = request.uri().path().to_owned();
    let Some(key) = websocket_key(&request) else {
        return not_websocket(&path);
    };
    let wanted = match shell_request(&query(&request)) {
        Ok(wanted) => wanted,
        Err(why) => return error(StatusCode::BAD_REQUEST, "bad-query", why),
    };
    let shell = match state.live.shell(id, &wanted).await {
        Some(Ok(shell)) => shell,
        Some(Err(e)) => {
            return error(
                StatusCode::CONFLICT,
                "shell-failed",
                format!(
                    "{id}'s guest did not give a shell: {}",
                    crate::error_chain::display_chain(&e)
                ),
            );
        }
        None => return elsewhere(state, id, &key, request).await,
    };
    // A client that goes away before the upgrade drops the shell, which ends it.
    accept(&mut request, &key, move |socket| pump(socket, shell))
}

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Answers `101` and runs `serve` on the WebSocket once the upgrade is through.
fn accept<F, Fut>(request: &mut Request<Incoming>, key: &HeaderValue, serve: F) -> Reply
where
    F: FnOnce(Socket) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let upgrade = hyper::upgrade::on(&mut *request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        serve(socket).await;
    });
    switching(key, chosen(&offered(request)).as_deref())
}

/// `GET /v1/jobs/ID/display`: `control` (scope admin) lets the viewer's input through.
pub(super) async fn display(
    state: &Arc<ApiState>,
    id: &str,
    mut request: Request<Incoming>,
    control: bool,
) -> Reply {
    let path = request.uri().path().to_owned();
    let Some(key) = websocket_key(&request) else {
        return not_websocket(&path);
    };
    let vnc = match state.live.display_socket(id) {
        Some(Some(vnc)) => vnc,
        Some(None) => {
            return error(
                StatusCode::CONFLICT,
                "no-display",
                format!("{id}'s machine has no display (machine.graphics: none)"),
            );
        }
        None => return elsewhere(state, id, &key, request).await,
    };
    accept(&mut request, &key, move |socket| async move {
        super::display::bridge(socket, &vnc, control).await;
    })
}

/// Carries a shell over a WebSocket until it exits, is lost, or the client leaves (which
/// kills it).
async fn pump<S>(socket: WebSocketStream<S>, mut shell: Shell)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut messages) = socket.split();
    let last = loop {
        tokio::select! {
            event = shell.next() => match event {
                ShellEvent::Output { stream, data } => {
                    let mut message = Vec::with_capacity(data.len() + 1);
                    message.push(stream);
                    message.extend_from_slice(&data);
                    if sink.send(Message::Binary(message.into())).await.is_err() {
                        return;
                    }
                }
                ShellEvent::Exited(exit) => {
                    break ServerControl::Exit {
                        code: exit.code,
                        signal: exit.signal,
                        error: exit.error,
                    };
                }
                ShellEvent::Lost(reason) => break ServerControl::Lost { reason },
            },
            message = messages.next() => {
                let sent = match message {
                    Some(Ok(Message::Binary(data))) => shell.write(&data).await,
                    Some(Ok(Message::Text(text))) => {
                        match serde_json::from_str::<ClientControl>(text.as_str()) {
                            Ok(ClientControl::Resize { rows, cols }) => shell.resize(rows, cols).await,
                            Ok(ClientControl::Eof) => shell.close_stdin().await,
                            Err(e) => {
                                let _ = sink
                                    .send(Message::Close(Some(close_frame(
                                        1003,
                                        &format!("not a control message: {e}"),
                                    ))))
                                    .await;
                                return;
                            }
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Ok(()),
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                };
                if let Err(e) = sent {
                    break ServerControl::Lost {
                        reason: crate::error_chain::display_chain(&e),
                    };
                }
            }
        }
    };
    if let Ok(text) = serde_json::to_string(&last) {
        let _ = sink.send(Message::Text(text.into())).await;
    }
    let _ = sink.send(Message::Close(Some(close_frame(1000, "")))).await;
}

pub(super) fn close_frame(
    code: u16,
    reason: &str,
) -> tokio_tungstenite::tungstenite::protocol::CloseFrame {
    tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: code.into(),
        reason: reason.chars().take(100).collect::<String>().into(),
    }
}

/// The job has no VM here: passed on to the worker that runs it, or a clear refusal.
async fn elsewhere(
    state: &Arc<ApiState>,
    id: &str,
    key: &HeaderValue,
    mut request: Request<Incoming>,
) -> Reply {
    let (queue, job) = (Arc::clone(&state.queue), id.to_owned());
    let status = match blocking(move || queue.status(&job)).await {
        Ok(status) => status,
        Err(e) => return super::queue_error(&e),
    };
    if status.state == JobState::Running
        && let Some(base) = super::holder_api(state, &status, &request).await
    {
        let base = match base {
            Ok(base) => base,
            Err(reply) => return reply,
        };
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", hyper::http::uri::PathAndQuery::as_str);
        let mut forwarded = state
            .client
            .get(format!("{base}{path}"))
            .header(PASSED_ON, "1")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", key.as_bytes());
        for name in ["authorization", "sec-websocket-protocol"] {
            for value in request.headers().get_all(name) {
                forwarded = forwarded.header(name, value.as_bytes());
            }
        }
        let answer = match tokio::time::timeout(super::PASS_ON_TIMEOUT, forwarded.send()).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                return super::holder_unreachable(
                    &status,
                    &base,
                    &crate::error_chain::display_chain(&e),
                );
            }
            Err(_) => {
                return super::holder_unreachable(
                    &status,
                    &base,
                    &format!("no answer within {} s", super::PASS_ON_TIMEOUT.as_secs()),
                );
            }
        };
        if answer.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            return super::passed_back(answer).await;
        }
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            let (Ok(ours), Ok(theirs)) = (upgrade.await, answer.upgrade().await) else {
                return;
            };
            let (mut ours, mut theirs) = (TokioIo::new(ours), theirs);
            let _ = tokio::io::copy_bidirectional(&mut ours, &mut theirs).await;
        });
        return switching(key, chosen(&offered(&request)).as_deref());
    }
    let why = match (status.state, status.report.is_some()) {
        (JobState::Running, _) => "its VM is not up (starting, or being torn down)".to_owned(),
        (_, true) => "it ended, and its VM with it (debug.keepAliveOnFailure keeps a failed job's VM for a while)".to_owned(),
        (state, false) => format!("it is {state}"),
    };
    error(
        StatusCode::CONFLICT,
        "not-running",
        format!("{id} has no VM running now: {why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_shell_request_reads_its_query() {
        let request = shell_request(&q(&[
            ("tty", "true"),
            ("rows", "40"),
            ("cols", "120"),
            ("command", "sh"),
            ("command", "-c"),
            ("command", "echo%20%24((6*7))"),
        ]))
        .expect("valid");
        assert!(request.tty);
        assert_eq!((request.rows, request.cols), (40, 120));
        assert_eq!(
            request.command,
            Some(vec!["sh".into(), "-c".into(), "echo $((6*7))".into()])
        );
    }

    #[test]
    fn a_bad_shell_query_names_its_parameter() {
        for (pairs, named) in [
            (vec![("rows", "0")], "rows"),
            (vec![("cols", "70000")], "cols"),
            (vec![("tty", "yes")], "tty"),
            (vec![("term", "a b")], "term"),
            (vec![("user", "x")], "user"),
            (vec![("command", "%ff")], "command"),
        ] {
            let error = shell_request(&q(&pairs)).expect_err("refused");
            assert!(error.starts_with(named), "{error}");
        }
    }

    #[test]
    fn the_answer_names_an_offered_subprotocol_never_needlessly_the_token() {
        let offer = |list: &[&str]| list.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            chosen(&offer(&["bearer.x", "binary"])).as_deref(),
            Some("binary")
        );
        assert_eq!(
            chosen(&offer(&["bearer.x", "base64"])).as_deref(),
            Some("base64")
        );
        assert_eq!(chosen(&offer(&["bearer.x"])), None);
        assert_eq!(chosen(&[]), None);
    }

    #[test]
    fn control_messages_parse() {
        assert!(matches!(
            serde_json::from_str::<ClientControl>(r#"{"resize":{"rows":3,"cols":4}}"#),
            Ok(ClientControl::Resize { rows: 3, cols: 4 })
        ));
        assert!(matches!(
            serde_json::from_str::<ClientControl>(r#""eof""#),
            Ok(ClientControl::Eof)
        ));
        assert!(serde_json::from_str::<ClientControl>(r#"{"kill":1}"#).is_err());
    }
}
