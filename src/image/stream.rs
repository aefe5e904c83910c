//! The archive's bytes on their way through unpacking: the caller's thread reads and
//! hashes the compressed bytes, one thread decompresses them, one parses the tar and
//! writes the files (`unpack.rs`), with bounded channels of chunks between the stages.

use std::io::{self, BufRead, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use sha2::{Digest, Sha256};

/// Bytes in one chunk between two stages: big enough that a channel hand-off costs
/// nothing next to the chunk's work, small enough to stay in a core's cache.
const CHUNK: usize = 256 << 10;
/// Chunks queued between two stages. A pipe never holds more than `DEPTH + 2` chunks:
/// a new one is made only when no spare came back, and then at most `DEPTH` are queued
/// and one is read.
const DEPTH: usize = 4;

/// What happened to the source stream, as seen by the stage that reads it: the error
/// that a stage passes on is tagged with where it came from, so that it is not blamed on
/// the archive (a source failure) or is reported as the size limit.
#[derive(Debug, Default)]
pub(super) struct SourceState {
    pub(super) bytes: AtomicU64,
    pub(super) failed: AtomicBool,
    pub(super) over_limit: AtomicBool,
}

/// Where an error that travels down the stages came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    /// The archive itself (bad zstd data, truncation) or the stage that found it.
    Archive,
    /// Reading the source failed (network, disk).
    SourceFailed,
    /// The source had more bytes than the limit allows.
    OverLimit,
}

impl SourceState {
    fn record(&self, cause: Cause) {
        match cause {
            Cause::Archive => {}
            Cause::SourceFailed => self.failed.store(true, Ordering::Relaxed),
            Cause::OverLimit => self.over_limit.store(true, Ordering::Relaxed),
        }
    }

    fn cause(&self) -> Cause {
        if self.over_limit.load(Ordering::Relaxed) {
            Cause::OverLimit
        } else if self.failed.load(Ordering::Relaxed) {
            Cause::SourceFailed
        } else {
            Cause::Archive
        }
    }
}

/// What one stage hands the next.
pub(super) enum Piece {
    Chunk(Vec<u8>),
    /// The decompressed stream ended; what follows only tells whether reading the rest
    /// of the source failed.
    End,
    /// The stream stopped here with this error; nothing follows.
    Failed(io::Error, Cause),
}

/// The sending end of a pipe, which also hands out the chunks the receiver is done with.
pub(super) struct ChunkSender {
    pieces: SyncSender<Piece>,
    spares: Receiver<Vec<u8>>,
}

/// The receiving end of a pipe, not yet reading.
pub(super) struct Chunks {
    pieces: Receiver<Piece>,
    spares: SyncSender<Vec<u8>>,
}

pub(super) fn pipe() -> (ChunkSender, Chunks) {
    let (pieces_tx, pieces_rx) = sync_channel(DEPTH);
    let (spares_tx, spares_rx) = sync_channel(DEPTH + 2);
    (
        ChunkSender {
            pieces: pieces_tx,
            spares: spares_rx,
        },
        Chunks {
            pieces: pieces_rx,
            spares: spares_tx,
        },
    )
}

impl ChunkSender {
    /// A chunk-sized buffer, reused when the receiver gave one back.
    fn buffer(&self) -> Vec<u8> {
        let mut buffer = self.spares.try_recv().unwrap_or_default();
        buffer.resize(CHUNK, 0);
        buffer
    }

    /// Hands `piece` on; false once the receiver is gone (it stopped early).
    fn send(&self, piece: Piece) -> bool {
        self.pieces.send(piece).is_ok()
    }
}

impl Chunks {
    /// Reads the pieces as one stream; an error that arrives is recorded in `state`.
    pub(super) fn reader(self, state: &SourceState) -> ChunkReader<'_> {
        ChunkReader {
            chunks: self,
            chunk: Vec::new(),
            at: 0,
            ended: false,
            state,
        }
    }
}

/// The pieces from a pipe as one stream, ending at `End` (or when the sender is gone).
pub(super) struct ChunkReader<'a> {
    chunks: Chunks,
    chunk: Vec<u8>,
    at: usize,
    ended: bool,
    state: &'a SourceState,
}

impl ChunkReader<'_> {
    /// Waits for the sending stage to finish after `End`: an error it met reading the
    /// rest of the source is returned (and recorded) here.
    pub(super) fn finish(self) -> io::Result<()> {
        loop {
            match self.chunks.pieces.recv() {
                Ok(Piece::Failed(error, cause)) => {
                    self.state.record(cause);
                    return Err(error);
                }
                Ok(Piece::Chunk(_) | Piece::End) => {}
                Err(_) => return Ok(()),
            }
        }
    }
}

impl BufRead for ChunkReader<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.at == self.chunk.len() && !self.ended {
            match self.chunks.pieces.recv() {
                Ok(Piece::Chunk(next)) => {
                    let used = std::mem::replace(&mut self.chunk, next);
                    self.at = 0;
                    if used.capacity() > 0 {
                        // A full spare queue only means the sender has enough.
                        let _ = self.chunks.spares.try_send(used);
                    }
                }
                Ok(Piece::End) | Err(_) => self.ended = true,
                Ok(Piece::Failed(error, cause)) => {
                    self.state.record(cause);
                    return Err(error);
                }
            }
        }
        Ok(&self.chunk[self.at..])
    }

    fn consume(&mut self, amount: usize) {
        self.at = (self.at + amount).min(self.chunk.len());
    }
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Reads the archive from `source` in chunks for the decompressor, hashing and counting
/// every byte read; stops at the end of the source, at its first error, past `limit`
/// (the read that crosses it is not passed on), or when the decompressor is gone.
pub(super) fn feed<R: Read>(
    mut source: R,
    out: ChunkSender,
    hasher: &mut Sha256,
    limit: u64,
    state: &SourceState,
) {
    loop {
        let mut buffer = out.buffer();
        let mut filled = 0;
        let mut last = None;
        let mut at_end = false;
        while filled < buffer.len() {
            match source.read(&mut buffer[filled..]) {
                Ok(0) => {
                    at_end = true;
                    break;
                }
                Ok(n) => {
                    hasher.update(&buffer[filled..filled + n]);
                    let total = state.bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                    if total > limit {
                        let error = io::Error::other("archive is over the size limit");
                        last = Some(Piece::Failed(error, Cause::OverLimit));
                        break;
                    }
                    filled += n;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    last = Some(Piece::Failed(error, Cause::SourceFailed));
                    break;
                }
            }
        }
        buffer.truncate(filled);
        if filled > 0 && !out.send(Piece::Chunk(buffer)) {
            return;
        }
        if let Some(piece) = last {
            out.send(piece);
            return;
        }
        if at_end {
            return;
        }
    }
}

/// Decompresses the chunks from `input` into chunks for the tar stage, then sends `End`
/// and reads the rest of the source (so that the whole archive is hashed). An error is
/// passed on tagged with its cause; the stage stops when the tar stage is gone.
pub(super) fn decompress(input: Chunks, out: ChunkSender) {
    let state = SourceState::default();
    let mut decoder = match zstd::stream::read::Decoder::with_buffer(input.reader(&state)) {
        Ok(decoder) => decoder,
        Err(error) => {
            out.send(Piece::Failed(error, Cause::Archive));
            return;
        }
    };
    loop {
        let mut buffer = out.buffer();
        let mut filled = 0;
        let mut error = None;
        let mut at_end = false;
        while filled < buffer.len() {
            match decoder.read(&mut buffer[filled..]) {
                Ok(0) => {
                    at_end = true;
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        buffer.truncate(filled);
        if filled > 0 && !out.send(Piece::Chunk(buffer)) {
            return;
        }
        if let Some(error) = error {
            out.send(Piece::Failed(error, state.cause()));
            return;
        }
        if at_end {
            break;
        }
    }
    if !out.send(Piece::End) {
        return;
    }
    let mut rest = decoder.finish();
    if let Err(error) = io::copy(&mut rest, &mut io::sink()) {
        out.send(Piece::Failed(error, state.cause()));
    }
}
