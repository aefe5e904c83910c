use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::error::CacheError;
use super::handle::CacheSettings;
use super::request::{LocalStat, Resolved};
use crate::image::contents::{ImageContents, ImageLimits, check_image_dir};
use crate::image::fetch::{Validators, reset_dir};
use crate::image::member::Member;

const INDEX_VERSION: u32 = 1;

/// The persisted index.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Index {
    pub(super) version: u32,
    pub(super) images: BTreeMap<String, IndexEntry>,
    /// URL given without a sha256 → what it served last time.
    pub(super) urls: BTreeMap<String, UrlEntry>,
    /// Local archive (canonical path) → which version of it was unpacked.
    pub(super) locals: BTreeMap<String, LocalEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct IndexEntry {
    pub(super) size_bytes: u64,
    pub(super) last_used: u64,
    pub(super) sources: Vec<String>,
    pub(super) contents: ImageContents,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct UrlEntry {
    pub(super) sha256: String,
    pub(super) etag: Option<String>,
    pub(super) last_modified: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct LocalEntry {
    pub(super) sha256: String,
    pub(super) stat: LocalStat,
}

/// The cache's state on disk and in memory; owned by the actor.
pub(super) struct State {
    pub(super) dir: PathBuf,
    pub(super) index: Index,
    pub(super) pins: HashMap<String, usize>,
    /// Held for the life of the cache: one process per cache directory.
    _lock: File,
    /// What `/metrics` reports; shared with every handle.
    pub(super) counters: std::sync::Arc<super::CacheCounters>,
}

impl State {
    pub(super) fn objects(&self) -> PathBuf {
        self.dir.join("objects")
    }

    pub(super) fn object(&self, sha256: &str) -> PathBuf {
        self.objects().join(sha256)
    }

    pub(super) fn snapshots(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    pub(super) fn load(settings: &CacheSettings) -> Result<Self, CacheError> {
        let dir = settings.dir.clone();
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Io { path, source }
        };
        for sub in ["objects", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io_err(&dir.join(sub)))?;
        }
        let lock_path = dir.join(".lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(CacheError::Locked { dir });
        }

        // Unfinished downloads of an earlier run.
        reset_dir(&dir.join("tmp")).map_err(io_err(&dir.join("tmp")))?;

        let index_path = dir.join("index.json");
        let mut index: Index = match std::fs::read(&index_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| CacheError::Index {
                path: index_path.clone(),
                source,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Index::default(),
            Err(source) => {
                return Err(CacheError::Io {
                    path: index_path,
                    source,
                });
            }
        };
        index.version = INDEX_VERSION;
        let mut state = Self {
            dir,
            index,
            pins: HashMap::new(),
            _lock: lock,
            counters: Default::default(),
        };
        state.reconcile(settings.limits)?;
        Ok(state)
    }

    /// Makes the index and the objects directory agree after a crash: entries without
    /// an object are dropped; objects without an entry (renamed into place just before
    /// a crash) are checked again and adopted, or removed if they fail.
    pub(super) fn reconcile(&mut self, limits: ImageLimits) -> Result<(), CacheError> {
        let objects = self.objects();
        self.index
            .images
            .retain(|sha, _| objects.join(sha).is_dir());
        for (sha, entry) in &mut self.index.images {
            entry.contents.dir = objects.join(sha);
        }
        let listing = std::fs::read_dir(&objects).map_err(|source| CacheError::Io {
            path: objects.clone(),
            source,
        })?;
        for item in listing.flatten() {
            let sha = item.file_name().to_string_lossy().into_owned();
            if self.index.images.contains_key(&sha) {
                continue;
            }
            let path = item.path();
            let members = Member::ALL
                .into_iter()
                .filter(|m| path.join(m.name()).is_file())
                .collect();
            match check_image_dir(&path, &members, limits) {
                Ok(contents) => {
                    tracing::info!(sha256 = %sha, "adopted an image unpacked before a crash");
                    self.index.images.insert(
                        sha,
                        IndexEntry {
                            size_bytes: allocated_size(&path),
                            last_used: now(),
                            sources: Vec::new(),
                            contents,
                        },
                    );
                }
                Err(_) => remove_object(&path),
            }
        }
        // Boot snapshots go with their image; saves cut short by a crash (`.KEY.*`
        // directories) go too.
        if let Ok(listing) = std::fs::read_dir(self.snapshots()) {
            for item in listing.flatten() {
                let sha = item.file_name().to_string_lossy().into_owned();
                if !self.index.images.contains_key(&sha) {
                    remove_object(&item.path());
                    continue;
                }
                for partial in std::fs::read_dir(item.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    if partial.file_name().to_string_lossy().starts_with('.') {
                        remove_object(&partial.path());
                    }
                }
            }
        }
        let images = &self.index.images;
        self.index
            .urls
            .retain(|_, u| images.contains_key(&u.sha256));
        self.index
            .locals
            .retain(|_, l| images.contains_key(&l.sha256));
        self.save()
    }

    pub(super) fn save(&self) -> Result<(), CacheError> {
        let path = self.dir.join("index.json");
        let partial = self.dir.join("index.json.partial");
        let text = serde_json::to_vec_pretty(&self.index)
            .unwrap_or_else(|e| unreachable!("the index always serializes: {e}"));
        std::fs::write(&partial, text)
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|source| CacheError::Io { path, source })
    }

    pub(super) fn used(&self) -> u64 {
        self.index.images.values().map(|e| e.size_bytes).sum()
    }

    pub(super) fn free_space(&self) -> u64 {
        rustix::fs::statvfs(&self.dir).map_or(u64::MAX, |s| s.f_bavail.saturating_mul(s.f_frsize))
    }

    /// Evicts least recently used, unpinned images (never `keep`) until the cache is
    /// within its limits. Returns the bytes freed.
    pub(super) async fn evict(&mut self, settings: &CacheSettings, keep: Option<&str>) -> u64 {
        let mut freed = 0;
        while self.used() > settings.max_size || self.free_space() < settings.min_free {
            let victim = self
                .index
                .images
                .iter()
                .filter(|(sha, _)| Some(sha.as_str()) != keep && !self.pins.contains_key(*sha))
                .min_by_key(|(_, e)| e.last_used)
                .map(|(sha, _)| sha.clone());
            let Some(sha) = victim else { break };
            freed += self.remove(&sha).await;
        }
        freed
    }

    pub(super) async fn remove(&mut self, sha: &str) -> u64 {
        let Some(entry) = self.index.images.remove(sha) else {
            return 0;
        };
        tracing::info!(sha256 = %sha, bytes = entry.size_bytes, "evicting image");
        self.counters.removed(entry.size_bytes);
        remove_objects(vec![self.object(sha), self.snapshots().join(sha)]).await;
        self.index.urls.retain(|_, u| u.sha256 != sha);
        self.index.locals.retain(|_, l| l.sha256 != sha);
        entry.size_bytes
    }

    pub(super) fn lookup(&self, request: &Resolved) -> Lookup {
        if let Some(sha) = request.sha256() {
            if self.index.images.contains_key(sha) {
                return Lookup::Hit(sha.to_owned());
            }
            return Lookup::Miss;
        }
        match request {
            Resolved::Local { path, stat, .. } => self
                .index
                .locals
                .get(&path.display().to_string())
                .filter(|l| l.stat == *stat && self.index.images.contains_key(&l.sha256))
                .map_or(Lookup::Miss, |l| Lookup::Hit(l.sha256.clone())),
            Resolved::Http { url, .. } => self
                .index
                .urls
                .get(url)
                .filter(|u| self.index.images.contains_key(&u.sha256))
                .map_or(Lookup::Miss, |u| {
                    Lookup::Revalidate(Validators {
                        etag: u.etag.clone(),
                        last_modified: u.last_modified.clone(),
                    })
                }),
        }
    }
}

pub(super) enum Lookup {
    Hit(String),
    Revalidate(Validators),
    Miss,
}

/// Cached files are never written again: QEMU opens them read-only under overlays.
pub(super) fn seal(dir: &Path) {
    if let Ok(listing) = std::fs::read_dir(dir) {
        for item in listing.flatten() {
            let _ = std::fs::set_permissions(item.path(), std::fs::Permissions::from_mode(0o444));
        }
    }
}

/// Removes directories on the blocking pool (an image holds gigabytes), and waits: the
/// cache's free space is measured right after.
pub(super) async fn remove_objects(paths: Vec<PathBuf>) {
    let removed = tokio::task::spawn_blocking(move || paths.iter().for_each(|p| remove_object(p)));
    if let Err(error) = removed.await {
        tracing::warn!(%error, "failed to remove cache directories");
    }
}

pub(super) fn remove_object(path: &Path) {
    if let Err(error) = std::fs::remove_dir_all(path)
        && error.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), %error, "failed to remove a cache directory");
    }
}

/// Bytes a directory's files occupy on disk (sparse files count what they use).
pub(super) fn allocated_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|listing| {
            listing
                .flatten()
                .filter_map(|item| item.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Milliseconds since the epoch: fine enough to order uses for LRU eviction.
pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
