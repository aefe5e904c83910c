use std::time::{Duration, Instant};

use crate::config::ArtifactStoreConfig;
use crate::job::ArtifactKind;

/// What one job may still store: bytes, files and skipped entries, counted on the host
/// across every artifact and transport, and the collection's deadline.
#[derive(Debug)]
pub struct Budget {
    pub(super) limits: ArtifactStoreConfig,
    pub(super) bytes_left: u64,
    pub(super) entries_left: u64,
    pub(super) skipped: u64,
    deadline: Instant,
    /// Names files in progress: one sequence per job, so no two ever meet.
    pub(super) next_temp: u64,
}

impl Budget {
    /// A full budget; the collection deadline starts now.
    pub fn new(limits: &ArtifactStoreConfig) -> Self {
        Self {
            limits: *limits,
            bytes_left: limits.max_total_size.bytes(),
            entries_left: limits.max_entries,
            skipped: 0,
            deadline: Instant::now() + Duration::from_secs(limits.collect_seconds),
            next_temp: 0,
        }
    }

    pub fn limits(&self) -> &ArtifactStoreConfig {
        &self.limits
    }

    /// Bytes the next artifact may take (for a single file also capped per file).
    pub fn bytes_for(&self, kind: ArtifactKind) -> u64 {
        match kind {
            ArtifactKind::File => self.bytes_left.min(self.limits.max_file_size.bytes()),
            ArtifactKind::Directory => self.bytes_left,
        }
    }

    /// The worker.yml key that sets `bytes_for(kind)`.
    pub fn limit_name(&self, kind: ArtifactKind) -> &'static str {
        if kind == ArtifactKind::File && self.bytes_left >= self.limits.max_file_size.bytes() {
            "artifacts.maxFileSize"
        } else {
            "what is left of artifacts.maxTotalSize"
        }
    }

    /// Time left before the collection's deadline.
    pub fn time_left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// How long to wait for the next frame: the stall limit, or less near the deadline.
    pub fn frame_wait(&self) -> Duration {
        Duration::from_secs(self.limits.stall_seconds).min(self.time_left())
    }

    /// Whether the deadline (rather than the stall limit) ended a wait.
    pub fn deadline_passed(&self) -> bool {
        self.time_left().is_zero()
    }
}
