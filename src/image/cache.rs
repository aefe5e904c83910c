use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::contents::{ImageContents, ImageLimits, check_image_dir};
use super::disk::{BootDisk, DiskFormat, KernelFiles};
use super::fetch::{
    FetchError, Fetcher, HttpOutcome, Progress, Validators, reset_dir, resolve_local,
};
use super::member::Member;
use super::qemu_img::{self, QemuImgError};
use crate::job::{ExceptionReason, ImageLocationError, ImageReference, ImageSource};
use crate::schema::Issue;

const INDEX_VERSION: u32 = 1;

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
            other => vec![Issue::new("/image", other.to_string())],
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

/// A cached image held for one job; the image cannot be evicted while a lease lives.
#[derive(Debug)]
pub struct ImageLease {
    sha256: String,
    contents: Arc<ImageContents>,
    release: mpsc::UnboundedSender<Msg>,
}

impl ImageLease {
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn contents(&self) -> &ImageContents {
        &self.contents
    }

    /// Where the image's boot snapshots live (`<cache>/snapshots/<sha256>`); the cache
    /// removes them with the image.
    pub fn snapshot_dir(&self) -> PathBuf {
        let objects = self.contents.dir.parent().unwrap_or(&self.contents.dir);
        objects
            .parent()
            .unwrap_or(objects)
            .join("snapshots")
            .join(&self.sha256)
    }

    /// The files for direct kernel boot, when the image has a kernel.
    pub fn kernel_files(&self) -> Option<KernelFiles> {
        self.contents.kernel_files()
    }

    /// The boot chain with the job's overlay at `overlay` on top, without creating the
    /// overlay (what a boot snapshot's key is computed from).
    pub fn boot_chain(&self, overlay: &Path) -> BootDisk {
        BootDisk::stacked(self.contents.base_layers(), &[overlay])
    }

    /// Creates the job's writable qcow2 overlay at `path` over the cached base and
    /// returns the whole chain for QEMU. Its cost does not depend on the image size.
    pub async fn create_overlay(&self, path: &Path) -> Result<BootDisk, QemuImgError> {
        let base = self.contents.base_layers();
        let top = base
            .last()
            .unwrap_or_else(|| unreachable!("an image always has a boot disk"));
        qemu_img::create_overlay(path, Path::new(&top.path), top.format).await?;
        Ok(BootDisk::stacked(base, &[path]))
    }

    /// Creates the job's writable overlay at `path` over a boot snapshot's saved disk
    /// (a qcow2 overlay of this image's base) and returns the resume chain for QEMU:
    /// the base, the saved disk, the job's overlay.
    pub async fn create_resume_overlay(
        &self,
        path: &Path,
        saved_disk: &Path,
    ) -> Result<BootDisk, QemuImgError> {
        qemu_img::create_overlay(path, saved_disk, DiskFormat::Qcow2).await?;
        Ok(BootDisk::stacked(
            self.contents.base_layers(),
            &[saved_disk, path],
        ))
    }
}

impl Drop for ImageLease {
    fn drop(&mut self) {
        let _ = self.release.send(Msg::Release {
            sha256: self.sha256.clone(),
        });
    }
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
        let (tx, rx) = mpsc::unbounded_channel();
        let actor = Actor {
            state,
            settings: Arc::clone(&settings),
            fetcher,
            tx: tx.clone(),
            inflight: HashMap::new(),
        };
        tokio::spawn(actor.run(rx));
        Ok(Self { tx, settings })
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
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

fn closed() -> ImageError {
    FetchError::Internal("the image cache has shut down".into()).into()
}

/// A request with its local path resolved and checked.
#[derive(Debug, Clone)]
enum Resolved {
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
    fn key(&self) -> String {
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

    fn sha256(&self) -> Option<&str> {
        match self {
            Self::Http { sha256, .. } | Self::Local { sha256, .. } => sha256.as_deref(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Http { url, .. } => url.clone(),
            Self::Local { path, .. } => path.display().to_string(),
        }
    }
}

/// Identifies one version of a local archive without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct LocalStat {
    size: u64,
    mtime_ns: i128,
    inode: u64,
}

async fn resolve(request: &ImageRequest, allowed: &[PathBuf]) -> Result<Resolved, ImageError> {
    match &request.source {
        ImageSource::Http(url) => Ok(Resolved::Http {
            url: url.clone(),
            sha256: request.sha256.clone(),
        }),
        ImageSource::Local(path) => {
            let resolved = resolve_local(path, allowed)?;
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

enum Msg {
    Acquire {
        request: Resolved,
        progress: Option<Progress>,
        reply: oneshot::Sender<Result<ImageLease, ImageError>>,
    },
    Fetched {
        key: String,
        request: Resolved,
        result: Result<Arrival, ImageError>,
    },
    Release {
        sha256: String,
    },
    EnsureRoom {
        reply: oneshot::Sender<Result<(), CacheError>>,
    },
    List {
        reply: oneshot::Sender<Vec<CachedImage>>,
    },
    Prune {
        reply: oneshot::Sender<Result<u64, CacheError>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

#[derive(Debug)]
enum Arrival {
    Unpacked {
        sha256: String,
        tmp: PathBuf,
        contents: Box<ImageContents>,
        validators: Validators,
    },
    NotModified,
}

/// The persisted index.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    version: u32,
    images: BTreeMap<String, IndexEntry>,
    /// URL given without a sha256 → what it served last time.
    urls: BTreeMap<String, UrlEntry>,
    /// Local archive (canonical path) → which version of it was unpacked.
    locals: BTreeMap<String, LocalEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    size_bytes: u64,
    last_used: u64,
    sources: Vec<String>,
    contents: ImageContents,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UrlEntry {
    sha256: String,
    etag: Option<String>,
    last_modified: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LocalEntry {
    sha256: String,
    stat: LocalStat,
}

/// The cache's state on disk and in memory; owned by the actor.
struct State {
    dir: PathBuf,
    index: Index,
    pins: HashMap<String, usize>,
    /// Held for the life of the cache: one process per cache directory.
    _lock: File,
}

impl State {
    fn objects(&self) -> PathBuf {
        self.dir.join("objects")
    }

    fn object(&self, sha256: &str) -> PathBuf {
        self.objects().join(sha256)
    }

    fn snapshots(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    fn load(settings: &CacheSettings) -> Result<Self, CacheError> {
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
        };
        state.reconcile(settings.limits)?;
        Ok(state)
    }

    /// Makes the index and the objects directory agree after a crash: entries without
    /// an object are dropped; objects without an entry (renamed into place just before
    /// a crash) are checked again and adopted, or removed if they fail.
    fn reconcile(&mut self, limits: ImageLimits) -> Result<(), CacheError> {
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

    fn save(&self) -> Result<(), CacheError> {
        let path = self.dir.join("index.json");
        let partial = self.dir.join("index.json.partial");
        let text = serde_json::to_vec_pretty(&self.index)
            .unwrap_or_else(|e| unreachable!("the index always serializes: {e}"));
        std::fs::write(&partial, text)
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|source| CacheError::Io { path, source })
    }

    fn used(&self) -> u64 {
        self.index.images.values().map(|e| e.size_bytes).sum()
    }

    fn free_space(&self) -> u64 {
        rustix::fs::statvfs(&self.dir).map_or(u64::MAX, |s| s.f_bavail.saturating_mul(s.f_frsize))
    }

    /// Evicts least recently used, unpinned images (never `keep`) until the cache is
    /// within its limits. Returns the bytes freed.
    async fn evict(&mut self, settings: &CacheSettings, keep: Option<&str>) -> u64 {
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

    async fn remove(&mut self, sha: &str) -> u64 {
        let Some(entry) = self.index.images.remove(sha) else {
            return 0;
        };
        tracing::info!(sha256 = %sha, bytes = entry.size_bytes, "evicting image");
        remove_objects(vec![self.object(sha), self.snapshots().join(sha)]).await;
        self.index.urls.retain(|_, u| u.sha256 != sha);
        self.index.locals.retain(|_, l| l.sha256 != sha);
        entry.size_bytes
    }

    fn lookup(&self, request: &Resolved) -> Lookup {
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

enum Lookup {
    Hit(String),
    Revalidate(Validators),
    Miss,
}

struct Actor {
    state: State,
    settings: Arc<CacheSettings>,
    fetcher: Fetcher,
    tx: mpsc::UnboundedSender<Msg>,
    inflight: HashMap<String, Vec<oneshot::Sender<Result<ImageLease, ImageError>>>>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Acquire {
                    request,
                    progress,
                    reply,
                } => self.acquire(request, progress, reply),
                Msg::Fetched {
                    key,
                    request,
                    result,
                } => self.fetched(&key, &request, result).await,
                Msg::Release { sha256 } => self.release(&sha256).await,
                Msg::EnsureRoom { reply } => {
                    let _ = reply.send(self.ensure_room().await);
                }
                Msg::List { reply } => {
                    let _ = reply.send(self.list());
                }
                Msg::Prune { reply } => {
                    let _ = reply.send(self.prune().await);
                }
                Msg::Close { reply } => {
                    let Self {
                        state, inflight, ..
                    } = self;
                    drop(inflight);
                    drop(state); // releases the lock before anyone hears we are closed
                    let _ = reply.send(());
                    return;
                }
            }
        }
    }

    fn acquire(
        &mut self,
        request: Resolved,
        progress: Option<Progress>,
        reply: oneshot::Sender<Result<ImageLease, ImageError>>,
    ) {
        let validators = match self.state.lookup(&request) {
            Lookup::Hit(sha) => {
                self.grant(&sha, reply);
                return;
            }
            Lookup::Revalidate(validators) => validators,
            Lookup::Miss => Validators::default(),
        };
        let key = request.key();
        if let Some(waiters) = self.inflight.get_mut(&key) {
            waiters.push(reply);
            return;
        }
        self.inflight.insert(key.clone(), vec![reply]);
        let tmp = self.state.dir.join("tmp").join(unique_name());
        let fetcher = self.fetcher.clone();
        let settings = Arc::clone(&self.settings);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = download(&fetcher, &settings, &request, &validators, &tmp, progress).await;
            if result.is_err() {
                remove_objects(vec![tmp]).await;
            }
            let _ = tx.send(Msg::Fetched {
                key,
                request,
                result,
            });
        });
    }

    async fn fetched(
        &mut self,
        key: &str,
        request: &Resolved,
        result: Result<Arrival, ImageError>,
    ) {
        let waiters = self.inflight.remove(key).unwrap_or_default();
        let outcome = match result {
            Ok(arrival) => self.store(request, arrival).await,
            Err(error) => Err(error),
        };
        for waiter in waiters {
            match &outcome {
                Ok(sha) => self.grant(sha, waiter),
                Err(error) => {
                    let _ = waiter.send(Err(error.clone()));
                }
            }
        }
        if let Ok(sha) = &outcome {
            self.state.evict(&self.settings, Some(sha)).await;
            self.save_logged();
        }
    }

    /// Moves a finished download into place (or finds it already there) and indexes it.
    async fn store(&mut self, request: &Resolved, arrival: Arrival) -> Result<String, ImageError> {
        let (sha, validators) = match arrival {
            Arrival::NotModified => {
                let Resolved::Http { url, .. } = request else {
                    return Err(
                        FetchError::Internal("a local image cannot be unmodified".into()).into(),
                    );
                };
                return self
                    .state
                    .index
                    .urls
                    .get(url)
                    .map(|u| u.sha256.clone())
                    .filter(|sha| self.state.index.images.contains_key(sha))
                    .ok_or_else(|| {
                        FetchError::Internal(format!("{url} was evicted while being revalidated"))
                            .into()
                    });
            }
            Arrival::Unpacked {
                sha256,
                tmp,
                mut contents,
                validators,
            } => {
                let object = self.state.object(&sha256);
                if self.state.index.images.contains_key(&sha256) {
                    remove_objects(vec![tmp]).await;
                } else {
                    seal(&tmp);
                    std::fs::rename(&tmp, &object)
                        .map_err(|source| FetchError::Write { source })?;
                    contents.dir = object.clone();
                    self.state.index.images.insert(
                        sha256.clone(),
                        IndexEntry {
                            size_bytes: allocated_size(&object),
                            last_used: now(),
                            sources: Vec::new(),
                            contents: *contents,
                        },
                    );
                }
                (sha256, validators)
            }
        };
        if let Some(entry) = self.state.index.images.get_mut(&sha) {
            let source = request.describe();
            if !entry.sources.contains(&source) {
                entry.sources.push(source);
            }
        }
        match request {
            Resolved::Http { url, sha256: None } => {
                self.state.index.urls.insert(
                    url.clone(),
                    UrlEntry {
                        sha256: sha.clone(),
                        etag: validators.etag,
                        last_modified: validators.last_modified,
                    },
                );
            }
            Resolved::Local { path, stat, .. } => {
                self.state.index.locals.insert(
                    path.display().to_string(),
                    LocalEntry {
                        sha256: sha.clone(),
                        stat: *stat,
                    },
                );
            }
            Resolved::Http { .. } => {}
        }
        Ok(sha)
    }

    /// Pins `sha` and hands a lease to `reply`, unless the requester gave up.
    fn grant(&mut self, sha: &str, reply: oneshot::Sender<Result<ImageLease, ImageError>>) {
        let Some(entry) = self.state.index.images.get_mut(sha) else {
            let _ = reply.send(Err(FetchError::Internal(format!(
                "image {sha} vanished from the cache"
            ))
            .into()));
            return;
        };
        if reply.is_closed() {
            return;
        }
        entry.last_used = now();
        *self.state.pins.entry(sha.to_owned()).or_default() += 1;
        let lease = ImageLease {
            sha256: sha.to_owned(),
            contents: Arc::new(entry.contents.clone()),
            release: self.tx.clone(),
        };
        if let Err(Ok(lease)) = reply.send(Ok(lease)) {
            // Dropping the lease sends the matching release.
            drop(lease);
        }
    }

    async fn release(&mut self, sha: &str) {
        if let Some(count) = self.state.pins.get_mut(sha) {
            *count -= 1;
            if *count == 0 {
                self.state.pins.remove(sha);
            }
        }
        if let Some(entry) = self.state.index.images.get_mut(sha) {
            entry.last_used = now();
        }
        self.state.evict(&self.settings, None).await;
        self.save_logged();
    }

    async fn ensure_room(&mut self) -> Result<(), CacheError> {
        self.state.evict(&self.settings, None).await;
        self.save_logged();
        let (used, free) = (self.state.used(), self.state.free_space());
        if used > self.settings.max_size || free < self.settings.min_free {
            return Err(CacheError::NoRoom {
                free,
                min_free: self.settings.min_free,
                used,
                max_size: self.settings.max_size,
            });
        }
        Ok(())
    }

    fn list(&self) -> Vec<CachedImage> {
        let mut images: Vec<CachedImage> = self
            .state
            .index
            .images
            .iter()
            .map(|(sha, e)| CachedImage {
                sha256: sha.clone(),
                size_bytes: e.size_bytes,
                last_used: e.last_used,
                in_use: self.state.pins.get(sha).copied().unwrap_or(0),
                sources: e.sources.clone(),
            })
            .collect();
        images.sort_by_key(|i| std::cmp::Reverse(i.last_used));
        images
    }

    async fn prune(&mut self) -> Result<u64, CacheError> {
        let unused: Vec<String> = self
            .state
            .index
            .images
            .keys()
            .filter(|sha| !self.state.pins.contains_key(*sha))
            .cloned()
            .collect();
        let mut freed = 0;
        for sha in &unused {
            freed += self.state.remove(sha).await;
        }
        self.state.save()?;
        Ok(freed)
    }

    fn save_logged(&self) {
        if let Err(error) = self.state.save() {
            tracing::error!(error = %error, "failed to save the image cache index");
        }
    }
}

async fn download(
    fetcher: &Fetcher,
    settings: &CacheSettings,
    request: &Resolved,
    validators: &Validators,
    tmp: &Path,
    progress: Option<Progress>,
) -> Result<Arrival, ImageError> {
    tokio::fs::create_dir_all(tmp)
        .await
        .map_err(|source| FetchError::Write { source })?;
    let limits = settings.limits;
    let (unpacked, validators) = match request {
        Resolved::Http { url, sha256 } => {
            match fetcher
                .fetch_http(url, sha256.as_deref(), validators, tmp, limits, progress)
                .await?
            {
                HttpOutcome::NotModified => {
                    remove_objects(vec![tmp.to_path_buf()]).await;
                    return Ok(Arrival::NotModified);
                }
                HttpOutcome::Fetched {
                    unpacked,
                    validators,
                } => (*unpacked, validators),
            }
        }
        Resolved::Local { path, sha256, .. } => {
            let unpacked = fetcher
                .fetch_local(
                    path,
                    &settings.allowed_local_dirs,
                    sha256.as_deref(),
                    tmp,
                    limits,
                )
                .await?;
            (unpacked, Validators::default())
        }
    };
    Ok(Arrival::Unpacked {
        sha256: unpacked.sha256,
        tmp: tmp.to_path_buf(),
        contents: Box::new(unpacked.contents),
        validators,
    })
}

/// Cached files are never written again: QEMU opens them read-only under overlays.
fn seal(dir: &Path) {
    if let Ok(listing) = std::fs::read_dir(dir) {
        for item in listing.flatten() {
            let _ = std::fs::set_permissions(item.path(), std::fs::Permissions::from_mode(0o444));
        }
    }
}

/// Removes directories on the blocking pool (an image holds gigabytes), and waits: the
/// cache's free space is measured right after.
async fn remove_objects(paths: Vec<PathBuf>) {
    let removed = tokio::task::spawn_blocking(move || paths.iter().for_each(|p| remove_object(p)));
    if let Err(error) = removed.await {
        tracing::warn!(%error, "failed to remove cache directories");
    }
}

fn remove_object(path: &Path) {
    if let Err(error) = std::fs::remove_dir_all(path)
        && error.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), %error, "failed to remove a cache directory");
    }
}

/// Bytes a directory's files occupy on disk (sparse files count what they use).
fn allocated_size(dir: &Path) -> u64 {
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
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn unique_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        now(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
