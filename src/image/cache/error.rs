use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error_chain::display_chain;
use crate::image::fetch::FetchError;
use crate::job::ExceptionReason;
use crate::schema::Issue;

/// Why a job's image is not available; shared by every job waiting for it.
#[derive(Debug, Clone, thiserror::Error)]
#[error(transparent)]
pub struct ImageError(Arc<FetchError>);

impl ImageError {
    pub fn reason(&self) -> ExceptionReason {
        self.0.reason()
    }

    pub fn fetch_error(&self) -> &FetchError {
        &self.0
    }

    /// The error as payload issues at `/image`, one per problem.
    pub fn to_issues(&self) -> Vec<Issue> {
        match self.0.as_ref() {
            FetchError::Rejected(problems) => problems
                .iter()
                .map(|p| match &p.entry {
                    Some(_) => Issue::new("/image", format!("image {p}")),
                    None => Issue::new("/image", format!("image: {p}")),
                })
                .collect(),
            // The whole chain: "cannot be read: No such file or directory", not half of it.
            other => vec![Issue::new("/image", display_chain(other))],
        }
    }
}

impl From<FetchError> for ImageError {
    fn from(error: FetchError) -> Self {
        Self(Arc::new(error))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("image cache {dir:?} is in use by another qemu-worker process")]
    Locked { dir: PathBuf },
    #[error("image cache I/O failed on {path:?}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image cache index {path:?} is unreadable")]
    Index {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "image cache has no room: {free} bytes free (floor {min_free}), {used} bytes used \
         (cap {max_size}), and every remaining image is in use"
    )]
    NoRoom {
        free: u64,
        min_free: u64,
        used: u64,
        max_size: u64,
    },
    #[error("the image cache has shut down")]
    Closed,
}

pub(super) fn closed() -> ImageError {
    FetchError::CacheClosed.into()
}
