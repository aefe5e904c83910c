use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED};
use tokio::sync::mpsc;

use super::contents::ImageLimits;
use super::member::ImageProblem;
use super::unpack::{UnpackError, Unpacked, unpack_archive};
use crate::job::ExceptionReason;

/// How much of an error response body is quoted back to the job author.
const BODY_EXCERPT_BYTES: usize = 512;

/// How downloads retry and time out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchPolicy {
    /// Attempts in all, for network errors and 5xx responses.
    pub attempts: u32,
    /// Delay before the second attempt; doubled for each further attempt.
    pub first_backoff: Duration,
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response.
    pub read_timeout: Duration,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        Self {
            attempts: 4,
            first_backoff: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
        }
    }
}

/// Why an image could not be fetched and unpacked.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("image download from {url} was refused with HTTP {status}: {excerpt:?}")]
    ClientStatus {
        url: String,
        status: u16,
        excerpt: String,
    },
    #[error("image download from {url} failed after {attempts} attempts: {last}")]
    Exhausted {
        url: String,
        attempts: u32,
        last: String,
    },
    #[error("image archive is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("image archive has sha256 {actual}, but the payload requires {expected}")]
    DigestMismatch { expected: String, actual: String },
    #[error("the image is not acceptable: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Rejected(Vec<ImageProblem>),
    #[error("local image {path:?} cannot be read")]
    LocalUnreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("local image {path:?} resolves to {resolved:?}, outside the allowed image directories")]
    LocalOutsideAllowed { path: PathBuf, resolved: PathBuf },
    #[error("failed to write the image into the cache")]
    Write {
        #[source]
        source: io::Error,
    },
    #[error("failed to set up the HTTP client")]
    Client {
        #[source]
        source: reqwest::Error,
    },
    #[error("a blocking step of the image fetch (resolving, reading, unpacking) failed")]
    BlockingTask {
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("the image source {url} was reported not modified (304), but no copy of it is held")]
    UnexpectedNotModified { url: String },
    #[error("{url} was evicted from the image cache while being revalidated")]
    EvictedWhileRevalidated { url: String },
    #[error("image {sha256} vanished from the image cache")]
    Vanished { sha256: String },
    #[error("the image cache has shut down")]
    CacheClosed,
}

impl FetchError {
    /// How a job that hit this error is resolved.
    pub fn reason(&self) -> ExceptionReason {
        match self {
            Self::ClientStatus { .. }
            | Self::TooLarge { .. }
            | Self::DigestMismatch { .. }
            | Self::Rejected(_)
            | Self::LocalUnreadable { .. }
            | Self::LocalOutsideAllowed { .. } => ExceptionReason::MalformedPayload,
            Self::Exhausted { .. } | Self::Write { .. } => ExceptionReason::ResourceUnavailable,
            Self::Client { .. }
            | Self::BlockingTask { .. }
            | Self::UnexpectedNotModified { .. }
            | Self::EvictedWhileRevalidated { .. }
            | Self::Vanished { .. }
            | Self::CacheClosed => ExceptionReason::InternalError,
        }
    }
}

/// Conditional request headers from an earlier download of the same URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// The result of an HTTP fetch.
#[derive(Debug)]
pub enum HttpOutcome {
    /// The server said the copy we hold is current (304).
    NotModified,
    Fetched {
        unpacked: Box<Unpacked>,
        validators: Validators,
    },
}

/// Called with (bytes so far, total if known) as an archive streams in.
pub type Progress = Arc<dyn Fn(u64, Option<u64>) + Send + Sync>;

/// reqwest is built without a default crypto provider (ring builds twice as fast as
/// aws-lc here): installs ring, once per process, before any client is built.
pub(crate) fn install_crypto_provider() {
    static PROVIDER: OnceLock<()> = OnceLock::new();
    PROVIDER.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Downloads and unpacks images.
#[derive(Debug, Clone)]
pub struct Fetcher {
    /// Built on the first HTTP request: loading the system's CA roots costs ~25 ms, which
    /// a job on a local or cached image should not pay before its VM starts.
    client: Arc<OnceLock<reqwest::Client>>,
    policy: FetchPolicy,
}

impl Fetcher {
    pub fn new(policy: FetchPolicy) -> Self {
        Self {
            client: Arc::new(OnceLock::new()),
            policy,
        }
    }

    fn client(&self) -> Result<&reqwest::Client, FetchError> {
        if let Some(client) = self.client.get() {
            return Ok(client);
        }
        install_crypto_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(self.policy.connect_timeout)
            .read_timeout(self.policy.read_timeout)
            .user_agent(concat!("qemu-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| FetchError::Client { source })?;
        // Two racing first requests may both build one; either is fine.
        Ok(self.client.get_or_init(|| client))
    }

    /// Downloads `url` and unpacks it into the empty directory `dest` in one pass,
    /// retrying network errors and 5xx responses with exponential backoff.
    pub async fn fetch_http(
        &self,
        url: &str,
        expected_sha256: Option<&str>,
        validators: &Validators,
        dest: &Path,
        limits: ImageLimits,
        progress: Option<Progress>,
    ) -> Result<HttpOutcome, FetchError> {
        let mut last = String::new();
        for attempt in 1..=self.policy.attempts {
            if attempt > 1 {
                let backoff = self.policy.first_backoff * 2u32.saturating_pow(attempt - 2);
                tracing::info!(url, attempt, ?backoff, error = %last, "retrying image download");
                tokio::time::sleep(backoff).await;
                // A failed attempt may have unpacked gigabytes: emptied on the blocking pool.
                let dir = dest.to_path_buf();
                tokio::task::spawn_blocking(move || reset_dir(&dir))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)))
                    .map_err(|source| FetchError::Write { source })?;
            }
            match self
                .attempt(url, validators, dest, limits, progress.clone())
                .await
            {
                Attempt::Done(outcome) => {
                    if let HttpOutcome::Fetched { unpacked, .. } = &outcome {
                        check_digest(expected_sha256, unpacked)?;
                    }
                    return Ok(outcome);
                }
                Attempt::Fatal(error) => return Err(error),
                Attempt::Retry(reason) => last = reason,
            }
        }
        Err(FetchError::Exhausted {
            url: url.to_owned(),
            attempts: self.policy.attempts,
            last,
        })
    }

    async fn attempt(
        &self,
        url: &str,
        validators: &Validators,
        dest: &Path,
        limits: ImageLimits,
        progress: Option<Progress>,
    ) -> Attempt {
        let client = match self.client() {
            Ok(client) => client,
            Err(error) => return Attempt::Fatal(error),
        };
        let mut request = client.get(url);
        if let Some(etag) = &validators.etag {
            request = request.header(IF_NONE_MATCH, etag);
        }
        if let Some(modified) = &validators.last_modified {
            request = request.header(IF_MODIFIED_SINCE, modified);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return Attempt::Retry(describe(&e)),
        };
        let status = response.status();
        if status == StatusCode::NOT_MODIFIED
            && (validators.etag.is_some() || validators.last_modified.is_some())
        {
            return Attempt::Done(HttpOutcome::NotModified);
        }
        if status.is_server_error() {
            return Attempt::Retry(format!("HTTP {status}"));
        }
        if !status.is_success() {
            return Attempt::Fatal(FetchError::ClientStatus {
                url: url.to_owned(),
                status: status.as_u16(),
                excerpt: body_excerpt(response).await,
            });
        }
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let validators = Validators {
            etag: header(ETAG),
            last_modified: header(LAST_MODIFIED),
        };
        let total = header(CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        if let Some(size) = total.filter(|&size| size > limits.max_image_bytes) {
            return Attempt::Fatal(FetchError::TooLarge {
                size,
                limit: limits.max_image_bytes,
            });
        }

        // The network side pumps chunks into a bounded channel; a blocking thread reads
        // them as one stream through hash, zstd and tar.
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(64);
        let dest_owned = dest.to_path_buf();
        let unpacker = tokio::task::spawn_blocking(move || {
            unpack_archive(ChannelReader::new(rx), &dest_owned, limits)
        });
        let mut stream = response.bytes_stream();
        let mut received: u64 = 0;
        let mut network_error = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    received += chunk.len() as u64;
                    if let Some(progress) = &progress {
                        progress(received, total);
                    }
                    if received > limits.max_image_bytes {
                        drop(tx);
                        let _ = unpacker.await;
                        return Attempt::Fatal(FetchError::TooLarge {
                            size: received,
                            limit: limits.max_image_bytes,
                        });
                    }
                    if tx.send(Ok(chunk)).await.is_err() {
                        break; // the unpacker stopped early; its result says why
                    }
                }
                Err(e) => {
                    let reason = describe(&e);
                    let _ = tx.send(Err(io::Error::other(reason.clone()))).await;
                    network_error = Some(reason);
                    break;
                }
            }
        }
        drop(tx);
        let result = match unpacker.await {
            Ok(result) => result,
            Err(source) => return Attempt::Fatal(FetchError::BlockingTask { source }),
        };
        if let Some(reason) = network_error {
            return Attempt::Retry(reason);
        }
        match result {
            Ok(unpacked) => Attempt::Done(HttpOutcome::Fetched {
                unpacked: Box::new(unpacked),
                validators,
            }),
            Err(UnpackError::Source { source }) => Attempt::Retry(source.to_string()),
            Err(e) => Attempt::Fatal(from_unpack(e)),
        }
    }

    /// Unpacks a local archive after checking that its real path (symlinks resolved)
    /// is inside one of `allowed_dirs`.
    pub async fn fetch_local(
        &self,
        path: &Path,
        allowed_dirs: &[PathBuf],
        expected_sha256: Option<&str>,
        dest: &Path,
        limits: ImageLimits,
    ) -> Result<Unpacked, FetchError> {
        let (path, allowed, dest) = (
            path.to_path_buf(),
            allowed_dirs.to_vec(),
            dest.to_path_buf(),
        );
        // Resolving, opening and unpacking all touch the disk: on the blocking pool.
        let unpacked = tokio::task::spawn_blocking(move || {
            let resolved = resolve_local(&path, &allowed)?;
            let unreadable = |source| FetchError::LocalUnreadable {
                path: path.clone(),
                source,
            };
            let file = std::fs::File::open(&resolved).map_err(unreadable)?;
            let size = file.metadata().map_err(unreadable)?.len();
            if size > limits.max_image_bytes {
                return Err(FetchError::TooLarge {
                    size,
                    limit: limits.max_image_bytes,
                });
            }
            // Unbuffered: unpacking reads its source in large chunks already.
            unpack_archive(file, &dest, limits).map_err(|e| match e {
                UnpackError::Source { source } => unreadable(source),
                other => from_unpack(other),
            })
        })
        .await
        .map_err(|source| FetchError::BlockingTask { source })??;
        check_digest(expected_sha256, &unpacked)?;
        Ok(unpacked)
    }
}

/// The canonical path of a local image, if it lies inside an allowed directory.
pub(crate) fn resolve_local(path: &Path, allowed_dirs: &[PathBuf]) -> Result<PathBuf, FetchError> {
    let resolved = std::fs::canonicalize(path).map_err(|source| FetchError::LocalUnreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let inside = allowed_dirs
        .iter()
        .any(|dir| std::fs::canonicalize(dir).is_ok_and(|dir| resolved.starts_with(dir)));
    if inside {
        Ok(resolved)
    } else {
        Err(FetchError::LocalOutsideAllowed {
            path: path.to_path_buf(),
            resolved,
        })
    }
}

enum Attempt {
    Done(HttpOutcome),
    Retry(String),
    Fatal(FetchError),
}

fn from_unpack(error: UnpackError) -> FetchError {
    match error {
        UnpackError::Rejected(problems) => FetchError::Rejected(problems),
        UnpackError::Write { source, .. } | UnpackError::Source { source } => {
            FetchError::Write { source }
        }
    }
}

fn check_digest(expected: Option<&str>, unpacked: &Unpacked) -> Result<(), FetchError> {
    match expected {
        Some(expected) if expected != unpacked.sha256 => Err(FetchError::DigestMismatch {
            expected: expected.to_owned(),
            actual: unpacked.sha256.clone(),
        }),
        _ => Ok(()),
    }
}

fn describe(error: &reqwest::Error) -> String {
    crate::error_chain::display_chain(error)
}

/// The start of an error body, as printable text.
async fn body_excerpt(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < BODY_EXCERPT_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(BODY_EXCERPT_BYTES);
    String::from_utf8_lossy(&body)
        .chars()
        .map(|c| if c.is_control() && c != '\n' { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// Empties `dir` for another attempt.
pub(crate) fn reset_dir(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir)
}

/// Reads the chunks the network side sends, as one byte stream.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl ChannelReader {
    fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        Self {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
