//! Image benchmarks, each figure next to its baseline in the same run:
//!
//! 1. Unpack throughput and peak RSS: `qemu-worker image inspect` (single pass: sha256,
//!    zstd, tar, sparse writes, then every check) against `zstd -dc | tar -xS` on the
//!    same archive: a 2 GiB sparse disk holding 1 GiB of data. Goal: ratio ≥ 1.0.
//! 2. Cache-hit preparation (acquire a cached image + create the job overlay) for a
//!    ~100 MiB and a ~2 GiB image. Goal: ≤ 50 ms each, flat in the image size.
//!
//! `cargo bench --bench images`. Inputs are generated once under target/bench-data.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qemu_worker::image::{
    CacheSettings, FetchPolicy, Fetcher, ImageCache, ImageLimits, ImageRequest, pack_image,
};
use qemu_worker::job::ImageSource;

use test_support::figure;

const MIB: u64 = 1 << 20;
const LIMITS: ImageLimits = ImageLimits {
    max_image_bytes: 16 << 30,
};

fn main() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&data).expect("bench data dir");
    let large = image_archive(&data, "large", 2048, 1024);
    let small = image_archive(&data, "small", 100, 100);

    unpack_throughput(&data, &large);
    cache_hit_preparation(&data, &[("~100 MiB", &small), ("~2 GiB", &large)]);
}

/// An image whose raw disk is `virtual_mib` long with `data_mib` of semi-compressible
/// data spread over it (1 MiB blocks with holes between), packed once and reused.
fn image_archive(data: &Path, name: &str, virtual_mib: u64, data_mib: u64) -> PathBuf {
    let archive = data.join(format!("{name}.tar.zst"));
    if archive.is_file() {
        return archive;
    }
    let dir = data.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("image dir");
    std::fs::write(
        dir.join("machine.json"),
        br#"{"version": 1, "memory": 256}"#,
    )
    .expect("machine");
    let mut disk = std::fs::File::create(dir.join("disk.img")).expect("disk");
    let stride = virtual_mib / data_mib;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; MIB as usize];
    for i in 0..data_mib {
        for byte in &mut block {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // About 6 bits of entropy per byte: compresses like real disk contents.
            *byte = b' ' + (state as u8 & 0x3f);
        }
        disk.seek(SeekFrom::Start(i * stride * MIB)).expect("seek");
        disk.write_all(&block).expect("write");
    }
    disk.set_len(virtual_mib * MIB).expect("size");
    drop(disk);
    let start = Instant::now();
    pack_image(&dir, &archive, LIMITS).expect("pack");
    println!(
        "(prepared {name}: {virtual_mib} MiB disk, {data_mib} MiB data, archive {} MiB, packed in {:.1} s)",
        std::fs::metadata(&archive).expect("archive").len() / MIB,
        start.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
    archive
}

/// Runs `command` through a wrapper that reports the peak RSS of it and its children.
fn run_measured(command: &[&str]) -> (Duration, u64) {
    let wrapper = "import resource, subprocess, sys\n\
                   r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n\
                   print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n\
                   sys.exit(r.returncode)";
    let start = Instant::now();
    let output = Command::new("python3")
        .args(["-c", wrapper])
        .args(command)
        .output()
        .expect("python3 runs the measured command");
    let elapsed = start.elapsed();
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rss_kib: u64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("peak RSS");
    (elapsed, rss_kib)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn unpack_throughput(data: &Path, archive: &Path) {
    const ROUNDS: usize = 5;
    let scratch = data.join("unpack-scratch");
    let stored_mib = 1024.0;
    let archive_str = archive.to_str().expect("utf-8");
    let (mut ours, mut theirs, mut ours_rss, mut theirs_rss) = (vec![], vec![], 0, 0);
    for _ in 0..ROUNDS {
        // Alternate, so that drifting host load hits both alike.
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).expect("scratch");
        let (t, rss) = run_measured(&[
            "env",
            &format!("TMPDIR={}", scratch.display()),
            env!("CARGO_BIN_EXE_qemu-worker"),
            "image",
            "inspect",
            archive_str,
        ]);
        ours.push(stored_mib / t.as_secs_f64());
        ours_rss = ours_rss.max(rss);

        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).expect("scratch");
        let pipeline = format!(
            "zstd -qdc '{archive_str}' | tar -xS -C '{}'",
            scratch.display()
        );
        let (t, rss) = run_measured(&["sh", "-c", &pipeline]);
        theirs.push(stored_mib / t.as_secs_f64());
        theirs_rss = theirs_rss.max(rss);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let (ours_median, theirs_median) = (median(ours.clone()), median(theirs.clone()));
    let ratio = ours_median / theirs_median;
    println!(
        "\nunpack throughput: 2 GiB sparse disk, 1 GiB of data ({ROUNDS} rounds, MiB of data per second)"
    );
    println!(
        "  qemu-worker image inspect   median {ours_median:7.1}  (min {:7.1}, max {:7.1})  peak RSS {:6.1} MiB",
        ours.iter().copied().fold(f64::MAX, f64::min),
        ours.iter().copied().fold(0.0, f64::max),
        ours_rss as f64 / 1024.0
    );
    println!(
        "  baseline zstd -dc | tar -xS median {theirs_median:7.1}  (min {:7.1}, max {:7.1})  peak RSS {:6.1} MiB",
        theirs.iter().copied().fold(f64::MAX, f64::min),
        theirs.iter().copied().fold(0.0, f64::max),
        theirs_rss as f64 / 1024.0
    );
    println!(
        "  ratio {ratio:.2}x  (goal >= 1.0x: {})",
        if ratio >= 1.0 { "met" } else { "NOT met" }
    );
    figure::Figure {
        figure: "unpack throughput (2 GiB sparse disk, 1 GiB data)",
        unit: "MiB/s",
        samples: &ours,
        baseline_name: "zstd -dc | tar -xS",
        baseline: &theirs,
        goal: ">= 1.0x the baseline",
        met: Some(ratio >= 1.0),
        note: &format!(
            "peak RSS {:.1} MiB vs {:.1} MiB",
            ours_rss as f64 / 1024.0,
            theirs_rss as f64 / 1024.0
        ),
        ..Default::default()
    }
    .emit();
}

fn cache_hit_preparation(data: &Path, images: &[(&str, &Path)]) {
    const ROUNDS: usize = 30;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let cache_dir = data.join("cache");
    let _ = std::fs::remove_dir_all(&cache_dir);
    let settings = CacheSettings {
        dir: cache_dir.clone(),
        max_size: 64 << 30,
        min_free: 0,
        limits: LIMITS,
        allowed_local_dirs: vec![data.to_path_buf()],
    };
    println!(
        "\ncache-hit preparation: acquire a cached image + create the job overlay ({ROUNDS} rounds, ms)"
    );
    runtime.block_on(async {
        let cache = ImageCache::open(settings, Fetcher::new(FetchPolicy::default()))
            .await
            .expect("cache");
        let mut medians = Vec::new();
        let mut first: Vec<f64> = Vec::new();
        for (label, archive) in images {
            let request = ImageRequest {
                source: ImageSource::Local(archive.to_path_buf()),
                sha256: None,
            };
            drop(
                cache
                    .acquire(&request, None)
                    .await
                    .expect("first acquire unpacks"),
            );
            let overlay = cache_dir.join("overlay.qcow2");
            let mut samples = Vec::new();
            for _ in 0..ROUNDS {
                let start = Instant::now();
                let lease = cache.acquire(&request, None).await.expect("hit");
                let disk = lease.create_overlay(&overlay).await.expect("overlay");
                samples.push(start.elapsed().as_secs_f64() * 1000.0);
                assert_eq!(disk.layers.len(), 2);
                drop(lease);
                std::fs::remove_file(&overlay).expect("remove overlay");
            }
            let med = median(samples.clone());
            println!(
                "  {label:<9} median {med:6.1}  (min {:6.1}, max {:6.1})  goal <= 50 ms: {}",
                samples.iter().copied().fold(f64::MAX, f64::min),
                samples.iter().copied().fold(0.0, f64::max),
                if med <= 50.0 { "met" } else { "NOT met" }
            );
            figure::Figure {
                figure: &format!("cache-hit preparation, {label} image"),
                unit: "ms",
                samples: &samples,
                baseline_name: if first.is_empty() {
                    ""
                } else {
                    "the ~100 MiB image (flat in size)"
                },
                baseline: &first,
                goal: "<= 50 ms, flat in the image size",
                met: Some(med <= 50.0),
                ..Default::default()
            }
            .emit();
            if first.is_empty() {
                first = samples.clone();
            }
            medians.push(med);
        }
        if let [small, large] = medians[..] {
            println!(
                "  large/small ratio {:.2} (flat means about 1)",
                large / small
            );
        }
        cache.close().await;
    });
    let _ = std::fs::remove_dir_all(&cache_dir);
}
