//! The agent port: a virtio-serial port the guest tools serve, a unix socket on the
//! host. Each frame is one type byte, a big-endian `u32` length, then that many bytes:
//! JSON for control frames, raw bytes for [`DATA`].
//!
//! The host sends [`SYNC`] (an 8-byte nonce, echoed back) and [`GET`]. The guest
//! answers a `GET` with, per file, [`FILE`], [`DATA`]…, [`END`]; [`SKIP`] for an entry
//! it did not send; then [`DONE`] — or [`REFUSE`] instead of all of it. [`PARK`] and
//! [`RESUME`] carry the boot snapshot handshake (see [`crate::snapshot`]); the guest
//! echoes each, or answers [`REFUSE`].
//!
//! Version 2 adds shells: [`VERSION`] says which version the tools speak (tools of
//! version 1 refuse it as an unknown frame), and [`OPEN`], [`INPUT`], [`RESIZE`] and
//! [`CLOSE`] drive shell channels whose [`OUTPUT`] and [`EXITED`] frames come in between
//! the frames of an answer. Requests are still answered one at a time, in order.

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
/// Both ways: the host's [`Hello`] asks which version the tools speak; they answer
/// with theirs. Tools of version 1 answer [`REFUSE`] ([`BAD_REQUEST`]).
pub const VERSION: u8 = b'V';
/// Host → guest: an [`Open`] starts a shell channel (no answer; its [`OUTPUT`] and
/// [`EXITED`] frames follow).
pub const OPEN: u8 = b'O';
/// Host → guest: the channel (4 bytes, big-endian) then bytes for the shell's stdin;
/// no bytes closes its stdin.
pub const INPUT: u8 = b'I';
/// Host → guest: a [`Resize`] of a channel's terminal.
pub const RESIZE: u8 = b'W';
/// Host → guest: a [`Channel`] to end: its processes are killed.
pub const CLOSE: u8 = b'C';
/// Guest → host: the channel (4 bytes, big-endian), the stream ([`STDOUT`] or
/// [`STDERR`]), then bytes the shell wrote.
pub const OUTPUT: u8 = b'B';
/// Guest → host: an [`Exited`] ends a channel; nothing of it follows.
pub const EXITED: u8 = b'T';
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

/// The version these frames make; the tools answer [`VERSION`] with it.
pub const PROTOCOL_VERSION: u32 = 2;
/// The first version with shells.
pub const SHELL_VERSION: u32 = 2;
/// [`OUTPUT`] streams.
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
/// Largest [`INPUT`] or [`OUTPUT`] payload either side sends (channel and stream
/// included); a guest's reads of a shell's output are smaller.
pub const MAX_SHELL_DATA: usize = 16 << 10;

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

/// [`VERSION`]: the version of the agent protocol one side speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
}

/// [`OPEN`]: a shell channel. `command` is run as it is (no shell in between); without
/// one the tools start a login shell (`/bin/bash -l`, else `/bin/sh -l`). With `tty`
/// it runs on a new pseudo-terminal of `rows` × `cols` (stdout carries everything it
/// writes); without, on pipes (stdout and stderr apart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    pub channel: u32,
    pub command: Option<Vec<String>>,
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
    /// `TERM` for the shell (`xterm-256color` if none).
    pub term: Option<String>,
}

/// [`RESIZE`]: a channel's terminal is now `rows` × `cols`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resize {
    pub channel: u32,
    pub rows: u16,
    pub cols: u16,
}

/// [`CLOSE`]: the channel to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    pub channel: u32,
}

/// [`EXITED`]: how a channel's command ended: its exit code, or the signal that killed
/// it, or why it could not start (`error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exited {
    pub channel: u32,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub error: Option<String>,
}

/// The channel a shell data frame ([`INPUT`], [`OUTPUT`]) is for, and the rest.
pub fn split_channel(payload: &[u8]) -> Option<(u32, &[u8])> {
    let (channel, rest) = payload.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*channel), rest))
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

    #[test]
    fn a_channel_is_split_from_its_data() {
        assert_eq!(split_channel(&[0, 0, 1, 2, 9]), Some((258, &[9u8][..])));
        assert_eq!(split_channel(&[0, 0, 1]), None);
    }
}
