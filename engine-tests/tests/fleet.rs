//! Fleet operations on the test image: two `serve` processes on one real PostgreSQL
//! queue, each with its HTTP API on loopback TCP; jobs submitted, listed and followed
//! through the API with bearer tokens of each scope; a real Prometheus (Debian's
//! `prometheus` package) scraping both workers, asked through its HTTP API how many
//! jobs completed; `promtool check metrics` on the exposition; and the worker's own log
//! as JSON lines with no token in any of them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use engine_tests::{Job, Worker, base_config, free_port, wait_until, with_setting};
use sha2::{Digest, Sha256};
use test_support::http::Reply;
use test_support::postgres::TestPostgres;
use test_support::require;

/// A job's status through the API on `port`.
fn status_of(port: u16, id: &str) -> serde_json::Value {
    http(
        port,
        "GET",
        &format!("/v1/jobs/{id}"),
        Some(READ_TOKEN),
        b"",
    )
    .json()
}

/// One request (test_support's plain client), its reply checked against the OpenAPI
/// document.
fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> Reply {
    let reply = test_support::http::request(port, method, path, token, body);
    conforms(method, path, &reply);
    reply
}

/// Checks a real reply against schemas/worker-api.openapi.json: its status is one the
/// document lists for the path and method, its media type is the documented one, and a
/// JSON body validates against the documented schema.
fn conforms(method: &str, path: &str, reply: &Reply) {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    let doc = DOC.get_or_init(|| {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../schemas/worker-api.openapi.json");
        serde_json::from_str(&std::fs::read_to_string(file).expect("the committed document"))
            .expect("JSON")
    });
    let route = path.split('?').next().unwrap_or(path);
    let template = match route
        .trim_matches('/')
        .split('/')
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["healthz" | "readyz" | "metrics" | "v1"] | ["v1", "jobs"] => route.to_owned(),
        ["v1", "jobs", _] => "/v1/jobs/{id}".to_owned(),
        ["v1", "jobs", _, leaf] => format!("/v1/jobs/{{id}}/{leaf}"),
        ["v1", "jobs", _, "artifacts", ..] => "/v1/jobs/{id}/artifacts/{name}".to_owned(),
        _ => return, // an unknown path: 404 not-found, in no path of the document
    };
    let Some(operation) = doc["paths"][&template]
        .get(method.to_ascii_lowercase())
        .filter(|_| reply.status != 405)
    else {
        assert_eq!(
            reply.status, 405,
            "{method} {template} is not in the document"
        );
        return;
    };
    let mut documented = &operation["responses"][reply.status.to_string()];
    if let Some(reference) = documented["$ref"].as_str() {
        documented = doc
            .pointer(reference.trim_start_matches('#'))
            .expect("a resolvable reference");
    }
    assert!(
        documented.is_object(),
        "{method} {template} answered {}, which the document does not list: {}",
        reply.status,
        String::from_utf8_lossy(&reply.body)
    );
    let content_type = reply
        .header("content-type")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let media = documented["content"]
        .as_object()
        .expect("documented content");
    let Some((documented_type, entry)) = media.iter().find(|(name, _)| {
        let name = name.to_ascii_lowercase();
        name == content_type || name == "application/octet-stream"
    }) else {
        panic!(
            "{method} {template} {}: Content-Type {content_type:?} is not one of {:?}",
            reply.status,
            media.keys().collect::<Vec<_>>()
        );
    };
    if documented_type == "application/json" {
        let mut schema = doc.clone();
        schema["$ref"] = entry["schema"]["$ref"].clone();
        if schema["$ref"].is_null() {
            schema = serde_json::json!({"$defs": {}, "components": doc["components"], "allOf": [entry["schema"]]});
        }
        let validator = jsonschema::draft202012::new(&schema).expect("the schema compiles");
        let body = reply.json();
        let problems: Vec<String> = validator
            .iter_errors(&body)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(
            problems.is_empty(),
            "{method} {template} {}: {problems:?} in {body}",
            reply.status
        );
    }
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const READ_TOKEN: &str = "qwt_read-token-of-the-fleet-test-0123456789abcdef";
const SUBMIT_TOKEN: &str = "qwt_submit-token-of-the-fleet-test-0123456789abcdef";
const ADMIN_TOKEN: &str = "qwt_admin-token-of-the-fleet-test-0123456789abcdef";

fn api_setting(port: u16) -> String {
    format!(
        "{{listen: \"127.0.0.1:{port}\", advertise: \"http://127.0.0.1:{port}\", tokens: [\
         {{name: scraper, scope: read, sha256: {}}}, \
         {{name: frontend, scope: submit, sha256: {}}}, \
         {{name: operator, scope: admin, sha256: {}}}]}}",
        sha256_hex(READ_TOKEN),
        sha256_hex(SUBMIT_TOKEN),
        sha256_hex(ADMIN_TOKEN)
    )
}

fn is_done(status: &serde_json::Value) -> bool {
    !matches!(status["state"].as_str(), Some("pending" | "running"))
}

/// Prometheus on a loopback port, scraping `targets` every second with the read token;
/// killed on drop.
struct Prometheus {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[u16]) -> Self {
        require("prometheus", "prometheus");
        let dir = tempfile::Builder::new()
            .prefix("qw-prom")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, READ_TOKEN).expect("token file");
        let targets: Vec<String> = targets
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, scrape_timeout: 1s}}\n\
                 scrape_configs:\n  - job_name: qemu-worker\n    \
                 authorization: {{credentials_file: {}}}\n    \
                 static_configs: [{{targets: [{}]}}]\n",
                token_file.display(),
                targets.join(", ")
            ),
        )
        .expect("prometheus.yml");
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).expect("log"))
            .spawn()
            .expect("prometheus starts");
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// The value of an instant query's single result, if it has one.
    fn query(&self, promql: &str) -> Option<f64> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        drop(stream);
        let reply = http(
            self.port,
            "GET",
            &format!("/api/v1/query?query={encoded}"),
            None,
            b"",
        );
        let answer = reply.json();
        let result = answer["data"]["result"].as_array()?.first()?.clone();
        result["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn two_workers_serve_the_api_with_scoped_tokens_and_prometheus_counts_their_jobs() {
    require("promtool", "prometheus");
    let server = TestPostgres::start();
    let queue_yaml = format!("{{backend: postgres, url: {:?}}}", server.url());
    let ports = [free_port(), free_port()];
    let config = |port| {
        with_setting(
            &with_setting(
                &with_setting(&base_config(), "capacity", "1"),
                "queue",
                &queue_yaml,
            ),
            "api",
            &api_setting(port),
        )
    };
    let workers = [
        Worker::with_config(&config(ports[0])),
        Worker::with_config(&config(ports[1])),
    ];
    // B logs JSON lines; A the default text.
    let serve_a = workers[0].serve();
    let serve_json = {
        let log = std::fs::File::create(workers[1].dir().join("serve.log")).expect("log");
        let mut command = workers[1].command(&["--log-format", "json", "serve"]);
        command.stdout(Stdio::null()).stderr(log);
        workers[1].spawn(command)
    };
    let pids = [serve_a, serve_json];
    let both_logs = || {
        format!(
            "worker A said:\n{}\nworker B said:\n{}",
            workers[0].serve_log(),
            workers[1].serve_log()
        )
    };
    for port in ports {
        wait_until(
            "the worker to be ready",
            Duration::from_secs(120),
            Duration::from_millis(200),
            || {
                TcpStream::connect(("127.0.0.1", port)).ok()?;
                let ready = http(port, "GET", "/readyz", None, b"");
                (ready.status == 200).then_some(ready)
            },
        )
        .unwrap_or_else(|e| panic!("{e}; {}", both_logs()));
    }
    let health = http(ports[0], "GET", "/healthz", None, b"");
    assert_eq!(
        (health.status, health.json()["status"].clone()),
        (200, "ok".into())
    );
    let ready = http(ports[1], "GET", "/readyz", None, b"").json();
    assert_eq!(
        (
            ready["ready"].clone(),
            ready["queue"].clone(),
            ready["accelerator"].clone()
        ),
        (true.into(), "ok".into(), "tcg".into()),
        "{ready}"
    );

    // Auth: 401 with no token or a wrong one, 403 for a scope too low.
    let none = http(ports[0], "GET", "/v1/jobs", None, b"");
    assert_eq!(none.status, 401, "{}", String::from_utf8_lossy(&none.body));
    assert!(
        none.head
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{}",
        none.head
    );
    let wrong = http(ports[0], "GET", "/metrics", Some("qwt_not-listed"), b"");
    assert_eq!(wrong.status, 401);
    let job = Job::script("echo through-the-api").yaml();
    let low = http(
        ports[0],
        "POST",
        "/v1/jobs",
        Some(READ_TOKEN),
        job.as_bytes(),
    );
    assert_eq!(low.status, 403);
    assert_eq!(low.json()["code"], "forbidden");
    assert!(
        low.json()["message"]
            .as_str()
            .unwrap_or("")
            .contains("scraper"),
        "{}",
        low.json()
    );

    // Prometheus scrapes both from the start.
    let prometheus = Prometheus::start(&ports);

    // Three jobs that complete and one that fails, submitted through A's API.
    let mut ids = Vec::new();
    for script in [
        "echo job-a",
        "echo job-b",
        "echo job-c",
        "echo job-d; exit 1",
    ] {
        let body = Job::script(script).yaml();
        let reply = http(
            ports[0],
            "POST",
            "/v1/jobs",
            Some(SUBMIT_TOKEN),
            body.as_bytes(),
        );
        assert_eq!(
            reply.status,
            201,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        ids.push(reply.json()["jobId"].as_str().expect("jobId").to_owned());
    }
    // Followed live through B's API while it runs (B reads its own state dir: the job
    // must have run on B for the bytes to be there, so follow the one B took).
    wait_until(
        "the four jobs to end",
        Duration::from_secs(400),
        Duration::from_millis(300),
        || {
            ids.iter()
                .all(|id| is_done(&status_of(ports[1], id)))
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}; {}", both_logs()));
    let states: Vec<String> = ids
        .iter()
        .map(|id| {
            status_of(ports[1], id)["state"]
                .as_str()
                .expect("state")
                .to_owned()
        })
        .collect();
    assert_eq!(states, ["completed", "completed", "completed", "failed"]);

    // A log read through the API of the worker that ran the job, from an offset.
    for (index, id) in ids.iter().enumerate() {
        let ran_on = workers
            .iter()
            .position(|w| w.state().join("jobs").join(id).exists())
            .expect("one of the workers ran it");
        let log_path = workers[ran_on]
            .state()
            .join("jobs")
            .join(id)
            .join("run-1/job.log");
        let on_disk = std::fs::read(&log_path).expect("job log");
        let whole = http(
            ports[ran_on],
            "GET",
            &format!("/v1/jobs/{id}/log?follow=true"),
            Some(READ_TOKEN),
            b"",
        );
        assert_eq!(whole.status, 200);
        assert_eq!(whole.body, on_disk, "job {index}: the log byte for byte");
        let tail = http(
            ports[ran_on],
            "GET",
            &format!("/v1/jobs/{id}/log?offset={}", on_disk.len() / 2),
            Some(READ_TOKEN),
            b"",
        );
        assert_eq!(
            tail.body,
            on_disk[on_disk.len() / 2..],
            "job {index}: from an offset"
        );
        assert!(!on_disk.is_empty(), "job {index} logged nothing");
    }

    // A running job's log, streamed while it runs: the first line arrives while the job
    // is still running, the rest follows, and the stream ends when the job does.
    let slow = {
        let body = Job::script("echo first-line; sleep 15; echo second-line").yaml();
        let reply = http(
            ports[0],
            "POST",
            "/v1/jobs",
            Some(SUBMIT_TOKEN),
            body.as_bytes(),
        );
        assert_eq!(reply.status, 201);
        reply.json()["jobId"].as_str().expect("jobId").to_owned()
    };
    let ran_on = wait_until(
        "the slow job to start",
        Duration::from_secs(120),
        Duration::from_millis(100),
        || {
            workers
                .iter()
                .position(|w| w.state().join("jobs").join(&slow).exists())
        },
    )
    .unwrap_or_else(|e| panic!("{e}; {}", both_logs()));
    let mut stream = TcpStream::connect(("127.0.0.1", ports[ran_on])).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    write!(
        stream,
        "GET /v1/jobs/{slow}/log?follow=true HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: Bearer {READ_TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&raw).contains("first-line") {
        let n = stream.read(&mut chunk).expect("the log streams");
        assert!(
            n > 0,
            "the stream ended before the first line: {}",
            String::from_utf8_lossy(&raw)
        );
        raw.extend_from_slice(&chunk[..n]);
    }
    let during = status_of(ports[1], &slow);
    assert_eq!(
        during["state"], "running",
        "the first line came while the job ran: {during}"
    );
    // A screenshot of the running VM, taken now: by the worker that runs it, and passed
    // on by the other; and the CLI's `screenshot` through the other.
    for port in [ports[ran_on], ports[1 - ran_on]] {
        let shot = http(
            port,
            "POST",
            &format!("/v1/jobs/{slow}/screenshots"),
            Some(READ_TOKEN),
            b"",
        );
        assert_eq!(shot.status, 200, "{}", String::from_utf8_lossy(&shot.body));
        assert!(shot.body.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    }
    let now = workers[1 - ran_on].dir().join("now.png");
    let taken = workers[1 - ran_on]
        .command(&["screenshot", &slow, "--out", &now.display().to_string()])
        .args([
            "--server",
            &format!("http://127.0.0.1:{}", ports[1 - ran_on]),
        ])
        .env("QEMU_WORKER_TOKEN", READ_TOKEN)
        .output()
        .expect("qemu-worker runs");
    assert!(
        taken.status.success(),
        "{}",
        String::from_utf8_lossy(&taken.stderr)
    );
    assert!(
        std::fs::read(&now)
            .expect("the screenshot written")
            .starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG"
    );
    // A shell in it through the other worker: the WebSocket passed on to the holder,
    // byte for byte; a `submit` token is not enough.
    let shell = |token: &str| {
        workers[1 - ran_on]
            .command(&[
                "shell",
                &slow,
                "--",
                "/bin/sh",
                "-c",
                "echo passed-on-$((6*7))",
            ])
            .args([
                "--server",
                &format!("http://127.0.0.1:{}", ports[1 - ran_on]),
            ])
            .env("QEMU_WORKER_TOKEN", token)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("qemu-worker runs")
    };
    let passed = shell(ADMIN_TOKEN);
    assert_eq!(
        (
            passed.status.code(),
            String::from_utf8_lossy(&passed.stdout).as_ref()
        ),
        (Some(0), "passed-on-42\n"),
        "{}",
        String::from_utf8_lossy(&passed.stderr)
    );
    let refused = shell(SUBMIT_TOKEN);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("403") && said.contains("admin"), "{said}");
    stream.read_to_end(&mut raw).expect("the rest of the log");
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(text.contains("second-line"), "{text}");
    let after = status_of(ports[1], &slow);
    assert_eq!(
        after["state"], "completed",
        "the stream ended with the job: {after}"
    );
    let ended = http(
        ports[ran_on],
        "POST",
        &format!("/v1/jobs/{slow}/screenshots"),
        Some(READ_TOKEN),
        b"",
    );
    assert_eq!(
        (ended.status, ended.json()["code"].clone()),
        (409, "not-running".into()),
        "{}",
        String::from_utf8_lossy(&ended.body)
    );

    // Cancel: a pending job at once; 405 with Allow for a wrong method.
    let cancel_me = {
        let body = Job::script("echo never").yaml();
        let reply = http(
            ports[0],
            "POST",
            "/v1/jobs?deadline=600&priority=-5",
            Some(SUBMIT_TOKEN),
            body.as_bytes(),
        );
        reply.json()["jobId"].as_str().expect("jobId").to_owned()
    };
    let canceled = http(
        ports[0],
        "POST",
        &format!("/v1/jobs/{cancel_me}/cancel"),
        Some(SUBMIT_TOKEN),
        b"",
    );
    assert_eq!(
        canceled.status,
        200,
        "{}",
        String::from_utf8_lossy(&canceled.body)
    );
    // Pending behind the others (canceled), or already taken by a worker.
    let outcome = canceled.json();
    assert!(
        matches!(
            (outcome["was"].as_str(), outcome["outcome"].as_str()),
            (Some("pending"), Some("canceled"))
                | (Some("running"), Some("requested"))
                | (Some("completed"), Some("already-ended"))
        ),
        "{outcome}"
    );
    let by_reader = http(
        ports[0],
        "POST",
        &format!("/v1/jobs/{cancel_me}/cancel"),
        Some(READ_TOKEN),
        b"",
    );
    assert_eq!(by_reader.status, 403);
    let wrong = http(ports[0], "DELETE", "/v1/jobs", Some(SUBMIT_TOKEN), b"");
    assert_eq!(wrong.status, 405);
    assert!(
        wrong.head.to_ascii_lowercase().contains("allow: get, post"),
        "{}",
        wrong.head
    );
    let missing = http(
        ports[0],
        "GET",
        "/v1/jobs/job-00000000-nothere",
        Some(READ_TOKEN),
        b"",
    );
    assert_eq!(
        (missing.status, missing.json()["code"].clone()),
        (404, "no-such-job".into())
    );
    let far = http(
        ports[0],
        "POST",
        "/v1/jobs?deadline=99999999999999",
        Some(SUBMIT_TOKEN),
        b"image: x",
    );
    assert_eq!(far.status, 400, "{}", String::from_utf8_lossy(&far.body));
    let wait_done = |id: &str| {
        wait_until(
            "the job to end",
            Duration::from_secs(240),
            Duration::from_millis(300),
            || is_done(&status_of(ports[1], id)).then_some(()),
        )
        .unwrap_or_else(|e| panic!("{e}; {}", both_logs()));
    };
    wait_done(&cancel_me);

    // An artifact and the screenshot through the API of the worker that ran the job:
    // Content-Length, the sha256 header, ranges; only what the report lists.
    let with_artifact = {
        let body = Job::script("printf 0123456789abcdef > /tmp/a.txt; echo stored")
            .file_artifact("/tmp/a.txt", "public/dir/a.txt")
            .yaml();
        let reply = http(
            ports[0],
            "POST",
            "/v1/jobs",
            Some(SUBMIT_TOKEN),
            body.as_bytes(),
        );
        assert_eq!(reply.status, 201);
        reply.json()["jobId"].as_str().expect("jobId").to_owned()
    };
    let early = http(
        ports[0],
        "GET",
        &format!("/v1/jobs/{with_artifact}/artifacts"),
        Some(READ_TOKEN),
        b"",
    );
    assert!(
        matches!(early.status, 200 | 409),
        "{}",
        String::from_utf8_lossy(&early.body)
    );
    wait_done(&with_artifact);
    let holder = workers
        .iter()
        .position(|w| w.state().join("jobs").join(&with_artifact).exists())
        .expect("one of the workers ran it");
    let list = http(
        ports[holder],
        "GET",
        &format!("/v1/jobs/{with_artifact}/artifacts"),
        Some(READ_TOKEN),
        b"",
    )
    .json();
    assert_eq!(list[0]["name"], "public/dir/a.txt", "{list}");
    let whole = http(
        ports[holder],
        "GET",
        &format!("/v1/jobs/{with_artifact}/artifacts/public/dir/a.txt"),
        Some(READ_TOKEN),
        b"",
    );
    assert_eq!(
        (whole.status, whole.body.as_slice()),
        (200, &b"0123456789abcdef"[..])
    );
    let head = whole.head.to_ascii_lowercase();
    assert!(head.contains("content-length: 16"), "{head}");
    assert!(
        head.contains(&format!(
            "x-artifact-sha256: {}",
            sha256_hex("0123456789abcdef")
        )),
        "{head}"
    );
    let ranged = |range: &str| {
        let mut stream = TcpStream::connect(("127.0.0.1", ports[holder])).expect("connect");
        write!(
            stream,
            "GET /v1/jobs/{with_artifact}/artifacts/public/dir/a.txt HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {READ_TOKEN}\r\nRange: {range}\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).expect("answer");
        String::from_utf8_lossy(&raw).into_owned()
    };
    let part = ranged("bytes=4-7");
    assert!(part.starts_with("HTTP/1.1 206"), "{part}");
    assert!(
        part.to_ascii_lowercase()
            .contains("content-range: bytes 4-7/16"),
        "{part}"
    );
    assert!(part.ends_with("\r\n\r\n4567"), "{part}");
    assert!(ranged("bytes=-3").ends_with("def"));
    assert!(ranged("bytes=16-").starts_with("HTTP/1.1 416"));
    let unlisted = http(
        ports[holder],
        "GET",
        &format!("/v1/jobs/{with_artifact}/artifacts/public/dir/../../report.json"),
        Some(READ_TOKEN),
        b"",
    );
    assert_eq!(
        unlisted.status,
        404,
        "{}",
        String::from_utf8_lossy(&unlisted.body)
    );
    let png = http(
        ports[holder],
        "GET",
        &format!("/v1/jobs/{with_artifact}/screenshot"),
        Some(READ_TOKEN),
        b"",
    );
    assert_eq!(png.status, 200);
    assert!(png.body.starts_with(b"\x89PNG"), "not a PNG");
    // Through the other worker's API: passed on to the holder, byte for byte, with the
    // same headers; a range too; and the log.
    let other = 1 - holder;
    let passed = http(
        ports[other],
        "GET",
        &format!("/v1/jobs/{with_artifact}/artifacts/public/dir/a.txt"),
        Some(READ_TOKEN),
        b"",
    );
    assert_eq!(
        passed.status,
        200,
        "{}",
        String::from_utf8_lossy(&passed.body)
    );
    assert_eq!(passed.body, whole.body);
    assert!(
        passed.head.to_ascii_lowercase().contains(&format!(
            "x-artifact-sha256: {}",
            sha256_hex("0123456789abcdef")
        )),
        "{}",
        passed.head
    );
    let passed_png = http(
        ports[other],
        "GET",
        &format!("/v1/jobs/{with_artifact}/screenshot"),
        Some(READ_TOKEN),
        b"",
    );
    assert_eq!(passed_png.body, png.body);
    let holder_log = std::fs::read(
        workers[holder]
            .state()
            .join("jobs")
            .join(&with_artifact)
            .join("run-1/job.log"),
    )
    .expect("log");
    let passed_log = http(
        ports[other],
        "GET",
        &format!("/v1/jobs/{with_artifact}/log?follow=true"),
        Some(READ_TOKEN),
        b"",
    );
    assert_eq!(
        passed_log.body, holder_log,
        "the log through the other worker"
    );
    // The CLI with --server, through the other worker's API: the same bytes as the
    // holder has, and the same status as the queue database gives.
    let through = |args: &[&str]| {
        let mut command = workers[other].command(args);
        command
            .args(["--server", &format!("http://127.0.0.1:{}", ports[other])])
            .env("QEMU_WORKER_TOKEN", READ_TOKEN);
        let output = command.output().expect("qemu-worker runs");
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    };
    assert_eq!(
        through(&["logs", "--follow", &with_artifact]),
        holder_log,
        "logs --follow --server"
    );
    let copied = workers[other].dir().join("copied");
    let copied_text = copied.display().to_string();
    through(&["artifacts", &with_artifact, "--out", &copied_text]);
    assert_eq!(
        std::fs::read(copied.join("public/dir/a.txt")).expect("the artifact copied"),
        b"0123456789abcdef"
    );
    let remote_status: serde_json::Value =
        serde_json::from_slice(&through(&["status", "--json", &with_artifact])).expect("JSON");
    let local_status = workers[holder].cli(&["status", "--json", &with_artifact]);
    assert_eq!(
        remote_status,
        serde_json::from_slice::<serde_json::Value>(&local_status.stdout).expect("JSON")
    );
    assert_eq!(
        remote_status["worker"].as_str().map(str::is_empty),
        Some(false)
    );
    let listed = String::from_utf8(through(&["jobs", "--state", "completed"])).expect("text");
    assert!(listed.contains(&with_artifact), "{listed}");
    let refused = workers[other]
        .command(&["cancel", &with_artifact])
        .args(["--server", &format!("http://127.0.0.1:{}", ports[other])])
        .env("QEMU_WORKER_TOKEN", READ_TOKEN)
        .output()
        .expect("qemu-worker runs");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(3), "{said}");
    assert!(said.contains("403 forbidden"), "{said}");
    let no_token = http(
        ports[other],
        "GET",
        &format!("/v1/jobs/{with_artifact}/screenshot"),
        None,
        b"",
    );
    assert_eq!(no_token.status, 401);

    // Listing with a filter, page by page (2 a page): exactly the completed jobs.
    let mut all = ids.clone();
    all.extend([slow.clone(), cancel_me.clone(), with_artifact.clone()]);
    let state_of = |id: &str| {
        status_of(ports[1], id)["state"]
            .as_str()
            .expect("state")
            .to_owned()
    };
    let mut completed: Vec<String> = all
        .iter()
        .filter(|id| state_of(id) == "completed")
        .cloned()
        .collect();
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &after {
            Some(a) => format!("/v1/jobs?state=completed&limit=2&after={a}"),
            None => "/v1/jobs?state=completed&limit=2".to_owned(),
        };
        let page = http(ports[1], "GET", &path, Some(READ_TOKEN), b"").json();
        let jobs = page["jobs"].as_array().expect("jobs");
        assert!(jobs.len() <= 2, "{page}");
        listed.extend(
            jobs.iter()
                .map(|j| j["jobId"].as_str().expect("id").to_owned()),
        );
        pages += 1;
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, completed.len().div_ceil(2), "{listed:?}");
    listed.sort();
    completed.sort();
    assert_eq!(listed, completed);
    let bad = http(
        ports[1],
        "GET",
        "/v1/jobs?state=sleeping",
        Some(READ_TOKEN),
        b"",
    );
    assert_eq!(
        (bad.status, bad.json()["code"].clone()),
        (400, "bad-query".into())
    );

    // Prometheus, asked through its HTTP API, counts what the test ran.
    let expected_completed = completed.len() as f64;
    assert!(expected_completed >= 4.0, "{completed:?}");
    let counted = wait_until(
        "Prometheus to count the completed and failed jobs",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let completed = prometheus.query("sum(qemu_worker_jobs_total{state=\"completed\"})")?;
            let failed = prometheus.query("sum(qemu_worker_jobs_total{state=\"failed\"})")?;
            (completed == expected_completed && failed == 1.0).then_some((completed, failed))
        },
    )
    .unwrap_or_else(|e| panic!("{e}; {}", both_logs()));
    assert_eq!(counted, (expected_completed, 1.0));
    wait_until(
        "both targets up in Prometheus",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || (prometheus.query("sum(up{job=\"qemu-worker\"})") == Some(2.0)).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(prometheus.query("sum(qemu_worker_capacity)"), Some(2.0));

    // The exposition passes promtool.
    for port in ports {
        let metrics = http(port, "GET", "/metrics", Some(READ_TOKEN), b"");
        assert_eq!(metrics.status, 200);
        let text = String::from_utf8_lossy(&metrics.body).into_owned();
        assert!(text.contains("qemu_worker_phase_seconds_bucket{"), "{text}");
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool");
        promtool
            .stdin
            .take()
            .expect("stdin")
            .write_all(&metrics.body)
            .expect("feed");
        let checked = promtool.wait_with_output().expect("promtool ends");
        assert!(
            checked.status.success(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );
    }

    // No token in any log line; B's log is JSON, one object per line, with the ids.
    for worker in &workers {
        let log = worker.serve_log();
        for token in [READ_TOKEN, SUBMIT_TOKEN, "qwt_not-listed"] {
            assert!(!log.contains(token), "a token in the log:\n{log}");
        }
    }
    let json_log = workers[1].serve_log();
    let mut claims: std::collections::HashMap<String, usize> = Default::default();
    for line in json_log.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            event["level"].is_string() && event["timestamp"].is_string(),
            "{line}"
        );
        if event["message"] == "claimed" {
            let id = event["job_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no job_id: {line}"));
            assert!(all.iter().any(|i| i == id), "{line}");
            assert!(event["run_id"].is_number(), "{line}");
            *claims.entry(id.to_owned()).or_default() += 1;
        }
    }
    for line in workers[0]
        .serve_log()
        .lines()
        .filter(|l| l.contains(" claimed "))
    {
        if let Some(id) = all.iter().find(|id| line.contains(id.as_str())) {
            *claims.entry(id.clone()).or_default() += 1;
        }
    }
    // Every job that ran was claimed once, on one worker (the canceled one maybe never).
    for id in ids.iter().chain([&slow, &with_artifact]) {
        assert_eq!(claims.get(id), Some(&1), "{id}:\n{}", both_logs());
    }
    assert!(claims.get(&cancel_me).copied().unwrap_or(0) <= 1);

    // With the holder stopped, the other worker's answer names it.
    workers[holder].signal(pids[holder], rustix::process::Signal::TERM);
    workers[holder].wait_exit(pids[holder], Duration::from_secs(60));
    let gone = http(
        ports[other],
        "GET",
        &format!("/v1/jobs/{with_artifact}/artifacts/public/dir/a.txt"),
        Some(READ_TOKEN),
        b"",
    );
    assert_eq!(gone.status, 502, "{}", String::from_utf8_lossy(&gone.body));
    let said = gone.json();
    assert_eq!(said["code"], "holder-unreachable", "{said}");
    let holder_id = format!("-{}", pids[holder]);
    assert!(
        said["message"]
            .as_str()
            .is_some_and(|m| m.contains("the job ran on worker ") && m.contains(&holder_id)),
        "names the worker: {said}"
    );
    let cli_gone = workers[other]
        .command(&["logs", &with_artifact])
        .args(["--server", &format!("http://127.0.0.1:{}", ports[other])])
        .env("QEMU_WORKER_TOKEN", READ_TOKEN)
        .output()
        .expect("qemu-worker runs");
    let said = String::from_utf8_lossy(&cli_gone.stderr);
    assert_eq!(cli_gone.status.code(), Some(3), "{said}");
    assert!(
        said.contains("502 holder-unreachable") && said.contains(&holder_id),
        "logs --server names the worker: {said}"
    );

    // Restarted on another port (a new worker id, and its old address dead), the holder
    // still answers for the jobs in its state directory.
    let moved = free_port();
    std::fs::write(workers[holder].dir().join("worker.yml"), config(moved)).expect("worker.yml");
    let _restarted = workers[holder].serve();
    wait_until(
        "the restarted worker to listen",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || TcpStream::connect(("127.0.0.1", moved)).ok(),
    )
    .unwrap_or_else(|e| panic!("{e}; {}", workers[holder].serve_log()));
    let again = http(
        moved,
        "GET",
        &format!("/v1/jobs/{with_artifact}/artifacts/public/dir/a.txt"),
        Some(READ_TOKEN),
        b"",
    );
    assert_eq!(
        (again.status, again.body.as_slice()),
        (200, &b"0123456789abcdef"[..]),
        "{}",
        String::from_utf8_lossy(&again.body)
    );
}
