//! The CLI contract: subcommands, output forms and exit codes (DESIGN §4).

use std::path::Path;
use std::process::{Command, Output};

fn qemu_worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("qemu-worker runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn validate_accepts_a_good_payload() {
    let output = qemu_worker(&["validate", "examples/hello.yml"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.starts_with("examples/hello.yml: valid\n"), "{text}");
    assert!(text.contains("1024 MiB"), "{text}");
}

#[test]
fn validate_reports_every_mistake_in_both_forms() {
    let output = qemu_worker(&["validate", "examples/malformed.yml"]);
    assert_eq!(output.status.code(), Some(2));
    let text = stdout(&output);
    let expected = [
        "/image (line 3): file: URLs are not accepted",
        "/maxRunTime (line 5): -5 is less than the minimum of 1",
        "/env/1A (line 7): invalid name `1A`",
        "/env/CI (line 9): duplicate key `CI`; it is already defined on line 8",
        "/machine/memory (line 11): machine memory 4096 MiB is larger than the allowed 1024 MiB (set by the payload)",
        "/machine/graphics (line 12): \"cga\" is not one of: none, VGA,",
        "/artifacts/0/path (line 14): \"relative/path\" is not an absolute path",
        "/artifacts/1/name (line 15): artifact name `../escape` must not contain `..`",
        "/colour (line 16): unknown field `colour`",
    ];
    assert!(
        text.starts_with(&format!(
            "examples/malformed.yml: {} problems\n",
            expected.len()
        )),
        "{text}"
    );
    for line in expected {
        assert!(
            text.contains(&format!("  {line}")),
            "missing {line:?} in:\n{text}"
        );
    }

    let output = qemu_worker(&["validate", "--json", "examples/malformed.yml"]);
    assert_eq!(output.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    assert_eq!(report["valid"], false);
    let paths: Vec<&str> = report["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["path"].as_str().expect("path"))
        .collect();
    assert_eq!(
        paths,
        [
            "/image",
            "/maxRunTime",
            "/env/1A",
            "/env/CI",
            "/machine/memory",
            "/machine/graphics",
            "/artifacts/0/path",
            "/artifacts/1/name",
            "/colour"
        ]
    );
}

#[test]
fn validate_reads_standard_input() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qemu-worker"))
        .args(["validate", "--json", "-"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(
            br#"{"image": "https://x.test/i.tar.zst", "command": ["true"], "maxRunTime": 10}"#,
        )
        .expect("write");
    let output = child.wait_with_output().expect("wait");
    assert_eq!(output.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(report["valid"], true);
    assert_eq!(report["machine"]["memory"], 1024);
    assert!(
        report["machine"]["mac"]
            .as_str()
            .expect("mac")
            .starts_with("52:54:00:")
    );
}

#[test]
fn a_missing_payload_is_a_usage_error() {
    let output = qemu_worker(&["validate", "does-not-exist.yml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("failed to read payload \"does-not-exist.yml\""),
        "{}",
        stderr(&output)
    );
}

#[test]
fn bad_usage_exits_2() {
    assert_eq!(qemu_worker(&["no-such-command"]).status.code(), Some(2));
    assert_eq!(qemu_worker(&["validate"]).status.code(), Some(2));
}

#[test]
fn an_invalid_config_names_key_and_line_and_exits_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("worker.yml");
    std::fs::write(&config, "capacity: 0\nlimits: {maxMemory: 64, maxCPUs: 1, defaultThreads: 1}\nnetwork: {backend: vde}\n")
        .expect("write config");
    let output = qemu_worker(&[
        "validate",
        "--config",
        config.to_str().expect("utf-8"),
        "examples/hello.yml",
    ]);
    assert_eq!(output.status.code(), Some(3));
    let err = stderr(&output);
    assert!(err.contains("worker.yml is invalid:"), "{err}");
    assert!(
        err.contains("/capacity (line 1): 0 is less than the minimum of 1"),
        "{err}"
    );
    assert!(
        err.contains("/network/backend (line 3): \"vde\" is not one of: user, tap"),
        "{err}"
    );
}

#[test]
fn schema_writes_the_committed_schemas() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = qemu_worker(&["schema", "--out", dir.path().to_str().expect("utf-8")]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let mut count = 0;
    for entry in std::fs::read_dir(dir.path()).expect("out dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name");
        let written = std::fs::read_to_string(&path).expect("written");
        let expected = std::fs::read_to_string(committed.join(name)).expect("committed copy");
        assert_eq!(written, expected, "{name:?} differs from schemas/");
        count += 1;
    }
    assert_eq!(count, qemu_worker::schema::schema_files().len());
}

/// A worker.yml whose state lives in `dir`, allowing local images from `dir/images`.
fn config_in(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("worker.yml");
    std::fs::create_dir_all(dir.join("images")).expect("images dir");
    std::fs::write(
        &config,
        "stateDir: state\nimages: {allowedLocalDirs: [images]}\n",
    )
    .expect("config");
    config
}

fn make_image_dir(dir: &Path) -> std::path::PathBuf {
    let image = dir.join("image");
    std::fs::create_dir_all(&image).expect("image dir");
    std::fs::write(image.join("machine.json"), br#"{"version": 1}"#).expect("machine");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(image.join("disk.qcow2"))
        .arg("16M")
        .status()
        .expect("qemu-img is missing: install it with `apt-get install qemu-utils`");
    assert!(status.success());
    image
}

#[test]
fn image_pack_inspect_pull_list_prune() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_in(dir.path());
    let config = config.to_str().expect("utf-8");
    let image = make_image_dir(dir.path());
    let archive = dir.path().join("images/ci.tar.zst");
    let archive_str = archive.to_str().expect("utf-8");

    let output = qemu_worker(&[
        "--config",
        config,
        "image",
        "pack",
        image.to_str().expect("utf-8"),
        archive_str,
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    let output = qemu_worker(&[
        "--config",
        config,
        "image",
        "inspect",
        "--json",
        archive_str,
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(report["valid"], true);
    assert_eq!(report["contents"]["disk"], "qcow2");
    let sha = report["sha256"].as_str().expect("sha256").to_owned();

    let output = qemu_worker(&["--config", config, "image", "pull", archive_str]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).starts_with(&sha), "{}", stdout(&output));

    let output = qemu_worker(&["--config", config, "image", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(listed[0]["sha256"], sha.as_str());

    let output = qemu_worker(&["--config", config, "image", "prune"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let output = qemu_worker(&["--config", config, "image", "list", "--json"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&output.stdout).expect("JSON"),
        serde_json::json!([])
    );
}

#[test]
fn image_inspect_lists_every_problem_and_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = make_image_dir(dir.path());
    std::fs::write(image.join("notes.txt"), b"x").expect("extra");
    let output = qemu_worker(&[
        "image",
        "pack",
        image.to_str().expect("utf-8"),
        "/dev/null/never",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("entry \"notes.txt\": is not an image member"),
        "{}",
        stderr(&output)
    );

    // A hostile archive made by hand: a symlink and an unknown member.
    let tarball = dir.path().join("bad.tar");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && ln -s /etc/shadow kernel && tar -cf '{}' machine.json disk.qcow2 kernel notes.txt && zstd -q --rm '{}'",
            image.display(),
            tarball.display(),
            tarball.display()
        ))
        .status()
        .expect("sh");
    assert!(status.success());
    let output = qemu_worker(&[
        "image",
        "inspect",
        dir.path().join("bad.tar.zst").to_str().expect("utf-8"),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("invalid image, 2 problems"), "{text}");
    assert!(
        text.contains("entry \"kernel\": is a symbolic link"),
        "{text}"
    );
    assert!(
        text.contains("entry \"notes.txt\": is not an image member"),
        "{text}"
    );
}
