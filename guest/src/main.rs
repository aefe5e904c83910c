//! qemu-worker-guest: the only project code inside a guest. Started by the image's
//! init, it waits for the VM's metadata service, fetches the task, runs the command with
//! its environment, streams stdout and stderr into the job log as they are produced,
//! reports the exit code, and then stays up: the host collects artifacts over the agent
//! port (`agent.rs`), which is served from the start.
//!
//! It is linked statically and uses IP literals only: no DNS, no user lookups.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Deserialize;

mod agent;

/// The metadata service, as every VM sees it.
const METADATA: &str = "169.254.169.254:80";
/// How long to wait for the metadata service at start (the network may come up late).
const WAIT_FOR_SERVICE: Duration = Duration::from_secs(600);
/// Created before the task runs: a restarted instance must not run it again.
const STARTED_MARKER: &str = "/run/qemu-worker-guest.started";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Task {
    command: Vec<String>,
    env: BTreeMap<String, String>,
    #[expect(
        dead_code,
        reason = "the host enforces maxRunTime; kept to document the contract"
    )]
    max_run_time: u64,
    working_directory: String,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, mode, count] = args.as_slice()
        && mode == "bench-metadata"
    {
        bench_metadata(count.parse().unwrap_or(200));
        return;
    }
    let address: SocketAddr = std::env::var("QEMU_WORKER_METADATA")
        .unwrap_or_else(|_| METADATA.to_owned())
        .parse()
        .unwrap_or_else(|e| fail(&format!("bad metadata address: {e}")));
    // `qemu-worker-guest report CODE`: report an exit code for a task that something else
    // ran (an image's own init script, for one); exits 0 once the service took it.
    if let [_, mode, code] = args.as_slice()
        && mode == "report"
    {
        let Ok(code) = code.parse::<i32>() else {
            eprintln!("usage: qemu-worker-guest report EXIT_CODE (an integer)");
            std::process::exit(2);
        };
        std::process::exit(if report(address, code) { 0 } else { 1 });
    }
    // The agent port serves artifacts from the start, whatever happens to the task.
    std::thread::spawn(|| agent::serve_forever(agent::PORT_NAME));
    if std::path::Path::new(STARTED_MARKER).exists() {
        say("restarted: the task already ran; serving the agent port only");
        idle();
    }
    say(&format!("waiting for the metadata service at {address}"));
    let task = fetch_task(address);
    if let Err(e) = std::fs::write(STARTED_MARKER, b"") {
        say(&format!(
            "cannot write {STARTED_MARKER} ({e}); a restart would run the task again"
        ));
    }
    say(&format!("running {:?}", task.command));
    let code = run(address, &task);
    if !report(address, code) {
        say("the metadata service never took the result");
    }
    say(&format!("done: exit code {code}"));
    // Stay up: the host collects artifacts and powers the VM off.
    idle();
}

fn idle() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// A line on the console, stamped with the guest's uptime (to place it in a boot).
fn say(message: &str) {
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let uptime = uptime.split_whitespace().next().unwrap_or("?");
    println!("qemu-worker-guest [{uptime}]: {message}");
}

fn fail(message: &str) -> ! {
    say(message);
    idle();
}

/// Fetches the task, retrying while the service cannot be reached (the network may come
/// up after the tools start). One request, no separate ping: every round trip counts
/// against the job's start-up.
fn fetch_task(address: SocketAddr) -> Task {
    let start = Instant::now();
    loop {
        match get(address, "/v1/task") {
            Ok((200, body)) => {
                return serde_json::from_slice(&body)
                    .unwrap_or_else(|e| fail(&format!("the task is not valid JSON: {e}")));
            }
            Ok((status, body)) => fail(&format!(
                "GET /v1/task answered {status}: {}",
                String::from_utf8_lossy(&body)
            )),
            Err(_) if start.elapsed() < WAIT_FOR_SERVICE => {
                // Quick while the network comes up; gentle after that, since each try
                // through user networking costs the host a helper process.
                let pause = if start.elapsed() < Duration::from_secs(2) {
                    20
                } else {
                    200
                };
                std::thread::sleep(Duration::from_millis(pause));
            }
            Err(e) => fail(&format!("the metadata service never answered: {e}")),
        }
    }
}

fn connect(address: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One HTTP/1.1 request with a complete body; returns status and body.
fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> io::Result<(u16, Vec<u8>)> {
    let mut stream = connect(address)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    read_response(stream)
}

fn get(address: SocketAddr, path: &str) -> io::Result<(u16, Vec<u8>)> {
    request(address, "GET", path, b"")
}

fn read_response(stream: TcpStream) -> io::Result<(u16, Vec<u8>)> {
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut length = None;
    let mut chunked = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(value) = lower.strip_prefix("content-length:") {
            length = value.trim().parse::<usize>().ok();
        }
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    let mut body = Vec::new();
    match (length, chunked) {
        (Some(length), _) => {
            body.resize(length, 0);
            reader.read_exact(&mut body)?;
        }
        _ => {
            reader.read_to_end(&mut body)?;
        }
    }
    Ok((status, body))
}

/// Runs the command, streaming its output; returns the exit code (128 + N for signal N).
fn run(address: SocketAddr, task: &Task) -> i32 {
    let (tx, rx) = mpsc::channel::<Piece>();
    let log = std::thread::spawn(move || stream_log(address, &rx));

    let Some((program, args)) = task.command.split_first() else {
        let _ = tx.send(Piece::text(
            "[qemu-worker-guest] the task has an empty command\n",
        ));
        let _ = tx.send(Piece::End);
        let _ = log.join();
        return 127;
    };
    let _ = std::fs::create_dir_all(&task.working_directory);
    // One pipe for stdout and stderr: the log keeps the order the command wrote in.
    let (mut output, writer) = match std::io::pipe() {
        Ok(pipe) => pipe,
        Err(e) => {
            let _ = tx.send(Piece::text(&format!(
                "[qemu-worker-guest] cannot create a pipe: {e}\n"
            )));
            let _ = tx.send(Piece::End);
            let _ = log.join();
            return 1;
        }
    };
    let stderr = match writer.try_clone() {
        Ok(stderr) => stderr,
        Err(e) => {
            let _ = tx.send(Piece::text(&format!(
                "[qemu-worker-guest] cannot share the pipe: {e}\n"
            )));
            let _ = tx.send(Piece::End);
            let _ = log.join();
            return 1;
        }
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(&task.env)
        .current_dir(&task.working_directory)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(stderr);
    if std::env::var_os("HOME").is_none() {
        command.env("HOME", "/root");
    }
    let spawned = command.spawn();
    // The child holds the write ends now; ours must go, or the reader never sees EOF.
    drop(command);
    let code = match spawned {
        Ok(mut child) => {
            let (done_tx, done_rx) = mpsc::channel::<()>();
            {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut buffer = vec![0u8; 64 << 10];
                    while let Ok(n) = output.read(&mut buffer) {
                        if n == 0 || tx.send(Piece::Data(buffer[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                    let _ = done_tx.send(());
                });
            }
            let status = child.wait();
            // A background process may keep the pipe open after the command exits: give
            // the rest of the output a moment, then end the log anyway.
            let _ = done_rx.recv_timeout(Duration::from_secs(5));
            match status {
                Ok(status) => status
                    .code()
                    .or_else(|| status.signal().map(|s| 128 + s))
                    .unwrap_or(1),
                Err(e) => {
                    let _ = tx.send(Piece::text(&format!(
                        "[qemu-worker-guest] waiting for the command failed: {e}\n"
                    )));
                    1
                }
            }
        }
        Err(e) => {
            let _ = tx.send(Piece::text(&format!(
                "[qemu-worker-guest] cannot run {program:?}: {e}\n"
            )));
            127
        }
    };
    let _ = tx.send(Piece::End);
    let _ = log.join();
    code
}

/// What the log streamer receives: output, or the end of the run.
enum Piece {
    Data(Vec<u8>),
    End,
}

impl Piece {
    fn text(text: &str) -> Self {
        Self::Data(text.as_bytes().to_vec())
    }
}

/// One chunked POST /v1/log for the whole run, opened before the command's first output;
/// each piece of output is sent as soon as it is read. If the stream breaks, a new one
/// is opened for what follows.
fn stream_log(address: SocketAddr, rx: &mpsc::Receiver<Piece>) {
    // Opened while the command starts, so its first output goes out at once.
    let mut stream: Option<TcpStream> = open_log(address).ok();
    for piece in rx {
        let Piece::Data(piece) = piece else { break };
        for _ in 0..3 {
            if stream.is_none() {
                stream = open_log(address).ok();
            }
            let Some(s) = stream.as_mut() else { continue };
            let sent = write!(s, "{:x}\r\n", piece.len())
                .and_then(|()| s.write_all(&piece))
                .and_then(|()| s.write_all(b"\r\n"));
            if sent.is_ok() {
                break;
            }
            stream = None;
        }
    }
    if let Some(mut s) = stream
        && s.write_all(b"0\r\n\r\n").is_ok()
    {
        let _ = read_response(s);
    }
}

fn open_log(address: SocketAddr) -> io::Result<TcpStream> {
    let mut stream = connect(address)?;
    stream.write_all(
        b"POST /v1/log HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\
          Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    Ok(stream)
}

/// Reports the exit code (retrying a few times); `false` when the service never took it.
fn report(address: SocketAddr, code: i32) -> bool {
    let body = format!("{{\"exitCode\": {code}}}");
    for attempt in 0..10 {
        match request(address, "PUT", "/v1/result", body.as_bytes()) {
            Ok((200 | 409, _)) => return true,
            Ok((status, body)) => say(&format!(
                "PUT /v1/result answered {status}: {}",
                String::from_utf8_lossy(&body)
            )),
            Err(e) => say(&format!("PUT /v1/result failed: {e}")),
        }
        std::thread::sleep(Duration::from_millis(200 * (attempt + 1)));
    }
    false
}

/// `qemu-worker-guest bench-metadata N`: times N `GET /v1/ping` round trips from inside
/// the guest and prints the median and 99th percentile (used by the benchmarks).
fn bench_metadata(count: usize) {
    let address: SocketAddr = METADATA.parse().unwrap_or_else(|e| fail(&format!("{e}")));
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        match get(address, "/v1/ping") {
            Ok((200, _)) => samples.push(start.elapsed().as_micros()),
            other => {
                println!("bench-metadata: request failed: {other:?}");
                return;
            }
        }
    }
    samples.sort_unstable();
    let pick = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "bench-metadata: n={} p50_us={} p99_us={}",
        samples.len(),
        pick(0.5),
        pick(0.99)
    );
}
