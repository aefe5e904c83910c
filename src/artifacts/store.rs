use std::path::{Path, PathBuf};

use super::receive::ReceiveError;
use crate::job::ArtifactRecord;

/// The complete files of one artifact, moved to their names in the job's artifacts dir,
/// and the folders made for them: what a failed artifact removes again.
#[derive(Debug, Default)]
pub(super) struct StoredFiles {
    files: Vec<(PathBuf, ArtifactRecord)>,
    created_dirs: Vec<PathBuf>,
}

impl StoredFiles {
    /// Moves the complete file `temp` to `target`, never over an existing file, and
    /// records it as `name` (`size` bytes, `sha256`).
    pub(super) async fn place(
        &mut self,
        temp: &Path,
        target: &Path,
        name: &str,
        size: u64,
        sha256: String,
    ) -> Result<(), ReceiveError> {
        if let Some(parent) = target.parent() {
            self.create_dirs(parent, name).await?;
        }
        let (from, to) = (temp.to_path_buf(), target.to_path_buf());
        let moved = tokio::task::spawn_blocking(move || {
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                &from,
                rustix::fs::CWD,
                &to,
                rustix::fs::RenameFlags::NOREPLACE,
            )
        })
        .await
        .unwrap_or(Err(rustix::io::Errno::IO));
        match moved {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) => {
                return Err(ReceiveError::Exists {
                    name: name.to_owned(),
                });
            }
            Err(errno) => return Err(ReceiveError::write(name, target, errno.into())),
        }
        self.files.push((
            target.to_path_buf(),
            ArtifactRecord {
                content_type: content_type(name).into(),
                name: name.to_owned(),
                size,
                sha256,
            },
        ));
        Ok(())
    }

    /// Creates the folders above a stored file, remembering the new ones so that a
    /// failed artifact removes them again.
    async fn create_dirs(&mut self, dir: &Path, name: &str) -> Result<(), ReceiveError> {
        let mut missing = Vec::new();
        let mut at = Some(dir);
        while let Some(d) = at {
            if tokio::fs::try_exists(d).await.unwrap_or(false) {
                break;
            }
            missing.push(d.to_path_buf());
            at = d.parent();
        }
        for d in missing.into_iter().rev() {
            match tokio::fs::create_dir(&d).await {
                Ok(()) => self.created_dirs.push(d),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(ReceiveError::write(name, &d, source)),
            }
        }
        Ok(())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub(super) fn into_records(self) -> Vec<ArtifactRecord> {
        self.files.into_iter().map(|(_, record)| record).collect()
    }

    /// Removes the stored files, then the folders made for them that are empty (one
    /// may hold another artifact's files).
    pub(super) async fn remove(&self) {
        for (path, _) in &self.files {
            let _ = tokio::fs::remove_file(path).await;
        }
        for dir in self.created_dirs.iter().rev() {
            let _ = tokio::fs::remove_dir(dir).await;
        }
    }
}

/// A content type from the file name; enough for browsers to show common CI outputs.
pub fn content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map_or("", |(_, ext)| ext)
        .to_ascii_lowercase();
    match ext.as_str() {
        "txt" | "log" => "text/plain; charset=utf-8",
        "json" => "application/json",
        "xml" => "application/xml",
        "html" | "htm" => "text/html; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "svg" => "image/svg+xml",
        "gz" | "tgz" => "application/gzip",
        "zst" => "application/zstd",
        "tar" => "application/x-tar",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}
