//! What hostile guests make the worker spend (docs/security.md), next to an idle job:
//! the worker's peak RSS (QEMU excluded) while the guest tools answer with endless
//! skipped entries and while the job opens 1,000 metadata connections, and the most
//! guestfwd helper processes alive at once during the connections. Goals: <= 2x the
//! idle worker's RSS; helpers <= metadata.maxConnections.
//!
//! `cargo bench -p engine-tests --bench hostile` (bench/run runs it with the release
//! worker through QEMU_WORKER_BIN).

use engine_tests::{Job, Watched, Worker, assets, base_config};
use qemu_worker::job::ResultState;
use test_support::figure;

const ROUNDS: usize = 3;
/// The shipped default of metadata.maxConnections.
const CAP: usize = 16;

fn mib(watched: &[Watched]) -> Vec<f64> {
    watched
        .iter()
        .map(|w| w.peak_rss_kib as f64 / 1024.0)
        .collect()
}

fn main() {
    let worker = Worker::with_config(&format!(
        "{}artifacts: {{maxSkipped: 1000, stallSeconds: 5}}\n",
        base_config()
    ));
    let mut idle = Vec::new();
    let mut skipped = Vec::new();
    let mut flood = Vec::new();
    let flood_script = "mkfifo /tmp/hold && exec 3<>/tmp/hold; i=0; \
         while [ $i -lt 1000 ]; do nc 169.254.169.254 80 <&3 >/dev/null 2>&1 & i=$((i+1)); done; \
         wait; echo all closed";
    for round in 0..ROUNDS {
        let (outcome, watched) = Job::script("echo idle").run_watched(&worker);
        assert_eq!(outcome.state(), ResultState::Completed, "{outcome}");
        idle.push(watched);
        let (outcome, watched) =
            Job::script("printf '/h skipped-flood\\n' > /tmp/qw-hostile && mkdir -p /h")
                .image(&assets::hostile_image().display().to_string())
                .directory_artifact("/h", "flood")
                .run_watched(&worker);
        assert_eq!(outcome.state(), ResultState::Failed, "{outcome}");
        skipped.push(watched);
        if round == 0 {
            let (outcome, watched) = Job::script(flood_script)
                .max_run_time(300)
                .run_watched(&worker);
            assert_eq!(outcome.state(), ResultState::Completed, "{outcome}");
            flood.push(watched);
        }
    }
    let idle_mib = mib(&idle);
    let baseline = figure::median(&idle_mib);
    for (name, samples) in [
        ("worker RSS, endless skipped frames", mib(&skipped)),
        ("worker RSS, 1,000 metadata connections", mib(&flood)),
    ] {
        let ratio = figure::median(&samples) / baseline;
        println!(
            "{name}: {:.1} MiB (idle job {baseline:.1} MiB, {ratio:.2}x)",
            figure::median(&samples)
        );
        figure::Figure {
            figure: name,
            unit: "MiB",
            samples: &samples,
            baseline_name: "the same worker running an idle job",
            baseline: &idle_mib,
            goal: "<= 2x the idle worker",
            met: Some(ratio <= 2.0),
            ..Default::default()
        }
        .emit();
    }
    let helpers: Vec<f64> = flood.iter().map(|w| w.peak_helpers as f64).collect();
    let peak = figure::median(&helpers);
    println!("guestfwd helpers at once, 1,000 connections: {peak} (cap {CAP})");
    figure::Figure {
        figure: "guestfwd helpers at once, 1,000 metadata connections (20 ms samples)",
        unit: "processes",
        samples: &helpers,
        baseline_name: "metadata.maxConnections",
        baseline: &[CAP as f64],
        goal: "<= the cap",
        met: Some(peak <= CAP as f64),
        note: "a refused connection's helper lives until the service closes it (a few ms)",
        ..Default::default()
    }
    .emit();
    worker.assert_clean();
}
