//! Hostile answers to the boot snapshot handshake (docs/snapshots.md), as the image's
//! `/etc/qw-hostile-park` names them in one word: `park-*` answers the PARK badly (so no
//! snapshot is saved), `resume-*` the RESUME of a VM resumed from the snapshot (the saved
//! VM's RESUME is answered honestly, so the snapshot is saved), `save-resume-*` the
//! saved VM's RESUME; each with `wrong-frame`, `truncated`, `oversized` or `silent`
//! (`Answer`).
//!
//! The handshake runs before the job's command, so the mode comes with the image. And
//! the real tools' agent thread (agent.rs, which this feature must not change: the test
//! image pins the real tools' build) would answer it itself, so these tools take the
//! agent port first: before `main`, they open it and serve SYNC, PARK and RESUME on a
//! thread of their own, as the real tools do except for the frame the mode names. They
//! let go of the port after the RESUME of the VM they run in (or once the task has
//! started, in a VM that booted without a park), and the real agent thread, which
//! retries its open every 50 ms meanwhile, serves it from then on.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use qemu_worker_protocol::agent::{
    BAD_REQUEST, HEAD_LEN, MAX_CONTROL, PARK, PORT_NAME, REFUSE, RESUME, SYNC, head, parse_head,
};

use crate::agent::write_frame;

const PARK_MODE: &str = "/etc/qw-hostile-park";
/// How long the start waits for the agent port to appear (the image loads its driver
/// in the background, after starting the tools).
const WAIT_FOR_PORT: Duration = Duration::from_secs(30);
/// How often the port thread looks whether the task has started.
const TICK: Duration = Duration::from_millis(100);

/// Which frame a mode answers badly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// `park-*`.
    Park,
    /// `resume-*`: the RESUME that does not come straight after a PARK on the same
    /// connection, i.e. a resumed VM's (the host connects anew and syncs first). The
    /// tools stay parked.
    ResumedVm,
    /// `save-resume-*`: the RESUME straight after the PARK, i.e. the saved VM's. The
    /// tools go on all the same.
    SavedVm,
}

/// How a mode answers its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// `*-wrong-frame`: a well-formed frame of another kind (`Z`, 21 bytes).
    WrongFrame,
    /// `*-truncated`: an echo whose head announces 100 bytes, of which 10 come.
    Truncated,
    /// `*-oversized`: a head announcing one byte over the 64 KiB control limit, then
    /// 4 KiB of it.
    Oversized,
    /// `*-silent`: nothing (the port is served on).
    Silent,
    /// `resume-run-silent`: nothing, but the tools go on and fetch their task as if they
    /// had taken the RESUME.
    RunSilent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mode {
    target: Target,
    answer: Answer,
}

impl Mode {
    /// `park-silent`, `resume-wrong-frame`, `save-resume-wrong-frame`, ...
    fn parse(name: &str) -> Option<Self> {
        let (target, answer) = if let Some(answer) = name.strip_prefix("park-") {
            (Target::Park, answer)
        } else if let Some(answer) = name.strip_prefix("save-resume-") {
            (Target::SavedVm, answer)
        } else {
            (Target::ResumedVm, name.strip_prefix("resume-")?)
        };
        let answer = match answer {
            "wrong-frame" => Answer::WrongFrame,
            "truncated" => Answer::Truncated,
            "oversized" => Answer::Oversized,
            "silent" => Answer::Silent,
            "run-silent" if target == Target::ResumedVm => Answer::RunSilent,
            _ => return None,
        };
        Some(Self { target, answer })
    }

    /// Whether this mode answers `kind` badly; `after_park`: the host's previous frame
    /// on this connection was PARK.
    fn targets(self, kind: u8, after_park: bool) -> bool {
        match self.target {
            Target::Park => kind == PARK,
            Target::ResumedVm => kind == RESUME && !after_park,
            Target::SavedVm => kind == RESUME && after_park,
        }
    }
}

// SAFETY: an `.init_array` entry is called once by the C runtime, before `main`, with
// the process's arguments (ignored here: a function without parameters may be called
// with some in the C calling convention); it only uses std, which is usable then.
#[used]
#[unsafe(link_section = ".init_array")]
static TAKE_THE_PORT: extern "C" fn() = take_the_port;

/// Before `main`: opens the agent port ahead of the real agent thread and serves the
/// handshake on a thread of its own, in an image that names a mode.
extern "C" fn take_the_port() {
    // Only the tools themselves (not `report`, `bench-metadata`), and not a restarted
    // instance, whose task already ran.
    if std::env::args_os().len() > 1 || Path::new(crate::STARTED_MARKER).exists() {
        return;
    }
    let Ok(name) = std::fs::read_to_string(PARK_MODE) else {
        return;
    };
    let name = name.trim().to_owned();
    let Some(mode) = Mode::parse(&name) else {
        say(&format!("unknown park mode {name}; answering honestly"));
        return;
    };
    let Some(port) = open_port() else {
        say("no agent port; answering honestly");
        return;
    };
    say(&format!("answering the boot snapshot handshake as {name}"));
    std::thread::spawn(move || serve(&port, mode));
}

/// A console line (never a panic: this runs before `main`, where one would abort).
fn say(message: &str) {
    let _ = writeln!(io::stdout(), "qemu-worker-guest (hostile): {message}");
}

fn open_port() -> Option<File> {
    let deadline = Instant::now() + WAIT_FOR_PORT;
    loop {
        if let Some(device) = find_port()
            && let Ok(port) = File::options().read(true).write(true).open(device)
        {
            return Some(port);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `/dev/vportNpM` of the port named `PORT_NAME`, through sysfs.
fn find_port() -> Option<PathBuf> {
    std::fs::read_dir("/sys/class/virtio-ports")
        .ok()?
        .flatten()
        .find(|port| {
            std::fs::read_to_string(port.path().join("name")).is_ok_and(|n| n.trim() == PORT_NAME)
        })
        .map(|port| Path::new("/dev").join(port.file_name()))
}

/// Serves SYNC, PARK and RESUME on `port` (as agent.rs does, but for the frame `mode`
/// names) until the tools go on; dropping the port then hands it to the real agent
/// thread.
fn serve(port: &File, mode: Mode) {
    let mut frames = Frames {
        port,
        buffer: Vec::new(),
    };
    let mut previous = None;
    loop {
        let (kind, payload) = match frames.next_frame() {
            Next::Frame(kind, payload) => (kind, payload),
            quiet => {
                if let Next::Disconnected = quiet {
                    previous = None;
                }
                // A VM that booted without a park: its tools have their task.
                if Path::new(crate::STARTED_MARKER).exists() {
                    return;
                }
                continue;
            }
        };
        let after_park = previous == Some(PARK);
        previous = Some(kind);
        let badly = mode.targets(kind, after_park);
        let mut out = port;
        // A write that fails (the host went away) is the host's to notice.
        let _ = if badly {
            answer_badly(&mut out, kind, mode)
        } else {
            answer_honestly(&mut out, kind, &payload)
        };
        // The handshake is over for this VM once its tools go on.
        if kind == RESUME && (!badly || mode.target == Target::SavedVm) {
            return;
        }
    }
}

/// The real tools' answers (agent.rs).
fn answer_honestly(out: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    match kind {
        SYNC => write_frame(out, SYNC, payload),
        PARK if crate::park::parked() => write_frame(out, PARK, &[]),
        PARK => refuse(out, "not asked to park for a boot snapshot"),
        RESUME if crate::park::resume() => write_frame(out, RESUME, &[]),
        RESUME => refuse(out, "not parked for a boot snapshot"),
        _ => refuse(
            out,
            "these tools serve only the boot snapshot handshake yet; ask again after it",
        ),
    }
}

fn answer_badly(out: &mut impl Write, kind: u8, mode: Mode) -> io::Result<()> {
    match mode.target {
        // As the real tools do before they answer: let the main thread take its `202`,
        // so that the RESUME that follows finds it holding.
        Target::Park => {
            let _ = crate::park::parked();
        }
        Target::SavedVm => {
            let _ = crate::park::resume();
        }
        Target::ResumedVm if mode.answer == Answer::RunSilent => {
            let _ = crate::park::resume();
        }
        Target::ResumedVm => {}
    }
    match mode.answer {
        Answer::WrongFrame => super::done(out, 0),
        Answer::Truncated => {
            out.write_all(&head(kind, 100))?;
            out.write_all(&[kind; 10])
        }
        Answer::Oversized => {
            out.write_all(&head(kind, MAX_CONTROL as u32 + 1))?;
            out.write_all(&[b'z'; 4096])
        }
        Answer::Silent | Answer::RunSilent => Ok(()),
    }
}

fn refuse(out: &mut impl Write, message: &str) -> io::Result<()> {
    super::control(
        out,
        REFUSE,
        json!({"code": BAD_REQUEST, "message": message}),
    )
}

/// What the port had.
#[derive(Debug)]
enum Next {
    Frame(u8, Vec<u8>),
    /// Nothing for `TICK`.
    Idle,
    /// The host is not connected: a frame it left half-sent is dropped with its
    /// connection.
    Disconnected,
}

/// The host's frames on the port, read without blocking for longer than `TICK`.
#[derive(Debug)]
struct Frames<'a> {
    port: &'a File,
    buffer: Vec<u8>,
}

impl Frames<'_> {
    fn next_frame(&mut self) -> Next {
        loop {
            if let Some(frame) = self.take() {
                return frame;
            }
            let mut poll = libc::pollfd {
                fd: self.port.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd that outlives the call.
            if unsafe { libc::poll(&mut poll, 1, TICK.as_millis() as libc::c_int) } <= 0 {
                return Next::Idle;
            }
            let mut chunk = [0u8; 4096];
            match self.port.read(&mut chunk) {
                Ok(0) | Err(_) => {
                    self.buffer.clear();
                    std::thread::sleep(TICK);
                    return Next::Disconnected;
                }
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The first whole frame in the buffer, taken out of it.
    fn take(&mut self) -> Option<Next> {
        let head: [u8; HEAD_LEN] = self.buffer.get(..HEAD_LEN)?.try_into().ok()?;
        let (kind, len) = parse_head(head);
        if len > MAX_CONTROL {
            // Not the worker's: nothing of it is a frame.
            self.buffer.clear();
            return None;
        }
        let payload = self.buffer.get(HEAD_LEN..HEAD_LEN + len)?.to_vec();
        self.buffer.drain(..HEAD_LEN + len);
        Some(Next::Frame(kind, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_name_a_frame_and_an_answer() {
        let mode = |name| Mode::parse(name).map(|m| (m.target, m.answer));
        assert_eq!(mode("park-silent"), Some((Target::Park, Answer::Silent)));
        assert_eq!(
            mode("resume-wrong-frame"),
            Some((Target::ResumedVm, Answer::WrongFrame))
        );
        assert_eq!(
            mode("save-resume-oversized"),
            Some((Target::SavedVm, Answer::Oversized))
        );
        assert_eq!(mode("park-"), None);
        assert_eq!(mode("silent"), None);
    }

    #[test]
    fn a_resume_mode_spares_the_saved_vms_resume() {
        let resumed = Mode::parse("resume-silent").expect("a mode");
        assert!(!resumed.targets(PARK, false));
        assert!(
            !resumed.targets(RESUME, true),
            "straight after PARK: the saved VM"
        );
        assert!(resumed.targets(RESUME, false), "after a SYNC: a resumed VM");
        let saved = Mode::parse("save-resume-wrong-frame").expect("a mode");
        assert!(saved.targets(RESUME, true));
        assert!(!saved.targets(RESUME, false));
    }
}
