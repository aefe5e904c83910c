//! `qemu-worker image build` (docs/image-recipes.md): a bad recipe is refused with every
//! problem and its path before anything is built; a step that fails fails the build and
//! leaves nothing behind; the same recipe and package versions give the same archive.

use std::path::Path;

use sha2::Digest;
use std::process::{Command, Output};

fn build(recipe: &str, out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
        .args(["image", "build", recipe])
        .arg(out)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        // Shared with images/build-image: a rebuild reads the archive only for what changed.
        .env(
            "QEMU_WORKER_DEB_CACHE",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("images/out/cache/debs"),
        )
        .output()
        .expect("qemu-worker runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn require_mmdebstrap() {
    test_support::host::require("mmdebstrap", "mmdebstrap");
}

#[test]
fn a_bad_recipe_is_refused_with_every_problem_and_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.tar.zst");
    let output = build("tests/recipes/broken.yml", &out);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let text = text(&output);
    for expected in [
        "/base/debian/packages/0 (line 3)",
        "/steps/0/copy/to (line 5)",
        "/steps/0/copy/from (line 5): cannot read",
        "/steps/1/shell (line 6): unknown field `shell`",
        "/output/diskSize (line 8)",
    ] {
        assert!(text.contains(expected), "{expected} in:\n{text}");
    }
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
}

/// Two builds of tests/recipes/tiny.yml give the same sha256; a `run` step that fails
/// fails the build, names the step, and leaves neither the output nor a scratch dir.
#[test]
fn the_same_recipe_builds_the_same_image_and_a_failing_step_leaves_nothing() {
    require_mmdebstrap();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut hashes = Vec::new();
    for n in 0..2 {
        let out = dir.path().join(format!("tiny-{n}.tar.zst"));
        let output = build("tests/recipes/tiny.yml", &out);
        assert!(output.status.success(), "{}", text(&output));
        let bytes = std::fs::read(&out).expect("the image");
        let digest = sha2::Sha256::digest(&bytes);
        hashes.push(
            digest
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
        );
        let inspected = Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
            .args(["image", "inspect", "--json"])
            .arg(&out)
            .output()
            .expect("inspect");
        assert!(inspected.status.success(), "{}", text(&inspected));
        let report: serde_json::Value =
            serde_json::from_slice(&inspected.stdout).expect("inspect --json");
        assert_eq!(
            report["contents"]["machine"]["kernel"], "kernel",
            "{report}"
        );
        assert_eq!(report["contents"]["machine"]["memory"], 256, "{report}");
    }
    assert_eq!(hashes[0], hashes[1], "two builds of one recipe differ");

    let out = dir.path().join("failed.tar.zst");
    let output = build("tests/recipes/failing.yml", &out);
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    let message = text(&output);
    assert!(
        message.contains("the run step `echo failing-step; exit 3`"),
        "{message}"
    );
    assert!(
        message.contains("failing-step"),
        "the step's output is shown: {message}"
    );
    assert!(!out.exists());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".image-build"))
        .collect();
    assert!(left.is_empty(), "scratch left: {left:?}");
}

#[test]
fn a_uefi_disk_from_an_image_base_is_reproducible_and_laid_out_for_ovmf() {
    disk_from_an_image_base("uefi");
}

#[test]
fn a_bios_disk_from_an_image_base_is_reproducible_and_laid_out_for_seabios() {
    disk_from_an_image_base("bios");
}

/// The test image (built by images/build-test-image) as an image base, laid out as a
/// GPT disk (`boot`: uefi or bios) twice: the same sha256, a GPT with the EFI system
/// partition and the root, systemd-boot and a loader entry naming the root by its
/// partition UUID, and a machine with that firmware and no kernel member; for BIOS also
/// syslinux on the partition, marked legacy-BIOS-bootable, and syslinux's GPT boot code
/// in the MBR. No guest is booted (engine-tests boot debian-12-ci's disks).
fn disk_from_an_image_base(boot: &str) {
    for (program, package) in [("sfdisk", "fdisk"), ("mtype", "mtools")] {
        test_support::host::require(program, package);
    }
    // mkfs.fat has no --version to probe it with.
    test_support::host::require_file(Path::new("/usr/sbin/mkfs.fat"), "dosfstools");
    let gpt_mbr = Path::new("/usr/lib/syslinux/mbr/gptmbr.bin");
    if boot == "bios" {
        test_support::host::require("syslinux", "syslinux");
        test_support::host::require_file(gpt_mbr, "syslinux-common");
    }
    test_support::host::require_file(
        Path::new("/usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
        "systemd-boot-efi",
    );
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/out/qemu-worker-test.tar.zst");
    assert!(
        base.is_file(),
        "{} is missing: run images/build-test-image",
        base.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = dir.path().join("disk.yml");
    std::fs::write(
        &recipe,
        format!(
            "base: {{image: {}}}\noutput: {{boot: {boot}, cmdline: extra.arg=1}}\n",
            base.display()
        ),
    )
    .expect("recipe");
    let mut hashes = Vec::new();
    for n in 0..2 {
        let out = dir.path().join(format!("disk-{n}.tar.zst"));
        let output = build(&recipe.display().to_string(), &out);
        assert!(output.status.success(), "{}", text(&output));
        let digest = sha2::Sha256::digest(std::fs::read(&out).expect("the image"));
        hashes.push(digest.to_vec());
    }
    assert_eq!(hashes[0], hashes[1], "two builds of one recipe differ");

    let unpacked = dir.path().join("unpacked");
    std::fs::create_dir(&unpacked).expect("dir");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "zstd -qdc '{}' | tar -xSf - -C '{}'",
            dir.path().join("disk-0.tar.zst").display(),
            unpacked.display()
        ))
        .status()
        .expect("zstd | tar");
    assert!(status.success());
    let mut members: Vec<String> = std::fs::read_dir(&unpacked)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    members.sort();
    assert_eq!(members, ["disk.img", "machine.json"]);
    let machine: serde_json::Value =
        serde_json::from_slice(&std::fs::read(unpacked.join("machine.json")).expect("machine"))
            .expect("JSON");
    assert_eq!(machine["firmware"], boot, "{machine}");
    assert!(
        machine.get("kernel").is_none() && machine.get("cmdline").is_none(),
        "{machine}"
    );

    let disk = unpacked.join("disk.img");
    let table = Command::new("sfdisk")
        .arg("-d")
        .arg(&disk)
        .output()
        .expect("sfdisk");
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.contains("label: gpt"), "{table}");
    assert!(
        table.contains(
            "start=        2048, size=      262144, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
        ),
        "{table}"
    );
    assert!(
        table.contains(
            "type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=7A1B2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D"
        ),
        "{table}"
    );
    let esp = format!("{}@@1M", disk.display());
    let read = |path: &str| {
        let output = Command::new("mtype")
            .args(["-i", &esp, path])
            .output()
            .expect("mtype");
        assert!(output.status.success(), "{path}: {}", text(&output));
        output.stdout
    };
    let entry = String::from_utf8(read("::/loader/entries/qemu-worker.conf")).expect("text");
    assert!(
        entry.contains("options root=PARTUUID=7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d rw ")
            && entry.contains("init=/init")
            && entry.ends_with(" extra.arg=1\n")
            && !entry.contains("root=/dev/vda"),
        "{entry}"
    );
    let loader = read("::/EFI/BOOT/BOOTX64.EFI");
    assert_eq!(&loader[..2], b"MZ", "systemd-boot is a PE binary");
    if boot == "bios" {
        assert!(table.contains("attrs=\"LegacyBIOSBootable\""), "{table}");
        let config = String::from_utf8(read("::/syslinux.cfg")).expect("text");
        assert!(
            config.contains("APPEND root=PARTUUID=7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d rw "),
            "{config}"
        );
        assert!(!read("::/ldlinux.sys").is_empty(), "syslinux is installed");
        let code = std::fs::read(gpt_mbr).expect("gptmbr.bin");
        let mbr = std::fs::read(&disk).expect("disk");
        assert_eq!(
            mbr[..440],
            code[..440],
            "syslinux's GPT boot code in the MBR"
        );
    } else {
        assert!(!table.contains("LegacyBIOSBootable"), "{table}");
    }
    // The root partition is the base's file system: ext4's magic at 1080.
    let root = std::fs::read(&disk).expect("disk");
    let at = (129 << 20) + 1080;
    assert_eq!(&root[at..at + 2], [0x53, 0xef]);
}
