//! `image build` with an image base and `boot` steps (docs/image-recipes.md): a step's
//! script runs in the booted test image as a job, the guest powers off, and its disk is
//! the new image's; a step that fails fails the build and leaves nothing behind.

use std::path::Path;

use engine_tests::{Job, Worker, assets};
use qemu_worker::job::ResultState;

/// A recipe in the worker's directory whose base is the test image.
fn recipe(worker: &Worker, steps: &str) -> std::path::PathBuf {
    let path = worker.dir().join("recipe.yml");
    let text = format!(
        "base: {{image: {}}}\nsteps:\n{steps}output: {{}}\n",
        assets::test_image().display()
    );
    std::fs::write(&path, text).expect("recipe");
    path
}

/// `image build RECIPE DIR/built.tar.zst` with the worker's configuration: the output's
/// path, the exit code and stderr.
fn build(worker: &Worker, recipe: &Path) -> (std::path::PathBuf, Option<i32>, String) {
    let out = worker.dir().join("built.tar.zst");
    let built = worker.cli(&[
        "image",
        "build",
        &recipe.display().to_string(),
        &out.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&built.stderr).into_owned();
    (out, built.status.code(), stderr)
}

/// What a build may leave in the output's directory besides the output: nothing.
fn scratch_left(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".image-build."))
        .collect()
}

#[test]
fn a_boot_step_writes_into_the_image_and_a_job_on_the_built_image_sees_it() {
    let worker = Worker::new();
    let recipe = recipe(
        &worker,
        "  - boot: {script: 'echo made-by-a-boot-step > /etc/qw-marker; rm /etc/motd || true', maxRunTime: 120}\n",
    );
    let (out, code, stderr) = build(&worker, &recipe);
    assert_eq!(code, Some(0), "image build failed: {stderr}");
    assert!(out.is_file(), "{stderr}");
    assert!(scratch_left(worker.dir()).is_empty(), "{stderr}");

    // The built image is a kernel-boot image like its base, with the step's change in.
    let inspect = worker.cli(&["image", "inspect", "--json", &out.display().to_string()]);
    let report: serde_json::Value = serde_json::from_slice(&inspect.stdout)
        .unwrap_or_else(|e| panic!("inspect: {e}: {}", String::from_utf8_lossy(&inspect.stderr)));
    assert_eq!(report["contents"]["kernel"], true, "{report}");

    // A worker that allows the build's directory runs a job on it.
    let config = engine_tests::config_with_images(&format!(
        "{{allowedLocalDirs: [{{allowed}}, {}]}}",
        worker.dir().display()
    ));
    let runner = Worker::with_config(&config);
    let outcome = Job::script("cat /etc/qw-marker; ls /etc/motd 2>&1 || echo motd-gone")
        .image(&out.display().to_string())
        .run(&runner);
    assert_eq!(outcome.state(), ResultState::Completed, "{outcome}");
    let log = outcome.log();
    assert!(log.contains("made-by-a-boot-step"), "{log}");
    assert!(log.contains("motd-gone"), "{log}");
    worker.assert_clean();
    runner.assert_clean();
}

#[test]
fn a_boot_step_that_fails_fails_the_build_and_leaves_nothing() {
    let worker = Worker::new();
    let recipe = recipe(
        &worker,
        "  - boot: {script: 'echo half-done > /etc/partial; echo about to fail; exit 7', maxRunTime: 120}\n",
    );
    let (out, code, stderr) = build(&worker, &recipe);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("boot step 0 (echo half-done") && stderr.contains("the script exited 7"),
        "{stderr}"
    );
    // The step's own output is in the error, for the recipe's author.
    assert!(stderr.contains("about to fail"), "{stderr}");
    assert!(!out.exists());
    assert!(scratch_left(worker.dir()).is_empty(), "{stderr}");
    worker.assert_clean();
}
