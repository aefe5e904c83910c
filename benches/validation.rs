//! Payload validation time per payload, next to a serde-only parse of the same payload.
//!
//! `cargo bench --bench validation` prints, for each example payload, the median and
//! spread of a full `validate_payload` (parse with lines, schema, semantic rules, machine
//! layering and limits) and of the baseline: deserializing the same text straight into
//! `JobPayload` with serde, which checks types and nothing else. Goal: well under 1 ms.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use qemu_worker::config::load_config;
use qemu_worker::job::{Identity, JobPayload, PayloadContext, validate_payload};

use test_support::figure;

const ROUNDS: usize = 2000;

fn measure(mut f: impl FnMut()) -> Stats {
    for _ in 0..ROUNDS / 10 {
        f();
    }
    let mut samples: Vec<Duration> = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    samples.sort();
    Stats {
        all: samples.iter().map(|d| micros(*d)).collect(),
        p10: samples[ROUNDS / 10],
        median: samples[ROUNDS / 2],
        p90: samples[ROUNDS * 9 / 10],
    }
}

struct Stats {
    p10: Duration,
    median: Duration,
    p90: Duration,
    /// Every sample, in µs.
    all: Vec<f64>,
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = load_config(Some(&repo.join("worker.yml")))
        .expect("worker.yml loads")
        .config;
    let context = PayloadContext::from_config(&config);
    let identity = Identity::derive("bench", 0);

    // The first validation compiles the schema; report it apart from steady state.
    let first_text = std::fs::read_to_string(repo.join("examples/hello.yml")).expect("example");
    let start = Instant::now();
    assert!(validate_payload(&first_text, &context, &identity).is_valid());
    let cold = start.elapsed();

    println!("payload validation ({ROUNDS} rounds each; µs: median [p10, p90])");
    println!(
        "{:<22} {:>26} {:>26} {:>7}",
        "payload", "validate_payload", "baseline: serde only", "ratio"
    );
    for name in ["hello.yml", "pinned-image.json"] {
        let text = std::fs::read_to_string(repo.join("examples").join(name)).expect("example");
        assert!(
            validate_payload(&text, &context, &identity).is_valid(),
            "{name} must be valid"
        );
        let full = measure(|| {
            black_box(validate_payload(black_box(&text), &context, &identity));
        });
        let json = name.ends_with(".json");
        let serde_only = measure(|| {
            let parsed: JobPayload = if json {
                serde_json::from_str(black_box(&text)).expect("parses")
            } else {
                serde_saphyr::from_str(black_box(&text)).expect("parses")
            };
            black_box(parsed);
        });
        println!(
            "{name:<22} {:>8.1} [{:>6.1}, {:>6.1}] {:>8.1} [{:>6.1}, {:>6.1}] {:>6.1}x",
            micros(full.median),
            micros(full.p10),
            micros(full.p90),
            micros(serde_only.median),
            micros(serde_only.p10),
            micros(serde_only.p90),
            micros(full.median) / micros(serde_only.median),
        );
        let verdict = if full.median < Duration::from_millis(1) {
            "met"
        } else {
            "NOT met"
        };
        println!("  goal: well under 1000 µs per payload: {verdict}");
        figure::Figure {
            figure: &format!("payload validation, {name}"),
            unit: "µs",
            samples: &full.all,
            baseline_name: "serde-only parse of the same payload",
            baseline: &serde_only.all,
            goal: "well under 1000 µs",
            met: Some(full.median < Duration::from_millis(1)),
            ..Default::default()
        }
        .emit();
    }
    println!(
        "first validation in the process (compiles the schema once): {:.1} µs",
        micros(cold)
    );
}
