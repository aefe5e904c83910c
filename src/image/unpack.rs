use std::collections::BTreeSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use tar::EntryType;

use super::contents::{ImageContents, ImageLimits, MAX_MACHINE_JSON_BYTES, check_image_dir};
use super::member::{ImageProblem, Member};

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

/// What happened to the source stream, shared with the reader that feeds the decoder.
#[derive(Debug, Default)]
struct SourceState {
    bytes: AtomicU64,
    failed: AtomicBool,
    over_limit: AtomicBool,
}

/// Counts, caps and hashes the archive bytes as they are read, and remembers whether a
/// read error came from the source itself (so that it is not blamed on the archive).
struct SourceReader<R> {
    inner: R,
    hasher: Sha256,
    limit: u64,
    state: Arc<SourceState>,
}

impl<R: Read> Read for SourceReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf).inspect_err(|_| {
            self.state.failed.store(true, Ordering::Relaxed);
        })?;
        self.hasher.update(&buf[..n]);
        let total = self.state.bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if total > self.limit {
            self.state.over_limit.store(true, Ordering::Relaxed);
            return Err(io::Error::other("archive is over the size limit"));
        }
        Ok(n)
    }
}

/// Unpacks a zstd-compressed tar from `source` into the empty directory `dir` in one
/// streaming pass: no temporary tarball, only the members of DESIGN §2.1, regular files
/// only, GNU sparse members written sparse. Then checks the result (machine.json, disk
/// layout, disks through qemu-img). Every problem is reported, not just the first.
///
/// Blocking: call it from a blocking thread.
pub fn unpack_archive<R: Read>(
    source: R,
    dir: &Path,
    limits: ImageLimits,
) -> Result<Unpacked, UnpackError> {
    let state = Arc::new(SourceState::default());
    let reader = SourceReader {
        inner: source,
        hasher: Sha256::new(),
        limit: limits.max_image_bytes,
        state: Arc::clone(&state),
    };
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

    let decoder = zstd::stream::read::Decoder::new(reader).map_err(classify)?;
    let mut archive = tar::Archive::new(decoder);
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

    // Read what follows the tar end through the decoder, so the zstd checksum is
    // verified and the whole archive is hashed.
    let mut decoder = archive.into_inner();
    let trailing = io::copy(
        &mut (&mut decoder).take(MAX_TRAILING_BYTES + 1),
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
    let mut source = decoder.finish().into_inner();
    io::copy(&mut source, &mut io::sink()).map_err(classify)?;

    let contents = check_image_dir(dir, &present, limits).map_err(UnpackError::Rejected)?;
    let digest: [u8; 32] = source.hasher.finalize().into();
    Ok(Unpacked {
        sha256: hex(&digest),
        archive_bytes: state.bytes.load(Ordering::Relaxed),
        contents,
    })
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
