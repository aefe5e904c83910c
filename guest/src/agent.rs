//! The guest side of the agent port (docs/guest-agent.md): serves file and folder
//! requests from the host over the virtio-serial port `org.qemu-worker.agent.0`, and
//! carries shells (`shell.rs`) in between.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use qemu_worker_protocol::agent::{
    self, BAD_REQUEST, CLOSE, DATA, DONE, Done, END, FILE, FileEnd, FileHeader, GET, Get, GetKind,
    Hello, INPUT, NOT_A_DIRECTORY, NOT_A_FILE, NOT_FOUND, OPEN, PARK, REFUSE, RESIZE, RESUME,
    Refusal, SKIP, SYNC, Skipped, TOO_LARGE, VERSION,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Read size: one data frame per read.
const CHUNK: usize = agent::MAX_DATA;

/// Serves the port named `name` forever; reopens it after any error (the host may
/// reconnect, or the port may not exist yet: images may load its driver after starting
/// the tools, and ports appear as the host announces them). A failed open costs
/// nothing, so it is retried often.
pub fn serve_forever(name: &str) -> ! {
    loop {
        if let Some(port) = find_port(name)
            && let Ok(device) = File::options().read(true).write(true).open(port)
            && let Ok(writer) = device.try_clone()
        {
            let _ = serve(device, writer);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The device of the virtio-serial port `name`: udev's `/dev/virtio-ports/NAME` link if
/// there is one, else found through sysfs (`/sys/class/virtio-ports/vportNpM/name`), so
/// that images without udev need no naming step of their own.
fn find_port(name: &str) -> Option<PathBuf> {
    let link = Path::new("/dev/virtio-ports").join(name);
    if link.exists() {
        return Some(link);
    }
    std::fs::read_dir("/sys/class/virtio-ports")
        .ok()?
        .flatten()
        .find(|port| {
            std::fs::read_to_string(port.path().join("name")).is_ok_and(|n| n.trim() == name)
        })
        .map(|port| Path::new("/dev").join(port.file_name()))
}

/// The port's writer, shared by the answers and the shells: each frame is written
/// whole under its lock.
pub(crate) type Port = Arc<Mutex<io::BufWriter<File>>>;

/// Bumped by each [`SYNC`]: an answer in progress stops at its next frame (the host
/// has started afresh and discards everything before the echo).
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Reads the host's frames. Shell frames are handled at once; requests (everything
/// else) go to one answering thread in order, so that a long answer never holds up a
/// shell's keystrokes and a [`SYNC`] echo always comes after the answer before it.
fn serve(mut reader: File, writer: File) -> io::Result<()> {
    let port: Port = Arc::new(Mutex::new(io::BufWriter::with_capacity(CHUNK + 16, writer)));
    // Tools that (re)open the port say so first: a host connected since before them
    // learns that the shells it had here are gone. (Until a host connects, this waits;
    // a host that connects now discards it with everything before its SYNC's echo.)
    if let Ok(mut out) = port.lock() {
        let hello = Hello {
            version: agent::PROTOCOL_VERSION,
        };
        control(&mut *out, VERSION, &hello)?;
    }
    let (requests, queue) = mpsc::sync_channel::<(u8, Vec<u8>)>(16);
    let answering = {
        let port = Arc::clone(&port);
        std::thread::spawn(move || answer_requests(&port, &queue))
    };
    let served = (|| loop {
        let (kind, payload) = read_frame(&mut reader)?;
        match kind {
            OPEN | INPUT | RESIZE | CLOSE => crate::shell::handle(&port, kind, &payload),
            SYNC => {
                // A new host connection: the shells of the old one are gone with it.
                GENERATION.fetch_add(1, Ordering::SeqCst);
                crate::shell::close_all();
                requests.send((kind, payload)).map_err(io::Error::other)?;
            }
            _ => requests.send((kind, payload)).map_err(io::Error::other)?,
        }
    })();
    drop(requests);
    crate::shell::close_all();
    let _ = answering.join();
    served
}

/// Answers requests one at a time, each frame under the port's lock.
fn answer_requests(port: &Mutex<io::BufWriter<File>>, queue: &mpsc::Receiver<(u8, Vec<u8>)>) {
    while let Ok((kind, payload)) = queue.recv() {
        let mut out = Locked { port, guard: None };
        if answer(&mut out, kind, &payload)
            .and_then(|()| out.flush())
            .is_err()
        {
            return;
        }
    }
}

fn answer(out: &mut Locked<'_>, kind: u8, payload: &[u8]) -> io::Result<()> {
    match kind {
        SYNC => write_frame(out, SYNC, payload),
        VERSION => control(
            out,
            VERSION,
            &Hello {
                version: agent::PROTOCOL_VERSION,
            },
        ),
        PARK if crate::park::parked() => write_frame(out, PARK, &[]),
        PARK => error(out, BAD_REQUEST, "not asked to park for a boot snapshot"),
        RESUME if crate::park::resume() => write_frame(out, RESUME, &[]),
        RESUME => error(out, BAD_REQUEST, "not parked for a boot snapshot"),
        GET => match serde_json::from_slice::<Get>(payload) {
            #[cfg(feature = "hostile")]
            Ok(get) if crate::hostile::answer(out, &get.path)? => Ok(()),
            Ok(get) => send(out, &get),
            Err(e) => error(out, BAD_REQUEST, &e.to_string()),
        },
        _ => error(out, BAD_REQUEST, "unknown frame type"),
    }
}

/// A writer that takes the port's lock at its first write and lets it go at `flush`:
/// [`write_frame`] flushes after each frame, so shells' frames come in between.
struct Locked<'a> {
    port: &'a Mutex<io::BufWriter<File>>,
    guard: Option<std::sync::MutexGuard<'a, io::BufWriter<File>>>,
}

impl Write for Locked<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.guard.is_none() {
            self.guard = Some(
                self.port
                    .lock()
                    .map_err(|_| io::Error::other("port lock"))?,
            );
        }
        match self.guard.as_mut() {
            Some(guard) => guard.write(buf),
            None => Err(io::Error::other("port lock")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.guard.take() {
            Some(mut guard) => guard.flush(),
            None => Ok(()),
        }
    }
}

fn read_frame(reader: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; agent::HEAD_LEN];
    // Between frames, a read of nothing means the host's end is not connected (it went,
    // or its going is told late: the port's events and its data come on different
    // queues). The port stays open: closing it would drop what the next host already
    // sent (its SYNC, its first request), and nothing would answer it.
    let mut got = 0;
    while got < head.len() {
        match reader.read(&mut head[got..]) {
            Ok(0) if got == 0 => std::thread::sleep(Duration::from_millis(20)),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let (kind, len) = agent::parse_head(head);
    if len > agent::MAX_CONTROL {
        return Err(io::Error::other("request frame too large"));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload)?;
    Ok((kind, payload))
}

pub(crate) fn write_frame(out: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| io::Error::other("frame too large"))?;
    out.write_all(&agent::head(kind, len))?;
    out.write_all(payload)?;
    out.flush()
}

/// A control frame: `value` as JSON.
pub(crate) fn control(out: &mut impl Write, kind: u8, value: &impl Serialize) -> io::Result<()> {
    let json = serde_json::to_vec(value).map_err(io::Error::other)?;
    write_frame(out, kind, &json)
}

fn error(out: &mut impl Write, code: &str, message: &str) -> io::Result<()> {
    let refusal = Refusal {
        code: code.to_owned(),
        message: message.to_owned(),
    };
    control(out, REFUSE, &refusal)
}

fn send(out: &mut impl Write, get: &Get) -> io::Result<()> {
    let root = PathBuf::from(&get.path);
    let meta = match std::fs::symlink_metadata(&root) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return error(out, NOT_FOUND, &format!("{} does not exist", get.path));
        }
        Err(e) => return error(out, agent::IO, &e.to_string()),
    };
    let mut files = Vec::new();
    match get.kind {
        GetKind::File if meta.is_file() => files.push((String::new(), root.clone(), meta.len())),
        GetKind::File => {
            return error(
                out,
                NOT_A_FILE,
                &format!("{} is not a regular file", get.path),
            );
        }
        GetKind::Directory if meta.is_dir() => collect(&root, "", &mut files, out)?,
        GetKind::Directory => {
            return error(
                out,
                NOT_A_DIRECTORY,
                &format!("{} is not a directory", get.path),
            );
        }
    }
    let total: u64 = files.iter().map(|f| f.2).sum();
    if total > get.max_bytes {
        return error(
            out,
            TOO_LARGE,
            &format!(
                "{} is {total} bytes, over the limit of {}",
                get.path, get.max_bytes
            ),
        );
    }
    let mut sent_files = 0u64;
    let mut sent_bytes = 0u64;
    let mut buffer = vec![0u8; CHUNK];
    let generation = GENERATION.load(Ordering::SeqCst);
    for (name, path, size) in files {
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) => {
                skip(out, &name, &format!("cannot be opened: {e}"))?;
                continue;
            }
        };
        let header = FileHeader {
            name: name.clone(),
            size: Some(size),
        };
        control(out, FILE, &header)?;
        let mut hasher = get.verify.then(Sha256::new);
        let mut left = size;
        while left > 0 {
            if GENERATION.load(Ordering::SeqCst) != generation {
                return Ok(()); // the host started afresh: it discards the rest anyway
            }
            let want = (left as usize).min(CHUNK);
            let n = file.read(&mut buffer[..want])?;
            if n == 0 {
                break; // the file shrank; the end frame says how much was sent
            }
            if let Some(hasher) = hasher.as_mut() {
                hasher.update(&buffer[..n]);
            }
            write_frame(out, DATA, &buffer[..n])?;
            left -= n as u64;
        }
        let sha256 = hasher.map(|h| {
            let digest: [u8; 32] = h.finalize().into();
            digest
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        });
        let end = FileEnd {
            size: size - left,
            sha256,
        };
        control(out, END, &end)?;
        sent_files += 1;
        sent_bytes += size - left;
    }
    let done = Done {
        files: sent_files,
        bytes: sent_bytes,
    };
    control(out, DONE, &done)
}

/// Lists the regular files under `dir` (sorted, names relative with `/`); symbolic
/// links and special files are reported as skipped and never followed.
fn collect(
    dir: &Path,
    prefix: &str,
    files: &mut Vec<(String, PathBuf, u64)>,
    out: &mut impl Write,
) -> io::Result<()> {
    let mut entries: Vec<_> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.flatten().collect(),
        Err(e) => return skip(out, prefix, &format!("cannot be listed: {e}")),
    };
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let file_name = entry.file_name();
        // Names travel as JSON strings: one that is not UTF-8 is skipped and shown with
        // its bad bytes as \xNN, never turned into a name that another file could have.
        let Some(utf8) = file_name.to_str() else {
            let shown = escape_name(std::os::unix::ffi::OsStrExt::as_bytes(
                file_name.as_os_str(),
            ));
            skip(
                out,
                &format!("{prefix}{shown}"),
                "its name is not valid UTF-8 (shown with \\xNN for the bad bytes)",
            )?;
            continue;
        };
        let name = format!("{prefix}{utf8}");
        match entry.file_type() {
            Ok(t) if t.is_dir() => collect(&entry.path(), &format!("{name}/"), files, out)?,
            Ok(t) if t.is_file() => {
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                files.push((name, entry.path(), size));
            }
            Ok(t) if t.is_symlink() => skip(out, &name, "is a symbolic link (not followed)")?,
            _ => skip(out, &name, "is not a regular file")?,
        }
    }
    Ok(())
}

/// A name's valid UTF-8 as it is, every other byte as `\xNN`.
fn escape_name(bytes: &[u8]) -> String {
    let mut shown = String::new();
    for chunk in bytes.utf8_chunks() {
        shown.push_str(chunk.valid());
        for byte in chunk.invalid() {
            shown.push_str(&format!("\\x{byte:02x}"));
        }
    }
    shown
}

fn skip(out: &mut impl Write, name: &str, reason: &str) -> io::Result<()> {
    let skipped = Skipped {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    control(out, SKIP, &skipped)
}
