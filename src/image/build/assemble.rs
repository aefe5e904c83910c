//! From a root tree to an image directory (`machine.json`, `disk.img`, `kernel`,
//! `initrd`), with fixed time stamps, UUID and hash seed (blocking).

use std::io::Write;
use std::path::Path;
use std::process::Command;

use super::BuildError;
use super::recipe::Output;
use super::root::{checked, require};
use crate::job::{InitrdMember, KernelMember};

/// Fixed so that the same tree gives the same file system.
const FS_UUID: &str = "6b8b4567-327b-4c0e-8a9a-0a1c2e3d4f51";
const HASH_SEED: &str = "0f1e2d3c-4b5a-4968-8776-655443322111";
/// What a kernel boot of a built image always gets, before the recipe's own arguments:
/// its root, both consoles (the VGA one for screenshots), and what helps under TCG.
const CMDLINE: &str =
    "root=/dev/vda rw console=tty0 console=ttyS0 quiet cryptomgr.notests no_timer_check";

/// The one regular file in `tree/boot` whose name starts with `prefix`.
fn boot_file(
    tree: &Path,
    prefix: &str,
    what: &'static str,
) -> Result<std::path::PathBuf, BuildError> {
    let boot = tree.join("boot");
    let mut found: Vec<_> = std::fs::read_dir(&boot)
        .map_err(|source| BuildError::Io {
            what: "cannot read",
            path: boot.clone(),
            source,
        })?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(BuildError::BootFiles {
            what,
            found: if found.is_empty() {
                format!("no /boot/{prefix}*")
            } else {
                format!("{found:?}")
            },
        }),
    }
}

/// The image directory of a kernel boot: the tree's kernel and initramfs as members, the
/// tree as an ext4 `disk.img` of `output.disk_size` (sparse).
pub(super) fn kernel_boot(tree: &Path, output: &Output, image: &Path) -> Result<(), BuildError> {
    require("mkfs.ext4", "e2fsprogs")?;
    require("debugfs", "e2fsprogs")?;
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| BuildError::Io { what, path, source }
    };
    std::fs::create_dir_all(image).map_err(io("cannot make", image))?;
    let kernel = boot_file(tree, "vmlinuz-", "kernel (install linux-image-cloud-amd64)")?;
    let initrd = boot_file(tree, "initrd.img-", "initramfs (install initramfs-tools)")?;
    std::fs::copy(&kernel, image.join("kernel")).map_err(io("cannot copy", &kernel))?;
    std::fs::copy(&initrd, image.join("initrd")).map_err(io("cannot copy", &initrd))?;

    // Every time stamp to 0; mkfs copies each file's ctime, which touch cannot set, so
    // it is zeroed in the file system afterwards.
    checked(
        "setting the tree's time stamps",
        Command::new("find")
            .arg(tree)
            .args(["-exec", "touch", "-h", "-d", "@0", "{}", "+"]),
    )?;
    let disk = image.join("disk.img");
    checked(
        "mkfs.ext4",
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "qwroot", "-b", "4096", "-U", FS_UUID])
            .args(["-E", &format!("hash_seed={HASH_SEED}")])
            .arg("-d")
            .arg(tree)
            .arg(&disk)
            .arg(format!("{}k", output.disk_size.bytes() / 1024))
            .env("E2FSPROGS_FAKE_TIME", "1"),
    )?;
    zero_ctimes(tree, &disk)?;

    let mut machine = output.machine.clone();
    machine.version = Some(1);
    machine.kernel = Some(KernelMember::Kernel);
    machine.initrd = Some(InitrdMember::Initrd);
    machine.cmdline = Some(match &output.cmdline {
        Some(extra) => format!("{CMDLINE} {extra}"),
        None => CMDLINE.to_owned(),
    });
    let json = serde_json::to_vec_pretty(&machine)
        .unwrap_or_else(|e| unreachable!("a machine definition serializes: {e}"));
    let path = image.join("machine.json");
    std::fs::write(&path, json).map_err(io("cannot write", &path))
}

/// `sif PATH ctime 0` for every entry of the tree, in one debugfs run.
fn zero_ctimes(tree: &Path, disk: &Path) -> Result<(), BuildError> {
    let script_path = disk.with_extension("debugfs");
    let mut script = Vec::new();
    let mut stack = vec![tree.to_path_buf()];
    let _ = writeln!(script, "sif \"/\" ctime 0");
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| BuildError::Io {
            what: "cannot read",
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(inside) = path.strip_prefix(tree) else {
                continue;
            };
            let name = inside.to_string_lossy();
            // debugfs quotes with `"`: a name with one keeps its ctime (reported below).
            if !name.contains('"') {
                let _ = writeln!(script, "sif \"/{name}\" ctime 0");
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    let _ = writeln!(script, "sif \"/lost+found\" ctime 0");
    std::fs::write(&script_path, script).map_err(|source| BuildError::Io {
        what: "cannot write",
        path: script_path.clone(),
        source,
    })?;
    let result = checked(
        "debugfs (zeroing ctimes)",
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&script_path)
            .arg(disk)
            .env("E2FSPROGS_FAKE_TIME", "1"),
    );
    let _ = std::fs::remove_file(&script_path);
    result
}
