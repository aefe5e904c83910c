use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use tar::{EntryType, GnuExtSparseHeader, GnuSparseHeader, Header};

use super::contents::{ImageContents, ImageLimits, check_image_dir};
use super::member::{ImageProblem, Member};

const BLOCK: u64 = 512;
/// A good ratio for disk images at a speed that keeps up with a 2-core host.
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{dir:?} is not a valid image: {}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Rejected {
        dir: PathBuf,
        problems: Vec<ImageProblem>,
    },
    #[error("failed to read {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to write {path:?}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Packs an image directory into `out` (a `.tar.zst`): the same checks as unpacking
/// first, then a deterministic archive (fixed member order, mtime 0, uid/gid 0, mode
/// 0644) in which files with holes become GNU sparse entries.
pub fn pack_image(dir: &Path, out: &Path, limits: ImageLimits) -> Result<ImageContents, PackError> {
    let present = scan_dir(dir)?;
    let contents =
        check_image_dir(dir, &present, limits).map_err(|problems| PackError::Rejected {
            dir: dir.to_path_buf(),
            problems,
        })?;

    let partial = out.with_extension("partial");
    let write_err = |source| PackError::Write {
        path: partial.clone(),
        source,
    };
    let file = File::create(&partial).map_err(write_err)?;
    let mut encoder =
        zstd::stream::write::Encoder::new(BufWriter::with_capacity(1 << 20, file), ZSTD_LEVEL)
            .map_err(write_err)?;
    encoder.include_checksum(true).map_err(write_err)?;
    let mut builder = tar::Builder::new(encoder);
    for member in Member::ALL.into_iter().filter(|m| present.contains(m)) {
        append_member(&mut builder, &dir.join(member.name()), member.name()).map_err(
            |e| match e {
                MemberError::Read(source) => PackError::Read {
                    path: dir.join(member.name()),
                    source,
                },
                MemberError::Write(source) => write_err(source),
            },
        )?;
    }
    let encoder = builder.into_inner().map_err(write_err)?;
    let file = encoder
        .finish()
        .map_err(write_err)?
        .into_inner()
        .map_err(|e| write_err(e.into_error()))?;
    file.sync_all().map_err(write_err)?;
    std::fs::rename(&partial, out).map_err(|source| PackError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(contents)
}

/// Lists the members in `dir`; anything that is not an allowed regular file is refused.
fn scan_dir(dir: &Path) -> Result<BTreeSet<Member>, PackError> {
    let read_err = |source| PackError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut present = BTreeSet::new();
    let mut problems = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type().map_err(read_err)?;
        match Member::from_name(name.as_bytes()) {
            _ if !kind.is_file() => problems.push(ImageProblem::entry(
                &name,
                "is not a regular file (symbolic links, directories and devices are not allowed)",
            )),
            Some(member) => {
                present.insert(member);
            }
            None => problems.push(ImageProblem::entry(&name, "is not an image member")),
        }
    }
    if problems.is_empty() {
        Ok(present)
    } else {
        problems.sort_by(|a, b| a.entry.cmp(&b.entry));
        Err(PackError::Rejected {
            dir: dir.to_path_buf(),
            problems,
        })
    }
}

enum MemberError {
    Read(io::Error),
    Write(io::Error),
}

fn append_member<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &Path,
    name: &str,
) -> Result<(), MemberError> {
    let mut file = File::open(path).map_err(MemberError::Read)?;
    let len = file.metadata().map_err(MemberError::Read)?.len();
    let regions = data_regions(&file, len).map_err(MemberError::Read)?;
    // SEEK_DATA/SEEK_HOLE moved the file offset.
    file.seek(SeekFrom::Start(0)).map_err(MemberError::Read)?;
    let dense = regions.is_empty() && len == 0 || regions == [(0, len)];

    let mut header = Header::new_gnu();
    header.set_path(name).map_err(MemberError::Write)?;
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    if dense {
        header.set_entry_type(EntryType::Regular);
        header.set_size(len);
        header.set_cksum();
        return builder
            .append(&header, &mut file)
            .map_err(MemberError::Write);
    }

    let stored: u64 = regions.iter().map(|(start, end)| end - start).sum();
    // GNU marks a file that ends in a hole with an empty region at its end.
    let mut map = regions.clone();
    if map.last().is_none_or(|&(_, end)| end < len) {
        map.push((len, len));
    }
    header.set_entry_type(EntryType::GNUSparse);
    header.set_size(stored);
    let (in_header, rest) = map.split_at(map.len().min(4));
    if let Some(gnu) = header.as_gnu_mut() {
        gnu.set_real_size(len);
        for (slot, &(start, end)) in gnu.sparse.iter_mut().zip(in_header) {
            set_region(slot, start, end);
        }
        gnu.set_is_extended(!rest.is_empty());
    }
    header.set_cksum();

    let out = builder.get_mut();
    out.write_all(header.as_bytes())
        .map_err(MemberError::Write)?;
    let chunks: Vec<&[(u64, u64)]> = rest.chunks(21).collect();
    for (index, chunk) in chunks.iter().enumerate() {
        let mut ext = GnuExtSparseHeader::new();
        for (slot, &(start, end)) in ext.sparse.iter_mut().zip(chunk.iter()) {
            set_region(slot, start, end);
        }
        ext.set_is_extended(index + 1 < chunks.len());
        out.write_all(ext.as_bytes()).map_err(MemberError::Write)?;
    }
    let mut buffer = vec![0u8; 1 << 20];
    for &(start, end) in &regions {
        file.seek(SeekFrom::Start(start))
            .map_err(MemberError::Read)?;
        let mut remaining = end - start;
        while remaining > 0 {
            let want = remaining.min(buffer.len() as u64) as usize;
            file.read_exact(&mut buffer[..want])
                .map_err(MemberError::Read)?;
            out.write_all(&buffer[..want]).map_err(MemberError::Write)?;
            remaining -= want as u64;
        }
    }
    let padding = (BLOCK - stored % BLOCK) % BLOCK;
    out.write_all(&vec![0u8; padding as usize])
        .map_err(MemberError::Write)
}

fn set_region(slot: &mut GnuSparseHeader, start: u64, end: u64) {
    slot.set_offset(start);
    slot.set_length(end - start);
}

/// The data regions of a file (SEEK_DATA/SEEK_HOLE), widened to 512-byte boundaries as
/// the GNU sparse format needs; a file system without hole support reports one region.
fn data_regions(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{SeekFrom as RSeek, seek};
    let mut regions: Vec<(u64, u64)> = Vec::new();
    let mut offset = 0;
    while offset < len {
        let start = match seek(file, RSeek::Data(offset)) {
            Ok(start) => start,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = seek(file, RSeek::Hole(start))
            .map_err(io::Error::from)?
            .min(len);
        let start = start / BLOCK * BLOCK;
        let end = end.div_ceil(BLOCK).saturating_mul(BLOCK).min(len);
        match regions.last_mut() {
            Some(last) if last.1 >= start => last.1 = last.1.max(end),
            _ => regions.push((start, end)),
        }
        offset = end.max(start + 1);
    }
    Ok(regions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_found_and_aligned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sparse");
        let mut file = File::create(&path).expect("create");
        file.write_all(b"head").expect("write");
        file.seek(SeekFrom::Start(8 << 20)).expect("seek");
        file.write_all(b"tail").expect("write");
        file.set_len(16 << 20).expect("extend");
        let file = File::open(&path).expect("open");
        let regions = data_regions(&file, 16 << 20).expect("regions");
        assert_eq!(regions.len(), 2, "{regions:?}");
        assert_eq!(regions[0].0, 0);
        assert!(
            regions[1].0 <= 8 << 20 && regions[1].1 > 8 << 20,
            "{regions:?}"
        );
        for &(start, end) in &regions {
            assert_eq!(start % BLOCK, 0);
            assert_eq!(end % BLOCK, 0);
        }
    }
}
