//! The image's root tree: mmdebstrap, then `copy` and `run` steps (blocking).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::BuildError;
use super::recipe::{CopyStep, DebianBase};

/// Files that differ between two builds of the same packages (caches, logs, ids, byte
/// code compiled at install time) and that a booted system makes again when it needs
/// them; removed so that the same inputs give the same image.
const UNREPRODUCIBLE: &[&str] = &[
    "var/cache/apt/pkgcache.bin",
    "var/cache/apt/srcpkgcache.bin",
    "var/cache/ldconfig/aux-cache",
    "var/lib/dbus/machine-id",
    "var/log/dpkg.log",
    "var/log/alternatives.log",
    "var/log/apt/history.log",
    "var/log/apt/term.log",
    "var/log/apt/eipp.log.xz",
    "var/log/bootstrap.log",
];

/// Runs `command` (no input), capturing its output for the error.
pub(super) fn checked(what: &str, command: &mut Command) -> Result<(), BuildError> {
    checked_with_input(what, command, Stdio::null())
}

/// As `checked`, with `stdin` as the command's input.
pub(super) fn checked_with_input(
    what: &str,
    command: &mut Command,
    stdin: Stdio,
) -> Result<(), BuildError> {
    let output = command
        .stdin(stdin)
        .output()
        .map_err(|source| BuildError::Io {
            what: "cannot run",
            path: PathBuf::from(command.get_program()),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Err(BuildError::Command {
        what: what.to_owned(),
        status: output.status,
        output: text,
    })
}

pub(super) fn require(program: &'static str, package: &'static str) -> Result<(), BuildError> {
    match crate::host_path::find_on_path(program) {
        Some(_) => Ok(()),
        None => Err(BuildError::Missing { program, package }),
    }
}

/// The Debian archive the host's apt uses: the first `URIs:` / `deb` URI of its sources
/// that is not the security archive, and the security archive's.
fn host_archives() -> (String, Option<String>) {
    let mut uris = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(
            more.into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources")),
        );
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("URIs:") {
                uris.extend(rest.split_whitespace().map(str::to_owned));
            } else if let Some(rest) = line.strip_prefix("deb ") {
                // `deb [options] URI suite components`
                let rest = match rest.trim_start().strip_prefix('[') {
                    Some(options) => options.split_once(']').map_or("", |(_, r)| r),
                    None => rest,
                };
                uris.extend(rest.split_whitespace().next().map(str::to_owned));
            }
        }
    }
    let debian = uris
        .iter()
        .find(|u| u.contains("debian") && !u.contains("security"));
    let security = uris.iter().find(|u| u.contains("security")).cloned();
    let main = debian
        .or(uris.first())
        .cloned()
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned());
    (main, security)
}

/// `mmdebstrap --mode=root` of `base` into `tree`, with the host's archive.
pub(super) fn debian(base: &DebianBase, tree: &Path) -> Result<(), BuildError> {
    require("mmdebstrap", "mmdebstrap")?;
    let (main, security) = host_archives();
    let suite = &base.suite;
    let mut mirrors = vec![
        format!("deb {main} {suite} main"),
        format!("deb {main} {suite}-updates main"),
    ];
    if let Some(security) = security {
        mirrors.push(format!("deb {security} {suite}-security main"));
    }
    let packages: Vec<&str> = base.packages.iter().map(|p| p.0.as_str()).collect();
    let mut command = Command::new("mmdebstrap");
    // Downloaded packages are kept between builds (QEMU_WORKER_DEB_CACHE): a rebuild
    // then reads the archive only for what changed.
    if let Some(cache) = std::env::var_os("QEMU_WORKER_DEB_CACHE") {
        let cache = PathBuf::from(cache);
        std::fs::create_dir_all(&cache).map_err(|source| BuildError::Io {
            what: "cannot make the package cache",
            path: cache.clone(),
            source,
        })?;
        let cache = cache.display().to_string();
        command
            .arg("--skip=download/empty")
            .arg("--skip=essential/unlink")
            .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
            .arg(format!(
                "--setup-hook=sync-in '{cache}' /var/cache/apt/archives/"
            ))
            .arg(format!(
                "--customize-hook=sync-out /var/cache/apt/archives '{cache}'"
            ))
            .arg("--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb");
    }
    command
        .args(["--mode=root", "--format=directory", "--quiet"])
        .arg(format!("--variant={}", base.variant.as_str()))
        // Manual pages and documentation (but their copyright files) are not needed to
        // run CI jobs and are a fifth of a base system's files.
        .args([
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        ])
        // Fixed: mmdebstrap, dpkg and initramfs-tools stamp files with it.
        .env("SOURCE_DATE_EPOCH", "0")
        .env("LC_ALL", "C.UTF-8");
    if !packages.is_empty() {
        command.arg(format!("--include={}", packages.join(",")));
    }
    command.arg(suite).arg(tree).args(&mirrors);
    checked("mmdebstrap", &mut command)?;
    for file in UNREPRODUCIBLE {
        let _ = std::fs::remove_file(tree.join(file));
    }
    // An empty machine-id: systemd makes one at each boot of the image.
    write(&tree.join("etc/machine-id"), b"")?;
    // Python byte code compiled at install time is not reproducible; Python compiles
    // again what it imports.
    checked(
        "removing byte code",
        Command::new("find").arg(tree.join("usr")).args([
            "-name",
            "__pycache__",
            "-type",
            "d",
            "-prune",
            "-exec",
            "rm",
            "-rf",
            "{}",
            "+",
        ]),
    )?;
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    std::fs::write(path, bytes).map_err(|source| BuildError::Io {
        what: "cannot write",
        path: path.to_path_buf(),
        source,
    })
}

/// A `copy` step: `from` to `tree` + `step.to`, parents made as needed.
pub(super) fn copy(from: &Path, tree: &Path, step: &CopyStep) -> Result<(), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    let to = tree.join(step.to.trim_start_matches('/'));
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| BuildError::Io { what, path, source }
    };
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(io("cannot make", parent))?;
    }
    // Never through a link the tree holds (the tree's own `/etc/x -> /host/file`).
    if std::fs::symlink_metadata(&to).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(&to).map_err(io("cannot replace", &to))?;
    }
    std::fs::copy(from, &to).map_err(io("cannot copy", from))?;
    let mode = u32::from_str_radix(&step.mode, 8).unwrap_or(0o644);
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
        .map_err(io("cannot set the mode of", &to))
}

/// A `run` step: `sh -c COMMAND` in the tree's directory, `ROOT` naming it.
pub(super) fn run(command: &str, tree: &Path) -> Result<(), BuildError> {
    checked(
        &format!("the run step `{}`", super::first_line(command)),
        Command::new("sh")
            .arg("-ec")
            .arg(command)
            .current_dir(tree)
            .env("ROOT", tree),
    )
}
