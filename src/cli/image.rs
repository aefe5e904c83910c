//! `image`: build, check and manage VM images.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use qemu_worker::config::LoadedConfig;
use qemu_worker::error_chain::display_chain;
use qemu_worker::image::build::{BuildWorker, Report, build_image, check_recipe};
use qemu_worker::image::{
    CacheSettings, FetchError, FetchPolicy, Fetcher, ImageCache, ImageProblem, ImageRequest,
    Progress, inspect_archive, pack_image,
};
use qemu_worker::job::ImageSource;

use super::exit::{EXIT_OTHER, EXIT_USAGE, ExitWith, Failure, print};
use super::model::ImageCommand;

pub(super) async fn image(
    loaded: &LoadedConfig,
    command: ImageCommand,
) -> Result<ExitCode, Failure> {
    let settings = CacheSettings::from_config(&loaded.config);
    match command {
        ImageCommand::Pack { dir, out } => {
            // Packing reads and compresses the whole disk: on the blocking pool.
            let limits = settings.limits;
            let (from, to) = (dir.clone(), out.clone());
            let contents = tokio::task::spawn_blocking(move || pack_image(&from, &to, limits))
                .await
                .exit_with(EXIT_OTHER)?
                .exit_with(EXIT_USAGE)?;
            let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
            print(&format!(
                "{}: {size} bytes, disk {}, {} member(s) checked\n",
                out.display(),
                contents.disk,
                contents.disks.len()
                    + 1
                    + usize::from(contents.kernel)
                    + usize::from(contents.initrd)
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Build { recipe, out } => build(loaded, &recipe, &out).await,
        ImageCommand::Inspect { archive, json } => inspect(&settings, &archive, json).await,
        ImageCommand::Pull { reference, sha256 } => {
            let source = cli_image_source(&reference)?;
            let cache = open_cache(settings).await?;
            let request = ImageRequest { source, sha256 };
            let (progress, bar) = progress_bar();
            let result = cache.acquire(&request, progress).await;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            let lease = result.map_err(|e| {
                let code = if e.reason() == qemu_worker::job::ExceptionReason::MalformedPayload {
                    EXIT_USAGE
                } else {
                    EXIT_OTHER
                };
                Failure {
                    error: e.into(),
                    exit_code: code,
                }
            })?;
            print(&format!(
                "{} {}\n",
                lease.sha256(),
                lease.contents().dir.display()
            ))?;
            drop(lease);
            cache.close().await;
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::List { json } => {
            let cache = open_cache(settings).await?;
            let images = cache.list().await.exit_with(EXIT_OTHER)?;
            cache.close().await;
            if json {
                print(&(serde_json::to_string_pretty(&images).exit_with(EXIT_OTHER)? + "\n"))?;
            } else {
                let mut out = String::new();
                for image in &images {
                    out.push_str(&format!(
                        "{}  {:>12} bytes  {}\n",
                        image.sha256,
                        image.size_bytes,
                        image.sources.join(", ")
                    ));
                }
                print(&out)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Prune => {
            let cache = open_cache(settings).await?;
            let freed = cache.prune().await.exit_with(EXIT_OTHER)?;
            cache.close().await;
            print(&format!("freed {freed} bytes\n"))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// An image named on the command line: a URL, or a path (relative to the current
/// directory, unlike in payloads).
pub(super) fn cli_image_source(text: &str) -> Result<ImageSource, Failure> {
    let absolute = if text.contains("://") || Path::new(text).is_absolute() {
        text.to_owned()
    } else {
        std::env::current_dir()
            .exit_with(EXIT_OTHER)?
            .join(text)
            .display()
            .to_string()
    };
    ImageSource::parse(&absolute).exit_with(EXIT_USAGE)
}

pub(super) async fn open_cache(settings: CacheSettings) -> Result<ImageCache, Failure> {
    let fetcher = Fetcher::new(FetchPolicy::default());
    ImageCache::open(settings, fetcher)
        .await
        .exit_with(EXIT_OTHER)
}

/// A progress bar on a terminal; nothing otherwise.
pub(super) fn progress_bar() -> (Option<Progress>, Option<indicatif::ProgressBar>) {
    if !std::io::stderr().is_terminal() {
        return (None, None);
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {bytes}/{total_bytes} {bytes_per_sec} {wide_bar} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let handle = bar.clone();
    let progress: Progress = Arc::new(move |done, total| {
        if let Some(total) = total {
            handle.set_length(total);
        }
        handle.set_position(done);
    });
    (Some(progress), Some(bar))
}

/// The `image inspect` report.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct InspectReport {
    archive: String,
    valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    archive_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    contents: Option<qemu_worker::image::ImageContents>,
    problems: Vec<ImageProblem>,
}

async fn inspect(settings: &CacheSettings, archive: &str, json: bool) -> Result<ExitCode, Failure> {
    let outcome = inspect_archive(archive, settings.limits).await;
    let report = match outcome {
        Ok(unpacked) => InspectReport {
            archive: archive.to_owned(),
            valid: true,
            sha256: Some(unpacked.sha256),
            archive_bytes: Some(unpacked.archive_bytes),
            contents: Some(unpacked.contents),
            problems: Vec::new(),
        },
        Err(FetchError::Rejected(problems)) => InspectReport {
            archive: archive.to_owned(),
            valid: false,
            sha256: None,
            archive_bytes: None,
            contents: None,
            problems,
        },
        Err(e @ FetchError::LocalUnreadable { .. }) => return Err(e).exit_with(EXIT_USAGE),
        Err(other) => return Err(other).exit_with(EXIT_OTHER),
    };
    if json {
        print(&(serde_json::to_string_pretty(&report).exit_with(EXIT_OTHER)? + "\n"))?;
    } else {
        print(&human_inspect(&report))?;
    }
    Ok(if report.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_USAGE)
    })
}

fn human_inspect(report: &InspectReport) -> String {
    let mut out = String::new();
    match (&report.contents, &report.sha256) {
        (Some(contents), Some(sha)) => {
            out.push_str(&format!(
                "{}: valid image\n  sha256: {sha}\n",
                report.archive
            ));
            out.push_str(&format!(
                "  archive: {} bytes\n  disk layout: {}\n",
                report.archive_bytes.unwrap_or(0),
                contents.disk
            ));
            for disk in &contents.disks {
                out.push_str(&format!(
                    "  {}: {}, virtual size {} bytes, {} bytes allocated\n",
                    disk.member,
                    disk.format,
                    disk.virtual_size,
                    disk.allocated_size.unwrap_or(0)
                ));
            }
            out.push_str(&format!(
                "  direct kernel boot: {}{}\n",
                if contents.kernel { "kernel" } else { "no" },
                if contents.initrd { " + initrd" } else { "" }
            ));
            let machine = serde_json::to_string(&contents.machine).unwrap_or_default();
            out.push_str(&format!("  machine.json: {machine}\n"));
        }
        _ => {
            let count = report.problems.len();
            out.push_str(&format!(
                "{}: invalid image, {count} problem{}\n",
                report.archive,
                if count == 1 { "" } else { "s" }
            ));
            for problem in &report.problems {
                out.push_str(&format!("  {problem}\n"));
            }
        }
    }
    out
}

/// `image build RECIPE OUT`: a bad recipe exits 2 with every problem listed; a failed
/// build exits 3 and leaves nothing at `out`.
async fn build(loaded: &LoadedConfig, recipe: &Path, out: &Path) -> Result<ExitCode, Failure> {
    let text = std::fs::read_to_string(recipe).map_err(|e| {
        Failure::new(
            EXIT_USAGE,
            anyhow::anyhow!("cannot read the recipe {}: {e}", recipe.display()),
        )
    })?;
    let dir = recipe
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let checked = check_recipe(&text, &dir).map_err(|issues| {
        let list: Vec<String> = issues.iter().map(|i| format!("  {i}")).collect();
        Failure::new(
            EXIT_USAGE,
            anyhow::anyhow!(
                "the recipe {} is not valid:\n{}",
                recipe.display(),
                list.join("\n")
            ),
        )
    })?;
    let started = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal();
    let report: Report = Arc::new(move |line: &str| {
        if tty {
            eprintln!(
                "image build [{:>5.1}s] {line}",
                started.elapsed().as_secs_f64()
            );
        }
    });
    let (signals, cancel) = super::job::cancel_on_signals("the image build");
    let worker = BuildWorker {
        config: loaded.config.clone(),
        helper: std::env::current_exe().exit_with(EXIT_OTHER)?,
        live_log: tty,
        cancel,
    };
    let built = build_image(&checked, out, &worker, report).await;
    signals.abort();
    let contents = built.map_err(|e| {
        Failure::new(
            EXIT_OTHER,
            anyhow::anyhow!("image build failed: {}", display_chain(&e)),
        )
    })?;
    let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    print(&format!(
        "{}: {size} bytes, disk {}, built in {:.1} s\n",
        out.display(),
        contents.disk,
        started.elapsed().as_secs_f64()
    ))?;
    Ok(ExitCode::SUCCESS)
}
