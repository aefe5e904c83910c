//! The malformed-payload matrix: bad payloads and bad images, each resolved
//! `exception/malformed-payload` with the exact error path, and never a VM.

use std::path::Path;

use engine_tests::assets::{pinned, sha256_hex, test_image};
use engine_tests::{Job, Worker, config_with_images};
use qemu_worker::job::{ExceptionReason, ResultState};
use tar::EntryType;
use test_support::archive::RawTar;

const MACHINE: &[u8] = br#"{"version": 1, "memory": 128}"#;

/// A raw disk that is an image's only disk.
fn disk() -> Vec<u8> {
    vec![0u8; 64 << 10]
}

/// The hostile archives, generated here and pinned in engine-tests/assets.json.
fn hostile(dir: &Path) -> Vec<(&'static str, std::path::PathBuf)> {
    let ok = || RawTar::default().file("machine.json", MACHINE);
    let generated: Vec<(&'static str, Vec<u8>)> = vec![
        (
            "tar-symlink",
            ok().file("disk.img", &disk())
                .link("kernel", EntryType::Symlink, "/etc/passwd")
                .zst(),
        ),
        (
            "tar-parent-path",
            ok().file("disk.img", &disk()).file("../escape", b"x").zst(),
        ),
        (
            "tar-absolute-path",
            ok().file("disk.img", &disk())
                .file("/etc/cron.d/x", b"x")
                .zst(),
        ),
        (
            "tar-device",
            ok().file("disk.img", &disk())
                .entry(b"initrd", EntryType::Char, b"")
                .zst(),
        ),
        (
            "no-machine-json",
            RawTar::default().file("disk.img", &disk()).zst(),
        ),
        (
            "oversize-machine-json",
            RawTar::default()
                .file("machine.json", &vec![b' '; 2 << 20])
                .file("disk.img", &disk())
                .zst(),
        ),
        (
            "invalid-machine-json",
            RawTar::default()
                .file("machine.json", br#"{"version": 1, "memory": "lots"}"#)
                .file("disk.img", &disk())
                .zst(),
        ),
        (
            "machine-json-over-limits",
            RawTar::default()
                .file("machine.json", br#"{"version": 1, "memory": 8192}"#)
                .file("disk.img", &disk())
                .zst(),
        ),
    ];
    generated
        .into_iter()
        .map(|(name, bytes)| (name, pinned(dir, name, &bytes)))
        .collect()
}

/// A qcow2 disk whose backing file is a host file (made with the real qemu-img).
fn qcow2_backed_by_host_file(dir: &Path) -> std::path::PathBuf {
    let disk = dir.join("hostile.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "/etc/hostname",
        ])
        .arg(&disk)
        .arg("1M")
        .status()
        .expect("qemu-img (apt-get install qemu-utils)");
    assert!(status.success());
    let bytes = RawTar::default()
        .file("machine.json", MACHINE)
        .file("disk.qcow2", &std::fs::read(&disk).expect("qcow2"))
        .zst();
    let path = dir.join("qcow2-backing.tar.zst");
    std::fs::write(&path, bytes).expect("archive");
    path
}

/// Serves 404 for everything on 127.0.0.1; returns the base URL.
fn not_found_server() -> String {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("http server");
    let url = format!("http://{}", server.server_addr());
    std::thread::spawn(move || {
        for request in server.incoming_requests() {
            let _ = request.respond(tiny_http::Response::empty(404));
        }
    });
    url
}

/// A piece of the message each case must give (the path alone could hide a different
/// error at the same place).
fn expected_message(case: &str) -> &'static str {
    match case {
        "missing command" => "missing required field `command`",
        "empty command" => "less than 1 item",
        "maxRunTime zero" => "less than the minimum of 1",
        "maxRunTime not a number" => "not of type \\\"integer\\\"",
        "unknown field" => "unknown field `colour`",
        "outbound network on a worker that does not allow it" => {
            "does not allow outbound network access"
        }
        "relative artifact path" => "not an absolute path",
        "artifact name escapes" => "must not contain `..`",
        "unknown artifact type" => "not one of: file, directory",
        "memory over the worker's limit" => "larger than the allowed 256 MiB (set by the payload)",
        "unknown display adapter" => "not one of: none, VGA",
        "unknown machine field" => "unknown field `turbo`",
        "not a mapping" => "not of type \\\"object\\\"",
        "not YAML at all" => "not valid YAML or JSON",
        "file: URL" => "file: URLs are not accepted",
        "local path not allowed" => "outside the allowed image directories",
        "local path that does not exist" => "cannot be read",
        "image URL answers 404" => "refused with HTTP 404",
        "image hash mismatch" => "but the payload requires",
        "corrupt zstd" => "image: the archive is not a valid zstd-compressed tar",
        "qcow2 backed by a host file" => "must not have a backing file",
        "hostile image tar-symlink" => "entry \\\"kernel\\\": is a symbolic link",
        "hostile image tar-parent-path" => "has a `..` path component",
        "hostile image tar-absolute-path" => "has an absolute path",
        "hostile image tar-device" => "entry \\\"initrd\\\": is a character device",
        "hostile image no-machine-json" => "image: the image has no machine.json",
        "hostile image oversize-machine-json" => "over the limit of 1048576 bytes",
        "hostile image invalid-machine-json" => "\\\"lots\\\" is not of type",
        "hostile image machine-json-over-limits" => "(set by the image's machine.json)",
        other => panic!("no expected message for case {other:?}"),
    }
}

#[test]
fn malformed_payloads_and_images_are_resolved_without_a_vm() {
    let worker = Worker::with_config(&config_with_images(
        "{allowedLocalDirs: [{allowed}, '{dir}/assets']}",
    ));
    let assets = worker.dir().join("assets");
    std::fs::create_dir_all(&assets).expect("assets dir");
    let image = test_image().display().to_string();
    let http = not_found_server();
    let corrupt = assets.join("corrupt.tar.zst");
    std::fs::write(&corrupt, b"\x28\xb5\x2f\xfd this is not zstd").expect("corrupt");
    let good_hash = sha256_hex(&std::fs::read(test_image()).expect("image"));
    let wrong_hash = sha256_hex(b"something else");
    assert_ne!(good_hash, wrong_hash);

    let mut cases: Vec<(String, Job, &str)> = vec![
        // Schema and semantic errors in the payload itself.
        (
            "missing command".into(),
            Job::raw(&format!("image: {image}\nmaxRunTime: 10\n")),
            "/command",
        ),
        (
            "empty command".into(),
            Job::raw(&format!("image: {image}\ncommand: []\nmaxRunTime: 10\n")),
            "/command",
        ),
        (
            "maxRunTime zero".into(),
            Job::script("true").max_run_time(0),
            "/maxRunTime",
        ),
        (
            "maxRunTime not a number".into(),
            Job::raw(&format!(
                "image: {image}\ncommand: [\"true\"]\nmaxRunTime: ten\n"
            )),
            "/maxRunTime",
        ),
        (
            "unknown field".into(),
            Job::script("true").extra("colour: blue"),
            "/colour",
        ),
        (
            "outbound network on a worker that does not allow it".into(),
            Job::script("true").extra("network: {outbound: true}"),
            "/network/outbound",
        ),
        (
            "relative artifact path".into(),
            Job::script("true").file_artifact("relative/path", "public/a"),
            "/artifacts/0/path",
        ),
        (
            "artifact name escapes".into(),
            Job::script("true").file_artifact("/a", "../escape"),
            "/artifacts/0/name",
        ),
        (
            "unknown artifact type".into(),
            Job::script("true").extra("artifacts:\n  - {type: blob, path: /a, name: a}"),
            "/artifacts/0/type",
        ),
        (
            "memory over the worker's limit".into(),
            Job::script("true").extra("machine: {memory: 4096}"),
            "/machine/memory",
        ),
        (
            "unknown display adapter".into(),
            Job::script("true").extra("machine: {graphics: cga}"),
            "/machine/graphics",
        ),
        (
            "unknown machine field".into(),
            Job::script("true").extra("machine: {turbo: true}"),
            "/machine/turbo",
        ),
        ("not a mapping".into(), Job::raw("- just\n- a list\n"), ""),
        ("not YAML at all".into(), Job::raw("image: [unclosed\n"), ""),
        // Where the image comes from.
        (
            "file: URL".into(),
            Job::script("true").image("file:///etc/shadow"),
            "/image",
        ),
        (
            "local path not allowed".into(),
            Job::script("true").image("/etc/hostname"),
            "/image",
        ),
        (
            "local path that does not exist".into(),
            Job::script("true").image(&format!("{}/nothing-here.tar.zst", assets.display())),
            "/image",
        ),
        (
            "image URL answers 404".into(),
            Job::script("true").image(&format!("{http}/missing.tar.zst")),
            "/image",
        ),
        (
            "image hash mismatch".into(),
            Job::raw(&format!(
                "image: {{url: {image}, sha256: {wrong_hash}}}\ncommand: [\"true\"]\nmaxRunTime: 10\n"
            )),
            "/image",
        ),
        (
            "corrupt zstd".into(),
            Job::script("true").image(&corrupt.display().to_string()),
            "/image",
        ),
        (
            "qcow2 backed by a host file".into(),
            Job::script("true").image(&qcow2_backed_by_host_file(&assets).display().to_string()),
            "/image",
        ),
    ];
    for (name, path) in hostile(&assets) {
        let expected = if name == "machine-json-over-limits" {
            "/machine/memory"
        } else {
            "/image"
        };
        cases.push((
            format!("hostile image {name}"),
            Job::script("true").image(&path.display().to_string()),
            expected,
        ));
    }
    assert!(cases.len() >= 25, "the matrix has {} cases", cases.len());

    let mut failures = Vec::new();
    for (name, job, path) in &cases {
        let needle = expected_message(name);
        let outcome = job.run(&worker);
        let paths = outcome.error_paths();
        let ok = outcome.exit_code == Some(2)
            && outcome.state() == ResultState::Exception
            && outcome.reason() == Some(ExceptionReason::MalformedPayload)
            && !paths.is_empty()
            && paths.iter().all(|p| p == path)
            && outcome.error_messages().contains(needle)
            && !outcome.vm_started();
        if !ok {
            failures.push(format!(
                "{name}: expected malformed-payload at {path:?} saying {needle:?} without a VM; got exit {:?}, \
                 {}/{}, paths {paths:?}, VM started: {}\n  {}",
                outcome.exit_code,
                outcome.state(),
                outcome.reason().map_or("no reason", ExceptionReason::as_str),
                outcome.vm_started(),
                outcome.error_messages()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    worker.assert_clean();
    // Nothing half-unpacked stays in the cache after all those refusals.
    let listed = worker.cli(&["image", "list"]);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout)
            .lines()
            .filter(|l| l.contains("nothing-here"))
            .count(),
        0
    );
}
