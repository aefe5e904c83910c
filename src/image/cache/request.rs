use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::ImageError;
use crate::image::fetch::{FetchError, resolve_local};
use crate::job::{ImageLocationError, ImageReference, ImageSource};

/// What a job asks the cache for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRequest {
    pub source: ImageSource,
    pub sha256: Option<String>,
}

impl ImageRequest {
    pub fn from_reference(reference: &ImageReference) -> Result<Self, ImageLocationError> {
        Ok(Self {
            source: ImageSource::parse(reference.location())?,
            sha256: reference.sha256().map(str::to_owned),
        })
    }
}

/// A request with its local path resolved and checked.
#[derive(Debug, Clone)]
pub(super) enum Resolved {
    Http {
        url: String,
        sha256: Option<String>,
    },
    Local {
        path: PathBuf,
        stat: LocalStat,
        sha256: Option<String>,
    },
}

impl Resolved {
    /// Requests with the same key share one download.
    pub(super) fn key(&self) -> String {
        match self {
            Self::Http {
                sha256: Some(sha), ..
            }
            | Self::Local {
                sha256: Some(sha), ..
            } => format!("sha256:{sha}"),
            Self::Http { url, .. } => format!("url:{url}"),
            Self::Local { path, .. } => format!("file:{}", path.display()),
        }
    }

    pub(super) fn sha256(&self) -> Option<&str> {
        match self {
            Self::Http { sha256, .. } | Self::Local { sha256, .. } => sha256.as_deref(),
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            Self::Http { url, .. } => url.clone(),
            Self::Local { path, .. } => path.display().to_string(),
        }
    }
}

/// Identifies one version of a local archive without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct LocalStat {
    size: u64,
    mtime_ns: i128,
    inode: u64,
}

pub(super) async fn resolve(
    request: &ImageRequest,
    allowed: &[PathBuf],
) -> Result<Resolved, ImageError> {
    match &request.source {
        ImageSource::Http(url) => Ok(Resolved::Http {
            url: url.clone(),
            sha256: request.sha256.clone(),
        }),
        ImageSource::Local(path) => {
            // canonicalize walks the path on disk: on the blocking pool.
            let (asked, dirs) = (path.clone(), allowed.to_vec());
            let resolved = tokio::task::spawn_blocking(move || resolve_local(&asked, &dirs))
                .await
                .map_err(|source| FetchError::BlockingTask { source })??;
            let meta = tokio::fs::metadata(&resolved).await.map_err(|source| {
                FetchError::LocalUnreadable {
                    path: path.clone(),
                    source,
                }
            })?;
            Ok(Resolved::Local {
                path: resolved,
                stat: LocalStat {
                    size: meta.len(),
                    mtime_ns: i128::from(meta.mtime()) * 1_000_000_000
                        + i128::from(meta.mtime_nsec()),
                    inode: meta.ino(),
                },
                sha256: request.sha256.clone(),
            })
        }
    }
}
