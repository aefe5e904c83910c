//! The agent port: a virtio-serial port the guest tools serve, a unix socket on the
//! host. Each frame is one type byte, a big-endian `u32` length, then that many bytes:
//! JSON for control frames, raw bytes for [`DATA`].
//!
//! The host sends [`SYNC`] (an 8-byte nonce, echoed back) and [`GET`]. The guest
//! answers a `GET` with, per file, [`FILE`], [`DATA`]…, [`END`]; [`SKIP`] for an entry
//! it did not send; then [`DONE`] — or [`REFUSE`] instead of all of it. [`PARK`] and
//! [`RESUME`] carry the boot snapshot handshake (see [`crate::snapshot`]); the guest
//! echoes each, or answers [`REFUSE`].

use serde::{Deserialize, Serialize};

/// The port's name (`-device virtserialport,name=…`; `/dev/virtio-ports/<name>`).
pub const PORT_NAME: &str = "org.qemu-worker.agent.0";

/// Host → guest: a nonce to echo; every byte before the echo is left-over.
pub const SYNC: u8 = b'S';
/// Host → guest: a [`Get`].
pub const GET: u8 = b'G';
/// Host → guest: hold still for a boot snapshot (no payload). Echoed, empty, once the
/// tools hold no connection; refused when they were not asked to park.
pub const PARK: u8 = b'P';
/// Host → guest: the snapshot is taken (or given up); go on (no payload). Echoed, empty.
pub const RESUME: u8 = b'R';
/// Guest → host: a [`FileHeader`]; the file's bytes follow.
pub const FILE: u8 = b'F';
/// Guest → host: bytes of the open file.
pub const DATA: u8 = b'D';
/// Guest → host: a [`FileEnd`] closes the open file.
pub const END: u8 = b'E';
/// Guest → host: a [`Skipped`] entry of a directory.
pub const SKIP: u8 = b'K';
/// Guest → host: a [`Refusal`] ends the answer.
pub const REFUSE: u8 = b'X';
/// Guest → host: a [`Done`] ends the answer.
pub const DONE: u8 = b'Z';

/// Type byte and length.
pub const HEAD_LEN: usize = 5;
/// The nonce's length in a [`SYNC`] frame.
pub const NONCE_LEN: usize = 8;
/// Largest [`DATA`] frame the guest tools send (their read size).
pub const MAX_DATA: usize = 1 << 20;
/// Largest control frame either side accepts (requests, headers, refusals).
pub const MAX_CONTROL: usize = 64 << 10;

/// A frame's head.
pub fn head(kind: u8, len: u32) -> [u8; HEAD_LEN] {
    let [a, b, c, d] = len.to_be_bytes();
    [kind, a, b, c, d]
}

/// The type and length a head announces.
pub fn parse_head(head: [u8; HEAD_LEN]) -> (u8, usize) {
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    (head[0], len as usize)
}

/// What a [`GET`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GetKind {
    File,
    Directory,
}

/// [`GET`]: send the file or the directory at `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Get {
    pub path: String,
    pub kind: GetKind,
    /// Refuse ([`TOO_LARGE`]) when the files add up to more.
    pub max_bytes: u64,
    /// Also hash each file in the guest (the host always hashes what it receives).
    #[serde(default)]
    pub verify: bool,
}

/// [`FILE`]: a file's name (relative to the directory asked for; empty for a single
/// file) and the size the guest saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHeader {
    pub name: String,
    pub size: Option<u64>,
}

/// [`END`]: how many bytes were sent, and their SHA-256 when the host asked to verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEnd {
    pub size: u64,
    pub sha256: Option<String>,
}

/// [`SKIP`]: an entry that was not sent (a link, a device, an unreadable file), and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

/// [`REFUSE`]: why nothing (more) is sent; `code` is one of the codes below.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: String,
    pub message: String,
}

/// [`DONE`]: what the answer held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub files: u64,
    pub bytes: u64,
}

/// Refusal codes.
pub const NOT_FOUND: &str = "not-found";
pub const TOO_LARGE: &str = "too-large";
pub const NOT_A_FILE: &str = "not-a-file";
pub const NOT_A_DIRECTORY: &str = "not-a-directory";
pub const BAD_REQUEST: &str = "bad-request";
pub const IO: &str = "io";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_round_trips() {
        assert_eq!(head(FILE, 258), [b'F', 0, 0, 1, 2]);
        assert_eq!(parse_head(head(DATA, MAX_DATA as u32)), (DATA, MAX_DATA));
    }
}
