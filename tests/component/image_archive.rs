//! Image archives: every hostile case is refused naming the entry, nothing is written
//! outside the destination, and pack → unpack round-trips sparse disks.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use qemu_worker::image::{
    DiskLayout, ImageLimits, ImageProblem, PackError, UnpackError, Unpacked, pack_image,
    unpack_archive,
};
use tar::EntryType;
use test_support::archive::RawTar;

const LIMITS: ImageLimits = ImageLimits {
    max_image_bytes: 64 << 20,
};

fn qemu_img(args: &[&str]) {
    let status = Command::new("qemu-img")
        .args(args)
        .status()
        .expect("qemu-img is missing: install it with `apt-get install qemu-utils`");
    assert!(status.success(), "qemu-img {args:?} failed");
}

/// A scratch area: `dest` is where unpacking goes, `work` holds inputs.
struct Scratch {
    root: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(root.path().join("dest")).expect("dest");
        std::fs::create_dir(root.path().join("work")).expect("work");
        Self { root }
    }

    fn dest(&self) -> PathBuf {
        self.root.path().join("dest")
    }

    fn work(&self, name: &str) -> PathBuf {
        self.root.path().join("work").join(name)
    }

    fn qcow2(&self, name: &str, extra: &[&str]) -> Vec<u8> {
        let path = self.work(name);
        let path_str = path.to_str().expect("utf-8");
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[path_str, "16M"]);
        qemu_img(&args);
        std::fs::read(&path).expect("read qcow2")
    }

    /// Nothing may appear next to `dest` or `work`, whatever the archive said.
    fn assert_nothing_outside_dest(&self) {
        let mut names: Vec<String> = std::fs::read_dir(self.root.path())
            .expect("root")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["dest", "work"]);
    }
}

const MACHINE: &[u8] = br#"{"version": 1, "memory": 128}"#;

fn valid(s: &Scratch) -> RawTar {
    RawTar::default().file("machine.json", MACHINE).entry(
        b"disk.qcow2",
        EntryType::Regular,
        &s.qcow2("base.qcow2", &[]),
    )
}

/// Unpacks into a fresh `dest`, as the cache does.
fn unpack(s: &Scratch, archive: &[u8]) -> Result<Unpacked, UnpackError> {
    let _ = std::fs::remove_dir_all(s.dest());
    std::fs::create_dir(s.dest()).expect("dest");
    unpack_archive(archive, &s.dest(), LIMITS)
}

/// Unpacks `archive`, expects it refused, and returns the problems.
fn rejected(s: &Scratch, archive: &[u8]) -> Vec<ImageProblem> {
    let result = unpack(s, archive);
    s.assert_nothing_outside_dest();
    match result {
        Err(UnpackError::Rejected(problems)) => problems,
        other => panic!("expected the archive to be rejected, got {other:?}"),
    }
}

fn assert_entry_problem(problems: &[ImageProblem], entry: &str, needle: &str) {
    assert!(
        problems
            .iter()
            .any(|p| p.entry.as_deref() == Some(entry) && p.message.contains(needle)),
        "no problem for entry {entry:?} containing {needle:?} in {problems:#?}"
    );
}

#[test]
fn a_valid_archive_unpacks_and_is_hashed() {
    let s = Scratch::new();
    let archive = valid(&s).zst();
    let unpacked = unpack(&s, &archive).expect("valid image");
    assert_eq!(unpacked.archive_bytes, archive.len() as u64);
    let expected = {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(&archive).into();
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert_eq!(unpacked.sha256, expected);
    assert_eq!(unpacked.contents.disk, DiskLayout::Qcow2);
    assert_eq!(unpacked.contents.machine.memory, Some(128));
    assert_eq!(unpacked.contents.disks[0].virtual_size, 16 << 20);
}

#[test]
fn path_escapes_are_refused() {
    let s = Scratch::new();
    let problems = rejected(&s, &valid(&s).file("../evil", b"x").zst());
    assert_entry_problem(&problems, "../evil", "`..`");
    let problems = rejected(&s, &valid(&s).file("/etc/evil", b"x").zst());
    assert_entry_problem(&problems, "/etc/evil", "absolute path");
    let problems = rejected(&s, &valid(&s).file("sub/../../evil", b"x").zst());
    assert_entry_problem(&problems, "sub/../../evil", "`..`");
}

#[test]
fn links_devices_fifos_and_directories_are_refused() {
    let s = Scratch::new();
    let cases: [(RawTar, &str, &str); 6] = [
        (
            valid(&s).link("kernel", EntryType::Symlink, "/etc/shadow"),
            "kernel",
            "symbolic link",
        ),
        (
            valid(&s).link("initrd", EntryType::Link, "machine.json"),
            "initrd",
            "hard link",
        ),
        (
            valid(&s).entry(b"kernel", EntryType::Char, b""),
            "kernel",
            "character device",
        ),
        (
            valid(&s).entry(b"kernel", EntryType::Block, b""),
            "kernel",
            "block device",
        ),
        (
            valid(&s).entry(b"kernel", EntryType::Fifo, b""),
            "kernel",
            "FIFO",
        ),
        (
            valid(&s).entry(b"layer.qcow2/", EntryType::Directory, b""),
            "layer.qcow2/",
            "directory",
        ),
    ];
    for (archive, entry, kind) in cases {
        let problems = rejected(&s, &archive.zst());
        assert_entry_problem(&problems, entry, kind);
    }
}

#[test]
fn duplicates_and_unknown_names_are_refused() {
    let s = Scratch::new();
    let problems = rejected(&s, &valid(&s).file("machine.json", MACHINE).zst());
    assert_entry_problem(&problems, "machine.json", "more than once");
    let problems = rejected(&s, &valid(&s).file("notes.txt", b"hi").zst());
    assert_entry_problem(&problems, "notes.txt", "not an image member");
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let s = Scratch::new();
    let archive = valid(&s)
        .file("../a", b"x")
        .link("b", EntryType::Symlink, "/")
        .file("c.txt", b"x")
        .zst();
    let problems = rejected(&s, &archive);
    assert_eq!(problems.len(), 3, "{problems:#?}");
}

#[test]
fn corrupt_and_truncated_archives_are_refused() {
    let s = Scratch::new();
    let problems = rejected(&s, &valid(&s).tar());
    assert!(
        problems[0]
            .message
            .contains("not a valid zstd-compressed tar"),
        "{problems:?}"
    );
    let full = valid(&s).zst();
    let problems = rejected(&s, &full[..full.len() / 2]);
    assert!(
        problems[0]
            .message
            .contains("not a valid zstd-compressed tar"),
        "{problems:?}"
    );
    let mut flipped = full.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xff;
    rejected(&s, &flipped);
}

#[test]
fn machine_json_must_exist_fit_and_be_valid() {
    let s = Scratch::new();
    let qcow2 = s.qcow2("base.qcow2", &[]);
    let missing = RawTar::default()
        .entry(b"disk.qcow2", EntryType::Regular, &qcow2)
        .zst();
    let problems = rejected(&s, &missing);
    assert!(
        problems
            .iter()
            .any(|p| p.message.contains("no machine.json")),
        "{problems:?}"
    );

    let oversize = vec![b' '; (1 << 20) + 1];
    let problems = rejected(
        &s,
        &RawTar::default()
            .file("machine.json", &oversize)
            .entry(b"disk.qcow2", EntryType::Regular, &qcow2)
            .zst(),
    );
    assert_entry_problem(&problems, "machine.json", "over the limit of 1048576 bytes");

    let invalid = RawTar::default()
        .file("machine.json", br#"{"version": 1, "graphics": "cga"}"#)
        .entry(b"disk.qcow2", EntryType::Regular, &qcow2)
        .zst();
    let problems = rejected(&s, &invalid);
    assert_entry_problem(&problems, "machine.json", "/graphics");
}

#[test]
fn a_qcow2_backed_by_a_host_file_is_refused() {
    let s = Scratch::new();
    let hostile = s.qcow2("hostile.qcow2", &["-F", "raw", "-b", "/etc/hostname", "-u"]);
    let archive = RawTar::default()
        .file("machine.json", MACHINE)
        .entry(b"disk.qcow2", EntryType::Regular, &hostile)
        .zst();
    let problems = rejected(&s, &archive);
    assert_entry_problem(
        &problems,
        "disk.qcow2",
        "must not have a backing file (it names \"/etc/hostname\")",
    );
}

#[test]
fn a_layer_must_be_backed_by_disk_img_exactly() {
    let s = Scratch::new();
    let raw = vec![0u8; 1 << 20];
    let wrong = s.qcow2("layer.qcow2", &["-F", "raw", "-b", "/etc/hostname", "-u"]);
    let archive = RawTar::default()
        .file("machine.json", MACHINE)
        .entry(b"disk.img", EntryType::Regular, &raw)
        .entry(b"layer.qcow2", EntryType::Regular, &wrong)
        .zst();
    let problems = rejected(&s, &archive);
    assert_entry_problem(
        &problems,
        "layer.qcow2",
        "must have the backing file disk.img",
    );

    let right = s.qcow2("layer-ok.qcow2", &["-F", "raw", "-b", "disk.img", "-u"]);
    let archive = RawTar::default()
        .file("machine.json", MACHINE)
        .entry(b"disk.img", EntryType::Regular, &raw)
        .entry(b"layer.qcow2", EntryType::Regular, &right)
        .zst();
    let unpacked = unpack(&s, &archive).expect("taskcluster layout is valid");
    assert_eq!(unpacked.contents.disk, DiskLayout::Raw { layer: true });
}

#[test]
fn an_external_data_file_is_refused() {
    let s = Scratch::new();
    let data_file = s.work("data.raw");
    let option = format!("data_file={}", data_file.display());
    let hostile = s.qcow2("external.qcow2", &["-o", &option]);
    let archive = RawTar::default()
        .file("machine.json", MACHINE)
        .entry(b"disk.qcow2", EntryType::Regular, &hostile)
        .zst();
    let problems = rejected(&s, &archive);
    assert_entry_problem(&problems, "disk.qcow2", "external data file");
}

#[test]
fn a_disk_that_is_not_its_declared_format_is_refused() {
    let s = Scratch::new();
    let archive = RawTar::default()
        .file("machine.json", MACHINE)
        .file("disk.qcow2", b"this is not a qcow2 image")
        .zst();
    let problems = rejected(&s, &archive);
    assert_entry_problem(&problems, "disk.qcow2", "not a qcow2 image");
}

#[test]
fn size_caps_apply_while_streaming() {
    let s = Scratch::new();
    let big = vec![1u8; 2 << 20];
    let archive = RawTar::default()
        .file("machine.json", MACHINE)
        .entry(b"disk.img", EntryType::Regular, &big)
        .zst();
    let small = ImageLimits {
        max_image_bytes: 1 << 20,
    };
    let result = unpack_archive(&archive[..], &s.dest(), small);
    s.assert_nothing_outside_dest();
    match result {
        Err(UnpackError::Rejected(problems)) => {
            assert_entry_problem(&problems, "disk.img", "over the limit")
        }
        other => panic!("expected a size problem, got {other:?}"),
    }
}

#[test]
fn a_decompression_bomb_after_the_tar_is_refused() {
    let s = Scratch::new();
    let mut tar = valid(&s).tar();
    tar.extend(std::iter::repeat_n(0u8, 8 << 20));
    let archive = zstd::encode_all(&tar[..], 19).expect("compress");
    let problems = rejected(&s, &archive);
    assert!(
        problems
            .iter()
            .any(|p| p.message.contains("after the end of the tar")),
        "{problems:?}"
    );
}

#[test]
fn kernel_members_must_match_machine_json() {
    let s = Scratch::new();
    let archive = valid(&s).file("kernel", b"k").zst();
    let problems = rejected(&s, &archive);
    assert_entry_problem(&problems, "kernel", "does not set `kernel`");
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("metadata").blocks() * 512
}

#[test]
fn pack_then_unpack_keeps_sparse_disks_sparse_and_is_deterministic() {
    let s = Scratch::new();
    let image = s.work("image");
    std::fs::create_dir(&image).expect("image dir");
    std::fs::write(
        image.join("machine.json"),
        br#"{"version": 1, "kernel": "kernel"}"#,
    )
    .expect("machine");
    std::fs::write(image.join("kernel"), b"not really a kernel").expect("kernel");
    let disk = image.join("disk.img");
    {
        use std::io::{Seek, SeekFrom};
        let mut file = std::fs::File::create(&disk).expect("disk");
        // 40 scattered data blocks: more regions than fit in the header (4) and one
        // extension block (21), so extension chaining is exercised.
        for i in 0..40u64 {
            file.seek(SeekFrom::Start(i * (1 << 20))).expect("seek");
            file.write_all(&[i as u8 + 1; 4096]).expect("write");
        }
        file.set_len(48 << 20).expect("size");
    }
    let first = s.work("a.tar.zst");
    let second = s.work("b.tar.zst");
    pack_image(&image, &first, LIMITS).expect("pack");
    pack_image(&image, &second, LIMITS).expect("pack again");
    assert_eq!(
        std::fs::read(&first).expect("a"),
        std::fs::read(&second).expect("b"),
        "pack is not deterministic"
    );

    let archive = std::fs::read(&first).expect("archive");
    let unpacked = unpack(&s, &archive).expect("packed image unpacks");
    let out = s.dest().join("disk.img");
    assert_eq!(
        std::fs::read(&out).expect("out"),
        std::fs::read(&disk).expect("in")
    );
    assert!(
        allocated_bytes(&out) < 4 << 20,
        "unpacked disk is not sparse: {} bytes allocated",
        allocated_bytes(&out)
    );
    assert!(unpacked.contents.kernel_files().is_some());

    // GNU tar reads the same archive (sparse map included).
    let gnu = s.work("gnu");
    std::fs::create_dir(&gnu).expect("gnu dir");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "zstd -qdc '{}' | tar -xf - -C '{}'",
            first.display(),
            gnu.display()
        ))
        .status()
        .expect("sh runs");
    assert!(
        status.success(),
        "GNU tar could not extract the packed archive"
    );
    assert_eq!(
        std::fs::read(gnu.join("disk.img")).expect("gnu disk"),
        std::fs::read(&disk).expect("in")
    );
    assert_eq!(
        std::fs::read(gnu.join("kernel")).expect("gnu kernel"),
        b"not really a kernel"
    );
}

#[test]
fn pack_refuses_a_directory_that_would_not_unpack() {
    let s = Scratch::new();
    let image = s.work("bad-image");
    std::fs::create_dir(&image).expect("dir");
    std::fs::write(image.join("machine.json"), b"{\"version\": 1}").expect("machine");
    std::fs::write(image.join("README"), b"hi").expect("readme");
    std::os::unix::fs::symlink("/etc/shadow", image.join("disk.img")).expect("symlink");
    let out = s.work("bad.tar.zst");
    match pack_image(&image, &out, LIMITS) {
        Err(PackError::Rejected { problems, .. }) => {
            assert_entry_problem(&problems, "README", "not an image member");
            assert_entry_problem(&problems, "disk.img", "not a regular file");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!out.exists());
}
