//! Where artifact files land on the host, whatever transport brought them: each file is
//! written under a temporary name, hashed, checked against the job's budget, and moved
//! to its name only when complete. A failed artifact leaves nothing behind and gives its
//! share of the budget back.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::budget::Budget;
use super::names::ArtifactNames;
use super::store::StoredFiles;
use crate::job::{ArtifactKind, ArtifactRecord, SkippedRecord};

/// Skipped entries named in the report and the log; the rest are only counted.
pub const SKIPPED_NAMED: usize = 20;

/// Why a received file or entry was refused on the host.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("{name} is larger than the limit of {limit} bytes for one file")]
    FileTooLarge { name: String, limit: u64 },
    #[error("the artifacts are larger than the job's limit of {limit} bytes in all")]
    TotalTooLarge { limit: u64 },
    #[error("more than {limit} files in the job's artifacts (artifacts.maxEntries)")]
    TooManyEntries { limit: u64 },
    #[error("more than {limit} skipped entries (artifacts.maxSkipped)")]
    TooManySkipped { limit: u64 },
    #[error("the guest sent an unsafe file name {name:?}: {problem}")]
    UnsafeName { name: String, problem: String },
    #[error("the guest sent {name} twice")]
    Duplicate { name: String },
    #[error("the guest sent {name} both as a file and as a folder")]
    FileAndFolder { name: String },
    #[error("{name} was not sent: {why}")]
    NotSent { name: String, why: String },
    #[error("{name} was already stored by another artifact")]
    Exists { name: String },
    #[error("{name} arrived with {received} bytes, the guest said {announced}")]
    SizeMismatch {
        name: String,
        received: u64,
        announced: u64,
    },
    #[error("{name} arrived corrupted: sha256 {actual}, the guest computed {expected}")]
    Checksum {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("the guest broke the protocol: {0}")]
    Protocol(String),
    #[error("cannot write {name} to {path:?}")]
    Write {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ReceiveError {
    pub(super) fn write(name: &str, path: &Path, source: std::io::Error) -> Self {
        Self::Write {
            name: name.to_owned(),
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A file being received.
#[derive(Debug)]
struct Pending {
    file: tokio::fs::File,
    temp: PathBuf,
    target: PathBuf,
    name: String,
    announced: Option<u64>,
    size: u64,
    hasher: Sha256,
}

/// Receives the files of one artifact (a single file, or a folder's files) for
/// `collect`. Every file is charged to the job's `Budget` as it arrives.
#[derive(Debug)]
pub struct Receiver<'a> {
    budget: &'a mut Budget,
    /// Where the artifact is stored.
    target: PathBuf,
    kind: ArtifactKind,
    /// Where files are written until they are complete (outside the artifacts dir).
    partial_dir: PathBuf,
    current: Option<Pending>,
    stored: StoredFiles,
    names: ArtifactNames,
    skipped: Vec<SkippedRecord>,
    skipped_count: u64,
    bytes: u64,
}

/// What one artifact brought, once complete.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Received {
    pub files: Vec<ArtifactRecord>,
    /// Named skipped entries (at most `SKIPPED_NAMED` per job) and how many there were.
    pub skipped: Vec<SkippedRecord>,
    pub skipped_count: u64,
}

impl<'a> Receiver<'a> {
    /// Receives the artifact `label` into `store` (the job's artifacts dir), with files
    /// in progress under `partial_dir`.
    pub fn new(
        budget: &'a mut Budget,
        store: &Path,
        partial_dir: &Path,
        label: &str,
        kind: ArtifactKind,
    ) -> Self {
        Self {
            budget,
            target: store.join(label),
            kind,
            partial_dir: partial_dir.to_path_buf(),
            current: None,
            stored: StoredFiles::default(),
            names: ArtifactNames::new(label, kind),
            skipped: Vec::new(),
            skipped_count: 0,
            bytes: 0,
        }
    }

    pub fn budget(&self) -> &Budget {
        self.budget
    }

    /// Starts the file `name` (relative inside a folder; empty for a single file),
    /// `announced` bytes long if the transport says.
    pub async fn begin(&mut self, name: &str, announced: Option<u64>) -> Result<(), ReceiveError> {
        if self.current.is_some() {
            return Err(ReceiveError::Protocol(
                "a new file before the last one ended".into(),
            ));
        }
        let full = self.names.check(name, self.budget.limits())?;
        self.budget.charge_entry()?;
        let full = match self.names.claim(name, full) {
            Ok(full) => full,
            Err(e) => {
                // Refused before it was counted as one of this artifact's names.
                self.budget.refund(1, 0, 0);
                return Err(e);
            }
        };
        let target = match self.kind {
            ArtifactKind::File => self.target.clone(),
            ArtifactKind::Directory => self.target.join(name),
        };
        tokio::fs::create_dir_all(&self.partial_dir)
            .await
            .map_err(|source| ReceiveError::write(&full, &self.partial_dir, source))?;
        let temp = self.partial_dir.join(self.budget.temp_name());
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .await
            .map_err(|source| ReceiveError::write(&full, &temp, source))?;
        self.current = Some(Pending {
            file,
            temp,
            target,
            name: full,
            announced,
            size: 0,
            hasher: Sha256::new(),
        });
        Ok(())
    }

    /// Appends to the current file.
    pub async fn data(&mut self, bytes: &[u8]) -> Result<(), ReceiveError> {
        let n = bytes.len() as u64;
        let Some(pending) = self.current.as_mut() else {
            return Err(ReceiveError::Protocol("data outside a file".into()));
        };
        if let Some(announced) = pending.announced
            && pending.size + n > announced
        {
            return Err(ReceiveError::SizeMismatch {
                name: pending.name.clone(),
                received: pending.size + n,
                announced,
            });
        }
        self.budget.charge_bytes(&pending.name, pending.size, n)?;
        // Counted as this artifact's from here: `abandon` gives it back.
        self.bytes += n;
        pending.hasher.update(bytes);
        pending.size += n;
        if let Err(source) = pending.file.write_all(bytes).await {
            let (name, temp) = (pending.name.clone(), pending.temp.clone());
            return Err(ReceiveError::write(&name, &temp, source));
        }
        Ok(())
    }

    /// Ends the current file: `size` is what the guest says it sent, `sha256` its hash
    /// if it made one. The file moves to its name only if both agree with what arrived.
    pub async fn end(&mut self, size: u64, sha256: Option<&str>) -> Result<(), ReceiveError> {
        let Some(mut pending) = self.current.take() else {
            return Err(ReceiveError::Protocol("a file end without a file".into()));
        };
        let result = self.complete(&mut pending, size, sha256).await;
        if result.is_err() {
            // Not stored: its bytes go back to the budget with the rest in `abandon`.
            let _ = tokio::fs::remove_file(&pending.temp).await;
        }
        result
    }

    /// Ends a file that the transport wrote itself through `file()` (qemu-ga), with
    /// what the transport counted and hashed.
    pub async fn end_written(&mut self, size: u64, sha256: &str) -> Result<(), ReceiveError> {
        let Some(mut pending) = self.current.take() else {
            return Err(ReceiveError::Protocol("a file end without a file".into()));
        };
        let result = match self.budget.charge_bytes(&pending.name, 0, size) {
            Err(e) => Err(e),
            Ok(()) => {
                pending.size = size;
                self.bytes += size;
                self.store(&mut pending, sha256.to_owned()).await
            }
        };
        if result.is_err() {
            let _ = tokio::fs::remove_file(&pending.temp).await;
        }
        result
    }

    /// The file in progress, for a transport that writes it itself.
    pub fn file(&mut self) -> Option<&mut tokio::fs::File> {
        self.current.as_mut().map(|p| &mut p.file)
    }

    async fn complete(
        &mut self,
        pending: &mut Pending,
        size: u64,
        sha256: Option<&str>,
    ) -> Result<(), ReceiveError> {
        if size != pending.size {
            return Err(ReceiveError::SizeMismatch {
                name: pending.name.clone(),
                received: pending.size,
                announced: size,
            });
        }
        let digest: [u8; 32] = std::mem::take(&mut pending.hasher).finalize().into();
        let actual: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        if let Some(expected) = sha256
            && expected != actual
        {
            return Err(ReceiveError::Checksum {
                name: pending.name.clone(),
                expected: expected.to_owned(),
                actual,
            });
        }
        self.store(pending, actual).await
    }

    /// Flushes the file and moves it to its name, never over an existing file.
    async fn store(&mut self, pending: &mut Pending, sha256: String) -> Result<(), ReceiveError> {
        if let Err(source) = pending.file.flush().await {
            return Err(ReceiveError::write(&pending.name, &pending.temp, source));
        }
        self.stored
            .place(
                &pending.temp,
                &pending.target,
                &pending.name,
                pending.size,
                sha256,
            )
            .await
    }

    /// Records an entry the guest did not send (a link, a device, an unreadable file).
    pub fn skip(&mut self, name: &str, reason: &str) -> Result<(), ReceiveError> {
        self.skipped_count += 1;
        let skipped = self.budget.charge_skipped()?;
        let named = usize::try_from(skipped).unwrap_or(usize::MAX);
        if named <= SKIPPED_NAMED {
            let printable: String = name.chars().take(256).collect();
            self.skipped.push(SkippedRecord {
                name: if printable.is_empty() {
                    self.names.label().to_owned()
                } else {
                    format!("{}/{printable}", self.names.label())
                },
                reason: reason.chars().take(256).collect(),
            });
        }
        Ok(())
    }

    /// Checks that the answer that just ended is whole: no file left open, and a
    /// single-file artifact has its file.
    pub fn check_complete(&self) -> Result<(), ReceiveError> {
        if let Some(pending) = &self.current {
            return Err(ReceiveError::Protocol(format!(
                "the answer ended in the middle of {}",
                pending.name
            )));
        }
        if self.kind == ArtifactKind::File && self.stored.is_empty() {
            let why = self.skipped.first().map_or_else(
                || "the guest ended its answer without it".to_owned(),
                |s| format!("the guest skipped it: {}", s.reason),
            );
            return Err(ReceiveError::NotSent {
                name: self.names.label().to_owned(),
                why,
            });
        }
        Ok(())
    }

    /// The artifact is complete (after `check_complete`).
    pub fn finish(self) -> Received {
        Received {
            files: self.stored.into_records(),
            skipped: self.skipped,
            skipped_count: self.skipped_count,
        }
    }

    /// The artifact failed: everything it stored or started is removed, its files,
    /// bytes and skipped entries are given back to the budget.
    pub async fn abandon(mut self) {
        if let Some(pending) = self.current.take() {
            drop(pending.file);
            let _ = tokio::fs::remove_file(&pending.temp).await;
        }
        self.stored.remove().await;
        if self.kind == ArtifactKind::Directory {
            let _ = tokio::fs::remove_dir(&self.target).await;
        }
        self.budget
            .refund(self.names.count(), self.bytes, self.skipped_count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ArtifactStoreConfig, ByteSize};

    fn limits() -> ArtifactStoreConfig {
        ArtifactStoreConfig {
            max_file_size: ByteSize(10),
            max_total_size: ByteSize(16),
            max_entries: 3,
            max_skipped: 2,
            max_name_length: 12,
            max_depth: 2,
            ..ArtifactStoreConfig::default()
        }
    }

    struct Dirs {
        _temp: tempfile::TempDir,
        store: PathBuf,
        partial: PathBuf,
    }

    fn dirs() -> Dirs {
        let temp = tempfile::tempdir().expect("tempdir");
        let store = temp.path().join("artifacts");
        let partial = temp.path().join(".partial");
        std::fs::create_dir(&store).expect("store");
        Dirs {
            _temp: temp,
            store,
            partial,
        }
    }

    async fn file(
        receiver: &mut Receiver<'_>,
        name: &str,
        data: &[u8],
    ) -> Result<(), ReceiveError> {
        receiver.begin(name, Some(data.len() as u64)).await?;
        receiver.data(data).await?;
        receiver.end(data.len() as u64, None).await
    }

    #[tokio::test]
    async fn hostile_names_are_refused_before_anything_is_written() {
        // Through the receiver, as a transport meets them (names.rs tests each rule).
        let d = dirs();
        let mut budget = Budget::new(&limits());
        for bad in crate::artifacts::names::tests::HOSTILE_NAMES {
            let mut receiver = Receiver::new(
                &mut budget,
                &d.store,
                &d.partial,
                "dir",
                ArtifactKind::Directory,
            );
            let error = receiver.begin(bad, None).await.expect_err(bad);
            assert!(
                matches!(error, ReceiveError::UnsafeName { .. }),
                "{bad:?}: {error}"
            );
            receiver.abandon().await;
        }
        let mut receiver = Receiver::new(
            &mut budget,
            &d.store,
            &d.partial,
            "dir",
            ArtifactKind::Directory,
        );
        let long = receiver
            .begin("abcdefghijklm", None)
            .await
            .expect_err("13 bytes");
        assert!(
            long.to_string().contains("artifacts.maxNameLength"),
            "{long}"
        );
        let deep = receiver.begin("a/b/c", None).await.expect_err("depth 3");
        assert!(deep.to_string().contains("artifacts.maxDepth"), "{deep}");
        receiver.abandon().await;
        assert_eq!(std::fs::read_dir(&d.store).expect("store").count(), 0);
        assert!(!d.partial.exists(), "no file was started");
        assert_eq!(budget.left(), (16, 3), "refused names cost nothing");
    }

    #[tokio::test]
    async fn a_complete_file_is_stored_under_its_name_with_its_hash() {
        let d = dirs();
        let mut budget = Budget::new(&limits());
        let mut receiver = Receiver::new(
            &mut budget,
            &d.store,
            &d.partial,
            "logs",
            ArtifactKind::Directory,
        );
        file(&mut receiver, "a/b.txt", b"hello")
            .await
            .expect("stored");
        let received = receiver.finish();
        assert_eq!(received.files.len(), 1);
        assert_eq!(received.files[0].name, "logs/a/b.txt");
        assert_eq!(received.files[0].content_type, "text/plain; charset=utf-8");
        assert_eq!(
            received.files[0].sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(
            std::fs::read(d.store.join("logs/a/b.txt")).expect("file"),
            b"hello"
        );
        assert_eq!(budget.left(), (11, 2));
    }

    #[tokio::test]
    async fn a_failed_artifact_leaves_nothing_and_gives_its_budget_back() {
        let d = dirs();
        let mut budget = Budget::new(&limits());
        let mut receiver = Receiver::new(
            &mut budget,
            &d.store,
            &d.partial,
            "out",
            ArtifactKind::Directory,
        );
        file(&mut receiver, "x/one", b"12345").await.expect("first");
        receiver
            .begin("x/two", Some(8))
            .await
            .expect("second starts");
        receiver.data(b"123").await.expect("some data");
        // More than announced.
        let error = receiver.data(b"123456").await.expect_err("too much");
        assert!(
            matches!(error, ReceiveError::SizeMismatch { .. }),
            "{error}"
        );
        receiver.abandon().await;
        assert!(!d.store.join("out").exists(), "nothing of it is kept");
        assert_eq!(std::fs::read_dir(&d.partial).expect("partial").count(), 0);
        assert_eq!(budget.left(), (16, 3));
    }

    #[tokio::test]
    async fn sizes_hashes_counts_and_duplicates_are_checked_on_the_host() {
        let d = dirs();
        let mut budget = Budget::new(&limits());
        let mut receiver =
            Receiver::new(&mut budget, &d.store, &d.partial, "f", ArtifactKind::File);
        receiver.begin("", None).await.expect("begin");
        let big = receiver
            .data(&[0; 11])
            .await
            .expect_err("over the file cap");
        assert!(
            matches!(big, ReceiveError::FileTooLarge { limit: 10, .. }),
            "{big}"
        );
        receiver.abandon().await;

        let mut receiver =
            Receiver::new(&mut budget, &d.store, &d.partial, "f", ArtifactKind::File);
        receiver.begin("", None).await.expect("begin");
        receiver.data(b"abc").await.expect("data");
        let lie = receiver.end(4, None).await.expect_err("sent 3, says 4");
        assert!(matches!(lie, ReceiveError::SizeMismatch { .. }), "{lie}");
        receiver.abandon().await;

        let mut receiver =
            Receiver::new(&mut budget, &d.store, &d.partial, "f", ArtifactKind::File);
        receiver.begin("", None).await.expect("begin");
        receiver.data(b"abc").await.expect("data");
        let corrupt = receiver.end(3, Some("00")).await.expect_err("bad hash");
        assert!(
            matches!(corrupt, ReceiveError::Checksum { .. }),
            "{corrupt}"
        );
        receiver.abandon().await;

        let mut receiver = Receiver::new(
            &mut budget,
            &d.store,
            &d.partial,
            "d",
            ArtifactKind::Directory,
        );
        file(&mut receiver, "same", b"1").await.expect("first");
        let twice = receiver.begin("same", None).await.expect_err("twice");
        assert!(matches!(twice, ReceiveError::Duplicate { .. }), "{twice}");
        receiver.abandon().await;
        assert_eq!(std::fs::read_dir(&d.store).expect("store").count(), 0);
    }

    #[tokio::test]
    async fn a_stored_file_is_never_replaced() {
        let d = dirs();
        std::fs::write(d.store.join("taken"), b"first").expect("existing");
        let mut budget = Budget::new(&limits());
        let mut receiver = Receiver::new(
            &mut budget,
            &d.store,
            &d.partial,
            "taken",
            ArtifactKind::File,
        );
        let error = file(&mut receiver, "", b"second")
            .await
            .expect_err("exists");
        assert!(matches!(error, ReceiveError::Exists { .. }), "{error}");
        receiver.abandon().await;
        assert_eq!(
            std::fs::read(d.store.join("taken")).expect("kept"),
            b"first"
        );
    }

    #[tokio::test]
    async fn entries_and_skipped_entries_are_capped_for_the_whole_job() {
        let d = dirs();
        let mut budget = Budget::new(&limits());
        let mut receiver = Receiver::new(
            &mut budget,
            &d.store,
            &d.partial,
            "a",
            ArtifactKind::Directory,
        );
        for name in ["1", "2", "3"] {
            file(&mut receiver, name, b"")
                .await
                .expect("within the count");
        }
        receiver
            .skip("link", "is a symbolic link")
            .expect("one skipped");
        receiver
            .skip("dev", "is not a regular file")
            .expect("two skipped");
        let received = receiver.finish();
        assert_eq!(received.skipped_count, 2);
        assert_eq!(received.skipped[0].name, "a/link");
        let mut receiver = Receiver::new(
            &mut budget,
            &d.store,
            &d.partial,
            "b",
            ArtifactKind::Directory,
        );
        let many = receiver.begin("4", None).await.expect_err("a fourth file");
        assert!(
            matches!(many, ReceiveError::TooManyEntries { limit: 3 }),
            "{many}"
        );
        let skipped = receiver.skip("x", "y").expect_err("a third skipped entry");
        assert!(
            matches!(skipped, ReceiveError::TooManySkipped { limit: 2 }),
            "{skipped}"
        );
    }

    #[tokio::test]
    async fn an_answer_must_be_whole_and_a_name_is_a_file_or_a_folder() {
        let d = dirs();
        let mut budget = Budget::new(&limits());
        let mut receiver =
            Receiver::new(&mut budget, &d.store, &d.partial, "f", ArtifactKind::File);
        receiver
            .skip("", "cannot be opened: permission denied")
            .expect("skipped");
        let missing = receiver.check_complete().expect_err("no file");
        assert_eq!(
            missing.to_string(),
            "f was not sent: the guest skipped it: cannot be opened: permission denied"
        );
        receiver.abandon().await;

        let mut receiver = Receiver::new(
            &mut budget,
            &d.store,
            &d.partial,
            "d",
            ArtifactKind::Directory,
        );
        receiver.begin("open", Some(5)).await.expect("begin");
        let open = receiver.check_complete().expect_err("a file still open");
        assert!(
            open.to_string().contains("in the middle of d/open"),
            "{open}"
        );
        receiver.abandon().await;

        // A name is a file or a folder, never both, whichever comes first.
        let mut receiver = Receiver::new(
            &mut budget,
            &d.store,
            &d.partial,
            "d",
            ArtifactKind::Directory,
        );
        file(&mut receiver, "a", b"1").await.expect("a file");
        let under = receiver
            .begin("a/b", None)
            .await
            .expect_err("a as a folder");
        assert!(
            matches!(under, ReceiveError::FileAndFolder { .. }),
            "{under}"
        );
        file(&mut receiver, "x/y", b"1")
            .await
            .expect("x as a folder");
        let over = receiver.begin("x", None).await.expect_err("x as a file");
        assert!(matches!(over, ReceiveError::FileAndFolder { .. }), "{over}");
        receiver.abandon().await;
        assert_eq!(std::fs::read_dir(&d.partial).expect("partial").count(), 0);
    }
}
