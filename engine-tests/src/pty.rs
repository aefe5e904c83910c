//! A real pseudo-terminal for driving interactive commands (`qemu-worker shell`) as a
//! user's terminal would: the command runs as the session leader of a new terminal, the
//! test types into its controlling side and reads what comes back.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A command on a terminal of its own.
#[derive(Debug)]
pub struct Pty {
    master: File,
    child: Child,
    /// Everything read so far (a reader thread appends).
    seen: Arc<Mutex<Vec<u8>>>,
    /// Where the next [`Pty::expect`] starts looking.
    from: usize,
}

impl Pty {
    /// Starts `command` on a new `rows` × `cols` terminal.
    pub fn spawn(mut command: Command, rows: u16, cols: u16) -> Self {
        let master = rustix::pty::openpt(
            rustix::pty::OpenptFlags::RDWR
                | rustix::pty::OpenptFlags::NOCTTY
                | rustix::pty::OpenptFlags::CLOEXEC,
        )
        .expect("a pseudo-terminal");
        rustix::pty::grantpt(&master).expect("grantpt");
        rustix::pty::unlockpt(&master).expect("unlockpt");
        let name = rustix::pty::ptsname(&master, Vec::new()).expect("ptsname");
        let slave: OwnedFd = File::options()
            .read(true)
            .write(true)
            .open(name.to_string_lossy().as_ref())
            .expect("the terminal's other side")
            .into();
        set_size(&master, rows, cols);
        let stdio = || Stdio::from(slave.try_clone().expect("dup"));
        command.stdin(stdio()).stdout(stdio()).stderr(stdio());
        // SAFETY: setsid and TIOCSCTTY only, between fork and exec.
        unsafe {
            command.pre_exec(|| {
                rustix::process::setsid()?;
                rustix::process::ioctl_tiocsctty(std::io::stdin().as_fd())?;
                Ok(())
            });
        }
        let child = command.spawn().expect("the command starts");
        drop(command);
        drop(slave);
        let master = File::from(master);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().expect("dup");
        let sink = Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buffer) {
                if n == 0 {
                    return;
                }
                if let Ok(mut seen) = sink.lock() {
                    seen.extend_from_slice(&buffer[..n]);
                }
            }
        });
        Self {
            master,
            child,
            seen,
            from: 0,
        }
    }

    /// Types `text` (use `\r` for Enter, `\x03` for Ctrl-C).
    pub fn type_text(&mut self, text: &str) {
        self.master
            .write_all(text.as_bytes())
            .and_then(|()| self.master.flush())
            .expect("the terminal takes input");
    }

    /// Waits until `text` has been shown since the last match; panics with everything
    /// shown when it does not come within `within`.
    pub fn expect(&mut self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let found = {
                let seen = self.seen.lock().expect("lock");
                let tail = &seen[self.from.min(seen.len())..];
                tail.windows(text.len())
                    .position(|w| w == text.as_bytes())
                    .map(|at| self.from + at + text.len())
            };
            if let Some(end) = found {
                self.from = end;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{text:?} was not shown within {within:?}; the terminal showed:\n{}",
                self.shown()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How long `text` takes to be shown after it is typed (a keystroke's round trip).
    pub fn round_trip(&mut self, typed: &str, shown: &str) -> Duration {
        let started = Instant::now();
        self.type_text(typed);
        self.expect(shown, Duration::from_secs(30));
        started.elapsed()
    }

    /// Everything the terminal showed.
    pub fn shown(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().expect("lock")).into_owned()
    }

    /// Makes the terminal `rows` × `cols` (its foreground process gets SIGWINCH).
    pub fn resize(&mut self, rows: u16, cols: u16) {
        set_size(&self.master, rows, cols);
    }

    /// Waits for the command to exit.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "the command did not exit within {within:?}; the terminal showed:\n{}",
                    self.shown()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_size(master: &impl AsFd, rows: u16, cols: u16) {
    let size = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(master, size).expect("the terminal takes a size");
}
