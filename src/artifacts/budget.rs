use std::time::{Duration, Instant};

use super::receive::ReceiveError;
use crate::config::ArtifactStoreConfig;
use crate::job::ArtifactKind;

/// What one job may still store: bytes, files and skipped entries, counted on the host
/// across every artifact and transport, and the collection's deadline.
///
/// Every charge and every refund goes through the methods below: nothing else changes
/// the counts.
#[derive(Debug)]
pub struct Budget {
    limits: ArtifactStoreConfig,
    bytes_left: u64,
    entries_left: u64,
    skipped: u64,
    deadline: Instant,
    /// Names files in progress: one sequence per job, so no two ever meet.
    next_temp: u64,
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

    /// Charges one file (an entry).
    pub(super) fn charge_entry(&mut self) -> Result<(), ReceiveError> {
        if self.entries_left == 0 {
            return Err(ReceiveError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        self.entries_left -= 1;
        Ok(())
    }

    /// Charges `n` more bytes of the file `name`, which has `so_far` already: within
    /// the per-file cap and what is left of the total.
    pub(super) fn charge_bytes(
        &mut self,
        name: &str,
        so_far: u64,
        n: u64,
    ) -> Result<(), ReceiveError> {
        let file_limit = self.limits.max_file_size.bytes();
        if so_far.saturating_add(n) > file_limit {
            return Err(ReceiveError::FileTooLarge {
                name: name.to_owned(),
                limit: file_limit,
            });
        }
        if n > self.bytes_left {
            return Err(ReceiveError::TotalTooLarge {
                limit: self.limits.max_total_size.bytes(),
            });
        }
        self.bytes_left -= n;
        Ok(())
    }

    /// Charges one skipped entry; returns how many the job has skipped so far.
    pub(super) fn charge_skipped(&mut self) -> Result<u64, ReceiveError> {
        self.skipped += 1;
        if self.skipped > self.limits.max_skipped {
            return Err(ReceiveError::TooManySkipped {
                limit: self.limits.max_skipped,
            });
        }
        Ok(self.skipped)
    }

    /// Gives back what a failed artifact took: none of it is kept.
    pub(super) fn refund(&mut self, entries: u64, bytes: u64, skipped: u64) {
        self.entries_left += entries;
        self.bytes_left += bytes;
        self.skipped -= skipped.min(self.skipped);
    }

    /// A temporary file name unique in the job.
    pub(super) fn temp_name(&mut self) -> String {
        self.next_temp += 1;
        format!("{}.partial", self.next_temp - 1)
    }

    /// Bytes and entries left (tests).
    #[cfg(test)]
    pub(super) fn left(&self) -> (u64, u64) {
        (self.bytes_left, self.entries_left)
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
