//! Commands on one job without the queue: validate a payload, run it here.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use qemu_worker::config::LoadedConfig;
use qemu_worker::image::CacheSettings;
use qemu_worker::job::{Identity, PayloadCheck, PayloadContext, validate_payload};

use super::exit::{EXIT_OTHER, EXIT_USAGE, ExitWith, Failure, print};
use super::image::open_cache;

pub(super) async fn run_job(
    loaded: &LoadedConfig,
    payload: String,
    json: bool,
) -> Result<ExitCode, Failure> {
    use qemu_worker::engine::{Engine, JobRun};
    let config = loaded.config.clone();
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let job_id = format!("run-{millis}-{}", std::process::id());
    let job_dir = qemu_worker::job::JobDir::one_shot(&config.state_dir, &job_id);
    let cache = open_cache(CacheSettings::from_config(&config)).await?;
    let engine = Engine {
        config,
        cache: cache.clone(),
        helper: std::env::current_exe().exit_with(EXIT_OTHER)?,
        guest_tools: Default::default(),
        live: Default::default(),
    };
    let (signals, cancel_rx) = cancel_on_signals("the job");
    let report = engine
        .run(&JobRun {
            job_id: job_id.clone(),
            run_id: 0,
            payload,
            job_dir: job_dir.clone(),
            live_log: true,
            cancel: cancel_rx,
            keep_disk: None,
            keep_failed: false,
        })
        .await;
    signals.abort();
    drop(engine);
    cache.close().await;
    if json {
        print(&(serde_json::to_string_pretty(&report).exit_with(EXIT_OTHER)? + "\n"))?;
    }
    let outcome = match (report.state, report.reason, report.exit_code) {
        (state, Some(reason), _) => format!("{state} ({reason})"),
        (state, None, Some(code)) => format!("{state} (exit code {code})"),
        (state, None, None) => state.to_string(),
    };
    eprintln!(
        "qemu-worker: job {job_id} {outcome}; log, report and artifacts in {}",
        job_dir.path().display()
    );
    for issue in &report.errors {
        eprintln!("  {issue}");
    }
    Ok(ExitCode::from(report.resolution().cli_exit_code()))
}

pub(super) fn read_payload(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("failed to read the payload from standard input")?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("failed to read payload {path:?}"))
    }
}

pub(super) fn validate(
    loaded: &LoadedConfig,
    path: &Path,
    json: bool,
) -> Result<ExitCode, Failure> {
    let text = read_payload(path).exit_with(EXIT_USAGE)?;
    let context = PayloadContext::from_config(&loaded.config);
    let check = validate_payload(&text, &context, &Identity::derive("validate", 0));
    let output = if json {
        serde_json::to_string_pretty(&check.report()).exit_with(EXIT_OTHER)? + "\n"
    } else {
        human_report(path, &check)
    };
    print(&output)?;
    Ok(if check.is_valid() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_USAGE)
    })
}

fn human_report(path: &Path, check: &PayloadCheck) -> String {
    let name = path.display();
    if let (true, Some(m)) = (check.is_valid(), &check.machine) {
        let t = m.topology;
        return format!(
            "{name}: valid\n  machine: {} {}, {} vCPUs ({} threads × {} cores × {} sockets), \
             {} MiB, {} disk, {} NIC {}, display {}\n",
            m.chipset,
            m.cpu,
            t.vcpus(),
            t.threads,
            t.cores,
            t.sockets,
            m.memory,
            m.storage,
            m.network,
            m.mac,
            m.graphics
        );
    }
    let count = check.issues.len();
    let mut out = format!(
        "{name}: {count} problem{}\n",
        if count == 1 { "" } else { "s" }
    );
    for issue in &check.issues {
        out.push_str(&format!("  {issue}\n"));
    }
    out
}

/// Ctrl-C cancels, SIGTERM is a shutdown: either way the engine tears its VM down
/// (exiting on the signal would leave QEMU running in its own process group). Abort the
/// returned task when the work is done.
pub(super) fn cancel_on_signals(
    what: &'static str,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Receiver<Option<qemu_worker::job::ExceptionReason>>,
) {
    let (cancel, cancel_rx) = tokio::sync::watch::channel(None);
    let signals = tokio::spawn(async move {
        use qemu_worker::job::ExceptionReason;
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        let reason = tokio::select! {
            _ = int.recv() => ExceptionReason::Canceled,
            _ = term.recv() => ExceptionReason::WorkerShutdown,
        };
        eprintln!("qemu-worker: stopping {what} ({reason})");
        let _ = cancel.send(Some(reason));
    });
    (signals, cancel_rx)
}
