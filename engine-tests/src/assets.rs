//! The suite's assets, in one manifest (`engine-tests/assets.json`): the test image (a
//! reproducible build from Debian packages, identified by its build key) and the
//! hostile archives the cases generate, each pinned by sha256 so that a change to a
//! generator is noticed rather than silently testing something else.

use std::path::{Path, PathBuf};

use sha2::Digest;

/// The test image built by `images/build-test-image`, checked once per process against
/// the manifest: built from the pinned inputs, it must be byte-identical to the pinned
/// sha256 (the recipe is reproducible); built from other inputs (a changed recipe or
/// newer Debian packages) it is used as is, and the harness says so on stderr.
pub fn test_image() -> PathBuf {
    static CHECKED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CHECKED.get_or_init(check_test_image).clone()
}

fn check_test_image() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let out = super::workspace().join("images/out");
    let path = out.join("qemu-worker-test.tar.zst");
    let meta = std::fs::metadata(&path).unwrap_or_else(|_| {
        panic!("the test image is missing: run images/build-test-image (scripts/test does)")
    });
    // The recipe names each build after the hash of its inputs and links the current one.
    let key = std::fs::read_dir(&out)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.metadata().is_ok_and(|m| m.ino() == meta.ino()))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("qemu-worker-test-")?
                .strip_suffix(".tar.zst")
                .map(str::to_owned)
        })
        .next()
        .unwrap_or_default();
    let manifest = manifest();
    let pinned_key = manifest["testImage"]["inputs"].as_str().unwrap_or_default();
    let pinned_sha = manifest["testImage"]["sha256"].as_str().unwrap_or_default();
    let bytes = std::fs::read(&path).expect("read the test image");
    let actual = sha256_hex(&bytes);
    if key == pinned_key {
        assert_eq!(
            actual, pinned_sha,
            "the test image was built from the pinned inputs {key} but is not byte-identical \
             to the pinned build: the recipe is no longer reproducible"
        );
    } else {
        eprintln!(
            "engine-tests: the test image was built from inputs {key} (sha256 {actual}), not \
             the pinned {pinned_key}; if the recipe changed on purpose, pin these in \
             engine-tests/assets.json"
        );
    }
    path
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn manifest() -> serde_json::Value {
    let path = super::workspace().join("engine-tests/assets.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Writes a generated asset as `dir/name.tar.zst` after checking its bytes against the
/// hash pinned for `name` in the manifest; returns the path.
pub fn pinned(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let manifest = manifest();
    let actual = sha256_hex(bytes);
    let expected = manifest["generated"][name]["sha256"]
        .as_str()
        .unwrap_or_else(|| {
            panic!("engine-tests/assets.json pins no asset {name:?} (its sha256 is {actual})")
        });
    assert_eq!(
        actual, expected,
        "asset {name:?} is not what engine-tests/assets.json pins: if its generator changed \
         on purpose, pin the new hash"
    );
    let path = dir.join(format!("{name}.tar.zst"));
    std::fs::write(&path, bytes).expect("write asset");
    path
}

/// The test image with hostile guest tools: the guest crate built with its `hostile`
/// feature (guest/src/hostile.rs) put in place of the real tools (`swapped_image`).
pub fn hostile_image() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| swapped_image("hostile", &[(hostile_tools(), GUEST_TOOLS)]))
        .clone()
}

/// [`hostile_image`] whose tools answer the boot snapshot handshake as `mode` says
/// (`park-silent`, `resume-wrong-frame`, ...: guest/src/hostile/handshake.rs), named in
/// the image's `/etc/qw-hostile-park`: the handshake comes at boot, before a job's
/// command could tell the tools anything.
pub fn hostile_park_image(mode: &str) -> PathBuf {
    let dir = super::workspace().join("target/hostile-park");
    std::fs::create_dir_all(&dir).expect("target/hostile-park");
    let file = dir.join(mode);
    std::fs::write(&file, format!("{mode}\n")).expect("the mode file");
    swapped_image(
        &format!("hostile-park-{mode}"),
        &[
            (hostile_tools(), GUEST_TOOLS),
            (file, "/etc/qw-hostile-park"),
        ],
    )
}

/// Where the test image has the guest tools.
const GUEST_TOOLS: &str = "/usr/bin/qemu-worker-guest";

/// The guest tools built with the `hostile` feature, once per process (the build itself
/// is cargo's: it does nothing when the sources did not change; the images made from
/// them are named after their hash).
fn hostile_tools() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_hostile_tools).clone()
}

fn build_hostile_tools() -> PathBuf {
    use std::process::Command;
    super::require("zstd", "zstd");
    let workspace = super::workspace();
    // One build at a time (nextest runs each case in a process of its own).
    std::fs::create_dir_all(workspace.join("target")).expect("target dir");
    let lock = std::fs::File::create(workspace.join("target/.hostile-guest.lock")).expect("lock");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("lock");

    // A target dir of its own: the test image's recipe hashes the real tools' binary.
    let target_dir = workspace.join("target/hostile-guest");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .args([
            "build",
            "--release",
            "--locked",
            "--quiet",
            "-p",
            "qemu-worker-guest",
        ])
        .args([
            "--features",
            "hostile",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the hostile guest tools failed");
    target_dir.join("x86_64-unknown-linux-gnu/release/qemu-worker-guest")
}

/// The test image whose init sends the guest tools' output nowhere, as systemd sends a
/// service's to the journal: nothing of theirs reaches the serial console.
pub fn quiet_tools_image() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let init = std::fs::read_to_string(super::workspace().join("images/test-image/init"))
                .expect("images/test-image/init");
            let tools = "      /usr/bin/qemu-worker-guest\n";
            assert!(
                init.contains(tools),
                "the test image's init starts the tools"
            );
            let quiet = init.replace(tools, "      /usr/bin/qemu-worker-guest >/dev/null 2>&1\n");
            let dir = super::workspace().join("target/quiet-tools");
            std::fs::create_dir_all(&dir).expect("target/quiet-tools");
            let path = dir.join("init");
            std::fs::write(&path, quiet).expect("init");
            swapped_image("quiet-tools", &[(path, "/init")])
        })
        .clone()
}

/// The test image with `files` (host file, guest path) written over its disk with
/// debugfs, nothing else changed: `qemu-worker-test-LABEL-KEY.tar.zst` next to the test
/// image, built once per set of inputs under a lock (nextest runs each case in a
/// process of its own).
fn swapped_image(label: &str, files: &[(PathBuf, &str)]) -> PathBuf {
    use std::process::Command;
    let test_image = test_image();
    let out = test_image.parent().expect("images/out").to_path_buf();
    let lock = std::fs::File::create(out.join(format!(".{label}.lock"))).expect("lock file");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("lock");
    let key = {
        let mut inputs = sha256_hex(&std::fs::read(&test_image).expect("test image"));
        for (file, guest) in files {
            inputs.push_str(guest);
            inputs.push_str(&sha256_hex(&std::fs::read(file).expect("swapped file")));
        }
        sha256_hex(inputs.as_bytes())
    };
    let target = out.join(format!("qemu-worker-test-{label}-{}.tar.zst", &key[..16]));
    if target.exists() {
        return target;
    }
    let work = tempfile::Builder::new()
        .prefix("qw-swapped")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let image_dir = work.path().join("image");
    std::fs::create_dir(&image_dir).expect("image dir");
    let unpacked = Command::new("sh")
        .arg("-c")
        .arg("zstd -dcq \"$1\" | tar -x -C \"$2\"")
        .args([
            "sh",
            test_image.to_str().expect("utf-8"),
            image_dir.to_str().expect("utf-8"),
        ])
        .status()
        .expect("tar");
    assert!(unpacked.success(), "unpacking the test image failed");
    let script = work.path().join("swap.debugfs");
    let commands: String = files
        .iter()
        .map(|(file, guest)| {
            format!(
                "rm {guest}\nwrite {} {guest}\nsif {guest} mode 0100755\n",
                file.display()
            )
        })
        .collect();
    std::fs::write(&script, commands).expect("debugfs script");
    let swapped = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script)
        .arg(image_dir.join("disk.img"))
        .output()
        .expect("`debugfs` is missing: install it with `apt-get install e2fsprogs`");
    assert!(
        swapped.status.success() && !String::from_utf8_lossy(&swapped.stderr).contains("rror"),
        "debugfs could not write {files:?} into the image: {}",
        String::from_utf8_lossy(&swapped.stderr)
    );
    let partial = target.with_extension("partial");
    let packed = Command::new(super::worker_binary())
        .args(["image", "pack"])
        .arg(&image_dir)
        .arg(&partial)
        .output()
        .expect("image pack");
    assert!(
        packed.status.success(),
        "packing the {label} image failed: {}",
        String::from_utf8_lossy(&packed.stderr)
    );
    std::fs::rename(&partial, &target).expect("rename");
    target
}

/// `images/out/debian-12-ci.tar.zst`, built by `images/build-image
/// images/recipes/debian-12-ci.yml` (scripts/test builds it before the suite).
pub fn debian_ci_image() -> PathBuf {
    let path = super::workspace().join("images/out/debian-12-ci.tar.zst");
    assert!(
        path.is_file(),
        "{} is missing: build it with `images/build-image images/recipes/debian-12-ci.yml` \
         (needs root and `apt-get install mmdebstrap`)",
        path.display()
    );
    path
}

/// `images/out/debian-12-cloud.tar.zst`: Debian 12 as a stock cloud image (cloud-init,
/// no guest tools inside, a UEFI disk), built by `images/build-image
/// images/recipes/debian-12-cloud.yml`.
pub fn debian_cloud_image() -> PathBuf {
    let path = super::workspace().join("images/out/debian-12-cloud.tar.zst");
    assert!(
        path.is_file(),
        "{} is missing: build it with `images/build-image images/recipes/debian-12-cloud.yml` \
         (needs root and what scripts/setup-host installs)",
        path.display()
    );
    path
}

/// `images/out/qemu-worker-guest`: the static guest tools that images/build-image
/// builds, which a worker serves to cloud-init images.
pub fn guest_tools() -> PathBuf {
    let path = super::workspace().join("images/out/qemu-worker-guest");
    assert!(
        path.is_file(),
        "{} is missing: images/build-image builds it (run any recipe, e.g. \
         `images/build-image images/recipes/debian-12-cloud.yml`)",
        path.display()
    );
    path
}

/// `images/out/debian-12-ci-FIRMWARE.tar.zst` (`uefi` or `bios`): debian-12-ci as a GPT
/// disk, built by `images/build-image images/recipes/debian-12-ci-FIRMWARE.yml` (after
/// debian-12-ci).
pub fn debian_ci_disk_image(firmware: &str) -> PathBuf {
    let path = super::workspace().join(format!("images/out/debian-12-ci-{firmware}.tar.zst"));
    assert!(
        path.is_file(),
        "{} is missing: build it with `images/build-image images/recipes/debian-12-ci-{firmware}.yml` \
         (after debian-12-ci.yml; needs `apt-get install fdisk dosfstools mtools systemd-boot-efi \
         syslinux syslinux-common ovmf`, which scripts/setup-host installs)",
        path.display()
    );
    path
}
