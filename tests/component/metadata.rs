//! The metadata service over real HTTP on its unix socket, every JSON reply checked
//! against the committed OpenAPI document, and the guestfwd helper through the binary.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use qemu_worker::metadata::{LogSink, MetadataLimits, Park, Task, start_metadata_service};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: String,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

pub(crate) fn parse(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers: head.to_ascii_lowercase(),
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&data[..end]).expect("size"), 16)
            .expect("hex");
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 2 + size + 2..];
    }
    out
}

pub(crate) async fn request(socket: &Path, raw: &[u8]) -> Reply {
    let mut stream = UnixStream::connect(socket).await.expect("connect");
    stream.write_all(raw).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    parse(&response)
}

pub(crate) fn simple(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Checks a reply against the OpenAPI document's schema for (path, method, status).
fn assert_conforms(reply: &Reply, path: &str, method: &str) {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/metadata-api.openapi.json"),
        )
        .expect("committed OpenAPI document"),
    )
    .expect("JSON");
    let documented = &doc["paths"][path][method]["responses"][reply.status.to_string()];
    let documented = if documented.is_null() {
        match reply.status {
            404 => &doc["components"]["responses"]["NotFound"],
            405 => &doc["components"]["responses"]["MethodNotAllowed"],
            _ => panic!(
                "{method} {path} answered {} which the document does not list",
                reply.status
            ),
        }
    } else {
        documented
    };
    assert!(
        reply.headers.contains("content-type: application/json"),
        "{}",
        reply.headers
    );
    let reference = documented["content"]["application/json"]["schema"]["$ref"]
        .as_str()
        .expect("a JSON schema reference");
    // The document itself is the schema root, so #/components/... references resolve.
    let mut schema = doc.clone();
    schema["$ref"] = Value::from(reference);
    let validator = jsonschema::draft202012::new(&schema).expect("schema compiles");
    let body = reply.json();
    let errors: Vec<String> = validator
        .iter_errors(&body)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {}: {body} does not conform: {errors:?}",
        reply.status
    );
}

struct Service {
    dir: tempfile::TempDir,
    handle: qemu_worker::metadata::MetadataHandle,
    log: LogSink,
}

impl Service {
    async fn start(log_cap: u64) -> Self {
        Self::start_with(log_cap, MetadataLimits::default()).await
    }

    async fn start_with(log_cap: u64, limits: MetadataLimits) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("qw-md")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let log = LogSink::create(&dir.path().join("job.log"), log_cap)
            .await
            .expect("log");
        let task = Task {
            command: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: BTreeMap::from([("CI".into(), "true".into())]),
            max_run_time: 60,
            working_directory: "/root".into(),
        };
        let handle =
            start_metadata_service(&dir.path().join("meta.sock"), &task, log.clone(), limits)
                .await
                .expect("service");
        Self { dir, handle, log }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("meta.sock")
    }

    async fn log_text(&self) -> String {
        self.log.flush().await;
        std::fs::read_to_string(self.dir.path().join("job.log")).expect("log")
    }
}

#[tokio::test]
async fn ping_task_and_the_result_lifecycle() {
    let mut service = Service::start(1 << 20).await;
    let socket = service.socket();
    let reply = request(&socket, &simple("GET", "/v1/ping", "")).await;
    assert_eq!(reply.status, 200);
    assert_conforms(&reply, "/v1/ping", "get");

    let reply = request(&socket, &simple("GET", "/v1/task", "")).await;
    assert_eq!(reply.status, 200);
    assert_conforms(&reply, "/v1/task", "get");
    assert_eq!(reply.json()["command"][2], "echo hi");
    assert!(service.handle.task_fetched().await);

    let reply = request(&socket, &simple("PUT", "/v1/result", r#"{"exitCode": 3}"#)).await;
    assert_eq!(reply.status, 200);
    assert_conforms(&reply, "/v1/result", "put");
    assert_eq!(service.handle.result().await, Some(3));

    let again = request(&socket, &simple("PUT", "/v1/result", r#"{"exitCode": 3}"#)).await;
    assert_eq!(again.status, 200, "the same report is idempotent");
    let conflict = request(&socket, &simple("PUT", "/v1/result", r#"{"exitCode": 0}"#)).await;
    assert_eq!(conflict.status, 409);
    assert_conforms(&conflict, "/v1/result", "put");
    assert_eq!(service.handle.reported(), Some(3), "the first report wins");
}

/// A boot snapshot's park request: answered `202` (connection closed) once, only to a
/// caller that offers to park; the task comes on the next fetch, with the host's clock
/// and per-VM entropy. Tools that do not offer get their task, and the worker learns it.
#[tokio::test]
async fn a_park_request_goes_once_to_tools_that_offer_to_park() {
    let mut service = Service::start(1 << 20).await;
    let socket = service.socket();
    service.handle.arm_park();
    let parked = request(&socket, &simple("GET", "/v1/task?park=2", "")).await;
    assert_eq!(parked.status, 202);
    assert_conforms(&parked, "/v1/task", "get");
    assert_eq!(parked.json()["code"], "park");
    assert!(
        parked
            .headers
            .to_ascii_lowercase()
            .contains("connection: close"),
        "{}",
        parked.headers
    );
    assert_eq!(service.handle.park_outcome().await, Park::Sent);

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let reply = request(&socket, &simple("GET", "/v1/task?park=2", "")).await;
    assert_eq!(reply.status, 200, "parked once only");
    assert_conforms(&reply, "/v1/task", "get");
    let task = reply.json();
    assert_eq!(task["command"][2], "echo hi");
    let now = task["unixTimeMillis"].as_u64().expect("unixTimeMillis");
    assert!(now >= before && now < before + 60_000, "{now} vs {before}");
    let entropy = task["entropy"].as_str().expect("entropy").to_owned();
    assert_eq!(entropy.len(), 64);
    assert!(entropy.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(service.handle.task_fetched().await);

    let other = Service::start(1 << 20).await;
    other.handle.arm_park();
    // `park=1`: tools that offered the console handshake, which is no longer served.
    let reply = request(&other.socket(), &simple("GET", "/v1/task?park=1", "")).await;
    assert_eq!(reply.status, 200, "tools that cannot park get the task");
    assert_conforms(&reply, "/v1/task", "get");
    assert_ne!(
        reply.json()["entropy"],
        entropy.as_str(),
        "entropy is per VM"
    );
    assert_eq!(other.handle.park_outcome().await, Park::Refused);
}

/// A VM resumed from a boot snapshot: its task waits until the worker released it (the
/// guest tools echoed RESUME), so tools that skip the echo never run the command in a
/// VM that is then discarded.
#[tokio::test]
async fn a_held_task_is_served_only_once_the_vm_is_released() {
    let mut service = Service::start(1 << 20).await;
    let socket = service.socket();
    service.handle.hold_task();
    let fetch = tokio::spawn(async move { request(&socket, &simple("GET", "/v1/task", "")).await });
    let mut fetch = std::pin::pin!(fetch);
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), &mut fetch)
            .await
            .is_err(),
        "a held task was served"
    );
    let ping = request(&service.socket(), &simple("GET", "/v1/ping", "")).await;
    assert_eq!(ping.status, 200, "only the task waits");
    service.handle.release_task();
    let reply = fetch.await.expect("the fetch");
    assert_eq!(reply.status, 200);
    assert_conforms(&reply, "/v1/task", "get");
    assert_eq!(reply.json()["command"][2], "echo hi");
    assert!(service.handle.task_fetched().await);
}

#[tokio::test]
async fn bad_requests_get_json_errors_and_never_break_the_service() {
    let service = Service::start(1 << 20).await;
    let socket = service.socket();
    let reply = request(&socket, &simple("GET", "/v2/secrets", "")).await;
    assert_eq!(reply.status, 404);
    assert_conforms(&reply, "/v2/secrets", "get");
    let reply = request(&socket, &simple("DELETE", "/v1/task", "")).await;
    assert_eq!(reply.status, 405);
    assert!(reply.headers.contains("allow: get"), "{}", reply.headers);
    assert_conforms(&reply, "/v1/task", "delete");
    for body in [
        "",
        "not json",
        r#"{"exitCode": "zero"}"#,
        r#"{"exitCode": 1, "extra": true}"#,
    ] {
        let reply = request(&socket, &simple("PUT", "/v1/result", body)).await;
        assert_eq!(reply.status, 400, "{body:?}");
        assert_conforms(&reply, "/v1/result", "put");
    }
    let big = format!(r#"{{"exitCode": 1, "pad": "{}"}}"#, "x".repeat(70 << 10));
    let reply = request(&socket, &simple("PUT", "/v1/result", &big)).await;
    assert_eq!(reply.status, 413);
    assert_conforms(&reply, "/v1/result", "put");

    // Not HTTP at all, and a head over the limit: the connection is refused, nothing else.
    let mut raw = UnixStream::connect(&socket).await.expect("connect");
    raw.write_all(b"\x00\x01\x02 garbage\r\n\r\n")
        .await
        .expect("write");
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink).await;
    let huge = format!(
        "GET /v1/ping HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 << 10)
    );
    let mut raw = UnixStream::connect(&socket).await.expect("connect");
    let _ = raw.write_all(huge.as_bytes()).await;
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink).await;
    assert!(
        !String::from_utf8_lossy(&sink).starts_with("HTTP/1.1 200"),
        "an oversized head was served"
    );

    let reply = request(&socket, &simple("GET", "/v1/ping", "")).await;
    assert_eq!(reply.status, 200, "the service still answers");
}

#[tokio::test]
async fn log_streams_are_appended_live() {
    let service = Service::start(1 << 20).await;
    let mut stream = UnixStream::connect(service.socket())
        .await
        .expect("connect");
    stream
        .write_all(b"POST /v1/log HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .expect("head");
    stream.write_all(b"6\r\nfirst\n\r\n").await.expect("chunk");
    // The first line is in the job log while the stream is still open.
    let mut live = String::new();
    for _ in 0..100 {
        live = service.log_text().await;
        if live.contains("first") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(live, "first\n");

    // A second stream at the same time.
    let other = request(&service.socket(), &simple("POST", "/v1/log", "other\n")).await;
    assert_eq!(other.status, 200);
    assert_conforms(&other, "/v1/log", "post");

    stream
        .write_all(b"7\r\nsecond\n\r\n0\r\n\r\n")
        .await
        .expect("end");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let reply = parse(&response);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["bytes"], 13);
    assert_eq!(service.log_text().await, "first\nother\nsecond\n");
}

#[tokio::test]
async fn the_job_log_is_capped_and_says_so() {
    let service = Service::start(10).await;
    let reply = request(
        &service.socket(),
        &simple("POST", "/v1/log", "0123456789abcdef\nmore\n"),
    )
    .await;
    assert_eq!(reply.status, 200);
    let _ = request(&service.socket(), &simple("POST", "/v1/log", "even more\n")).await;
    let text = service.log_text().await;
    assert!(
        text.starts_with("0123456789\n[qemu-worker:error] the log reached its limit of 10 bytes"),
        "{text}"
    );
    assert_eq!(text.matches("[qemu-worker:error]").count(), 1, "{text}");
}

#[tokio::test]
async fn the_guestfwd_helper_splices_a_connection_to_the_service() {
    let service = Service::start(1 << 20).await;
    let socket = service.socket();
    let binary = env!("CARGO_BIN_EXE_qemu-worker");
    let output = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(binary)
            .arg("metadata-splice")
            .arg(&socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("helper");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&simple("GET", "/v1/task", ""))
            .expect("write");
        let mut out = Vec::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_end(&mut out)
            .expect("read");
        let status = child.wait().expect("wait");
        (status, out)
    })
    .await
    .expect("join");
    assert!(output.0.success());
    let reply = parse(&output.1);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["env"]["CI"], "true");
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_on_arrival_and_counted() {
    let limits = MetadataLimits {
        max_connections: 3,
        ..MetadataLimits::default()
    };
    let service = Service::start_with(1 << 20, limits).await;
    let socket = service.socket();
    // Three held open (idle, mid-head), then more.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = UnixStream::connect(&socket).await.expect("connect");
        stream
            .write_all(b"GET /v1/ping HTTP/1.1\r\n")
            .await
            .expect("write");
        held.push(stream);
    }
    for _ in 0..5 {
        let mut refused = UnixStream::connect(&socket).await.expect("connect");
        let mut sink = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), refused.read_to_end(&mut sink))
            .await
            .expect("closed at once, not left open")
            .unwrap_or(0);
        assert_eq!(n, 0, "a refused connection gets nothing");
    }
    let usage = service.handle.usage();
    assert_eq!((usage.refused_connections, usage.peak_connections), (5, 3));
    // Once one closes, a new connection is served again.
    drop(held.pop());
    let served = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let reply = request(&socket, &simple("GET", "/v1/ping", "")).await;
            if reply.status == 200 {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(served.is_ok(), "a freed slot serves again");
}

#[tokio::test]
async fn an_idle_log_stream_is_closed_and_counted() {
    let limits = MetadataLimits {
        log_idle: Duration::from_millis(300),
        ..MetadataLimits::default()
    };
    let service = Service::start_with(1 << 20, limits).await;
    let mut stream = UnixStream::connect(service.socket())
        .await
        .expect("connect");
    stream
        .write_all(
            b"POST /v1/log HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhi\n\r\n",
        )
        .await
        .expect("write");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply))
        .await
        .expect("the service ends the idle stream")
        .expect("read");
    let reply = parse(&reply);
    assert_eq!(reply.status, 408, "{}", reply.headers);
    assert_eq!(reply.json()["code"], "log-idle");
    assert_conforms(&reply, "/v1/log", "post");
    assert_eq!(service.handle.usage().idle_logs_closed, 1);
    assert!(service.log_text().await.contains("hi"), "what came is kept");
}

#[tokio::test]
async fn the_guestfwd_helper_exits_when_the_service_closes_whatever_the_guest_does() {
    let limits = MetadataLimits {
        head_timeout: Duration::from_millis(300),
        ..MetadataLimits::default()
    };
    let service = Service::start_with(1 << 20, limits).await;
    let socket = service.socket();
    let binary = env!("CARGO_BIN_EXE_qemu-worker");
    let status = tokio::task::spawn_blocking(move || {
        // The guest side stays open and silent: only the service can end this.
        let mut child = Command::new(binary)
            .arg("metadata-splice")
            .arg(&socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("helper");
        let _guest = child.stdin.take();
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return Some(status);
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .expect("join");
    assert!(
        status.is_some(),
        "the helper outlived the service's side of the connection"
    );
}

#[tokio::test]
async fn slow_heads_smuggling_and_bad_chunking_are_refused() {
    let limits = MetadataLimits {
        head_timeout: Duration::from_millis(300),
        ..MetadataLimits::default()
    };
    let service = Service::start_with(1 << 20, limits).await;
    let socket = service.socket();
    // A head that never finishes is dropped at the head timeout.
    let mut slow = UnixStream::connect(&socket).await.expect("connect");
    slow.write_all(b"GET /v1/ping HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut sink))
        .await
        .expect("a slow head is dropped")
        .expect("read");
    assert!(
        !String::from_utf8_lossy(&sink).contains("200 OK"),
        "{sink:?}"
    );
    // Content-Length and chunked together: the body is read as chunked (RFC 9112) and
    // the connection closed after the answer, so the request smuggled behind it is never
    // served.
    let mut stream = UnixStream::connect(&socket).await.expect("connect");
    stream
        .write_all(b"POST /v1/log HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/task HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("closed")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert_eq!(
        text.matches("http/1.1 ").count(),
        1,
        "one answer only: {text}"
    );
    assert!(
        text.contains("connection: close") && !text.contains("command"),
        "{text}"
    );
    // A chunk size that is not hex breaks the stream, with a JSON error.
    let broken = request(
        &socket,
        b"POST /v1/log HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(broken.status, 400, "{}", broken.headers);
    assert_eq!(broken.json()["code"], "bad-body");
    let reply = request(&socket, &simple("GET", "/v1/ping", "")).await;
    assert_eq!(reply.status, 200, "the service still answers");
}
