//! The queue commands through a worker's API (`--server URL` or worker.yml
//! `client.server`) instead of the queue database: what they print is the same.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use futures_util::StreamExt;
use qemu_worker::api::client::{ApiClient, ClientError};
use qemu_worker::api::model::{Canceled, JobPage, Submitted};
use qemu_worker::job::ArtifactRecord;
use qemu_worker::queue::JobStatus;
use sha2::{Digest, Sha256};

use super::exit::{EXIT_OTHER, EXIT_USAGE, ExitWith, Failure, print};
use super::job::read_payload;
use super::queue::{parse_state, print_canceled, print_jobs, print_status, target_of};

/// A refusal the caller can fix (a bad job id, a job that has not ended, a bad
/// payload) exits 2 as the database path does; everything else 3.
pub(super) fn failed(error: ClientError) -> Failure {
    let code = match error.status() {
        Some(400 | 404 | 409 | 413 | 416) => EXIT_USAGE,
        _ => EXIT_OTHER,
    };
    Failure::new(code, error.into())
}

/// A job id as one path segment.
pub(super) fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub(super) async fn submit(
    client: &ApiClient,
    payload: &Path,
    priority: i32,
    max_runs: u32,
    deadline: Option<u64>,
) -> Result<ExitCode, Failure> {
    let text = read_payload(payload).exit_with(EXIT_USAGE)?;
    let mut path = format!("/v1/jobs?priority={priority}&maxRuns={}", max_runs.max(1));
    if let Some(seconds) = deadline {
        // Seconds from now, counted on the server's clock.
        path.push_str(&format!("&deadline={seconds}"));
    }
    let answer = client
        .post(&path, text.into_bytes())
        .await
        .map_err(failed)?;
    let submitted: Submitted = client.read_json(answer).await.map_err(failed)?;
    print(&format!("{}\n", submitted.job_id))?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn status(client: &ApiClient, job: &str, json: bool) -> Result<ExitCode, Failure> {
    let status: JobStatus = client
        .get_json(&format!("/v1/jobs/{}", segment(job)))
        .await
        .map_err(failed)?;
    print_status(&status, json)
}

pub(super) async fn jobs(client: &ApiClient, state: Option<String>) -> Result<ExitCode, Failure> {
    let state = parse_state(state)?;
    let mut jobs = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = "/v1/jobs?limit=1000".to_owned();
        if let Some(state) = state {
            path.push_str(&format!("&state={state}"));
        }
        if let Some(after) = &after {
            path.push_str(&format!("&after={}", segment(after)));
        }
        let page: JobPage = client.get_json(&path).await.map_err(failed)?;
        let progressed = !page.jobs.is_empty();
        jobs.extend(page.jobs);
        match page.next {
            // A server that names the same page again, or an empty one, is not followed.
            Some(next) if progressed && after.as_ref() != Some(&next) => after = Some(next),
            _ => break,
        }
    }
    print_jobs(&jobs)
}

pub(super) async fn cancel(client: &ApiClient, job: &str) -> Result<ExitCode, Failure> {
    let answer = client
        .post(&format!("/v1/jobs/{}/cancel", segment(job)), Vec::new())
        .await
        .map_err(failed)?;
    let canceled: Canceled = client.read_json(answer).await.map_err(failed)?;
    print_canceled(job, canceled.was)
}

/// The log as it comes: with `follow`, until the job ends (the server follows a retried
/// job's new run from its first byte, as the database path does).
pub(super) async fn logs(client: &ApiClient, job: &str, follow: bool) -> Result<ExitCode, Failure> {
    let answer = client
        .get(&format!("/v1/jobs/{}/log?follow={follow}", segment(job)))
        .await
        .map_err(failed)?;
    let mut body = answer.bytes_stream();
    let mut out = std::io::stdout();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| failed(client.broken(e)))?;
        out.write_all(&chunk).exit_with(EXIT_OTHER)?;
        let _ = out.flush();
    }
    Ok(ExitCode::SUCCESS)
}

/// Every listed artifact into `out`, each checked against the size and sha256 the
/// report lists (a file that does not match is removed, and the command fails).
pub(super) async fn artifacts(
    client: &ApiClient,
    job: &str,
    out: &Path,
) -> Result<ExitCode, Failure> {
    let id = segment(job);
    let listed: Vec<ArtifactRecord> = client
        .get_json(&format!("/v1/jobs/{id}/artifacts"))
        .await
        .map_err(failed)?;
    for artifact in &listed {
        let target = target_of(artifact, out).exit_with(EXIT_OTHER)?;
        let name: Vec<String> = artifact.name.split('/').map(segment).collect();
        let answer = client
            .get(&format!("/v1/jobs/{id}/artifacts/{}", name.join("/")))
            .await
            .map_err(failed)?;
        let written = download(client, answer, &target, artifact.size).await;
        let problem = match written {
            Ok((size, _)) if size != artifact.size => Some(format!(
                "the artifact {} arrived with {size} bytes, the report lists {}",
                artifact.name, artifact.size
            )),
            Ok((_, sha256)) if sha256 != artifact.sha256 => Some(format!(
                "the artifact {} arrived with sha256 {sha256}, the report lists {}",
                artifact.name, artifact.sha256
            )),
            Ok(_) => None,
            Err(e) => Some(format!("the artifact {}: {e:#}", artifact.name)),
        };
        if let Some(problem) = problem {
            let _ = std::fs::remove_file(&target);
            return Err(anyhow::anyhow!(problem)).exit_with(EXIT_OTHER);
        }
    }
    print(&format!(
        "{} file(s) copied into {}\n",
        listed.len(),
        out.display()
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Streams a body into `target` (at most `listed` bytes): its size and sha256.
async fn download(
    client: &ApiClient,
    answer: reqwest::Response,
    target: &Path,
    listed: u64,
) -> anyhow::Result<(u64, String)> {
    use anyhow::Context;
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::File::create(target)
        .await
        .with_context(|| format!("cannot create {}", target.display()))?;
    let mut hash = Sha256::new();
    let mut size = 0u64;
    let mut body = answer.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| client.broken(e))?;
        size += chunk.len() as u64;
        // No more than the report lists reaches the disk.
        anyhow::ensure!(
            size <= listed,
            "more than the {listed} bytes the report lists"
        );
        hash.update(&chunk);
        file.write_all(&chunk)
            .await
            .with_context(|| format!("cannot write {}", target.display()))?;
    }
    file.flush().await?;
    Ok((size, hex(&hash.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A screenshot of a running job's VM, taken now, written to `out` as PNG.
pub(super) async fn screenshot(
    client: &ApiClient,
    job: &str,
    out: &Path,
) -> Result<ExitCode, Failure> {
    let answer = client
        .post(
            &format!("/v1/jobs/{}/screenshots", segment(job)),
            Vec::new(),
        )
        .await
        .map_err(failed)?;
    // A screenshot is a PNG of the guest's display: a few hundred KiB at most.
    let png = client.bounded(answer, 64 << 20).await.map_err(failed)?;
    std::fs::write(out, &png)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))
        .exit_with(EXIT_OTHER)?;
    print(&format!(
        "{} bytes written to {}\n",
        png.len(),
        out.display()
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Lets a failed job's kept VM go.
pub(super) async fn release(client: &ApiClient, job: &str) -> Result<ExitCode, Failure> {
    client
        .post(&format!("/v1/jobs/{}/release", segment(job)), Vec::new())
        .await
        .map_err(failed)?;
    print(&format!("{job}: its kept VM is being torn down\n"))?;
    Ok(ExitCode::SUCCESS)
}
