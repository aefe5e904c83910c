//! Checks of the test host: std only.

use std::path::Path;
use std::process::{Command, Stdio};

/// Fails the test with the package to install when `program` is missing (it need not
/// know `--version`: `openssl` does not; that it starts is enough).
pub fn require(program: &str, package: &str) {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "`{program}` is missing: install it with `apt-get install {package}` \
         (scripts/setup-host installs everything the tests need)"
    );
}

/// Fails the test with the package to install when the file `path` is missing (OVMF's
/// firmware files, for one).
pub fn require_file(path: &Path, package: &str) {
    assert!(
        path.is_file(),
        "{} is missing: install it with `apt-get install {package}` \
         (scripts/setup-host installs everything the tests need)",
        path.display()
    );
}

/// Processes whose command line mentions `dir` (QEMU, the guestfwd helpers, which run in
/// a session of their own, workers), as "PID: command line", this process excluded.
/// Tests give every VM paths under their own scratch directory, so this finds exactly
/// their leftovers.
pub fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let own = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!("{pid}: {}", cmdline.trim()));
        }
    }
    found
}

/// Resident set size of a process in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
