use std::path::{Path, PathBuf};

/// The directory of one run of one job, `<stateDir>/jobs/<job>/run-<n>` (a one-shot
/// job's is `<stateDir>/jobs/<job>`): what the job
/// leaves behind for its author (log, report, console, artifacts, screenshots). The
/// layout is written here once; everything else asks this type for a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDir {
    root: PathBuf,
}

/// Where the final screenshot goes, relative to the job directory (as the report names it).
pub const FINAL_SCREENSHOT: &str = "screenshots/final.png";
/// The screenshots taken while a job runs: `screenshots/every-0001.png` and on.
pub fn periodic_screenshot(index: u32) -> String {
    format!("screenshots/every-{index:04}.png")
}

impl JobDir {
    /// The directory of run `run_id` of `job_id` under the state directory.
    pub fn of_run(state_dir: &Path, job_id: &str, run_id: u32) -> Self {
        Self {
            root: Self::of_job(state_dir, job_id).join(format!("run-{run_id}")),
        }
    }

    /// The directory of a one-shot job (`qemu-worker run`): it has one run and no queue
    /// row, so its run is the job's own directory.
    pub fn one_shot(state_dir: &Path, job_id: &str) -> Self {
        Self {
            root: Self::of_job(state_dir, job_id),
        }
    }

    /// A directory used as a job directory (`vm boot`, tests).
    pub fn at(root: PathBuf) -> Self {
        Self { root }
    }

    /// The directory holding every run of `job_id`.
    pub fn of_job(state_dir: &Path, job_id: &str) -> PathBuf {
        state_dir.join("jobs").join(job_id)
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The job log: the command's output and the worker's `[qemu-worker]` lines.
    pub fn log(&self) -> PathBuf {
        self.root.join("job.log")
    }

    /// The result report (`ResultReport` as JSON).
    pub fn report(&self) -> PathBuf {
        self.root.join("report.json")
    }

    /// The guest's serial console, capped (kept when the run dir goes).
    pub fn console(&self) -> PathBuf {
        self.root.join("console.log")
    }

    /// QEMU's own stderr.
    pub fn qemu_log(&self) -> PathBuf {
        self.root.join("qemu.log")
    }

    /// Stored artifacts, by name.
    pub fn artifacts(&self) -> PathBuf {
        self.root.join("artifacts")
    }

    /// Artifact files still being received (gone once collection ends).
    pub fn partial(&self) -> PathBuf {
        self.root.join(".partial")
    }

    /// A file relative to the job directory, e.g. [`FINAL_SCREENSHOT`].
    pub fn file(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_lives_under_its_job() {
        let dir = JobDir::of_run(Path::new("/var/lib/qw"), "abc", 2);
        assert_eq!(dir.path(), Path::new("/var/lib/qw/jobs/abc/run-2"));
        assert_eq!(dir.log(), Path::new("/var/lib/qw/jobs/abc/run-2/job.log"));
        assert_eq!(
            dir.file(FINAL_SCREENSHOT),
            Path::new("/var/lib/qw/jobs/abc/run-2/screenshots/final.png")
        );
        assert!(
            dir.path()
                .starts_with(JobDir::of_job(Path::new("/var/lib/qw"), "abc"))
        );
    }
}
