use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::actor::{Actor, Msg};
use super::error::{CacheError, ImageError, closed};
use super::lease::ImageLease;
use super::request::{ImageRequest, resolve};
use super::state::State;
use crate::image::contents::ImageLimits;
use crate::image::fetch::{Fetcher, Progress};

/// Where the cache lives and what it may use.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub dir: PathBuf,
    /// Evict least recently used images to stay under this many bytes (allocated).
    pub max_size: u64,
    /// Keep at least this much free space on the cache's file system.
    pub min_free: u64,
    pub limits: ImageLimits,
    pub allowed_local_dirs: Vec<PathBuf>,
}

impl CacheSettings {
    pub fn from_config(config: &crate::config::WorkerConfig) -> Self {
        Self {
            dir: config.image_dir(),
            max_size: config.images.max_size.bytes(),
            min_free: config.images.min_free_space.bytes(),
            limits: ImageLimits {
                max_image_bytes: config.images.max_image_size.bytes(),
            },
            allowed_local_dirs: config.images.allowed_local_dirs.clone(),
        }
    }
}

/// An image in the cache, for `image list`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedImage {
    pub sha256: String,
    pub size_bytes: u64,
    /// Milliseconds since the Unix epoch.
    pub last_used: u64,
    pub in_use: usize,
    pub sources: Vec<String>,
}

/// The content-addressed image cache. Cloning gives another handle to the same cache.
///
/// One task owns the index, the pins and the downloads in flight; handles talk to it
/// over a channel. Two jobs asking for the same image share one download, and a job
/// that gives up waiting does not disturb the others.
#[derive(Debug, Clone)]
pub struct ImageCache {
    tx: mpsc::UnboundedSender<Msg>,
    settings: Arc<CacheSettings>,
    counters: Arc<CacheCounters>,
}

/// What the cache has done since it opened, for `/metrics`.
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// Requests served from an image already in the cache.
    pub hits: AtomicU64,
    /// Requests that fetched or revalidated their image, or waited on such a fetch.
    pub misses: AtomicU64,
    /// Images removed (evicted for room, or pruned), and their bytes.
    pub evictions: AtomicU64,
    pub evicted_bytes: AtomicU64,
}

impl CacheCounters {
    pub(super) fn removed(&self, bytes: u64) {
        self.evictions.fetch_add(1, Ordering::Relaxed);
        self.evicted_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl ImageCache {
    /// Opens (or creates) the cache: takes its lock, loads the index, removes unfinished
    /// downloads, and reconciles the index with the objects on disk.
    pub async fn open(settings: CacheSettings, fetcher: Fetcher) -> Result<Self, CacheError> {
        let settings = Arc::new(settings);
        let state = {
            let settings = Arc::clone(&settings);
            tokio::task::spawn_blocking(move || State::load(&settings))
                .await
                .map_err(|_| CacheError::Closed)??
        };
        let counters = Arc::clone(&state.counters);
        let tx = Actor::spawn(state, Arc::clone(&settings), fetcher);
        Ok(Self {
            tx,
            settings,
            counters,
        })
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    pub fn counters(&self) -> &CacheCounters {
        &self.counters
    }

    /// The image for a job, from the cache or fetched once for every job asking.
    pub async fn acquire(
        &self,
        request: &ImageRequest,
        progress: Option<Progress>,
    ) -> Result<ImageLease, ImageError> {
        let resolved = resolve(request, &self.settings.allowed_local_dirs).await?;
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Acquire {
                request: resolved,
                progress,
                reply,
            })
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Evicts unused images until the cache is within its size cap and free-space
    /// floor; fails when that cannot be reached (the worker then claims no job).
    pub async fn ensure_room(&self) -> Result<(), CacheError> {
        self.ask(|reply| Msg::EnsureRoom { reply }).await?
    }

    pub async fn list(&self) -> Result<Vec<CachedImage>, CacheError> {
        self.ask(|reply| Msg::List { reply }).await
    }

    /// Removes every image no job is using; returns how many bytes were freed.
    pub async fn prune(&self) -> Result<u64, CacheError> {
        self.ask(|reply| Msg::Prune { reply }).await?
    }

    /// Stops the cache and releases its lock; downloads in flight are abandoned and
    /// their waiters get an error. Other handles fail from then on.
    pub async fn close(self) {
        let _ = self.ask(|reply| Msg::Close { reply }).await;
    }

    async fn ask<T>(&self, msg: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Result<T, CacheError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(msg(reply)).map_err(|_| CacheError::Closed)?;
        answer.await.map_err(|_| CacheError::Closed)
    }
}
