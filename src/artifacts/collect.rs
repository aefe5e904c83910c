//! Collecting a job's declared artifacts: through the agent port, or through qemu-ga
//! when the guest tools do not answer (files only), within one budget and one deadline
//! for the whole job.

use std::path::PathBuf;
use std::time::Duration;

use super::budget::Budget;
use super::link::{AgentLink, LinkGuard};
use super::receive::{ReceiveError, Receiver};
use crate::config::ArtifactStoreConfig;
use crate::error_chain::{DisplayChain, display_chain};
use crate::job::{ArtifactKind, ArtifactRecord, ArtifactSpec, JobDir, SkippedRecord};
use crate::qemu::{QgaClient, QgaError};
use crate::schema::Issue;

/// Where the transports are reached on the host.
#[derive(Debug, Clone)]
pub struct ArtifactSources {
    /// The agent port (the guest tools), shared with shells into the VM.
    pub agent: AgentLink,
    /// qemu-ga's socket, when the machine has the guest agent.
    pub qga: Option<PathBuf>,
}

/// What the collection brought, and what went wrong.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collection {
    /// Every stored file; nothing else is kept.
    pub artifacts: Vec<ArtifactRecord>,
    pub skipped: Vec<SkippedRecord>,
    pub skipped_count: u64,
    /// One per artifact that failed (or was not collected); each fails the job.
    pub problems: Vec<Issue>,
    /// Lines for the job log: fallbacks taken, skipped entries.
    pub notes: Vec<String>,
}

/// The artifact transport in use: the one interface every way of bringing a guest path
/// into a `Receiver` sits behind (the guest tools' agent port, qemu-ga for files).
enum Transport {
    Agent(LinkGuard),
    Qga(Box<QgaClient>),
    /// Neither answers; why.
    Gone(String),
}

/// Why an artifact did not come through, and whether the transport must be connected
/// afresh (the rest of a broken answer may still be on its way).
struct TransportFailure {
    message: String,
    reconnect: bool,
}

impl Transport {
    /// Brings `spec` into `receiver`, which checks and counts every file.
    async fn fetch(
        &mut self,
        spec: &ArtifactSpec,
        receiver: &mut Receiver<'_>,
    ) -> Result<(), TransportFailure> {
        match self {
            Self::Agent(agent) => match agent.client() {
                Ok(client) => client.fetch(&spec.path, spec.kind, false, receiver).await,
                Err(e) => Err(e),
            }
            .map_err(|e| TransportFailure {
                message: display_chain(&e),
                reconnect: !e.in_step(),
            }),
            Self::Qga(qga) => {
                through_qga(qga, spec, receiver)
                    .await
                    .map_err(|e| TransportFailure {
                        message: display_chain(&e),
                        reconnect: false,
                    })
            }
            Self::Gone(why) => Err(TransportFailure {
                message: format!("not collected: {why}"),
                reconnect: false,
            }),
        }
    }
}

/// Collects `specs` into the job directory's artifacts. Files in progress are kept in
/// its `.partial`, which is gone when this returns.
pub async fn collect_artifacts(
    specs: &[ArtifactSpec],
    sources: &ArtifactSources,
    job_dir: &JobDir,
    limits: &ArtifactStoreConfig,
) -> Collection {
    let mut collection = Collection::default();
    if specs.is_empty() {
        return collection;
    }
    let mut budget = Budget::new(limits);
    let store = job_dir.artifacts();
    let partial = job_dir.partial();
    // Idle guest tools answer in milliseconds even under TCG; with qemu-ga to fall back
    // on, do not make every such job wait long for tools the image lacks.
    let wait = Duration::from_secs(if sources.qga.is_some() { 10 } else { 30 });
    let mut transport = match sources.agent.lock(wait.min(budget.time_left())).await {
        Ok(agent) => Transport::Agent(agent),
        Err(e) => {
            fall_back(
                sources,
                &budget,
                display_chain(&e),
                "artifacts",
                &mut collection.notes,
            )
            .await
        }
    };
    for (index, spec) in specs.iter().enumerate() {
        let at = format!("/artifacts/{index}");
        if budget.deadline_passed() {
            collection.problems.push(Issue::new(
                at,
                format!(
                    "artifact {}: not collected: the collection deadline of {} s was spent (artifacts.collectSeconds)",
                    spec.name, limits.collect_seconds
                ),
            ));
            continue;
        }
        let mut receiver = Receiver::new(&mut budget, &store, &partial, &spec.name, spec.kind);
        match transport.fetch(spec, &mut receiver).await {
            Ok(()) => {
                let received = receiver.finish();
                for skipped in &received.skipped {
                    collection.notes.push(format!(
                        "artifact {}: skipped {}: {}",
                        spec.name, skipped.name, skipped.reason
                    ));
                }
                collection.artifacts.extend(received.files);
                collection.skipped.extend(received.skipped);
                collection.skipped_count += received.skipped_count;
            }
            Err(TransportFailure { message, reconnect }) => {
                receiver.abandon().await;
                collection.problems.push(Issue::new(
                    at,
                    format!("artifact {}: {message}; nothing of it was kept", spec.name),
                ));
                if reconnect && let Transport::Agent(agent) = &mut transport {
                    // The rest of a broken answer may still be on the port: start
                    // afresh (shells on the old connection end with it).
                    let wait = Duration::from_secs(10).min(budget.time_left());
                    if let Err(e) = agent.reconnect(wait).await {
                        transport = fall_back(
                            sources,
                            &budget,
                            format!(
                                "the agent port did not answer again after a broken answer ({})",
                                DisplayChain(&e)
                            ),
                            "the remaining artifacts",
                            &mut collection.notes,
                        )
                        .await;
                    }
                }
            }
        }
    }
    let shown = collection.skipped.len() as u64;
    if collection.skipped_count > shown {
        collection.notes.push(format!(
            "{} more skipped entries are not listed",
            collection.skipped_count - shown
        ));
    }
    let _ = tokio::fs::remove_dir_all(&partial).await;
    collection
}

/// After the agent port failed: qemu-ga if the machine has it (collecting `what`),
/// else nothing.
async fn fall_back(
    sources: &ArtifactSources,
    budget: &Budget,
    why: String,
    what: &str,
    notes: &mut Vec<String>,
) -> Transport {
    let Some(socket) = &sources.qga else {
        return Transport::Gone(why);
    };
    let wait = Duration::from_secs(30).min(budget.time_left());
    match QgaClient::connect(socket, wait).await {
        Ok(qga) => {
            notes.push(format!("{why}; collecting {what} through qemu-ga"));
            Transport::Qga(Box::new(qga))
        }
        Err(e) => Transport::Gone(format!(
            "{why}, and qemu-ga did not answer either ({})",
            DisplayChain(&e)
        )),
    }
}

/// Why a file did not come through qemu-ga.
#[derive(Debug, thiserror::Error)]
enum QgaCollectError {
    #[error("directory artifacts need the guest tools (qemu-ga cannot list a directory)")]
    Directory,
    #[error("the file was not started")]
    NotStarted,
    #[error("the collection deadline of {collect_seconds} s was spent (artifacts.collectSeconds)")]
    Deadline { collect_seconds: u64 },
    #[error(transparent)]
    Receive(#[from] ReceiveError),
    #[error(transparent)]
    Read(#[from] QgaError),
}

/// One file through qemu-ga (it cannot list a directory).
async fn through_qga(
    qga: &mut QgaClient,
    spec: &ArtifactSpec,
    receiver: &mut Receiver<'_>,
) -> Result<(), QgaCollectError> {
    if spec.kind == ArtifactKind::Directory {
        return Err(QgaCollectError::Directory);
    }
    let cap = receiver.budget().bytes_for(spec.kind);
    let wait = receiver.budget().frame_wait();
    let left = receiver.budget().time_left();
    receiver.begin("", None).await?;
    let Some(file) = receiver.file() else {
        return Err(QgaCollectError::NotStarted);
    };
    let read = match tokio::time::timeout(left, qga.file_read(&spec.path, file, cap, wait)).await {
        Ok(read) => read?,
        Err(_) => {
            return Err(QgaCollectError::Deadline {
                collect_seconds: receiver.budget().limits().collect_seconds,
            });
        }
    };
    receiver.end_written(read.bytes, &read.sha256).await?;
    Ok(())
}
