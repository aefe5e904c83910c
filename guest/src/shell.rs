//! Shells over the agent port (docs/guest-agent.md, version 2): each channel runs a
//! command, on a new pseudo-terminal or on pipes, and its output goes back as
//! `OUTPUT` frames between the frames of any answer in progress.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use qemu_worker_protocol::agent::{
    self, CLOSE, Channel, EXITED, Exited, INPUT, OPEN, OUTPUT, Open, RESIZE, Resize, STDERR, STDOUT,
};

use crate::agent::{Port, control, write_frame};

/// More channels than this at once are refused (each holds a process and threads).
const MAX_SESSIONS: usize = 32;
/// Input chunks queued for a shell that does not read its stdin; more end the channel.
const INPUT_QUEUE: usize = 256;
/// A shell's output read size (with the channel and stream, one `OUTPUT` frame).
const READ_SIZE: usize = agent::MAX_SHELL_DATA - 5;

/// A stream of the shell's output and where it is read.
type Output = (u8, Box<dyn Read + Send>);

struct Session {
    /// `None` closes the shell's stdin.
    input: mpsc::SyncSender<Option<Vec<u8>>>,
    /// The pseudo-terminal's controlling side, for resizes.
    pty: Option<Arc<File>>,
    /// The process group to signal when the channel is closed.
    pid: i32,
}

static SESSIONS: Mutex<Option<HashMap<u32, Session>>> = Mutex::new(None);

fn sessions<T>(f: impl FnOnce(&mut HashMap<u32, Session>) -> T) -> T {
    let mut guard = SESSIONS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f(guard.get_or_insert_with(HashMap::new))
}

/// A shell frame from the host. Bad frames end nothing but themselves: a channel the
/// tools do not know is ignored (its exit may have crossed the host's frame).
pub fn handle(port: &Port, kind: u8, payload: &[u8]) {
    match kind {
        OPEN => match serde_json::from_slice::<Open>(payload) {
            Ok(open) => start(port, open),
            Err(e) => eprintln!("qemu-worker-guest: a bad OPEN frame: {e}"),
        },
        INPUT => {
            let Some((channel, data)) = agent::split_channel(payload) else {
                return;
            };
            // Input for a stdin already closed (by the host, or by the command) is
            // dropped; a shell that does not read its stdin is ended, not waited on.
            let full = sessions(|s| {
                s.get(&channel).is_some_and(|session| {
                    let chunk = (!data.is_empty()).then(|| data.to_vec());
                    matches!(
                        session.input.try_send(chunk),
                        Err(mpsc::TrySendError::Full(_))
                    )
                })
            });
            if full {
                kill(channel);
            }
        }
        RESIZE => {
            if let Ok(resize) = serde_json::from_slice::<Resize>(payload) {
                let pty = sessions(|s| s.get(&resize.channel).and_then(|x| x.pty.clone()));
                if let Some(pty) = pty {
                    set_size(&pty, resize.rows, resize.cols);
                }
            }
        }
        CLOSE => {
            if let Ok(close) = serde_json::from_slice::<Channel>(payload) {
                kill(close.channel);
            }
        }
        _ => {}
    }
}

/// Ends every channel (the host connection they belonged to is gone).
pub fn close_all() {
    let channels: Vec<u32> = sessions(|s| s.keys().copied().collect());
    for channel in channels {
        kill(channel);
    }
}

fn kill(channel: u32) {
    if let Some(session) = sessions(|s| s.remove(&channel)) {
        // SAFETY: kill(2) on a process group of our own making.
        unsafe {
            libc::kill(-session.pid, libc::SIGHUP);
            libc::kill(-session.pid, libc::SIGKILL);
        }
    }
}

fn start(port: &Port, open: Open) {
    let channel = open.channel;
    let refused = if sessions(|s| s.contains_key(&channel)) {
        Some(format!("channel {channel} is already open"))
    } else if sessions(|s| s.len()) >= MAX_SESSIONS {
        Some(format!("more than {MAX_SESSIONS} shells at once"))
    } else {
        None
    };
    let started = match refused {
        Some(why) => Err(why),
        None => spawn(port, &open),
    };
    if let Err(error) = started {
        exited(
            port,
            Exited {
                channel,
                code: None,
                signal: None,
                error: Some(error),
            },
        );
    }
}

fn command(open: &Open) -> Command {
    let argv = match &open.command {
        Some(argv) if !argv.is_empty() => argv.clone(),
        _ if std::path::Path::new("/bin/bash").exists() => vec!["/bin/bash".into(), "-l".into()],
        _ => vec!["/bin/sh".into(), "-l".into()],
    };
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]);
    command.env("TERM", open.term.as_deref().unwrap_or("xterm-256color"));
    if std::env::var_os("HOME").is_none() {
        command.env("HOME", "/root");
    }
    if std::env::var_os("PATH").is_none() {
        command.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    if std::path::Path::new("/root").is_dir() {
        command.current_dir("/root");
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            default_signals();
            Ok(())
        });
    }
    command
}

fn spawn(port: &Port, open: &Open) -> Result<(), String> {
    let mut command = command(open);
    let (child, pty, outputs): (Child, Option<Arc<File>>, Vec<Output>) = if open.tty {
        let (master, slave) = open_pty().map_err(|e| format!("no pseudo-terminal: {e}"))?;
        set_size(&master, open.rows, open.cols);
        let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
        let (i, o, e) = (stdio(&slave), stdio(&slave), stdio(&slave));
        let (Ok(i), Ok(o), Ok(e)) = (i, o, e) else {
            return Err("the pseudo-terminal cannot be shared".into());
        };
        command.stdin(i).stdout(o).stderr(e);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| spawn_error(open, &e))?;
        drop(command); // the parent's copies of the terminal's other side
        drop(slave);
        let master = Arc::new(master);
        let reader = master.try_clone().map_err(|e| e.to_string())?;
        (child, Some(master), vec![(STDOUT, Box::new(reader))])
    } else {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = command.spawn().map_err(|e| spawn_error(open, &e))?;
        let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
            return Err("the command's pipes are missing".into());
        };
        (
            child,
            None,
            vec![(STDOUT, Box::new(out)), (STDERR, Box::new(err))],
        )
    };
    let channel = open.channel;
    let pid = i32::try_from(child.id()).unwrap_or(0);
    let (input, inputs) = mpsc::sync_channel(INPUT_QUEUE);
    let stdin: Option<Box<dyn Write + Send>> = match &pty {
        Some(master) => master
            .try_clone()
            .ok()
            .map(|f| Box::new(f) as Box<dyn Write + Send>),
        None => None,
    };
    let mut child = child;
    let stdin = stdin.or_else(|| {
        child
            .stdin
            .take()
            .map(|s| Box::new(s) as Box<dyn Write + Send>)
    });
    sessions(|s| s.insert(channel, Session { input, pty, pid }));
    if let Some(stdin) = stdin {
        std::thread::spawn(move || feed(stdin, &inputs));
    }
    let (drained, readers_done) = mpsc::channel::<()>();
    let readers = outputs.len();
    for (stream, source) in outputs {
        let port = Arc::clone(port);
        let drained = drained.clone();
        std::thread::spawn(move || {
            relay(&port, channel, stream, source);
            let _ = drained.send(());
        });
    }
    drop(drained);
    let port = Arc::clone(port);
    std::thread::spawn(move || {
        let status = child.wait();
        // Its output first: what it wrote before it ended is read to the end (a
        // background process that keeps the terminal open is not waited for long).
        for _ in 0..readers {
            if readers_done
                .recv_timeout(Duration::from_millis(500))
                .is_err()
            {
                break;
            }
        }
        sessions(|s| s.remove(&channel));
        let (code, signal, error) = match status {
            Ok(status) => (status.code(), status.signal(), None),
            Err(e) => (None, None, Some(format!("cannot wait for the shell: {e}"))),
        };
        exited(
            &port,
            Exited {
                channel,
                code,
                signal,
                error,
            },
        );
    });
    Ok(())
}

/// Signals as a login gives them: the tools may have been started with some ignored
/// (init scripts start them in the background, which ignores SIGINT), and an ignored
/// signal stays ignored across exec, so Ctrl-C would not interrupt anything.
///
/// # Safety
/// Between fork and exec: signal(2) is async-signal-safe.
unsafe fn default_signals() {
    for signal in [
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGPIPE,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
        libc::SIGCHLD,
    ] {
        // SAFETY: see above.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
        }
    }
}

fn spawn_error(open: &Open, e: &io::Error) -> String {
    let program = open
        .command
        .as_ref()
        .and_then(|c| c.first())
        .map_or("the login shell", String::as_str);
    format!("{program} cannot be started: {e}")
}

/// Writes the host's input to the shell's stdin; `None` (or the host gone) closes it.
fn feed(mut stdin: Box<dyn Write + Send>, inputs: &mpsc::Receiver<Option<Vec<u8>>>) {
    while let Ok(Some(chunk)) = inputs.recv() {
        if stdin
            .write_all(&chunk)
            .and_then(|()| stdin.flush())
            .is_err()
        {
            return;
        }
    }
}

/// Sends what the shell writes, a frame per read, until it closes (a terminal's
/// controlling side reads EIO once the last process on it has gone).
fn relay(port: &Port, channel: u32, stream: u8, mut source: Box<dyn Read + Send>) {
    let mut buffer = vec![0u8; READ_SIZE];
    loop {
        let n = match source.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut frame = Vec::with_capacity(n + 5);
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.push(stream);
        frame.extend_from_slice(&buffer[..n]);
        let Ok(mut out) = port.lock() else { return };
        if write_frame(&mut *out, OUTPUT, &frame).is_err() {
            return;
        }
    }
}

fn exited(port: &Port, exited: Exited) {
    if let Ok(mut out) = port.lock() {
        let _ = control(&mut *out, EXITED, &exited).and_then(|()| out.flush());
    }
}

fn open_pty() -> io::Result<(File, OwnedFd)> {
    // SAFETY: plain libc calls; each fd is owned right after it is made.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if master < 0 {
            return Err(io::Error::last_os_error());
        }
        let master = File::from_raw_fd(master);
        if libc::grantpt(master.as_raw_fd()) != 0 || libc::unlockpt(master.as_raw_fd()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut name = [0 as libc::c_char; 128];
        if libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let slave = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if slave < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((master, OwnedFd::from_raw_fd(slave)))
    }
}

fn set_size(pty: &File, rows: u16, cols: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize.
    unsafe {
        libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &size);
    }
}
