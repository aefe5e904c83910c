//! Interactive benchmarks through `serve`'s API on the test image under TCG, each next
//! to its baseline in the same run:
//!
//! 1. Display frame latency: a full framebuffer update (Raw encoding, the whole screen)
//!    asked for and received through `GET /v1/jobs/ID/display` (view-only: the RFB
//!    filter on the way), next to the same on QEMU's VNC unix socket directly.
//! 2. Shell keystroke round trip: a key typed into `GET /v1/jobs/ID/shell?tty=true`
//!    until its echo comes back, next to qemu-ga's `guest-exec` of `echo` (the way
//!    to run something in a guest without the tools), p50/p99.
//!
//! `cargo bench -p engine-tests --bench interactive` (needs images/build-test-image; the
//! worker is QEMU_WORKER_BIN, which bench/run sets to the release build).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use engine_tests::{Job, Worker, base_config, free_port, wait_until, with_setting};
use futures_util::{SinkExt, StreamExt};
use test_support::figure;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const ADMIN: &str = "qwt_bench-interactive-admin-0000000000000000000000000000000000000000";
const READER: &str = "qwt_bench-interactive-read-00000000000000000000000000000000000000000";
const FRAMES: usize = 30;
const KEYS: usize = 200;

/// A byte stream over a WebSocket's binary messages.
struct WsBytes<S> {
    socket: tokio_tungstenite::WebSocketStream<S>,
    buffer: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsBytes<S> {
    async fn read_exact(&mut self, out: &mut [u8]) {
        while self.buffer.len() < out.len() {
            match self.socket.next().await {
                Some(Ok(Message::Binary(data))) => self.buffer.extend_from_slice(&data),
                Some(Ok(_)) => {}
                other => panic!("the display WebSocket ended: {other:?}"),
            }
        }
        out.copy_from_slice(&self.buffer[..out.len()]);
        self.buffer.drain(..out.len());
    }

    async fn write_all(&mut self, data: &[u8]) {
        self.socket
            .send(Message::Binary(data.to_vec().into()))
            .await
            .expect("the display takes a message");
    }
}

/// Either a unix socket or a WebSocket, read and written as bytes.
enum Rfb {
    Unix(tokio::net::UnixStream),
    Ws(Box<WsBytes<tokio::net::TcpStream>>),
}

impl Rfb {
    async fn read_exact(&mut self, out: &mut [u8]) {
        match self {
            Self::Unix(s) => {
                s.read_exact(out).await.expect("VNC read");
            }
            Self::Ws(w) => w.read_exact(out).await,
        }
    }

    async fn write_all(&mut self, data: &[u8]) {
        match self {
            Self::Unix(s) => s.write_all(data).await.expect("VNC write"),
            Self::Ws(w) => w.write_all(data).await,
        }
    }

    async fn skip(&mut self, mut n: usize) {
        let mut buffer = vec![0u8; 64 << 10];
        while n > 0 {
            let take = n.min(buffer.len());
            self.read_exact(&mut buffer[..take]).await;
            n -= take;
        }
    }

    /// The RFB 3.8 handshake with security None; the framebuffer's size.
    async fn handshake(&mut self) -> (u16, u16) {
        let mut version = [0u8; 12];
        self.read_exact(&mut version).await;
        self.write_all(b"RFB 003.008\n").await;
        let mut count = [0u8; 1];
        self.read_exact(&mut count).await;
        let mut types = vec![0u8; usize::from(count[0])];
        self.read_exact(&mut types).await;
        assert!(types.contains(&1), "security None offered: {types:?}");
        self.write_all(&[1]).await;
        let mut result = [0u8; 4];
        self.read_exact(&mut result).await;
        assert_eq!(result, [0, 0, 0, 0], "security result");
        self.write_all(&[1]).await; // shared
        let mut init = [0u8; 24];
        self.read_exact(&mut init).await;
        let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
        self.skip(name_len).await;
        // 32 bits per pixel, true colour; Raw only.
        let mut format = vec![0u8, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0];
        format.extend_from_slice(&[0, 0, 0]);
        self.write_all(&format).await;
        self.write_all(&[2, 0, 0, 1, 0, 0, 0, 0]).await;
        (
            u16::from_be_bytes([init[0], init[1]]),
            u16::from_be_bytes([init[2], init[3]]),
        )
    }

    /// Asks for the whole screen and reads the update: how long it took.
    async fn frame(&mut self, width: u16, height: u16) -> Duration {
        let started = Instant::now();
        let [w0, w1] = width.to_be_bytes();
        let [h0, h1] = height.to_be_bytes();
        self.write_all(&[3, 0, 0, 0, 0, 0, w0, w1, h0, h1]).await;
        let mut head = [0u8; 4];
        self.read_exact(&mut head).await;
        assert_eq!(head[0], 0, "a framebuffer update");
        let rects = u16::from_be_bytes([head[2], head[3]]);
        let mut pixels = 0usize;
        for _ in 0..rects {
            let mut rect = [0u8; 12];
            self.read_exact(&mut rect).await;
            let w = usize::from(u16::from_be_bytes([rect[4], rect[5]]));
            let h = usize::from(u16::from_be_bytes([rect[6], rect[7]]));
            let encoding = i32::from_be_bytes([rect[8], rect[9], rect[10], rect[11]]);
            assert_eq!(encoding, 0, "Raw");
            self.skip(w * h * 4).await;
            pixels += w * h;
        }
        assert_eq!(
            pixels,
            usize::from(width) * usize::from(height),
            "the whole screen"
        );
        started.elapsed()
    }
}

async fn websocket(
    port: u16,
    path: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let mut request = format!("ws://127.0.0.1:{port}{path}")
        .into_client_request()
        .expect("a request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("a header"),
    );
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("the API");
    tokio_tungstenite::client_async(request, stream)
        .await
        .expect("the WebSocket")
        .0
}

fn run_dir_file(worker: &Worker, name: &str) -> PathBuf {
    let run = worker.state().join("run");
    std::fs::read_dir(&run)
        .expect("run dirs")
        .flatten()
        .map(|e| e.path().join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no {name} under {}", run.display()))
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn main() {
    let port = free_port();
    let tokens = format!(
        "[{{name: admin, scope: admin, sha256: {}}}, {{name: reader, scope: read, sha256: {}}}]",
        engine_tests::assets::sha256_hex(ADMIN.as_bytes()),
        engine_tests::assets::sha256_hex(READER.as_bytes())
    );
    let config = with_setting(
        &base_config(),
        "api",
        &format!("{{listen: \"127.0.0.1:{port}\", tokens: {tokens}}}"),
    );
    let worker = Worker::with_config(&config);
    let _serve = worker.serve();
    let job = worker.submit(&Job::script("echo bench-ready; sleep 900").max_run_time(1200));
    worker.wait_for_log(&job, 1, "bench-ready");
    let vnc = run_dir_file(&worker, "vnc.sock");
    let qga = run_dir_file(&worker, "qga.sock");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        display_latency(port, &job, &vnc).await;
        shell_round_trip(port, &job, &qga).await;
    });
    let _ = worker.cli(&["cancel", &job]);
    wait_until(
        "the job to end",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || (worker.status(&job)["state"] != "running").then_some(()),
    )
    .expect("canceled");
}

async fn display_latency(port: u16, job: &str, vnc: &Path) {
    let mut direct = Rfb::Unix(
        tokio::net::UnixStream::connect(vnc)
            .await
            .expect("the VNC socket"),
    );
    let (width, height) = direct.handshake().await;
    let mut through = Rfb::Ws(Box::new(WsBytes {
        socket: websocket(port, &format!("/v1/jobs/{job}/display"), READER).await,
        buffer: Vec::new(),
    }));
    assert_eq!(through.handshake().await, (width, height));
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..FRAMES {
        theirs.push(direct.frame(width, height).await.as_secs_f64() * 1e3);
        ours.push(through.frame(width, height).await.as_secs_f64() * 1e3);
    }
    figure::Figure {
        figure: &format!(
            "display frame latency through the WebSocket ({width}x{height}, Raw, view-only)"
        ),
        unit: "ms",
        samples: &ours,
        baseline_name: "the same update on QEMU's VNC unix socket",
        baseline: &theirs,
        goal: "",
        met: None,
        note: &format!(
            "{:.1} MB a frame",
            f64::from(width) * f64::from(height) * 4.0 / 1e6
        ),
        ..Default::default()
    }
    .emit();
}

async fn shell_round_trip(port: u16, job: &str, qga: &Path) {
    let mut socket = websocket(
        port,
        &format!("/v1/jobs/{job}/shell?tty=true&command=/bin/sh"),
        ADMIN,
    )
    .await;
    // busybox's prompt is `~ # ` (and a cursor position query after it).
    let prompted = |text: &[u8]| text.windows(2).any(|w| w == b"# ");
    let mut shown = Vec::new();
    while !prompted(&shown) {
        match socket.next().await {
            Some(Ok(Message::Binary(data))) => shown.extend_from_slice(&data[1..]),
            other => panic!("no prompt: {other:?}"),
        }
    }
    // Everything the terminal shows; each key waits for its echo after what came before.
    let mut seen = shown;
    let mut keys = Vec::new();
    for i in 0..KEYS {
        let line_end = i % 50 == 49;
        let key: &[u8] = if line_end { b"\r" } else { b"x" };
        let before = seen.len();
        let started = Instant::now();
        socket
            .send(Message::Binary(key.to_vec().into()))
            .await
            .expect("a key");
        // After Enter the line of x's runs (not found) and the prompt comes back.
        let done = |seen: &[u8]| {
            let new = &seen[before..];
            new.contains(&key[0])
                && (!line_end
                    || new
                        .windows(9)
                        .position(|w| w == b"not found")
                        .is_some_and(|at| prompted(&new[at..])))
        };
        while !done(&seen) {
            match socket.next().await {
                Some(Ok(Message::Binary(data))) => seen.extend_from_slice(&data[1..]),
                Some(Ok(_)) => {}
                other => panic!("no echo: {other:?}"),
            }
        }
        if !line_end {
            keys.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    let _ = socket.close(None).await;
    let mut agent = qemu_worker::qemu::QgaClient::connect(qga, Duration::from_secs(60))
        .await
        .expect("qemu-ga");
    let mut exec = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        let out = agent
            .exec("/bin/echo", &["x"], Duration::from_secs(30))
            .await
            .expect("guest-exec");
        assert_eq!(out.stdout, b"x\n");
        exec.push(started.elapsed().as_secs_f64() * 1e3);
    }
    keys.sort_by(f64::total_cmp);
    exec.sort_by(f64::total_cmp);
    for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
        figure::Figure {
            figure: &format!(
                "shell keystroke round trip through the API WebSocket, {label} of {}",
                keys.len()
            ),
            unit: "ms",
            samples: &[quantile(&keys, q)],
            baseline_name: "qemu-ga guest-exec of echo with its output (50 runs)",
            baseline: &[quantile(&exec, q)],
            goal: "",
            met: None,
            note: "WebSocket, agent port, the guest tools' pty, under TCG; qemu-ga is polled every 20 ms",
            ..Default::default()
        }
        .emit();
    }
}
