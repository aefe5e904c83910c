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
