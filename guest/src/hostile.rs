//! Hostile guest tools, for the worker's tests only (feature `hostile`): the agent port
//! answers a request the way an adversary's tools would, for the paths the job lists in
//! `/tmp/qw-hostile` as `PATH MODE` lines. Everything else behaves as in the real tools.
//! The guest is root and may replace the tools with anything; these are the cases the
//! host must survive with its budgets (docs/security.md).

use std::io::{self, Write};
use std::time::Duration;

use crate::agent::write_frame;

const MODES: &str = "/tmp/qw-hostile";

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
    let json = |value: serde_json::Value| value.to_string().into_bytes();
    match mode.as_str() {
        // Skipped entries without end.
        "skipped-flood" => {
            for n in 0u64.. {
                let skipped = json(serde_json::json!({
                    "name": format!("link-{n:012}"), "reason": "is a symbolic link (not followed)"
                }));
                write_frame(out, b'K', &skipped)?;
            }
        }
        // 200,000 empty files.
        "many-entries" => {
            for n in 0..200_000u32 {
                let name = format!("d{}/f{n:06}", n / 1000);
                write_frame(
                    out,
                    b'F',
                    &json(serde_json::json!({"name": name, "size": 0})),
                )?;
                write_frame(
                    out,
                    b'E',
                    &json(serde_json::json!({"size": 0, "sha256": null})),
                )?;
            }
            write_frame(
                out,
                b'Z',
                &json(serde_json::json!({"files": 200_000, "bytes": 0})),
            )?;
        }
        // One byte every 50 s.
        "slow" => {
            write_frame(
                out,
                b'F',
                &json(serde_json::json!({"name": "", "size": 1000})),
            )?;
            loop {
                write_frame(out, b'D', b"x")?;
                out.flush()?;
                std::thread::sleep(Duration::from_secs(50));
            }
        }
        // Says 10 bytes, sends 5, ends claiming 10.
        "lying-size" => {
            write_frame(
                out,
                b'F',
                &json(serde_json::json!({"name": "", "size": 10})),
            )?;
            write_frame(out, b'D', b"12345")?;
            write_frame(
                out,
                b'E',
                &json(serde_json::json!({"size": 10, "sha256": null})),
            )?;
            write_frame(
                out,
                b'Z',
                &json(serde_json::json!({"files": 1, "bytes": 10})),
            )?;
        }
        // A file that never ends.
        "endless-data" => {
            write_frame(
                out,
                b'F',
                &json(serde_json::json!({"name": "", "size": u64::MAX / 2})),
            )?;
            let chunk = vec![b'y'; 1 << 20];
            loop {
                write_frame(out, b'D', &chunk)?;
            }
        }
        // A frame header announcing 4 GiB, then some of it.
        "oversized-frame" => {
            write_frame(
                out,
                b'F',
                &json(serde_json::json!({"name": "", "size": 100})),
            )?;
            out.write_all(&[b'D', 0xff, 0xff, 0xff, 0xf0])?;
            out.write_all(&[b'z'; 4096])?;
        }
        // Names that must never reach the host's file system as given.
        "bad-names" => {
            for name in [
                "../escape",
                "/etc/passwd",
                "a/../../b",
                "a//b",
                ".",
                "a/./b",
            ] {
                write_frame(
                    out,
                    b'F',
                    &json(serde_json::json!({"name": name, "size": 1})),
                )?;
                write_frame(out, b'D', b"!")?;
                write_frame(
                    out,
                    b'E',
                    &json(serde_json::json!({"size": 1, "sha256": null})),
                )?;
            }
            write_frame(
                out,
                b'Z',
                &json(serde_json::json!({"files": 6, "bytes": 6})),
            )?;
        }
        // The same name twice.
        "duplicate-names" => {
            for _ in 0..2 {
                write_frame(
                    out,
                    b'F',
                    &json(serde_json::json!({"name": "same", "size": 1})),
                )?;
                write_frame(out, b'D', b"!")?;
                write_frame(
                    out,
                    b'E',
                    &json(serde_json::json!({"size": 1, "sha256": null})),
                )?;
            }
            write_frame(
                out,
                b'Z',
                &json(serde_json::json!({"files": 2, "bytes": 2})),
            )?;
        }
        other => {
            let message = format!("unknown hostile mode {other}");
            write_frame(
                out,
                b'X',
                &json(serde_json::json!({"code": "bad-request", "message": message})),
            )?;
        }
    }
    Ok(true)
}
