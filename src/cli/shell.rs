//! `qemu-worker shell JOB [-- CMD…]`: a shell in a running job's guest over serve's
//! WebSocket (docs/api.md). On a terminal the local one is put in raw mode (keys, Ctrl-C
//! included, go to the guest's terminal) and its size follows SIGWINCH; otherwise stdin
//! and stdout are piped, and the end of stdin closes the command's.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::ExitCode;

use futures_util::{SinkExt, StreamExt};
use qemu_worker::api::client::ApiClient;
use qemu_worker::api::model::{ShellClientControl, ShellServerControl as Last};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::exit::{EXIT_OTHER, ExitWith, Failure};
use super::remote::{failed, segment};

/// Puts the terminal back as it was.
struct RawMode(rustix::termios::Termios);

impl RawMode {
    fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(stdin.as_fd(), rustix::termios::OptionalActions::Now, &raw)
            .ok()?;
        Some(Self(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin().as_fd(),
            rustix::termios::OptionalActions::Now,
            &self.0,
        );
    }
}

/// The local terminal's size, when there is one.
fn terminal_size() -> Option<(u16, u16)> {
    let size = rustix::termios::tcgetwinsize(std::io::stdout().as_fd())
        .or_else(|_| rustix::termios::tcgetwinsize(std::io::stdin().as_fd()))
        .ok()?;
    (size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}

fn control(message: &ShellClientControl) -> String {
    serde_json::to_string(message).unwrap_or_default()
}

pub(super) async fn shell(
    client: &ApiClient,
    job: &str,
    tty: bool,
    command: Vec<String>,
) -> Result<ExitCode, Failure> {
    let (rows, cols) = terminal_size().unwrap_or((24, 80));
    let mut path = format!(
        "/v1/jobs/{}/shell?tty={tty}&rows={rows}&cols={cols}",
        segment(job)
    );
    if let Ok(term) = std::env::var("TERM")
        && tty
    {
        path.push_str(&format!("&term={}", segment(&term)));
    }
    for arg in &command {
        path.push_str(&format!("&command={}", segment(arg)));
    }
    let upgraded = client.websocket(&path).await.map_err(failed)?;
    let config = WebSocketConfig::default()
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20));
    let socket = WebSocketStream::from_raw_socket(upgraded, Role::Client, Some(config)).await;
    let (mut sink, mut messages) = socket.split();

    // Raw only when stdin really is a terminal (--tty may be asked with pipes).
    let raw = if tty { RawMode::enter() } else { None };
    // A thread of its own: a read blocked on stdin must not hold the exit up.
    let (keys, mut typed) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buffer = vec![0u8; 16 << 10];
        loop {
            let chunk = match stdin.read(&mut buffer) {
                Ok(0) | Err(_) => None,
                Ok(n) => Some(buffer[..n].to_vec()),
            };
            let end = chunk.is_none();
            if keys.blocking_send(chunk).is_err() || end {
                return;
            }
        }
    });
    let mut resized = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .exit_with(EXIT_OTHER)?;
    let mut stdin_open = true;
    let last = loop {
        tokio::select! {
            chunk = typed.recv(), if stdin_open => {
                let message = match chunk.flatten() {
                    Some(bytes) => Message::Binary(bytes.into()),
                    None => {
                        stdin_open = false;
                        if tty {
                            continue; // a terminal's end is the guest's Ctrl-D to give
                        }
                        Message::Text(control(&ShellClientControl::Eof).into())
                    }
                };
                if sink.send(message).await.is_err() {
                    break None;
                }
            }
            _ = resized.recv() => {
                if let Some((rows, cols)) = terminal_size() {
                    let resize = control(&ShellClientControl::Resize { rows, cols });
                    let _ = sink.send(Message::Text(resize.into())).await;
                }
            }
            message = messages.next() => match message {
                Some(Ok(Message::Binary(data))) => {
                    let Some((&stream, data)) = data.split_first() else { continue };
                    let written = if stream == 2 {
                        let mut err = std::io::stderr();
                        err.write_all(data).and_then(|()| err.flush())
                    } else {
                        let mut out = std::io::stdout();
                        out.write_all(data).and_then(|()| out.flush())
                    };
                    if written.is_err() {
                        break None;
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    break serde_json::from_str::<Last>(text.as_str()).ok();
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break None,
            },
        }
    };
    drop(raw);
    let _ = sink.close().await;
    match last {
        Some(Last::Exit {
            code: Some(code), ..
        }) => Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(255))),
        Some(Last::Exit {
            signal: Some(signal),
            ..
        }) => {
            eprintln!("qemu-worker: the command in {job} was killed by signal {signal}");
            Ok(ExitCode::from(
                u8::try_from(128 + (signal & 0x7f)).unwrap_or(255),
            ))
        }
        Some(Last::Exit {
            error: Some(error), ..
        }) => {
            eprintln!("qemu-worker: {job}: {error}");
            // As a shell says of a command it cannot run.
            Ok(ExitCode::from(127))
        }
        Some(Last::Exit { .. }) => Err(Failure::new(
            EXIT_OTHER,
            anyhow::anyhow!("{job}: the shell ended without an exit status"),
        )),
        Some(Last::Lost { reason }) => Err(Failure::new(
            EXIT_OTHER,
            anyhow::anyhow!("{job}: the shell was lost: {reason}"),
        )),
        None => Err(Failure::new(
            EXIT_OTHER,
            anyhow::anyhow!("{job}: the connection to the worker closed before the shell exited"),
        )),
    }
}
