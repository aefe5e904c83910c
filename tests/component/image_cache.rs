//! The image cache against a real HTTP server on loopback: single-flight downloads,
//! cancellation, errors and retries, verification, persistence, eviction, crash
//! leftovers, local images and per-job overlays.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qemu_worker::image::{
    CacheError, CacheSettings, FetchError, FetchPolicy, Fetcher, ImageCache, ImageLimits,
    ImageRequest, pack_image,
};
use qemu_worker::job::{ExceptionReason, ImageSource};

const LIMITS: ImageLimits = ImageLimits {
    max_image_bytes: 64 << 20,
};

/// Builds a real image archive whose machine.json sets `memory` (so archives differ).
fn archive(dir: &Path, memory: u32) -> Vec<u8> {
    let image = dir.join(format!("image-{memory}"));
    std::fs::create_dir_all(&image).expect("image dir");
    std::fs::write(
        image.join("machine.json"),
        format!(r#"{{"version": 1, "memory": {memory}}}"#),
    )
    .expect("machine.json");
    let disk = image.join("disk.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("32M")
        .status()
        .expect("qemu-img is missing: install it with `apt-get install qemu-utils`");
    assert!(status.success());
    let out = dir.join(format!("image-{memory}.tar.zst"));
    pack_image(&image, &out, LIMITS).expect("pack");
    std::fs::read(&out).expect("archive")
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest: [u8; 32] = sha2::Sha256::digest(bytes).into();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a route of the test server does.
#[derive(Clone)]
enum Route {
    /// Serves the bytes with an ETag, `chunk` bytes every `delay`.
    Archive {
        body: Arc<Vec<u8>>,
        etag: &'static str,
        chunk: usize,
        delay: Duration,
    },
    Status(u16, &'static str),
    /// Answers 500 for the first `failures` requests, then serves the archive.
    Flaky {
        failures: usize,
        body: Arc<Vec<u8>>,
    },
}

/// A real HTTP/1.1 server on 127.0.0.1 that counts requests per path.
struct TestServer {
    base: String,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    not_modified: Arc<Mutex<usize>>,
}

impl TestServer {
    fn start(routes: Vec<(&'static str, Route)>) -> Self {
        let server = tiny_http::Server::http("127.0.0.1:0").expect("bind loopback");
        let base = format!("http://{}", server.server_addr());
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let not_modified = Arc::new(Mutex::new(0));
        let routes: HashMap<&str, Route> = routes.into_iter().collect();
        let (c, n) = (Arc::clone(&counts), Arc::clone(&not_modified));
        std::thread::spawn(move || {
            for request in server.incoming_requests() {
                let path = request.url().to_owned();
                let seen = {
                    let mut counts = c.lock().expect("lock");
                    let count = counts.entry(path.clone()).or_insert(0);
                    *count += 1;
                    *count
                };
                let route = routes.get(path.as_str()).cloned();
                let n = Arc::clone(&n);
                // One thread per request, so concurrent downloads really overlap.
                std::thread::spawn(move || respond(request, route, seen, &n));
            }
        });
        Self {
            base,
            counts,
            not_modified,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn count(&self, path: &str) -> usize {
        self.counts
            .lock()
            .expect("lock")
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

fn respond(
    request: tiny_http::Request,
    route: Option<Route>,
    seen: usize,
    not_modified: &Mutex<usize>,
) {
    let header =
        |name: &str, value: &str| tiny_http::Header::from_bytes(name, value).expect("header");
    let result = match route {
        None => request.respond(tiny_http::Response::from_string("no route").with_status_code(404)),
        Some(Route::Status(code, body)) => {
            request.respond(tiny_http::Response::from_string(body).with_status_code(code))
        }
        Some(Route::Flaky { failures, body }) if seen <= failures => {
            let _ = body;
            request.respond(tiny_http::Response::from_string("try later").with_status_code(500))
        }
        Some(Route::Flaky { body, .. }) => {
            request.respond(tiny_http::Response::from_data(body.to_vec()))
        }
        Some(Route::Archive {
            body,
            etag,
            chunk,
            delay,
        }) => {
            let matches = request
                .headers()
                .iter()
                .any(|h| h.field.equiv("If-None-Match") && h.value.as_str() == etag);
            if matches {
                *not_modified.lock().expect("lock") += 1;
                request.respond(tiny_http::Response::empty(304).with_header(header("ETag", etag)))
            } else {
                let len = body.len();
                let reader = Slow {
                    body,
                    at: 0,
                    chunk,
                    delay,
                };
                request.respond(tiny_http::Response::new(
                    200.into(),
                    vec![header("ETag", etag)],
                    reader,
                    Some(len),
                    None,
                ))
            }
        }
    };
    let _ = result;
}

struct Slow {
    body: Arc<Vec<u8>>,
    at: usize,
    chunk: usize,
    delay: Duration,
}

impl Read for Slow {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at >= self.body.len() {
            return Ok(0);
        }
        std::thread::sleep(self.delay);
        let n = buf.len().min(self.chunk).min(self.body.len() - self.at);
        buf[..n].copy_from_slice(&self.body[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn fast(body: &Arc<Vec<u8>>) -> Route {
    Route::Archive {
        body: Arc::clone(body),
        etag: "\"v1\"",
        chunk: 1 << 20,
        delay: Duration::ZERO,
    }
}

struct Fixture {
    root: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Self {
            root: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn settings(&self) -> CacheSettings {
        CacheSettings {
            dir: self.path("cache"),
            max_size: 1 << 30,
            min_free: 0,
            limits: LIMITS,
            allowed_local_dirs: vec![self.path("allowed")],
        }
    }

    async fn open(&self, settings: CacheSettings) -> ImageCache {
        let fetcher = Fetcher::new(FetchPolicy {
            attempts: 3,
            first_backoff: Duration::from_millis(10),
            ..FetchPolicy::default()
        });
        ImageCache::open(settings, fetcher)
            .await
            .expect("cache opens")
    }
}

fn http(url: String, sha256: Option<String>) -> ImageRequest {
    ImageRequest {
        source: ImageSource::Http(url),
        sha256,
    }
}

#[tokio::test]
async fn concurrent_jobs_share_one_download_and_a_cancelled_waiter_harms_no_one() {
    let fx = Fixture::new();
    let body = Arc::new(archive(fx.root.path(), 128));
    let server = TestServer::start(vec![(
        "/slow.tar.zst",
        Route::Archive {
            body: Arc::clone(&body),
            etag: "\"v1\"",
            // About 40 chunks 10 ms apart: the download takes ~400 ms.
            chunk: body.len() / 40 + 1,
            delay: Duration::from_millis(10),
        },
    )]);
    let cache = fx.open(fx.settings()).await;
    let request = http(server.url("/slow.tar.zst"), None);

    let (c1, r1) = (cache.clone(), request.clone());
    let cancelled = tokio::spawn(async move { c1.acquire(&r1, None).await });
    let (c2, r2) = (cache.clone(), request.clone());
    let patient = tokio::spawn(async move { c2.acquire(&r2, None).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    cancelled.abort();
    assert!(cancelled.await.expect_err("aborted").is_cancelled());

    let lease = patient
        .await
        .expect("joins")
        .expect("the other job still gets the image");
    assert_eq!(lease.sha256(), sha256_hex(&body));
    assert_eq!(
        server.count("/slow.tar.zst"),
        1,
        "one download for both jobs"
    );
    let listed = cache.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].in_use, 1, "the cancelled job holds no pin");
    drop(lease);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(cache.list().await.expect("list")[0].in_use, 0);
}

#[tokio::test]
async fn client_errors_are_malformed_with_status_and_excerpt() {
    let fx = Fixture::new();
    let server = TestServer::start(vec![("/gone", Route::Status(404, "no such image here"))]);
    let cache = fx.open(fx.settings()).await;
    let error = cache
        .acquire(&http(server.url("/gone"), None), None)
        .await
        .expect_err("404");
    assert_eq!(error.reason(), ExceptionReason::MalformedPayload);
    let text = error.to_string();
    assert!(
        text.contains("HTTP 404") && text.contains("no such image here"),
        "{text}"
    );
    assert_eq!(server.count("/gone"), 1, "4xx is not retried");
    let issues = error.to_issues();
    assert_eq!(issues[0].path, "/image");
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed_or_give_up() {
    let fx = Fixture::new();
    let body = Arc::new(archive(fx.root.path(), 128));
    let server = TestServer::start(vec![
        (
            "/flaky",
            Route::Flaky {
                failures: 2,
                body: Arc::clone(&body),
            },
        ),
        ("/down", Route::Status(503, "maintenance")),
    ]);
    let cache = fx.open(fx.settings()).await;
    cache
        .acquire(&http(server.url("/flaky"), None), None)
        .await
        .expect("third attempt succeeds");
    assert_eq!(server.count("/flaky"), 3);

    let error = cache
        .acquire(&http(server.url("/down"), None), None)
        .await
        .expect_err("never succeeds");
    assert_eq!(error.reason(), ExceptionReason::ResourceUnavailable);
    assert!(matches!(
        error.fetch_error(),
        FetchError::Exhausted { attempts: 3, .. }
    ));
    assert_eq!(server.count("/down"), 3);
}

#[tokio::test]
async fn a_digest_mismatch_is_malformed_and_leaves_nothing_behind() {
    let fx = Fixture::new();
    let body = Arc::new(archive(fx.root.path(), 128));
    let server = TestServer::start(vec![("/i.tar.zst", fast(&body))]);
    let cache = fx.open(fx.settings()).await;
    let wrong = "0".repeat(64);
    let error = cache
        .acquire(&http(server.url("/i.tar.zst"), Some(wrong)), None)
        .await
        .expect_err("mismatch");
    assert_eq!(error.reason(), ExceptionReason::MalformedPayload);
    assert!(error.to_string().contains(&sha256_hex(&body)), "{error}");
    assert!(cache.list().await.expect("list").is_empty());
    assert_eq!(
        std::fs::read_dir(fx.path("cache/tmp"))
            .expect("tmp")
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(fx.path("cache/objects"))
            .expect("objects")
            .count(),
        0
    );
}

#[tokio::test]
async fn archives_over_the_cap_are_refused_while_downloading() {
    let fx = Fixture::new();
    let body = Arc::new(archive(fx.root.path(), 128));
    let server = TestServer::start(vec![("/i.tar.zst", fast(&body))]);
    let mut settings = fx.settings();
    settings.limits = ImageLimits {
        max_image_bytes: body.len() as u64 / 2,
    };
    let cache = fx.open(settings).await;
    let error = cache
        .acquire(&http(server.url("/i.tar.zst"), None), None)
        .await
        .expect_err("too large");
    assert!(
        matches!(error.fetch_error(), FetchError::TooLarge { .. }),
        "{error}"
    );
}

#[tokio::test]
async fn the_index_survives_a_restart_and_pinned_hits_need_no_request() {
    let fx = Fixture::new();
    let body = Arc::new(archive(fx.root.path(), 128));
    let server = TestServer::start(vec![("/i.tar.zst", fast(&body))]);
    let request = http(server.url("/i.tar.zst"), Some(sha256_hex(&body)));

    let cache = fx.open(fx.settings()).await;
    drop(cache.acquire(&request, None).await.expect("first"));
    cache.close().await;

    let cache = fx.open(fx.settings()).await;
    let lease = cache
        .acquire(&request, None)
        .await
        .expect("hit after restart");
    assert_eq!(
        server.count("/i.tar.zst"),
        1,
        "a pinned hit makes no request"
    );
    assert_eq!(lease.contents().machine.memory, Some(128));
}

#[tokio::test]
async fn urls_without_a_digest_are_revalidated() {
    let fx = Fixture::new();
    let body = Arc::new(archive(fx.root.path(), 128));
    let server = TestServer::start(vec![("/i.tar.zst", fast(&body))]);
    let cache = fx.open(fx.settings()).await;
    let request = http(server.url("/i.tar.zst"), None);
    let first = cache.acquire(&request, None).await.expect("first");
    let second = cache.acquire(&request, None).await.expect("second");
    assert_eq!(first.sha256(), second.sha256());
    assert_eq!(server.count("/i.tar.zst"), 2);
    assert_eq!(
        *server.not_modified.lock().expect("lock"),
        1,
        "the second request was conditional"
    );
}

#[tokio::test]
async fn eviction_is_lru_and_never_touches_images_in_use() {
    let fx = Fixture::new();
    let bodies: Vec<Arc<Vec<u8>>> = [128, 256, 384]
        .iter()
        .map(|m| Arc::new(archive(fx.root.path(), *m)))
        .collect();
    let server = TestServer::start(vec![
        ("/a", fast(&bodies[0])),
        ("/b", fast(&bodies[1])),
        ("/c", fast(&bodies[2])),
    ]);
    let mut settings = fx.settings();
    // Room for about two of these images (each allocates a few hundred KiB).
    let one = {
        let cache = fx.open(settings.clone()).await;
        drop(
            cache
                .acquire(&http(server.url("/a"), None), None)
                .await
                .expect("a"),
        );
        let size = cache.list().await.expect("list")[0].size_bytes;
        cache.prune().await.expect("prune");
        cache.close().await;
        size
    };
    settings.max_size = one * 2 + one / 2;
    let cache = fx.open(settings).await;

    let a = cache
        .acquire(&http(server.url("/a"), None), None)
        .await
        .expect("a");
    drop(
        cache
            .acquire(&http(server.url("/b"), None), None)
            .await
            .expect("b"),
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(
        cache
            .acquire(&http(server.url("/c"), None), None)
            .await
            .expect("c"),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;

    let listed = cache.list().await.expect("list");
    let kept: Vec<&str> = listed
        .iter()
        .map(|i| i.sources[0].rsplit('/').next().unwrap_or(""))
        .collect();
    assert!(
        kept.contains(&"a"),
        "the image in use was evicted: {kept:?}"
    );
    assert!(
        kept.contains(&"c"),
        "the newest image was evicted: {kept:?}"
    );
    assert!(
        !kept.contains(&"b"),
        "the least recently used image was kept: {kept:?}"
    );
    drop(a);
    cache.ensure_room().await.expect("room after eviction");
}

#[tokio::test]
async fn no_room_is_reported_when_everything_is_in_use() {
    let fx = Fixture::new();
    let body = Arc::new(archive(fx.root.path(), 128));
    let server = TestServer::start(vec![("/a", fast(&body))]);
    let mut settings = fx.settings();
    settings.max_size = 1;
    let cache = fx.open(settings).await;
    let _lease = cache
        .acquire(&http(server.url("/a"), None), None)
        .await
        .expect("a");
    let error = cache
        .ensure_room()
        .await
        .expect_err("pinned image over the cap");
    assert!(matches!(error, CacheError::NoRoom { .. }), "{error}");
}

#[tokio::test]
async fn leftovers_of_a_crash_are_swept_or_adopted() {
    let fx = Fixture::new();
    let body = Arc::new(archive(fx.root.path(), 128));
    let server = TestServer::start(vec![("/a", fast(&body))]);
    let sha = sha256_hex(&body);
    {
        let cache = fx.open(fx.settings()).await;
        drop(
            cache
                .acquire(&http(server.url("/a"), None), None)
                .await
                .expect("a"),
        );
        cache.close().await;
    }
    // A crash: the index lost, a half-written download, and a broken object.
    std::fs::remove_file(fx.path("cache/index.json")).expect("drop index");
    std::fs::create_dir_all(fx.path("cache/tmp/123-half")).expect("tmp");
    std::fs::write(fx.path("cache/tmp/123-half/disk.qcow2"), b"partial").expect("partial");
    std::fs::create_dir_all(fx.path("cache/objects/garbage")).expect("garbage");

    let cache = fx.open(fx.settings()).await;
    assert_eq!(
        std::fs::read_dir(fx.path("cache/tmp"))
            .expect("tmp")
            .count(),
        0
    );
    assert!(!fx.path("cache/objects/garbage").exists());
    let listed = cache.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].sha256, sha, "the complete object was adopted");
}

#[tokio::test]
async fn one_process_per_cache_directory() {
    let fx = Fixture::new();
    let _cache = fx.open(fx.settings()).await;
    let error = ImageCache::open(fx.settings(), Fetcher::new(FetchPolicy::default()))
        .await
        .expect_err("second opener");
    assert!(matches!(error, CacheError::Locked { .. }), "{error}");
}

#[tokio::test]
async fn local_images_must_really_be_inside_an_allowed_directory() {
    let fx = Fixture::new();
    let body = archive(fx.root.path(), 128);
    std::fs::create_dir_all(fx.path("allowed")).expect("allowed");
    std::fs::write(fx.path("allowed/i.tar.zst"), &body).expect("write");
    std::fs::write(fx.path("outside.tar.zst"), &body).expect("write");
    std::os::unix::fs::symlink(fx.path("outside.tar.zst"), fx.path("allowed/link.tar.zst"))
        .expect("symlink");
    let cache = fx.open(fx.settings()).await;

    let local = |path: PathBuf| ImageRequest {
        source: ImageSource::Local(path),
        sha256: None,
    };
    let lease = cache
        .acquire(&local(fx.path("allowed/i.tar.zst")), None)
        .await
        .expect("allowed");
    assert_eq!(lease.sha256(), sha256_hex(&body));
    let error = cache
        .acquire(&local(fx.path("allowed/link.tar.zst")), None)
        .await
        .expect_err("symlink escape");
    assert!(
        matches!(error.fetch_error(), FetchError::LocalOutsideAllowed { .. }),
        "{error}"
    );
    assert_eq!(error.reason(), ExceptionReason::MalformedPayload);
}

#[tokio::test]
async fn overlays_are_created_over_the_cached_base() {
    let fx = Fixture::new();
    let body = Arc::new(archive(fx.root.path(), 128));
    let server = TestServer::start(vec![("/a", fast(&body))]);
    let cache = fx.open(fx.settings()).await;
    let lease = cache
        .acquire(&http(server.url("/a"), None), None)
        .await
        .expect("a");
    let overlay = fx.path("overlay.qcow2");
    let disk = lease.create_overlay(&overlay).await.expect("overlay");
    assert_eq!(disk.layers.len(), 2);
    assert_eq!(disk.layers[1].path, overlay.display().to_string());
    let info = Command::new("qemu-img")
        .args(["info", "--output", "json"])
        .arg(&overlay)
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(
        info["backing-filename"].as_str(),
        Some(disk.layers[0].path.as_str())
    );
    assert_eq!(info["virtual-size"], 32 << 20);
}
