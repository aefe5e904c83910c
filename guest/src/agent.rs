//! The guest side of the agent port (docs/guest-agent.md): serves file and folder
//! requests from the host over the virtio-serial port `org.qemu-worker.agent.0`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

pub const PORT_NAME: &str = "org.qemu-worker.agent.0";
const CHUNK: usize = 1 << 20;
/// Requests are small JSON documents.
const MAX_REQUEST: usize = 64 << 10;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Get {
    path: String,
    kind: String,
    max_bytes: u64,
    /// Also hash each file here (the host always hashes what it receives). Under TCG
    /// this costs most of the throughput: SHA-256 runs at ~80 MB/s in an emulated CPU.
    #[serde(default)]
    verify: bool,
}

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

fn serve(mut reader: File, writer: File) -> io::Result<()> {
    let mut out = io::BufWriter::with_capacity(CHUNK + 16, writer);
    loop {
        let (kind, payload) = read_frame(&mut reader)?;
        match kind {
            b'S' => write_frame(&mut out, b'S', &payload)?,
            b'G' => match serde_json::from_slice::<Get>(&payload) {
                #[cfg(feature = "hostile")]
                Ok(get) if crate::hostile::answer(&mut out, &get.path)? => {}
                Ok(get) => send(&mut out, &get)?,
                Err(e) => error(&mut out, "bad-request", &e.to_string())?,
            },
            _ => error(&mut out, "bad-request", "unknown frame type")?,
        }
        out.flush()?;
    }
}

fn read_frame(reader: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    reader.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_REQUEST {
        return Err(io::Error::other("request frame too large"));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

pub(crate) fn write_frame(out: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| io::Error::other("frame too large"))?;
    out.write_all(&[kind])?;
    out.write_all(&len.to_be_bytes())?;
    out.write_all(payload)
}

fn error(out: &mut impl Write, code: &str, message: &str) -> io::Result<()> {
    write_frame(
        out,
        b'X',
        serde_json::json!({"code": code, "message": message})
            .to_string()
            .as_bytes(),
    )
}

fn send(out: &mut impl Write, get: &Get) -> io::Result<()> {
    let root = PathBuf::from(&get.path);
    let meta = match std::fs::symlink_metadata(&root) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return error(out, "not-found", &format!("{} does not exist", get.path));
        }
        Err(e) => return error(out, "io", &e.to_string()),
    };
    let mut files = Vec::new();
    match get.kind.as_str() {
        "file" if meta.is_file() => files.push((String::new(), root.clone(), meta.len())),
        "file" => {
            return error(
                out,
                "not-a-file",
                &format!("{} is not a regular file", get.path),
            );
        }
        "directory" if meta.is_dir() => collect(&root, "", &mut files, out)?,
        "directory" => {
            return error(
                out,
                "not-a-directory",
                &format!("{} is not a directory", get.path),
            );
        }
        _ => return error(out, "bad-request", "kind must be file or directory"),
    }
    let total: u64 = files.iter().map(|f| f.2).sum();
    if total > get.max_bytes {
        return error(
            out,
            "too-large",
            &format!(
                "{} is {total} bytes, over the limit of {}",
                get.path, get.max_bytes
            ),
        );
    }
    let mut sent_files = 0u64;
    let mut sent_bytes = 0u64;
    let mut buffer = vec![0u8; CHUNK];
    for (name, path, size) in files {
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) => {
                skip(out, &name, &format!("cannot be opened: {e}"))?;
                continue;
            }
        };
        write_frame(
            out,
            b'F',
            serde_json::json!({"name": name, "size": size})
                .to_string()
                .as_bytes(),
        )?;
        let mut hasher = get.verify.then(Sha256::new);
        let mut left = size;
        while left > 0 {
            let want = (left as usize).min(CHUNK);
            let n = file.read(&mut buffer[..want])?;
            if n == 0 {
                break; // the file shrank; the end frame says how much was sent
            }
            if let Some(hasher) = hasher.as_mut() {
                hasher.update(&buffer[..n]);
            }
            write_frame(out, b'D', &buffer[..n])?;
            left -= n as u64;
        }
        let sha256 = hasher.map(|h| {
            let digest: [u8; 32] = h.finalize().into();
            digest
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        });
        let end = serde_json::json!({"size": size - left, "sha256": sha256});
        write_frame(out, b'E', end.to_string().as_bytes())?;
        sent_files += 1;
        sent_bytes += size - left;
    }
    write_frame(
        out,
        b'Z',
        serde_json::json!({"files": sent_files, "bytes": sent_bytes})
            .to_string()
            .as_bytes(),
    )
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
    write_frame(
        out,
        b'K',
        serde_json::json!({"name": name, "reason": reason})
            .to_string()
            .as_bytes(),
    )
}
