//! The suite's assets, in one manifest (`engine-tests/assets.json`): the test image (a
//! reproducible build from Debian packages, identified by its build key) and the
//! hostile archives the cases generate, each pinned by sha256 so that a change to a
//! generator is noticed rather than silently testing something else.

use std::path::{Path, PathBuf};

use sha2::Digest;

/// The test image built by `images/build-test-image`.
pub fn test_image() -> PathBuf {
    let path = super::workspace().join("images/out/qemu-worker-test.tar.zst");
    assert!(
        path.is_file(),
        "the test image is missing: run images/build-test-image (scripts/test does)"
    );
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
