//! `GET /v1/jobs/ID/display`: a running job's screen, QEMU's VNC server (a unix socket
//! in the run dir) bridged to a WebSocket as noVNC speaks it. Without the `admin` scope
//! the viewer only watches: what it sends is read as RFB and its keys, pointer, cut text
//! and resizes never reach the guest.

use std::path::Path;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// The longest cut text a view-only viewer may send (it is dropped, not kept).
const MAX_CUT_TEXT: usize = 1 << 20;

/// Where a viewer is in the client's half of RFB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Version,
    Security,
    ClientInit,
    Messages,
}

/// The client's bytes, with input dropped: what a view-only viewer may send on.
#[derive(Debug)]
pub(super) struct ViewOnly {
    stage: Stage,
    pending: Vec<u8>,
    /// Bytes of a dropped message still to come (a long cut text is not buffered).
    skip: usize,
}

impl ViewOnly {
    pub(super) fn new() -> Self {
        Self {
            stage: Stage::Version,
            pending: Vec::new(),
            skip: 0,
        }
    }

    /// What of `data` goes on to the VNC server; an error ends the viewer's connection.
    pub(super) fn feed(&mut self, mut data: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        if self.skip > 0 {
            let n = self.skip.min(data.len());
            self.skip -= n;
            data = &data[n..];
        }
        self.pending.extend_from_slice(data);
        while let Some((len, pass)) = self.next_unit()? {
            if len > self.pending.len() {
                if pass {
                    break; // the rest of it is still to come
                }
                // A dropped message longer than what came: skip the rest as it comes.
                self.skip = len - self.pending.len();
                self.pending.clear();
                break;
            }
            let unit: Vec<u8> = self.pending.drain(..len).collect();
            if pass {
                out.extend_from_slice(&unit);
            }
        }
        Ok(out)
    }

    /// The length of the next whole unit and whether it passes, once its head is in.
    fn next_unit(&mut self) -> Result<Option<(usize, bool)>, String> {
        if self.stage == Stage::ClientInit && !self.pending.is_empty() {
            // Always shared: a viewer that asks for the display alone would have QEMU
            // disconnect every other (its default share policy allows exclusive access).
            self.pending[0] = 1;
        }
        let p = &self.pending;
        let need = |n: usize| p.len() >= n;
        match self.stage {
            Stage::Version => {
                if !need(12) {
                    return Ok(None);
                }
                if &p[..12] != b"RFB 003.008\n" && &p[..12] != b"RFB 003.007\n" {
                    return Err("a view-only display speaks RFB 3.7 or 3.8".into());
                }
                self.stage = Stage::Security;
                Ok(Some((12, true)))
            }
            Stage::Security => {
                if !need(1) {
                    return Ok(None);
                }
                if p[0] != 1 {
                    return Err(format!("security type {} (only None is served)", p[0]));
                }
                self.stage = Stage::ClientInit;
                Ok(Some((1, true)))
            }
            Stage::ClientInit => {
                if !need(1) {
                    return Ok(None);
                }
                self.stage = Stage::Messages;
                Ok(Some((1, true)))
            }
            Stage::Messages => {
                let Some(&kind) = p.first() else {
                    return Ok(None);
                };
                let u16_at = |at: usize| usize::from(u16::from_be_bytes([p[at], p[at + 1]]));
                let u32_at = |at: usize| {
                    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]) as usize
                };
                Ok(match kind {
                    0 => Some((20, true)),                           // SetPixelFormat
                    2 if need(4) => Some((4 + 4 * u16_at(2), true)), // SetEncodings
                    3 => Some((10, true)),                           // FramebufferUpdateRequest
                    4 => Some((8, false)),                           // KeyEvent
                    5 => Some((6, false)),                           // PointerEvent
                    6 if need(8) => {
                        // ClientCutText; a negative length is the extended clipboard's
                        // (its payload is that many bytes).
                        let len = (u32_at(4) as i32).unsigned_abs() as usize;
                        if len > MAX_CUT_TEXT {
                            return Err(format!("a cut text of {len} bytes"));
                        }
                        Some((8 + len, false))
                    }
                    150 => Some((10, true)), // EnableContinuousUpdates
                    248 if need(9) => Some((9 + usize::from(p[8]), true)), // ClientFence
                    251 if need(8) => Some((8 + 16 * usize::from(p[6]), false)), // SetDesktopSize
                    255 if need(2) => match p[1] {
                        0 => Some((12, false)), // QEMU extended key event
                        1 if need(4) => match u16_at(2) {
                            0 | 1 => Some((4, false)), // audio enable/disable
                            2 => Some((10, false)),    // audio format
                            op => return Err(format!("QEMU audio message {op}")),
                        },
                        1 => None,
                        sub => return Err(format!("QEMU client message {sub}")),
                    },
                    2 | 6 | 248 | 251 | 255 => None,
                    other => return Err(format!("RFB client message type {other}")),
                })
            }
        }
    }
}

/// Carries the VNC server's bytes to the viewer and the viewer's (filtered unless
/// `control`) to the server, until either side ends.
pub(super) async fn bridge<S>(socket: WebSocketStream<S>, vnc: &Path, control: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let server = match tokio::net::UnixStream::connect(vnc).await {
        Ok(server) => server,
        Err(error) => {
            tracing::warn!(%error, socket = %vnc.display(), "the display's VNC socket does not answer");
            return;
        }
    };
    let (mut from_server, mut to_server) = server.into_split();
    let (mut sink, mut messages) = socket.split();
    let mut filter = (!control).then(ViewOnly::new);
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        tokio::select! {
            read = from_server.read(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(Message::Binary(buffer[..n].to_vec().into())).await.is_err() {
                        return;
                    }
                }
            },
            message = messages.next() => match message {
                Some(Ok(Message::Binary(data))) => {
                    let passed = match filter.as_mut() {
                        Some(filter) => match filter.feed(&data) {
                            Ok(passed) => passed,
                            Err(why) => {
                                tracing::info!(%why, "a view-only display viewer was disconnected");
                                let _ = sink.send(Message::Close(Some(super::socket::close_frame(
                                    1008,
                                    &format!("view-only: {why}"),
                                )))).await;
                                return;
                            }
                        },
                        None => data.to_vec(),
                    };
                    if !passed.is_empty() && to_server.write_all(&passed).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = sink.send(Message::Close(None)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake() -> Vec<u8> {
        let mut bytes = b"RFB 003.008\n".to_vec();
        bytes.extend_from_slice(&[1, 1]); // security None, shared
        bytes
    }

    #[test]
    fn a_viewer_watches_but_its_input_is_dropped() {
        let mut filter = ViewOnly::new();
        let mut sent = handshake();
        let update = [3u8, 0, 0, 0, 0, 0, 0, 80, 0, 25];
        let encodings = [2u8, 0, 0, 2, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x11];
        let key = [4u8, 1, 0, 0, 0, 0, 0, 0x61];
        let pointer = [5u8, 1, 0, 10, 0, 10];
        let cut = [6u8, 0, 0, 0, 0, 0, 0, 3, b'a', b'b', b'c'];
        let qemu_key = [255u8, 0, 0, 1, 0, 0, 0, 0x61, 0, 0, 0, 0x1e];
        for part in [
            &update[..],
            &key,
            &encodings,
            &pointer,
            &cut,
            &qemu_key,
            &update,
        ] {
            sent.extend_from_slice(part);
        }
        // In pieces of every size, as a WebSocket may cut them.
        for piece in [1, 3, 7, sent.len()] {
            let mut filter_copy = ViewOnly::new();
            let passed: Vec<u8> = sent
                .chunks(piece)
                .flat_map(|c| filter_copy.feed(c).expect("valid"))
                .collect();
            let mut wanted = handshake();
            wanted.extend_from_slice(&update);
            wanted.extend_from_slice(&encodings);
            wanted.extend_from_slice(&update);
            assert_eq!(passed, wanted, "pieces of {piece}");
        }
        assert!(filter.feed(&sent).is_ok());
    }

    #[test]
    fn a_viewer_cannot_ask_for_the_display_alone() {
        let mut filter = ViewOnly::new();
        let mut sent = b"RFB 003.008\n".to_vec();
        sent.extend_from_slice(&[1, 0]); // security None, exclusive
        assert_eq!(filter.feed(&sent).expect("valid"), handshake());
    }

    #[test]
    fn what_cannot_be_read_ends_the_viewer() {
        let mut filter = ViewOnly::new();
        assert!(filter.feed(b"RFB 003.003\n").is_err());
        let mut filter = ViewOnly::new();
        let mut sent = b"RFB 003.008\n".to_vec();
        sent.push(2); // VNC authentication
        assert!(filter.feed(&sent).is_err());
        let mut filter = ViewOnly::new();
        let mut sent = handshake();
        sent.push(77);
        assert!(filter.feed(&sent).expect_err("refused").contains("77"));
        let mut filter = ViewOnly::new();
        let mut sent = handshake();
        // The extended clipboard's negative length is its payload's.
        sent.extend_from_slice(&[6, 0, 0, 0, 0xff, 0xff, 0xff, 0xf8, 1, 2, 3, 4, 5, 6, 7, 8]);
        sent.extend_from_slice(&[3, 1, 0, 0, 0, 0, 0, 8, 0, 8]);
        let mut wanted = handshake();
        wanted.extend_from_slice(&[3, 1, 0, 0, 0, 0, 0, 8, 0, 8]);
        assert_eq!(filter.feed(&sent).expect("valid"), wanted);
        let mut filter = ViewOnly::new();
        let mut sent = handshake();
        sent.extend_from_slice(&[6, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff]);
        assert!(
            filter
                .feed(&sent)
                .expect_err("refused")
                .contains("cut text")
        );
    }

    #[test]
    fn a_long_cut_text_is_skipped_as_it_comes() {
        let mut filter = ViewOnly::new();
        let mut sent = handshake();
        sent.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0x10, 0]); // 4096 bytes follow
        assert_eq!(filter.feed(&sent).expect("valid"), handshake());
        assert!(filter.feed(&[b'x'; 4000]).expect("valid").is_empty());
        let mut rest = vec![b'y'; 96];
        rest.extend_from_slice(&[3, 1, 0, 0, 0, 0, 0, 8, 0, 8]);
        assert_eq!(
            filter.feed(&rest).expect("valid"),
            [3, 1, 0, 0, 0, 0, 0, 8, 0, 8]
        );
    }
}
