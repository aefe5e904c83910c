use rustix::process::{Pid, Signal, kill_process};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long [`kill_strays`] waits for a killed process to be gone.
const GONE_WITHIN: Duration = Duration::from_secs(2);

/// Kills every QEMU or guestfwd helper whose command line names a path under `dir`, and
/// waits (bounded) until they are gone. The helpers need this: slirp starts them in a
/// session of their own, so killing QEMU's process group misses them, and one blocked on
/// a half-closed connection would outlive its VM. Returns how many it killed.
pub fn kill_strays(dir: &Path) -> usize {
    let needle = format!("{}/", dir.display());
    let killed: Vec<Pid> = ours_naming(&needle)
        .into_iter()
        .filter(|pid| kill_process(*pid, Signal::KILL).is_ok())
        .collect();
    let deadline = Instant::now() + GONE_WITHIN;
    // A killed process is gone once its command line is: zombies have none.
    while killed.iter().any(|pid| names(*pid, &needle)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    killed.len()
}

fn ours_naming(needle: &str) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(Pid::from_raw)
        .filter(|pid| names(*pid, needle))
        .collect()
}

/// Whether `pid` is a QEMU or a guestfwd helper with `needle` in its command line.
fn names(pid: Pid, needle: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", pid.as_raw_nonzero())) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("qemu-system") || cmdline.contains("metadata-splice"))
        && cmdline.contains(needle)
}
