//! Hand-made image archives, including ones `tar` itself would refuse to write: raw
//! entry names and types (links, devices, `..`, absolute paths), for the hostile-image
//! cases of the component tests (`image_archive`) and of engine-tests (`malformed.rs`).

use tar::{EntryType, Header};

/// Tar entries with raw names and types.
#[derive(Debug, Default)]
pub struct RawTar {
    bytes: Vec<u8>,
}

impl RawTar {
    pub fn entry(mut self, name: &[u8], kind: EntryType, data: &[u8]) -> Self {
        self.entry_with_link(name, kind, data, b"");
        self
    }

    pub fn file(self, name: &str, data: &[u8]) -> Self {
        self.entry(name.as_bytes(), EntryType::Regular, data)
    }

    pub fn entry_with_link(&mut self, name: &[u8], kind: EntryType, data: &[u8], link: &[u8]) {
        let mut header = Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        header.set_mode(0o644);
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.bytes.extend_from_slice(header.as_bytes());
        self.bytes.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.bytes.extend(std::iter::repeat_n(0, pad));
    }

    pub fn link(mut self, name: &str, kind: EntryType, target: &str) -> Self {
        self.entry_with_link(name.as_bytes(), kind, b"", target.as_bytes());
        self
    }

    /// The tar stream, with its end-of-archive blocks.
    pub fn tar(mut self) -> Vec<u8> {
        self.bytes.extend(std::iter::repeat_n(0, 1024));
        self.bytes
    }

    /// The zstd-compressed tar stream (level 3: deterministic for a given zstd).
    pub fn zst(self) -> Vec<u8> {
        zstd::encode_all(&self.tar()[..], 3).expect("compress")
    }
}
