//! What a build does with the worker's engine: fetch an image base, and run each `boot`
//! step as a job whose disk is kept (`JobRun::keep_disk`). The engine works on state of
//! the build's own: a private image cache in the scratch directory, run directories in a
//! short-lived directory under /tmp (unix socket paths are short), no boot snapshots.

use std::path::{Path, PathBuf};

use super::recipe::{BootStep, CheckedRecipe};
use super::{BuildError, first_line};
use crate::config::WorkerConfig;
use crate::engine::{Engine, JobRun};
use crate::image::{
    CacheSettings, FetchPolicy, Fetcher, ImageCache, ImageLease, ImageLimits, ImageRequest,
};
use crate::job::{ExceptionReason, ImageReference, JobDir, ResultState};

/// What a build needs from the worker for an image base and `boot` steps.
#[derive(Debug, Clone)]
pub struct BuildWorker {
    /// worker.yml: the machine limits, network, firmware and timeouts boot steps run
    /// with (its state and cache directories are not used).
    pub config: WorkerConfig,
    /// The program QEMU runs as the metadata guestfwd helper (this binary).
    pub helper: PathBuf,
    /// Copy a boot step's job log to stderr as it is written.
    pub live_log: bool,
    /// Becomes `Some` to stop the build (Ctrl-C); a running boot step's VM is torn down.
    pub cancel: tokio::sync::watch::Receiver<Option<ExceptionReason>>,
}

impl BuildWorker {
    pub(super) fn limits(&self) -> ImageLimits {
        CacheSettings::from_config(&self.config).limits
    }

    /// The engine for this build, on state of its own.
    pub(super) async fn engine(
        &self,
        work_dir: &Path,
        checked: &CheckedRecipe,
    ) -> Result<BuildEngine, BuildError> {
        let state = tempfile::Builder::new()
            .prefix("qw-build.")
            .tempdir_in("/tmp")
            .map_err(|source| BuildError::Io {
                what: "cannot make the build's state directory",
                path: "/tmp".into(),
                source,
            })?;
        let mut config = self.config.clone();
        config.state_dir = state.path().to_path_buf();
        config.images.dir = Some(work_dir.join("cache"));
        config.snapshots.enabled = false;
        // The build's own archives, and an image base named by a path.
        let recipe_dir = std::path::absolute(&checked.dir).unwrap_or(checked.dir.clone());
        config.images.allowed_local_dirs = vec![work_dir.to_path_buf(), recipe_dir];
        if let super::BaseKind::Image(reference) = checked.recipe.base.kind() {
            let location = absolute_location(reference, &checked.dir);
            if let Some(parent) = Path::new(&location).parent().filter(|_| is_path(&location)) {
                config.images.allowed_local_dirs.push(parent.to_path_buf());
            }
        }
        let cache = ImageCache::open(
            CacheSettings::from_config(&config),
            Fetcher::new(FetchPolicy::default()),
        )
        .await
        .map_err(BuildError::Cache)?;
        Ok(BuildEngine {
            engine: Engine {
                config,
                cache,
                helper: self.helper.clone(),
                guest_tools: Default::default(),
                live: Default::default(),
            },
            _state: state,
        })
    }
}

/// The engine a build runs its boot steps on, with the state directory it owns.
pub(super) struct BuildEngine {
    engine: Engine,
    _state: tempfile::TempDir,
}

fn is_path(location: &str) -> bool {
    !location.contains("://")
}

/// A recipe's image location as a payload names it (absolute, no `..`): a relative
/// path starts at the recipe's directory.
pub(super) fn absolute_location(reference: &ImageReference, dir: &Path) -> String {
    let location = reference.location();
    if !is_path(location) {
        return location.to_owned();
    }
    let joined = dir.join(location);
    // A path that does not resolve is named as written: fetching it says why.
    std::fs::canonicalize(&joined)
        .unwrap_or(joined)
        .display()
        .to_string()
}

/// Fetches (and checks) the image base into the build's cache.
pub(super) async fn acquire(
    engine: &BuildEngine,
    reference: &ImageReference,
    dir: &Path,
) -> Result<ImageLease, BuildError> {
    let location = absolute_location(reference, dir);
    let request = ImageRequest {
        source: crate::job::ImageSource::parse(&location)
            .map_err(|source| BuildError::BaseLocation { location, source })?,
        sha256: reference.sha256().map(str::to_owned),
    };
    engine
        .engine
        .cache
        .acquire(&request, None)
        .await
        .map_err(BuildError::Base)
}

/// Runs boot step `n` as a job on the image at `source` (a path or URL) and writes its
/// disk to `disk` once the script exited 0 and the guest powered off.
pub(super) async fn run_step(
    engine: &BuildEngine,
    worker: &BuildWorker,
    n: usize,
    step: &BootStep,
    source: &str,
    disk: &Path,
) -> Result<(), BuildError> {
    let payload = serde_json::json!({
        "image": source,
        "command": ["sh", "-ec", step.script],
        "maxRunTime": step.max_run_time,
    });
    // Beside the booted disk's directory (which becomes the image's): `booted-N.job`.
    let job_dir = JobDir::at(
        disk.parent()
            .unwrap_or(Path::new("."))
            .with_extension("job"),
    );
    let report = engine
        .engine
        .run(&JobRun {
            job_id: format!("image-build-step-{n}"),
            run_id: 0,
            payload: payload.to_string(),
            job_dir: job_dir.clone(),
            live_log: worker.live_log,
            cancel: worker.cancel.clone(),
            keep_disk: Some(disk.to_path_buf()),
            keep_failed: false,
        })
        .await;
    if let Some(reason @ (ExceptionReason::Canceled | ExceptionReason::WorkerShutdown)) =
        report.reason
    {
        return Err(BuildError::Stopped(reason));
    }
    if report.state == ResultState::Completed && disk.is_file() {
        return Ok(());
    }
    let mut outcome = match (report.state, report.exit_code, report.reason) {
        (ResultState::Failed, Some(code), _) => format!("the script exited {code}"),
        (ResultState::Failed, None, _) => "the script did not finish".to_owned(),
        (_, _, Some(reason)) => format!("the job ended with an exception ({reason})"),
        (state, _, None) => format!("the job ended {state}"),
    };
    for error in &report.errors {
        outcome.push_str("; ");
        outcome.push_str(&error.message);
    }
    let log = std::fs::read_to_string(job_dir.log()).unwrap_or_default();
    Err(BuildError::BootStep {
        step: n,
        script: first_line(&step.script),
        outcome,
        log,
    })
}
