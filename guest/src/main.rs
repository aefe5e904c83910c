//! qemu-worker-guest: the only project code inside a guest. Started by the image's
//! init, it waits for the VM's metadata service, fetches the task, runs the command with
//! its environment, streams stdout and stderr into the job log as they are produced,
//! reports the exit code, and then stays up: the host collects artifacts over the agent
//! port (`agent.rs`), which is served from the start.
//!
//! It is linked statically and uses IP literals only: no DNS, no user lookups.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use qemu_worker_protocol::metadata::{self, LOG_PATH, PING_PATH, RESULT_PATH, Task, TaskReply};
use qemu_worker_protocol::{agent::PORT_NAME, snapshot};

mod agent;
#[cfg(feature = "hostile")]
mod hostile;
mod park;
mod shell;

/// The metadata service, as every VM sees it.
const METADATA: &str = metadata::ADDRESS;
/// How long to wait for the metadata service at start (the network may come up late).
const WAIT_FOR_SERVICE: Duration = Duration::from_secs(600);
/// Created before the task runs: a restarted instance must not run it again.
const STARTED_MARKER: &str = "/run/qemu-worker-guest.started";

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
        std::process::exit(if report(address, code, None) { 0 } else { 1 });
    }
    // The agent port serves artifacts from the start, whatever happens to the task.
    std::thread::spawn(|| agent::serve_forever(PORT_NAME));
    if std::path::Path::new(STARTED_MARKER).exists() {
        say("restarted: the task already ran; serving the agent port only");
        idle();
    }
    let (reply, connection) = fetch_task(address);
    adopt_host_state(&reply);
    let task = reply.task;
    if let Err(e) = std::fs::write(STARTED_MARKER, b"") {
        say(&format!(
            "cannot write {STARTED_MARKER} ({e}); a restart would run the task again"
        ));
    }
    say(&format!("running {:?}", task.command));
    let (code, connection) = run(address, &task, connection);
    if !report(address, code, connection) {
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
/// against the job's start-up. The connection is kept for the log stream when the
/// service leaves it open (a new one costs a round trip and, with user networking, a
/// helper process on the host).
fn fetch_task(address: SocketAddr) -> (TaskReply, Option<TcpStream>) {
    let start = Instant::now();
    let mut waiting = false;
    loop {
        // `PARK_QUERY`: these tools can hold still for a boot snapshot (see `park`).
        let path = format!("{}?{}", metadata::TASK_PATH, metadata::PARK_QUERY);
        match connect(address).and_then(|s| send(s, "GET", &path, b"", true)) {
            Ok(Response {
                status: 200,
                body,
                reusable,
            }) => {
                let task = serde_json::from_slice(&body)
                    .unwrap_or_else(|e| fail(&format!("the task is not valid JSON: {e}")));
                return (task, reusable);
            }
            Ok(Response { status: 202, .. }) => park(),
            Ok(Response { status, body, .. }) => fail(&format!(
                "GET {} answered {status}: {}",
                metadata::TASK_PATH,
                String::from_utf8_lossy(&body)
            )),
            Err(_) if start.elapsed() < WAIT_FOR_SERVICE => {
                if !waiting {
                    // Only when the first try fails: a console line costs a few ms.
                    say(&format!("waiting for the metadata service at {address}"));
                    waiting = true;
                }
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

/// The worker asked the tools to hold still while it saves the VM as a boot snapshot
/// (`202` to the task fetch, the connection closed): the handshake then runs over the
/// agent port (`park.rs`), in this VM and in every VM later resumed from the snapshot.
/// The tools hold no connection meanwhile, so the snapshot holds none. They ask for the
/// task again on `RESUME`, or after `HOLD_LIMIT` if it never comes.
fn park() {
    say("holding still for a boot snapshot");
    if park::hold(snapshot::HOLD_LIMIT) {
        say("resumed after the boot snapshot");
    } else {
        say("no RESUME on the agent port; asking for the task anyway");
    }
}

/// Sets the guest's clock to the host's and feeds the host's random bytes to the kernel's
/// RNG, reseeding it at once. A guest resumed from a boot snapshot wakes with the
/// snapshot's clock and RNG state, shared with every other VM resumed from it.
fn adopt_host_state(reply: &TaskReply) {
    // 0: a worker that does not send its clock.
    if reply.unix_time_millis > 0 {
        let millis = reply.unix_time_millis;
        let now = libc::timespec {
            tv_sec: (millis / 1000) as libc::time_t,
            tv_nsec: ((millis % 1000) * 1_000_000) as libc::c_long,
        };
        // SAFETY: a valid timespec, read by the call only.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &now) } != 0 {
            say(&format!(
                "cannot set the clock: {}",
                io::Error::last_os_error()
            ));
        }
    }
    if !reply.entropy.is_empty()
        && let Err(e) = reseed(&reply.entropy)
    {
        say(&format!("cannot reseed the kernel's RNG: {e}"));
    }
    // "": a worker that leaves the name to the image.
    if !reply.hostname.is_empty()
        && let Err(e) = set_hostname(&reply.hostname)
    {
        say(&format!(
            "cannot set the host name {:?}: {e}",
            reply.hostname
        ));
    }
}

fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: a valid pointer and length, read by the call only.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `RNDADDENTROPY` (credited) then `RNDRESEEDCRNG`, both on /dev/urandom.
fn reseed(hex: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .map_err(|e| io::Error::other(format!("the entropy is not hex: {e}")))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(&bytes);
    let mut words = vec![0u32; info.len().div_ceil(4)];
    for (word, chunk) in words.iter_mut().zip(info.chunks(4)) {
        let mut b = [0u8; 4];
        b[..chunk.len()].copy_from_slice(chunk);
        *word = u32::from_ne_bytes(b);
    }
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // SAFETY: `words` holds a complete rand_pool_info (aligned, buf_size bytes of buf)
    // that outlives both calls; RNDRESEEDCRNG takes no argument.
    unsafe {
        if libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, words.as_ptr()) != 0
            || libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn connect(address: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// An answer, and its connection when the service left it open for another request.
struct Response {
    status: u16,
    body: Vec<u8>,
    reusable: Option<TcpStream>,
}

/// One HTTP/1.1 request with a complete body on `stream`; `keep` asks the service to
/// leave the connection open after the answer.
fn send(
    mut stream: TcpStream,
    method: &str,
    path: &str,
    body: &[u8],
    keep: bool,
) -> io::Result<Response> {
    let connection = if keep { "keep-alive" } else { "close" };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: {connection}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    read_response(stream)
}

fn get(address: SocketAddr, path: &str) -> io::Result<(u16, Vec<u8>)> {
    let response = send(connect(address)?, "GET", path, b"", false)?;
    Ok((response.status, response.body))
}

fn read_response(stream: TcpStream) -> io::Result<Response> {
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
    let mut close = false;
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
        if lower.starts_with("connection:") && lower.contains("close") {
            close = true;
        }
    }
    let mut body = Vec::new();
    match (length, chunked) {
        (Some(length), false) => {
            body.resize(length, 0);
            reader.read_exact(&mut body)?;
            // Reusable only when the answer ended exactly where its length said.
            let reusable = (!close && reader.buffer().is_empty()).then(|| reader.into_inner());
            return Ok(Response {
                status,
                body,
                reusable,
            });
        }
        _ => {
            reader.read_to_end(&mut body)?;
        }
    }
    Ok(Response {
        status,
        body,
        reusable: None,
    })
}

/// Runs the command, streaming its output (on `connection` when the service left one
/// open); returns the exit code (128 + N for signal N) and the log's connection when it
/// can carry another request.
fn run(
    address: SocketAddr,
    task: &Task,
    connection: Option<TcpStream>,
) -> (i32, Option<TcpStream>) {
    let (tx, rx) = mpsc::channel::<Piece>();
    let log = std::thread::spawn(move || stream_log(address, &rx, connection));

    let Some((program, args)) = task.command.split_first() else {
        let _ = tx.send(Piece::text(
            "[qemu-worker-guest] the task has an empty command\n",
        ));
        let _ = tx.send(Piece::End);
        return (127, log.join().ok().flatten());
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
            return (1, log.join().ok().flatten());
        }
    };
    let stderr = match writer.try_clone() {
        Ok(stderr) => stderr,
        Err(e) => {
            let _ = tx.send(Piece::text(&format!(
                "[qemu-worker-guest] cannot share the pipe: {e}\n"
            )));
            let _ = tx.send(Piece::End);
            return (1, log.join().ok().flatten());
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
    (code, log.join().ok().flatten())
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

/// One chunked POST /v1/log for the whole run, opened before the command's first output
/// (on `connection` if there is one); each piece of output is sent as soon as it is read.
/// If the stream breaks, a new one is opened for what follows. Returns the connection
/// when the service left it open after the log.
fn stream_log(
    address: SocketAddr,
    rx: &mpsc::Receiver<Piece>,
    connection: Option<TcpStream>,
) -> Option<TcpStream> {
    // Opened while the command starts, so its first output goes out at once.
    let mut stream: Option<TcpStream> = connection
        .and_then(|s| start_log(s).ok())
        .or_else(|| connect(address).and_then(start_log).ok());
    for piece in rx {
        let Piece::Data(piece) = piece else { break };
        for _ in 0..3 {
            // The service closes a stream that idled too long (logs.idleSeconds): look
            // before writing, or the first piece after a long silence would be lost.
            if stream.as_ref().is_some_and(closed_by_service) {
                stream = None;
            }
            if stream.is_none() {
                stream = connect(address).and_then(start_log).ok();
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
    let mut s = stream?;
    s.write_all(b"0\r\n\r\n").ok()?;
    read_response(s).ok()?.reusable
}

/// Whether the service has ended this request: it closed the connection, or answered
/// (it answers a log stream only when it ends it).
fn closed_by_service(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut byte = [0u8; 1];
    let closed = match stream.peek(&mut byte) {
        Ok(_) => true,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).is_err() || closed
}

fn start_log(mut stream: TcpStream) -> io::Result<TcpStream> {
    stream.write_all(
        format!(
            "POST {LOG_PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: keep-alive\r\n\
             Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .as_bytes(),
    )?;
    Ok(stream)
}

/// Reports the exit code (on `connection` first, if there is one; then on new connections,
/// retrying a few times); `false` when the service never took it.
fn report(address: SocketAddr, code: i32, connection: Option<TcpStream>) -> bool {
    let body = serde_json::to_string(&metadata::TaskResult { exit_code: code })
        .unwrap_or_else(|_| format!("{{\"exitCode\": {code}}}"));
    let put = |stream: TcpStream| send(stream, "PUT", RESULT_PATH, body.as_bytes(), false);
    if let Some(Ok(Response {
        status: 200 | 409, ..
    })) = connection.map(put)
    {
        return true;
    }
    for attempt in 0..10 {
        match connect(address).and_then(put) {
            Ok(Response {
                status: 200 | 409, ..
            }) => return true,
            Ok(Response { status, body, .. }) => say(&format!(
                "PUT {RESULT_PATH} answered {status}: {}",
                String::from_utf8_lossy(&body)
            )),
            Err(e) => say(&format!("PUT {RESULT_PATH} failed: {e}")),
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
        match get(address, PING_PATH) {
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

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A stand-in for the metadata service that answers every request (reading chunked
    /// bodies through to their end) and records, per connection, the request lines it
    /// got. With `close`, it answers `Connection: close` and ends each connection.
    fn service(close: bool) -> (SocketAddr, Arc<Mutex<Vec<Vec<String>>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let index = {
                    let mut seen = record.lock().expect("lock");
                    seen.push(Vec::new());
                    seen.len() - 1
                };
                let record = Arc::clone(&record);
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    let mut writer = stream;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        record.lock().expect("lock")[index].push(line.trim_end().to_owned());
                        let (mut length, mut chunked) = (0, false);
                        loop {
                            let mut header = String::new();
                            reader.read_line(&mut header).expect("header");
                            let lower = header.to_ascii_lowercase();
                            if let Some(value) = lower.strip_prefix("content-length:") {
                                length = value.trim().parse().expect("length");
                            }
                            chunked |= lower.contains("transfer-encoding: chunked");
                            if header == "\r\n" {
                                break;
                            }
                        }
                        if chunked {
                            loop {
                                let mut size = String::new();
                                reader.read_line(&mut size).expect("chunk size");
                                let size = usize::from_str_radix(size.trim(), 16).expect("hex");
                                let mut chunk = vec![0; size + 2];
                                reader.read_exact(&mut chunk).expect("chunk");
                                if size == 0 {
                                    break;
                                }
                            }
                        } else {
                            let mut body = vec![0; length];
                            reader.read_exact(&mut body).expect("body");
                        }
                        let body = if line.starts_with("GET /v1/task") {
                            r#"{"command":["echo","hello"],"env":{},"maxRunTime":60,"workingDirectory":"/tmp"}"#
                        } else {
                            "{}"
                        };
                        let connection = if close { "close" } else { "keep-alive" };
                        write!(
                            writer,
                            "HTTP/1.1 200 OK\r\nConnection: {connection}\r\n\
                             Content-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .expect("answer");
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (address, seen)
    }

    fn one_job(address: SocketAddr) {
        let (reply, connection) = fetch_task(address);
        let task = reply.task;
        assert_eq!(task.command, ["echo", "hello"]);
        let (code, connection) = run(address, &task, connection);
        assert_eq!(code, 0);
        assert!(report(address, code, connection), "the result was taken");
    }

    #[test]
    fn one_connection_carries_the_task_the_log_and_the_result() {
        let (address, seen) = service(false);
        one_job(address);
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(
            seen,
            [[
                "GET /v1/task?park=2 HTTP/1.1",
                "POST /v1/log HTTP/1.1",
                "PUT /v1/result HTTP/1.1"
            ]],
            "one connection, three requests in order"
        );
    }

    #[test]
    fn a_service_that_closes_gets_a_new_connection_per_request() {
        let (address, seen) = service(true);
        one_job(address);
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(
            seen,
            [
                ["GET /v1/task?park=2 HTTP/1.1"],
                ["POST /v1/log HTTP/1.1"],
                ["PUT /v1/result HTTP/1.1"]
            ],
        );
    }
}
