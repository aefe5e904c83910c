use std::path::{Path, PathBuf};

use super::contents::ImageLimits;
use super::fetch::{FetchError, FetchPolicy, Fetcher, HttpOutcome, Validators};
use super::unpack::Unpacked;

/// Checks an archive exactly as a worker's cache would take it in (`qemu-worker image
/// inspect`): fetched from a URL or read from a path, unpacked in one pass into a
/// scratch directory that is gone when this returns, with every check of §2.1. A local
/// archive's own directory is allowed (canonical, so a symlinked archive is inspected
/// where it really is).
pub async fn inspect_archive(location: &str, limits: ImageLimits) -> Result<Unpacked, FetchError> {
    let scratch = tempfile::tempdir().map_err(|source| FetchError::Write { source })?;
    let dest = scratch.path().join("image");
    tokio::fs::create_dir(&dest)
        .await
        .map_err(|source| FetchError::Write { source })?;
    let fetched = fetch_into(location, &dest, limits).await;
    // The scratch copy of the whole image is removed on the blocking pool.
    let _ = tokio::task::spawn_blocking(move || drop(scratch)).await;
    fetched
}

async fn fetch_into(
    location: &str,
    dest: &Path,
    limits: ImageLimits,
) -> Result<Unpacked, FetchError> {
    let fetcher = Fetcher::new(FetchPolicy::default());
    if location.starts_with("http://") || location.starts_with("https://") {
        let outcome = fetcher
            .fetch_http(location, None, &Validators::default(), dest, limits, None)
            .await?;
        return match outcome {
            HttpOutcome::Fetched { unpacked, .. } => Ok(*unpacked),
            // No validators were sent, so a 304 is the server's mistake.
            HttpOutcome::NotModified => Err(FetchError::UnexpectedNotModified {
                url: location.to_owned(),
            }),
        };
    }
    let path =
        tokio::fs::canonicalize(location)
            .await
            .map_err(|source| FetchError::LocalUnreadable {
                path: PathBuf::from(location),
                source,
            })?;
    let allowed: Vec<PathBuf> = path.parent().map(Path::to_path_buf).into_iter().collect();
    fetcher
        .fetch_local(&path, &allowed, None, dest, limits)
        .await
}
