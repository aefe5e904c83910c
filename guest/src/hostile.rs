//! Hostile guest tools, for the worker's tests only (feature `hostile`): the agent port
//! answers a request the way an adversary's tools would, for the paths the job lists in
//! `/tmp/qw-hostile` as `PATH MODE` lines; and, in an image that names a mode in
//! `/etc/qw-hostile-park`, the boot snapshot handshake is answered as that mode says
//! (`handshake` below: it comes at boot, before the job could write anything).
//! Everything else behaves as in the real tools. The guest is root and may replace the
//! tools with anything; these are the cases the host must survive with its budgets
//! (docs/security.md).

use std::io::{self, Write};
use std::time::Duration;

use serde_json::{Value, json};

use qemu_worker_protocol::agent::{DATA, DONE, END, FILE, REFUSE, SKIP};

use crate::agent::write_frame;

mod handshake;

const MODES: &str = "/tmp/qw-hostile";

fn control(out: &mut impl Write, kind: u8, value: Value) -> io::Result<()> {
    write_frame(out, kind, value.to_string().as_bytes())
}

/// `F`, one `D` of `data` (if any), then `E` claiming `claimed` bytes.
fn file(out: &mut impl Write, name: &str, data: &[u8], claimed: usize) -> io::Result<()> {
    control(out, FILE, json!({"name": name, "size": claimed}))?;
    if !data.is_empty() {
        write_frame(out, DATA, data)?;
    }
    control(out, END, json!({"size": claimed, "sha256": null}))
}

fn done(out: &mut impl Write, files: usize) -> io::Result<()> {
    control(out, DONE, json!({"files": files, "bytes": 0}))
}

/// Answers `path` in its hostile mode, if the job gave it one; `false` to answer it
/// honestly.
pub fn answer(out: &mut impl Write, path: &str) -> io::Result<bool> {
    let Ok(modes) = std::fs::read_to_string(MODES) else {
        return Ok(false);
    };
    let Some(mode) = modes.lines().find_map(|line| {
        let (p, mode) = line.split_once(' ')?;
        (p == path).then(|| mode.trim().to_owned())
    }) else {
        return Ok(false);
    };
    match mode.as_str() {
        // Skipped entries without end.
        "skipped-flood" => {
            for n in 0u64.. {
                let name = format!("link-{n:012}");
                control(
                    out,
                    SKIP,
                    json!({"name": name, "reason": "is a symbolic link (not followed)"}),
                )?;
            }
        }
        // 200,000 empty files.
        "many-entries" => {
            for n in 0..200_000u32 {
                file(out, &format!("d{}/f{n:06}", n / 1000), b"", 0)?;
            }
            done(out, 200_000)?;
        }
        // One byte every 50 s.
        "slow" => {
            control(out, FILE, json!({"name": "", "size": 1000}))?;
            loop {
                write_frame(out, DATA, b"x")?;
                out.flush()?;
                std::thread::sleep(Duration::from_secs(50));
            }
        }
        // Says 10 bytes, sends 5, ends claiming 10.
        "lying-size" => {
            file(out, "", b"12345", 10)?;
            done(out, 1)?;
        }
        // A file that never ends.
        "endless-data" => {
            control(out, FILE, json!({"name": "", "size": u64::MAX / 2}))?;
            let chunk = vec![b'y'; 1 << 20];
            loop {
                write_frame(out, DATA, &chunk)?;
            }
        }
        // A frame header announcing 4 GiB, then some of it.
        "oversized-frame" => {
            control(out, FILE, json!({"name": "", "size": 100}))?;
            out.write_all(&[DATA, 0xff, 0xff, 0xff, 0xf0])?;
            out.write_all(&[b'z'; 4096])?;
        }
        // Names that must never reach the host's file system as given.
        "bad-names" => {
            let names = [
                "../escape",
                "/etc/passwd",
                "a/../../b",
                "a//b",
                ".",
                "a/./b",
            ];
            for name in names {
                file(out, name, b"!", 1)?;
            }
            done(out, names.len())?;
        }
        // The same name twice.
        "duplicate-names" => {
            file(out, "same", b"!", 1)?;
            file(out, "same", b"!", 1)?;
            done(out, 2)?;
        }
        other => {
            let message = format!("unknown hostile mode {other}");
            control(
                out,
                REFUSE,
                json!({"code": "bad-request", "message": message}),
            )?;
        }
    }
    Ok(true)
}
