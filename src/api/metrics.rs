//! What `/metrics` exposes (Prometheus text, from the `prometheus-client` crate).

use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::image::ImageCache;
use crate::job::{ResultReport, SnapshotEvent};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    state: String,
    /// The exception's reason; empty for completed and failed jobs.
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Phase {
    phase: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Accelerator {
    accelerator: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: String,
}

fn seconds_histogram() -> Histogram {
    // 10 ms to ~11 min: a cache-hit image phase to a whole job under TCG.
    Histogram::new(exponential_buckets(0.01, 2.0, 17))
}

/// The worker's counters, updated as jobs run and read at each scrape.
#[derive(Debug)]
pub struct Metrics {
    jobs: Family<Outcome, Counter>,
    phases: Family<Phase, Histogram, fn() -> Histogram>,
    queue_wait: Histogram,
    running: Gauge,
    capacity: i64,
    snapshot_resumes: Counter,
    snapshot_saves: Counter,
    snapshot_fallbacks: Counter,
    /// The accelerator jobs ran with, once the first job decided it.
    accelerator: std::sync::Mutex<Option<String>>,
    /// When the worker loop last went round (for the systemd watchdog).
    loop_tick: std::sync::Mutex<std::time::Instant>,
}

impl Metrics {
    pub fn new(capacity: u32) -> Self {
        Self {
            jobs: Family::default(),
            phases: Family::new_with_constructor(seconds_histogram),
            queue_wait: seconds_histogram(),
            running: Gauge::default(),
            capacity: i64::from(capacity),
            snapshot_resumes: Counter::default(),
            snapshot_saves: Counter::default(),
            snapshot_fallbacks: Counter::default(),
            accelerator: std::sync::Mutex::new(None),
            loop_tick: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    /// The worker loop went round once more.
    pub fn loop_tick(&self) {
        *self.loop_tick.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
    }

    /// How long ago the worker loop last went round.
    pub fn loop_age(&self) -> std::time::Duration {
        self.loop_tick
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    /// A job was claimed after waiting `wait_ms` in the queue.
    pub fn claimed(&self, wait_ms: u64) {
        self.running.inc();
        self.queue_wait.observe(wait_ms as f64 / 1000.0);
    }

    /// A claimed job ended with `report` (its VM is gone).
    pub fn ended(&self, report: &ResultReport) {
        self.running.dec();
        self.jobs
            .get_or_create(&Outcome {
                state: report.state.to_string(),
                reason: report.reason.map(|r| r.to_string()).unwrap_or_default(),
            })
            .inc();
        for timing in &report.timings {
            self.phases
                .get_or_create(&Phase {
                    phase: timing.phase.clone(),
                })
                .observe(timing.millis as f64 / 1000.0);
        }
        for event in &report.snapshot {
            match event {
                SnapshotEvent::Resumed => self.snapshot_resumes.inc(),
                SnapshotEvent::Saved => self.snapshot_saves.inc(),
                SnapshotEvent::Fallback => self.snapshot_fallbacks.inc(),
            };
        }
    }

    /// The accelerator `serve` decided on, once it has.
    pub fn accelerator_in_use(&self) -> Option<String> {
        self.accelerator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn accelerator(&self, name: &str) {
        let mut slot = self.accelerator.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_deref() != Some(name) {
            *slot = Some(name.to_owned());
        }
    }

    /// The exposition: these counters, and what the cache and its disk say now.
    pub async fn render(&self, cache: &ImageCache) -> String {
        let mut registry = Registry::with_prefix("qemu_worker");
        registry.register(
            "jobs",
            "Jobs this worker ended, by state and exception reason",
            self.jobs.clone(),
        );
        registry.register(
            "phase_seconds",
            "Time spent in each phase of a job (validate, image, start or resume, run, artifacts, teardown, total, ...)",
            self.phases.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time from a job's submission to its claim by this worker",
            self.queue_wait.clone(),
        );
        registry.register(
            "vms_running",
            "Jobs (VMs) running now",
            self.running.clone(),
        );
        registry.register(
            "capacity",
            "Jobs this worker runs at once (worker.yml capacity)",
            ConstGauge::new(self.capacity),
        );
        registry.register(
            "snapshot_resumes",
            "Jobs that resumed a boot snapshot instead of booting",
            self.snapshot_resumes.clone(),
        );
        registry.register(
            "snapshot_saves",
            "Boot snapshots saved (the first job on an image and machine)",
            self.snapshot_saves.clone(),
        );
        registry.register(
            "snapshot_fallbacks",
            "Jobs that could not resume their boot snapshot and booted",
            self.snapshot_fallbacks.clone(),
        );
        let counters = cache.counters();
        registry.register(
            "image_cache_hits",
            "Image requests served from the cache",
            ConstCounter::new(counters.hits.load(Ordering::Relaxed)),
        );
        registry.register(
            "image_cache_misses",
            "Image requests not served from the cache (fetched, revalidated, or waited on a fetch)",
            ConstCounter::new(counters.misses.load(Ordering::Relaxed)),
        );
        registry.register(
            "image_cache_evictions",
            "Images removed from the cache (evicted for room, or pruned)",
            ConstCounter::new(counters.evictions.load(Ordering::Relaxed)),
        );
        registry.register(
            "image_cache_evicted_bytes",
            "Bytes of the images removed from the cache",
            ConstCounter::new(counters.evicted_bytes.load(Ordering::Relaxed)),
        );
        let (bytes, images) = match cache.list().await {
            Ok(list) => (
                list.iter().map(|i| i.size_bytes).sum::<u64>(),
                list.len() as u64,
            ),
            Err(_) => (0, 0),
        };
        registry.register(
            "image_cache_bytes",
            "Bytes the cached images take",
            ConstGauge::new(to_i64(bytes)),
        );
        registry.register(
            "image_cache_images",
            "Images in the cache",
            ConstGauge::new(to_i64(images)),
        );
        if let Some(free) = free_bytes(&cache.settings().dir) {
            registry.register(
                "image_cache_free_disk_bytes",
                "Free bytes on the file system under the image cache",
                ConstGauge::new(to_i64(free)),
            );
        }
        let accelerator = self
            .accelerator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(accelerator) = accelerator {
            let family: Family<Accelerator, Gauge> = Family::default();
            family.get_or_create(&Accelerator { accelerator }).set(1);
            registry.register(
                "accelerator",
                "The accelerator jobs run with (1 for the one in use)",
                family,
            );
        }
        // A gauge of 1 rather than OpenMetrics' info type, which Prometheus' text
        // parser (promtool check metrics) does not know.
        let build: Family<Build, Gauge> = Family::default();
        build
            .get_or_create(&Build {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        registry.register("build_info", "This worker's build (1)", build);
        let mut text = String::new();
        // Writing into a String does not fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

/// The OpenMetrics exposition as Prometheus' text format 0.0.4, for clients that do not
/// ask for OpenMetrics (curl, `promtool check metrics`): a counter family is named by
/// its `_total` samples there, and there is no `# EOF` or `# UNIT`.
pub fn to_text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_counters_by_their_total_and_has_no_eof() {
        let open = "# HELP x_jobs Jobs.\n# TYPE x_jobs counter\nx_jobs_total{a=\"1\"} 2\n\
                    # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n# UNIT x_up seconds\n# EOF\n";
        assert_eq!(
            to_text_format(open),
            "# HELP x_jobs_total Jobs.\n# TYPE x_jobs_total counter\nx_jobs_total{a=\"1\"} 2\n\
             # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n"
        );
    }
}
