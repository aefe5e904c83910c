//! Commands on the job queue: submit, status, jobs, logs, artifacts, cancel.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use qemu_worker::config::LoadedConfig;
use qemu_worker::job::JobDir;

use super::exit::{EXIT_OTHER, EXIT_USAGE, ExitWith, Failure, print};
use super::job::read_payload;

pub(super) fn submit(
    loaded: &LoadedConfig,
    payload: &Path,
    priority: i32,
    max_runs: u32,
    deadline: Option<u64>,
) -> Result<ExitCode, Failure> {
    let text = read_payload(payload).exit_with(EXIT_USAGE)?;
    let queue = open_queue(loaded)?;
    let job = qemu_worker::queue::NewJob {
        payload: text,
        priority,
        max_runs: max_runs.max(1),
        deadline_ms: deadline_ms(deadline),
    };
    let id = queue.enqueue(&job, now_ms()).exit_with(EXIT_OTHER)?;
    print(&format!("{id}\n"))?;
    Ok(ExitCode::SUCCESS)
}

pub(super) fn status(loaded: &LoadedConfig, job: &str, json: bool) -> Result<ExitCode, Failure> {
    let status = open_queue(loaded)?.status(job).exit_with(EXIT_USAGE)?;
    print_status(&status, json)
}

/// What `status` prints, from the database or the API.
pub(super) fn print_status(
    status: &qemu_worker::queue::JobStatus,
    json: bool,
) -> Result<ExitCode, Failure> {
    if json {
        print(&(serde_json::to_string_pretty(status).exit_with(EXIT_OTHER)? + "\n"))?;
    } else {
        let mut out = format!(
            "{} {} (run {} of {})\n",
            status.job_id, status.state, status.run_id, status.runs
        );
        if let Some(report) = &status.report {
            if let Some(code) = report.exit_code {
                out.push_str(&format!("  exit code {code}\n"));
            }
            if let Some(reason) = report.reason {
                out.push_str(&format!("  reason {reason}\n"));
            }
            for issue in &report.errors {
                out.push_str(&format!("  {issue}\n"));
            }
        }
        print(&out)?;
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn jobs(loaded: &LoadedConfig, state: Option<String>) -> Result<ExitCode, Failure> {
    let state = parse_state(state)?;
    let jobs = open_queue(loaded)?
        .list(state, &qemu_worker::queue::Page::default())
        .exit_with(EXIT_OTHER)?;
    print_jobs(&jobs)
}

/// `--state`'s value.
pub(super) fn parse_state(
    state: Option<String>,
) -> Result<Option<qemu_worker::queue::JobState>, Failure> {
    state
        .map(|text| {
            qemu_worker::queue::JobState::parse(&text)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown state {text:?}: pending, running, completed, failed or exception"
                    )
                })
                .exit_with(EXIT_USAGE)
        })
        .transpose()
}

/// What `jobs` prints, from the database or the API.
pub(super) fn print_jobs(jobs: &[qemu_worker::queue::JobStatus]) -> Result<ExitCode, Failure> {
    let out: String = jobs
        .iter()
        .map(|j| format!("{}  {:<9}  run {}\n", j.job_id, j.state.as_str(), j.run_id))
        .collect();
    print(&out)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) fn artifacts(loaded: &LoadedConfig, job: &str, out: &Path) -> Result<ExitCode, Failure> {
    let status = open_queue(loaded)?.status(job).exit_with(EXIT_USAGE)?;
    let Some(report) = &status.report else {
        return Err(anyhow::anyhow!(
            "{job} is {} and has no result yet: its artifacts are collected when it ends",
            status.state.as_str()
        ))
        .exit_with(EXIT_USAGE);
    };
    let dir = JobDir::of_run(&loaded.config.state_dir, &status.job_id, status.run_id).artifacts();
    // Only what the report lists is complete; nothing else is handed out.
    let copied = copy_listed(&dir, &report.artifacts, out).exit_with(EXIT_OTHER)?;
    print(&format!("{copied} file(s) copied into {}\n", out.display()))?;
    Ok(ExitCode::SUCCESS)
}

pub(super) fn cancel(loaded: &LoadedConfig, job: &str) -> Result<ExitCode, Failure> {
    let state = open_queue(loaded)?.cancel(job).exit_with(EXIT_USAGE)?;
    print_canceled(job, state)
}

/// What `cancel` prints, from the database or the API: `was` is the job's state before.
pub(super) fn print_canceled(
    job: &str,
    was: qemu_worker::queue::JobState,
) -> Result<ExitCode, Failure> {
    use qemu_worker::queue::CancelOutcome;
    print(&format!(
        "{job}: {}\n",
        match CancelOutcome::of(was) {
            CancelOutcome::Requested =>
                "cancel requested; its worker stops it at the next heartbeat".to_owned(),
            CancelOutcome::Canceled => "canceled".to_owned(),
            CancelOutcome::AlreadyEnded => format!("already ended ({was})"),
        }
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn deadline_ms(deadline: Option<u64>) -> Option<u64> {
    deadline.map(|s| now_ms().saturating_add(s.saturating_mul(1000)))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn open_queue(loaded: &LoadedConfig) -> Result<Arc<dyn qemu_worker::queue::Queue>, Failure> {
    qemu_worker::queue::open(&loaded.config).exit_with(EXIT_OTHER)
}

pub(super) fn logs(loaded: &LoadedConfig, job: &str, follow: bool) -> Result<ExitCode, Failure> {
    let queue = open_queue(loaded)?;
    let mut shown = 0usize;
    let mut run = 0;
    loop {
        let status = queue.status(job).exit_with(EXIT_USAGE)?;
        if status.run_id != run {
            run = status.run_id;
            shown = 0;
        }
        let path = JobDir::of_run(&loaded.config.state_dir, &status.job_id, run).log();
        let bytes = std::fs::read(&path).unwrap_or_default();
        if bytes.len() > shown {
            std::io::stdout()
                .write_all(&bytes[shown..])
                .exit_with(EXIT_OTHER)?;
            let _ = std::io::stdout().flush();
            shown = bytes.len();
        }
        let finished = !matches!(
            status.state,
            qemu_worker::queue::JobState::Pending | qemu_worker::queue::JobState::Running
        );
        if !follow || finished {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Copies the artifacts a report lists from `from` into `to`, checking each one's size.
fn copy_listed(
    from: &Path,
    artifacts: &[qemu_worker::job::ArtifactRecord],
    to: &Path,
) -> anyhow::Result<usize> {
    use anyhow::Context;
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for artifact in artifacts {
        let name = Path::new(&artifact.name);
        let target = target_of(artifact, to)?;
        let copied = std::fs::copy(from.join(name), &target)
            .with_context(|| format!("cannot copy the artifact {}", artifact.name))?;
        anyhow::ensure!(
            copied == artifact.size,
            "the stored artifact {} has {copied} bytes, the report says {}",
            artifact.name,
            artifact.size
        );
    }
    Ok(artifacts.len())
}

/// Where an artifact goes under `to` (its parent made); a name that is not a plain
/// relative path is refused, whoever sent the report.
pub(super) fn target_of(
    artifact: &qemu_worker::job::ArtifactRecord,
    to: &Path,
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let name = Path::new(&artifact.name);
    anyhow::ensure!(
        !artifact.name.is_empty()
            && name
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_))),
        "the report lists an unsafe artifact name {:?}",
        artifact.name
    );
    let target = to.join(name);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    Ok(target)
}
