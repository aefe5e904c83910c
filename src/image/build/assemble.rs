//! From a root tree to an image directory, and from a kernel-boot image directory to a
//! UEFI one, without loop devices or mounts (blocking). Every time stamp, UUID and hash
//! seed is fixed, so the same inputs give the same bytes.
//!
//! A kernel-boot image is `machine.json`, `kernel`, `initrd` and a raw `disk.img` that
//! is the ext4 root file system itself. A disk image (`uefi` or `bios`) is
//! `machine.json` and a raw `disk.img` with a GPT: an EFI system partition holding
//! systemd-boot, the kernel and the initramfs (and for `bios` syslinux, the partition
//! marked legacy-BIOS-bootable and syslinux's GPT boot code in the MBR), then the root
//! file system as the second partition.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::BuildError;
use super::root::{checked, checked_with_input, require};
use crate::image::Member;
use crate::job::{Firmware, InitrdMember, KernelMember, MachineDefinition};

/// Fixed so that the same tree gives the same file system.
const FS_UUID: &str = "6b8b4567-327b-4c0e-8a9a-0a1c2e3d4f51";
const HASH_SEED: &str = "0f1e2d3c-4b5a-4968-8776-655443322111";
/// What a kernel boot of a built image always gets, before the recipe's own arguments:
/// its root, both consoles (the VGA one for screenshots), and what helps under TCG.
const CMDLINE: &str =
    "root=/dev/vda rw console=tty0 console=ttyS0 quiet cryptomgr.notests no_timer_check";

const MIB: u64 = 1 << 20;
/// The EFI system partition: room for a distribution kernel, its initramfs and the
/// boot loader (FAT32 needs at least 32 MiB; the rest is sparse).
const ESP_SIZE: u64 = 128 * MIB;
/// What a UEFI disk adds to its root partition: the first MiB (the GPT, alignment),
/// the EFI system partition, and the last MiB (the backup GPT).
pub(super) const GPT_OVERHEAD: u64 = ESP_SIZE + 2 * MIB;
/// The GPT's identifiers, fixed for reproducible disks: every built disk has the same,
/// which is harmless for VMs that each see one disk.
const DISK_GUID: &str = "8C2E1F4A-5B3D-4E6F-9A0B-1C2D3E4F5A6B";
const ESP_GUID: &str = "0E5F1A2B-3C4D-4E5F-8A9B-0C1D2E3F4A5B";
const ROOT_GUID: &str = "7A1B2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D";
/// Partition types: EFI system, and Linux root (x86-64) of the Discoverable Partitions
/// Specification.
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
/// systemd-boot from the host's `systemd-boot-efi`: it runs before the guest's own
/// system, as OVMF itself does.
const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// FAT cannot hold dates before 1980; mtools stamps every entry with this.
const FAT_EPOCH: &str = "315532800";
/// syslinux's boot code for a GPT disk's protective MBR (Debian's `syslinux-common`): it
/// chains to the partition marked legacy-BIOS-bootable.
const GPT_MBR: &str = "/usr/lib/syslinux/mbr/gptmbr.bin";
/// The boot code's share of the MBR (the partition table follows).
const MBR_CODE: usize = 440;

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BuildError {
    let path = path.to_path_buf();
    move |source| BuildError::Io { what, path, source }
}

/// The one regular file in `tree/boot` whose name starts with `prefix`.
fn boot_file(tree: &Path, prefix: &str, what: &'static str) -> Result<PathBuf, BuildError> {
    let boot = tree.join("boot");
    let mut found: Vec<_> = std::fs::read_dir(&boot)
        .map_err(io_error("cannot read", &boot))?
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

/// The kernel-boot image directory of a Debian tree: the tree's kernel and initramfs as
/// members, the tree as an ext4 `disk.img` of `root_size` bytes (sparse), and
/// `machine` with the boot members and the command line (`CMDLINE`, then `extra`), which
/// it returns.
pub(super) fn kernel_image(
    tree: &Path,
    root_size: u64,
    machine: &MachineDefinition,
    extra: Option<&str>,
    image: &Path,
) -> Result<MachineDefinition, BuildError> {
    require("mkfs.ext4", "e2fsprogs")?;
    require("debugfs", "e2fsprogs")?;
    std::fs::create_dir_all(image).map_err(io_error("cannot make", image))?;
    let kernel = boot_file(tree, "vmlinuz-", "kernel (install linux-image-cloud-amd64)")?;
    let initrd = boot_file(tree, "initrd.img-", "initramfs (install initramfs-tools)")?;
    std::fs::copy(&kernel, image.join("kernel")).map_err(io_error("cannot copy", &kernel))?;
    std::fs::copy(&initrd, image.join("initrd")).map_err(io_error("cannot copy", &initrd))?;

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
            .arg(format!("{}k", root_size / 1024))
            .env("E2FSPROGS_FAKE_TIME", "1"),
    )?;
    zero_ctimes(tree, &disk)?;

    let mut machine = machine.clone();
    machine.kernel = Some(KernelMember::Kernel);
    machine.initrd = Some(InitrdMember::Initrd);
    machine.cmdline = Some(match extra {
        Some(extra) => format!("{CMDLINE} {extra}"),
        None => CMDLINE.to_owned(),
    });
    write_machine(&machine, image)?;
    Ok(machine)
}

/// Writes `machine.json` (format version 1) into `image`.
pub(super) fn write_machine(machine: &MachineDefinition, image: &Path) -> Result<(), BuildError> {
    let mut machine = machine.clone();
    machine.version = Some(1);
    let json = serde_json::to_vec_pretty(&machine)
        .unwrap_or_else(|e| unreachable!("a machine definition serializes: {e}"));
    let path = image.join("machine.json");
    std::fs::write(&path, json).map_err(io_error("cannot write", &path))
}

fn require_file(path: &'static str, package: &'static str) -> Result<(), BuildError> {
    if Path::new(path).is_file() {
        Ok(())
    } else {
        Err(BuildError::Missing {
            program: path,
            package,
        })
    }
}

/// Re-lays a kernel-boot image directory (`staged`, with `machine` as its definition)
/// out as a disk image in `image` that `firmware` boots: the kernel, the initramfs and
/// systemd-boot (and for BIOS syslinux) on an EFI system partition, `staged`'s disk as
/// the root partition, the machine without boot members and with that firmware. The
/// kernel arguments are `machine`'s, with the root named by its partition's UUID.
pub(super) fn disk_image(
    staged: &Path,
    machine: &MachineDefinition,
    firmware: Firmware,
    image: &Path,
) -> Result<(), BuildError> {
    let bios = firmware == Firmware::Bios;
    require("sfdisk", "fdisk")?;
    require("mkfs.vfat", "dosfstools")?;
    require("mcopy", "mtools")?;
    require_file(SYSTEMD_BOOT, "systemd-boot-efi")?;
    if bios {
        require("syslinux", "syslinux")?;
        require_file(GPT_MBR, "syslinux-common")?;
    }
    std::fs::create_dir_all(image).map_err(io_error("cannot make", image))?;
    let root = staged.join(Member::DiskImg.name());
    check_root_fs(&root)?;
    let root_size = std::fs::metadata(&root)
        .map_err(io_error("cannot read", &root))?
        .len()
        .div_ceil(MIB)
        * MIB;

    let esp = image.join("esp.img");
    let options = loader_options(machine.cmdline.as_deref().unwrap_or_default());
    let made = make_esp(staged, &options, bios, &esp);
    let disk = image.join(Member::DiskImg.name());
    let result = made.and_then(|()| {
        partition(&disk, root_size, bios)?;
        if bios {
            write_mbr_code(&disk)?;
        }
        splice(&esp, &disk, MIB)?;
        splice(&root, &disk, MIB + ESP_SIZE)
    });
    let _ = std::fs::remove_file(&esp);
    result?;

    let mut machine = machine.clone();
    machine.kernel = None;
    machine.initrd = None;
    machine.cmdline = None;
    machine.firmware = Some(firmware);
    write_machine(&machine, image)
}

/// systemd-boot's options line: the root by its partition UUID, then every argument of
/// the kernel boot's line except its own `root=`, `rw` and `ro`.
fn loader_options(cmdline: &str) -> String {
    let mut options = format!("root=PARTUUID={} rw", ROOT_GUID.to_ascii_lowercase());
    for word in cmdline.split_whitespace() {
        if !(word.starts_with("root=") || word == "rw" || word == "ro") {
            options.push(' ');
            options.push_str(word);
        }
    }
    options
}

/// The staged disk must be one ext4 file system (its superblock magic at 1080), not a
/// partitioned disk: only a kernel-boot image's disk can become the root partition.
fn check_root_fs(disk: &Path) -> Result<(), BuildError> {
    let mut magic = [0u8; 2];
    let read = std::fs::File::open(disk).and_then(|mut file| {
        file.seek(SeekFrom::Start(1080))?;
        file.read_exact(&mut magic)
    });
    read.map_err(io_error("cannot read", disk))?;
    if magic == [0x53, 0xef] {
        Ok(())
    } else {
        Err(BuildError::NotRootFs {
            path: disk.to_path_buf(),
        })
    }
}

/// The EFI system partition as a FAT32 file: `/EFI/BOOT/BOOTX64.EFI` (systemd-boot),
/// its loader configuration and one entry, the kernel and the initramfs; with `bios`,
/// syslinux and its configuration too.
fn make_esp(staged: &Path, options: &str, bios: bool, esp: &Path) -> Result<(), BuildError> {
    let scratch = esp.with_extension("d");
    std::fs::create_dir_all(&scratch).map_err(io_error("cannot make", &scratch))?;
    let write = |name: &str, text: &str| {
        let path = scratch.join(name);
        std::fs::write(&path, text).map_err(io_error("cannot write", &path))
    };
    write(
        "loader.conf",
        "timeout 0\ndefault qemu-worker.conf\neditor no\n",
    )?;
    write(
        "qemu-worker.conf",
        &format!(
            "title qemu-worker image\nlinux /vmlinuz\ninitrd /initrd.img\noptions {options}\n"
        ),
    )?;
    write(
        "syslinux.cfg",
        &format!(
            "DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND {options}\n"
        ),
    )?;
    let mut files: Vec<(PathBuf, &str)> = vec![
        (PathBuf::from(SYSTEMD_BOOT), "::/EFI/BOOT/BOOTX64.EFI"),
        (scratch.join("loader.conf"), "::/loader/loader.conf"),
        (
            scratch.join("qemu-worker.conf"),
            "::/loader/entries/qemu-worker.conf",
        ),
        (staged.join(Member::Kernel.name()), "::/vmlinuz"),
        (staged.join(Member::Initrd.name()), "::/initrd.img"),
    ];
    if bios {
        files.push((scratch.join("syslinux.cfg"), "::/syslinux.cfg"));
    }
    let mut total = 0;
    for (from, _) in &files {
        total += std::fs::metadata(from)
            .map_err(io_error("cannot read", from))?
            .len();
    }
    // FAT's own tables and clusters take a few MiB of the partition.
    if total > ESP_SIZE - 8 * MIB {
        return Err(BuildError::EspFull {
            bytes: total,
            room: ESP_SIZE - 8 * MIB,
        });
    }
    let result = (|| {
        checked(
            "mkfs.vfat (the EFI system partition)",
            Command::new("mkfs.vfat")
                .args(["-F", "32", "-n", "ESP", "--invariant", "-C"])
                .arg(esp)
                .arg((ESP_SIZE / 1024).to_string())
                .env("SOURCE_DATE_EPOCH", FAT_EPOCH),
        )?;
        let image = esp.display().to_string();
        checked(
            "mmd (the EFI system partition's directories)",
            Command::new("mmd")
                .args(["-i", &image])
                .args(["::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"])
                .env("SOURCE_DATE_EPOCH", FAT_EPOCH),
        )?;
        for (from, to) in &files {
            checked(
                "mcopy (into the EFI system partition)",
                Command::new("mcopy")
                    .args(["-i", &image])
                    .arg(from)
                    .arg(to)
                    .env("SOURCE_DATE_EPOCH", FAT_EPOCH),
            )?;
        }
        if bios {
            // ldlinux.sys and ldlinux.c32 into the file system and its boot sector.
            checked(
                "syslinux (into the EFI system partition)",
                Command::new("syslinux")
                    .arg("--install")
                    .arg(esp)
                    .env("SOURCE_DATE_EPOCH", FAT_EPOCH),
            )?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// A sparse `disk` with a GPT of two partitions: the EFI system partition from 1 MiB
/// (marked legacy-BIOS-bootable for `bios`), then the root partition of `root_size`
/// bytes.
fn partition(disk: &Path, root_size: u64, bios: bool) -> Result<(), BuildError> {
    let size = root_size + GPT_OVERHEAD;
    let file = std::fs::File::create(disk).map_err(io_error("cannot make", disk))?;
    file.set_len(size).map_err(io_error("cannot size", disk))?;
    drop(file);
    let sector = |bytes: u64| bytes / 512;
    let attrs = if bios {
        ", attrs=\"LegacyBIOSBootable\""
    } else {
        ""
    };
    let script = format!(
        "label: gpt\nlabel-id: {DISK_GUID}\nunit: sectors\nfirst-lba: 2048\n\
         start={}, size={}, type={ESP_TYPE}, uuid={ESP_GUID}, name=\"EFI system\"{attrs}\n\
         start={}, size={}, type={ROOT_TYPE}, uuid={ROOT_GUID}, name=\"root\"\n",
        sector(MIB),
        sector(ESP_SIZE),
        sector(MIB + ESP_SIZE),
        sector(root_size),
    );
    let script_path = disk.with_extension("sfdisk");
    std::fs::write(&script_path, script).map_err(io_error("cannot write", &script_path))?;
    let stdin = std::fs::File::open(&script_path).map_err(io_error("cannot read", &script_path));
    let result = stdin.and_then(|stdin| {
        checked_with_input(
            "sfdisk (the GPT)",
            Command::new("sfdisk")
                .args(["-q", "--no-reread", "--no-tell-kernel"])
                .arg(disk),
            stdin.into(),
        )
    });
    let _ = std::fs::remove_file(&script_path);
    result
}

/// syslinux's GPT boot code into the first 440 bytes of `disk` (its protective MBR's
/// partition entries stay as sfdisk wrote them).
fn write_mbr_code(disk: &Path) -> Result<(), BuildError> {
    let code = std::fs::read(GPT_MBR).map_err(io_error("cannot read", Path::new(GPT_MBR)))?;
    let code = code.get(..MBR_CODE).ok_or_else(|| BuildError::Io {
        what: "is shorter than an MBR's boot code",
        path: GPT_MBR.into(),
        source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
    })?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .map_err(io_error("cannot open", disk))?;
    file.write_all(code).map_err(io_error("cannot write", disk))
}

/// Copies `part` into `disk` at `offset`, leaving its zero blocks as holes.
fn splice(part: &Path, disk: &Path, offset: u64) -> Result<(), BuildError> {
    checked(
        "dd (a partition into the disk)",
        Command::new("dd")
            .arg(format!("if={}", part.display()))
            .arg(format!("of={}", disk.display()))
            .args(["bs=1M", &format!("seek={}", offset / MIB)])
            .args(["conv=notrunc,sparse", "status=none"]),
    )
}

/// `sif PATH ctime 0` for every entry of the tree, in one debugfs run.
fn zero_ctimes(tree: &Path, disk: &Path) -> Result<(), BuildError> {
    let script_path = disk.with_extension("debugfs");
    let mut script = Vec::new();
    let mut stack = vec![tree.to_path_buf()];
    let _ = writeln!(script, "sif \"/\" ctime 0");
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(io_error("cannot read", &dir))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(inside) = path.strip_prefix(tree) else {
                continue;
            };
            let name = inside.to_string_lossy();
            // debugfs quotes with `"`: a name with one keeps its ctime.
            if !name.contains('"') {
                let _ = writeln!(script, "sif \"/{name}\" ctime 0");
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    let _ = writeln!(script, "sif \"/lost+found\" ctime 0");
    std::fs::write(&script_path, script).map_err(io_error("cannot write", &script_path))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loader_names_the_root_partition_and_keeps_the_other_arguments() {
        assert_eq!(
            loader_options("root=/dev/vda rw console=ttyS0 quiet ro init=/bin/sh"),
            "root=PARTUUID=7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d rw console=ttyS0 quiet init=/bin/sh"
        );
    }
}
