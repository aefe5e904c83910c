use std::collections::BTreeSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::thread;

use sha2::{Digest, Sha256};
use tar::EntryType;

use super::contents::{ImageContents, ImageLimits, MAX_MACHINE_JSON_BYTES, check_image_dir};
use super::member::{ImageProblem, Member};
use super::stream::{self, ChunkReader, SourceState};

/// Decompressed bytes allowed after the end of the tar archive (its zero blocks and
/// padding); anything more is a decompression bomb, not an image.
const MAX_TRAILING_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The image is not acceptable; every problem found is listed.
    #[error("the image is not acceptable: {}", list(.0))]
    Rejected(Vec<ImageProblem>),
    /// Reading the archive failed for a reason outside the archive (network, disk).
    #[error("failed to read the image archive")]
    Source {
        #[source]
        source: io::Error,
    },
    /// Writing the unpacked image failed on this host (e.g. the disk is full).
    #[error("failed to write the unpacked image into {dir:?}")]
    Write {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn list(problems: &[ImageProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// What one pass over an archive produced.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// Lowercase hex sha256 of the archive as read (the compressed bytes).
    pub sha256: String,
    pub archive_bytes: u64,
    pub contents: ImageContents,
}

/// Unpacks a zstd-compressed tar from `source` into the empty directory `dir` in one
/// streaming pass: no temporary tarball, only the members of DESIGN §2.1, regular files
/// only, GNU sparse members written sparse. Then checks the result (machine.json, disk
/// layout, disks through qemu-img). Every problem is reported, not just the first.
///
/// Blocking: call it from a blocking thread. It returns once the source's read in
/// progress returns, even when a later stage failed.
pub fn unpack_archive<R: Read>(
    source: R,
    dir: &Path,
    limits: ImageLimits,
) -> Result<Unpacked, UnpackError> {
    let state = SourceState::default();
    let mut hasher = Sha256::new();
    // One thread per stage, as `zstd -dc | tar -x` has a process per stage: hashing,
    // decompressing and writing each keep a core busy, and the source stays on this thread.
    let present = thread::scope(|scope| {
        let (to_zstd, zstd_input) = stream::pipe();
        let (to_tar, tar_input) = stream::pipe();
        let spawn_failed = |source| UnpackError::Write {
            dir: dir.to_path_buf(),
            source,
        };
        let zstd = thread::Builder::new()
            .name("unpack-zstd".into())
            .spawn_scoped(scope, move || stream::decompress(zstd_input, to_tar))
            .map_err(spawn_failed)?;
        let state = &state;
        let tar = thread::Builder::new()
            .name("unpack-tar".into())
            .spawn_scoped(scope, move || {
                unpack_members(tar_input.reader(state), dir, limits, state)
            })
            .map_err(spawn_failed)?;
        stream::feed(source, to_zstd, &mut hasher, limits.max_image_bytes, state);
        zstd.join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        tar.join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;

    let contents = check_image_dir(dir, &present, limits).map_err(UnpackError::Rejected)?;
    let digest: [u8; 32] = hasher.finalize().into();
    Ok(Unpacked {
        sha256: hex(&digest),
        archive_bytes: state.bytes.load(Ordering::Relaxed),
        contents,
    })
}

/// The tar stage: admits and writes the members from the decompressed stream, checks
/// what follows the tar's end, and returns the members present.
fn unpack_members(
    input: ChunkReader<'_>,
    dir: &Path,
    limits: ImageLimits,
    state: &SourceState,
) -> Result<BTreeSet<Member>, UnpackError> {
    let classify = |error: io::Error| -> UnpackError {
        if state.over_limit.load(Ordering::Relaxed) {
            UnpackError::Rejected(vec![ImageProblem::image(format!(
                "the archive is over the limit of {} bytes",
                limits.max_image_bytes
            ))])
        } else if state.failed.load(Ordering::Relaxed) {
            UnpackError::Source { source: error }
        } else if is_host_write_error(&error) {
            UnpackError::Write {
                dir: dir.to_path_buf(),
                source: error,
            }
        } else {
            UnpackError::Rejected(vec![ImageProblem::image(format!(
                "the archive is not a valid zstd-compressed tar: {error}"
            ))])
        }
    };

    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(false);
    archive.set_preserve_mtime(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(false);

    let mut problems = Vec::new();
    let mut present = BTreeSet::new();
    let mut stored_total: u64 = 0;
    for entry in archive.entries().map_err(classify)? {
        let mut entry = entry.map_err(classify)?;
        let raw_name = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw_name).into_owned();
        let Some(member) = admit(&entry, &raw_name, &name, &present, limits, &mut problems) else {
            continue;
        };
        present.insert(member);
        stored_total = stored_total.saturating_add(entry.size());
        if stored_total > limits.max_image_bytes {
            problems.push(ImageProblem::image(format!(
                "the unpacked image is over the limit of {} bytes",
                limits.max_image_bytes
            )));
            break;
        }
        if !problems.is_empty() {
            // Keep scanning to report every problem, but write nothing more.
            continue;
        }
        entry
            .unpack(dir.join(member.name()))
            .map_err(|e| classify(root_cause(e)))?;
    }

    // Read what follows the tar end to the end of the decompressed stream, so the zstd
    // checksum is verified; `finish` then waits until the whole archive is read (and hashed).
    let mut input = archive.into_inner();
    let trailing = io::copy(
        &mut (&mut input).take(MAX_TRAILING_BYTES + 1),
        &mut io::sink(),
    )
    .map_err(classify)?;
    if trailing > MAX_TRAILING_BYTES {
        problems.push(ImageProblem::image(
            "the archive has data after the end of the tar archive",
        ));
    }
    if !problems.is_empty() {
        return Err(UnpackError::Rejected(problems));
    }
    input.finish().map_err(classify)?;
    Ok(present)
}

/// Decides whether an entry may be unpacked, recording why not.
fn admit<R: Read>(
    entry: &tar::Entry<'_, R>,
    raw_name: &[u8],
    name: &str,
    present: &BTreeSet<Member>,
    limits: ImageLimits,
    problems: &mut Vec<ImageProblem>,
) -> Option<Member> {
    let header = entry.header();
    let kind = header.entry_type();
    if !(kind.is_file() || kind.is_gnu_sparse()) {
        problems.push(ImageProblem::entry(
            name,
            format!("is a {}; only regular files are allowed", kind_name(kind)),
        ));
        return None;
    }
    if raw_name.first() == Some(&b'/') {
        problems.push(ImageProblem::entry(name, "has an absolute path"));
        return None;
    }
    if raw_name.split(|&b| b == b'/').any(|part| part == b"..") {
        problems.push(ImageProblem::entry(name, "has a `..` path component"));
        return None;
    }
    let Some(member) = Member::from_name(raw_name) else {
        let allowed: Vec<&str> = Member::ALL.iter().map(|m| m.name()).collect();
        problems.push(ImageProblem::entry(
            name,
            format!(
                "is not an image member (allowed at the top level: {})",
                allowed.join(", ")
            ),
        ));
        return None;
    };
    if present.contains(&member) {
        problems.push(ImageProblem::entry(name, "appears more than once"));
        return None;
    }
    let real_size = header
        .as_gnu()
        .filter(|_| kind.is_gnu_sparse())
        .and_then(|gnu| gnu.real_size().ok())
        .unwrap_or_else(|| entry.size());
    let cap = if member == Member::MachineJson {
        MAX_MACHINE_JSON_BYTES
    } else {
        limits.max_image_bytes
    };
    if real_size > cap {
        problems.push(ImageProblem::entry(
            name,
            format!("is {real_size} bytes, over the limit of {cap} bytes"),
        ));
        return None;
    }
    Some(member)
}

fn kind_name(kind: EntryType) -> &'static str {
    match kind {
        EntryType::Directory => "directory",
        EntryType::Symlink => "symbolic link",
        EntryType::Link => "hard link",
        EntryType::Char => "character device",
        EntryType::Block => "block device",
        EntryType::Fifo => "FIFO",
        EntryType::Continuous => "contiguous file",
        EntryType::XGlobalHeader => "pax global header",
        _ => "special entry",
    }
}

/// tar wraps I/O errors in its own; the innermost I/O error says what really failed.
fn root_cause(error: io::Error) -> io::Error {
    let mut root = (error.kind(), error.raw_os_error());
    let mut current: &dyn std::error::Error = &error;
    while let Some(next) = current.source() {
        if let Some(io) = next.downcast_ref::<io::Error>() {
            root = (io.kind(), io.raw_os_error());
        }
        current = next;
    }
    match root {
        (_, Some(code)) => io::Error::from_raw_os_error(code),
        (kind, None) => io::Error::new(kind, error.to_string()),
    }
}

/// Errors that mean this host could not write, not that the archive is bad (the
/// destination is a fresh directory, so an existing file is our fault too).
fn is_host_write_error(error: &io::Error) -> bool {
    use io::ErrorKind::{
        AlreadyExists, PermissionDenied, QuotaExceeded, ReadOnlyFilesystem, StorageFull,
    };
    matches!(
        error.kind(),
        StorageFull | QuotaExceeded | PermissionDenied | ReadOnlyFilesystem | AlreadyExists
    )
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, mpsc};
    use std::time::{Duration, Instant};

    use test_support::archive::RawTar;

    use super::*;

    const MACHINE: &[u8] = br#"{"version": 1, "memory": 128}"#;
    const NO_LIMIT: ImageLimits = ImageLimits {
        max_image_bytes: u64::MAX,
    };
    /// The stage threads are counted by name: one unpack at a time in these tests.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    /// Incompressible bytes, so that the archive is as long as its members.
    fn noise(len: usize) -> Vec<u8> {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// machine.json, then a 200 KiB disk. A one-thread pass meets machine.json after
    /// reading its first zstd block; the reader stage has read the whole archive, and what
    /// follows it, before the first decompressed chunk (256 KiB) reaches the tar stage.
    fn archive() -> Vec<u8> {
        RawTar::default()
            .file("machine.json", MACHINE)
            .entry(b"disk.img", EntryType::Regular, &noise(200 << 10))
            .zst()
    }

    /// `data`, then either an error or `tail` repeated forever.
    struct Source {
        data: io::Cursor<Vec<u8>>,
        then: Then,
    }

    enum Then {
        Fail(io::ErrorKind),
        Repeat(io::Cursor<Vec<u8>>),
    }

    impl Read for Source {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.data.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            match &mut self.then {
                Then::Fail(kind) => Err(io::Error::from(*kind)),
                Then::Repeat(tail) => {
                    if tail.position() == tail.get_ref().len() as u64 {
                        tail.set_position(0);
                    }
                    tail.read(buf)
                }
            }
        }
    }

    fn stage_threads() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .expect("/proc/self/task")
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .map(|name| name.trim().to_owned())
            .filter(|name| name.starts_with("unpack-"))
            .collect()
    }

    /// Unpacks into a fresh directory (holding `existing` files) on a thread of its own,
    /// so that a stage that never ends fails the test instead of hanging it; then checks
    /// that no stage thread is left.
    fn unpack(
        source: Source,
        existing: &[&str],
        limits: ImageLimits,
    ) -> (tempfile::TempDir, Result<Unpacked, UnpackError>) {
        let _one = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = tempfile::tempdir().expect("tempdir");
        for name in existing {
            std::fs::write(dir.path().join(name), b"").expect("existing file");
        }
        let (tx, rx) = mpsc::channel();
        let path = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(unpack_archive(source, &path, limits));
        });
        let result = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("unpack_archive returns (no stage waits forever)");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !stage_threads().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(stage_threads(), Vec::<String>::new(), "stage threads left");
        (dir, result)
    }

    #[test]
    fn a_write_error_is_a_write_error_even_when_the_reader_got_further() {
        let archive = archive();
        let ends = [
            // The source fails, or goes over the limit, after the member that cannot be
            // written: the stage ahead may have met that first, but the write came first.
            (Then::Fail(io::ErrorKind::ConnectionReset), NO_LIMIT),
            (
                Then::Repeat(io::Cursor::new(vec![0; 4096])),
                ImageLimits {
                    max_image_bytes: archive.len() as u64,
                },
            ),
        ];
        for (then, limits) in ends {
            let source = Source {
                data: io::Cursor::new(archive.clone()),
                then,
            };
            let (dir, result) = unpack(source, &["machine.json"], limits);
            match result {
                Err(UnpackError::Write {
                    dir: reported,
                    source,
                }) => {
                    assert_eq!(reported, dir.path());
                    assert_eq!(source.kind(), io::ErrorKind::AlreadyExists);
                }
                other => panic!("expected a write error, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_source_error_is_a_source_error() {
        let archive = archive();
        let source = Source {
            data: io::Cursor::new(archive[..archive.len() / 2].to_vec()),
            then: Then::Fail(io::ErrorKind::ConnectionReset),
        };
        match unpack(source, &[], NO_LIMIT).1 {
            Err(UnpackError::Source { source }) => {
                assert_eq!(source.kind(), io::ErrorKind::ConnectionReset);
            }
            other => panic!("expected a source error, got {other:?}"),
        }
    }

    #[test]
    fn the_stages_stop_when_the_tar_stage_fails_early() {
        // A valid stream that never ends: machine.json, a 1 TiB disk.img header, then
        // zstd frames of zeros forever. The tar stage fails on machine.json; the
        // decompressor and the reader must notice instead of going on forever.
        let mut tar = RawTar::default().file("machine.json", MACHINE).tar();
        tar.truncate(tar.len() - 1024);
        let mut header = tar::Header::new_gnu();
        header.set_path("disk.img").expect("name");
        header.set_mode(0o644);
        header.set_size(1 << 40);
        header.set_cksum();
        tar.extend_from_slice(header.as_bytes());
        let zeros = zstd::encode_all(&vec![0; 1 << 20][..], 3).expect("compress");
        let source = Source {
            data: io::Cursor::new(zstd::encode_all(&tar[..], 3).expect("compress")),
            then: Then::Repeat(io::Cursor::new(zeros)),
        };
        match unpack(source, &["machine.json"], NO_LIMIT).1 {
            Err(UnpackError::Write { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::AlreadyExists);
            }
            other => panic!("expected a write error, got {other:?}"),
        }
    }
}
