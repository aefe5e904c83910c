use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, oneshot};

use super::error::{CacheError, ImageError};
use super::handle::{CacheSettings, CachedImage};
use super::lease::ImageLease;
use super::request::Resolved;
use super::state::{
    IndexEntry, LocalEntry, Lookup, State, UrlEntry, allocated_size, now, remove_objects, seal,
};
use crate::image::contents::ImageContents;
use crate::image::fetch::{FetchError, Fetcher, HttpOutcome, Progress, Validators};

pub(super) enum Msg {
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
pub(super) enum Arrival {
    Unpacked {
        sha256: String,
        tmp: PathBuf,
        contents: Box<ImageContents>,
        validators: Validators,
    },
    NotModified,
}

pub(super) struct Actor {
    state: State,
    settings: Arc<CacheSettings>,
    fetcher: Fetcher,
    tx: mpsc::UnboundedSender<Msg>,
    inflight: HashMap<String, Vec<oneshot::Sender<Result<ImageLease, ImageError>>>>,
}

impl Actor {
    /// Starts the task that owns `state`; returns the channel to it.
    pub(super) fn spawn(
        state: State,
        settings: Arc<CacheSettings>,
        fetcher: Fetcher,
    ) -> mpsc::UnboundedSender<Msg> {
        let (tx, rx) = mpsc::unbounded_channel();
        let actor = Self {
            state,
            settings,
            fetcher,
            tx: tx.clone(),
            inflight: HashMap::new(),
        };
        tokio::spawn(actor.run(rx));
        tx
    }

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
                self.state.counters.hits.fetch_add(1, Ordering::Relaxed);
                self.grant(&sha, reply);
                return;
            }
            Lookup::Revalidate(validators) => validators,
            Lookup::Miss => Validators::default(),
        };
        self.state.counters.misses.fetch_add(1, Ordering::Relaxed);
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
                let url = match request {
                    Resolved::Http { url, .. } => url,
                    // A local archive is read whole every time; it has no 304.
                    Resolved::Local { path, .. } => {
                        return Err(FetchError::UnexpectedNotModified {
                            url: path.display().to_string(),
                        }
                        .into());
                    }
                };
                return self
                    .state
                    .index
                    .urls
                    .get(url)
                    .map(|u| u.sha256.clone())
                    .filter(|sha| self.state.index.images.contains_key(sha))
                    .ok_or_else(|| {
                        FetchError::EvictedWhileRevalidated { url: url.clone() }.into()
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
            let _ = reply.send(Err(FetchError::Vanished {
                sha256: sha.to_owned(),
            }
            .into()));
            return;
        };
        if reply.is_closed() {
            return;
        }
        entry.last_used = now();
        *self.state.pins.entry(sha.to_owned()).or_default() += 1;
        let lease = ImageLease::new(
            sha.to_owned(),
            Arc::new(entry.contents.clone()),
            self.tx.clone(),
        );
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

pub(super) async fn download(
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

pub(super) fn unique_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        now(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
