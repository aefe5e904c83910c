//! `serve`: run jobs from the queue until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use qemu_worker::config::LoadedConfig;
use qemu_worker::image::CacheSettings;

use super::exit::{EXIT_OTHER, ExitWith, Failure};
use super::image::open_cache;

pub(super) async fn serve(loaded: &LoadedConfig) -> Result<ExitCode, Failure> {
    use qemu_worker::engine::{Engine, Worker};
    let config = loaded.config.clone();
    // Off the executor: connecting to PostgreSQL blocks.
    let queue = tokio::task::spawn_blocking(move || qemu_worker::queue::open(&config))
        .await
        .exit_with(EXIT_OTHER)?
        .exit_with(EXIT_OTHER)?;
    let cache = open_cache(CacheSettings::from_config(&loaded.config)).await?;
    let metrics = std::sync::Arc::new(qemu_worker::api::Metrics::new(loaded.config.capacity));
    let worker_id = format!("{}-{}", hostname(), std::process::id());
    let listen = loaded.config.api_listen();
    let tls = match (&loaded.config.api.tls, &listen) {
        (None, _) => None,
        (Some(tls), qemu_worker::config::ApiListen::Tcp(_)) => {
            Some(qemu_worker::api::load_tls(tls).exit_with(EXIT_OTHER)?)
        }
        (Some(_), _) => {
            return Err(anyhow::anyhow!(
                "worker.yml api.tls needs a TCP api.listen (HOST:PORT), not {listen}"
            ))
            .exit_with(EXIT_OTHER);
        }
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let client =
        qemu_worker::api::client::http_client(&loaded.config.client).exit_with(EXIT_OTHER)?;
    let live = qemu_worker::engine::LiveVms::default();
    let api = qemu_worker::api::start_api(
        &listen,
        tls,
        qemu_worker::api::ApiState {
            queue: queue.clone(),
            cache: cache.clone(),
            metrics: metrics.clone(),
            tokens: qemu_worker::api::Tokens::new(&loaded.config.api.tokens),
            state_dir: loaded.config.state_dir.clone(),
            worker_id: worker_id.clone(),
            client,
            live: live.clone(),
            novnc: loaded
                .config
                .api
                .novnc
                .clone()
                .unwrap_or_else(|| "/usr/share/novnc".into()),
        },
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!("cannot listen for the API at {listen} (worker.yml api.listen): {e}")
    })
    .exit_with(EXIT_OTHER)?;
    // Where the other workers of a pool pass requests for this worker's files.
    let advertise = loaded.config.api.advertise.clone().or_else(|| {
        let address: std::net::SocketAddr = api.as_ref()?.address.parse().ok()?;
        // Not 0.0.0.0 (which address?) nor loopback (another host would reach itself).
        let ip = address.ip();
        (!ip.is_unspecified() && !ip.is_loopback()).then(|| format!("{scheme}://{address}"))
    });
    match &advertise {
        Some(url) => {
            let (queue, id, url) = (queue.clone(), worker_id.clone(), url.clone());
            let recorded =
                tokio::task::spawn_blocking(move || queue.record_api(&id, &url, unix_ms()))
                    .await
                    .exit_with(EXIT_OTHER)?;
            recorded.exit_with(EXIT_OTHER)?;
        }
        None => tracing::info!(
            "no API address recorded for other workers (worker.yml api.advertise): \
             they cannot pass on requests for this worker's logs and artifacts"
        ),
    }
    let worker = Worker {
        engine: Engine {
            config: loaded.config.clone(),
            cache: cache.clone(),
            helper: std::env::current_exe().exit_with(EXIT_OTHER)?,
            guest_tools: Default::default(),
            live,
        },
        queue,
        worker_id: worker_id.clone(),
        grace: std::time::Duration::from_secs(loaded.config.timeouts.grace_seconds),
        metrics,
    };
    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    // Installed before READY=1 goes out, so a stop right after start is graceful.
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        )
    };
    tokio::spawn(async move {
        if let (Ok(mut int), Ok(mut term)) = signals {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            let _ = shutdown.send(true);
        }
    });
    let notifier = super::notify::Notifier::from_env().map(std::sync::Arc::new);
    if let Some(notifier) = &notifier {
        let api = api.as_ref().map_or("off".to_owned(), |a| a.address.clone());
        notifier.notify(&format!("READY=1\nSTATUS=serving; API at {api}"));
        if let Some(every) = super::notify::Notifier::watchdog_interval() {
            // Only while the worker loop goes round (it does at least every second):
            // a loop stuck in a queue call or a wedged runtime stops the pings, and
            // systemd restarts the worker.
            let notifier = std::sync::Arc::clone(notifier);
            let metrics = worker.metrics.clone();
            tokio::spawn(async move {
                loop {
                    if metrics.loop_age() < every.max(std::time::Duration::from_secs(5)) {
                        notifier.notify("WATCHDOG=1");
                    }
                    tokio::time::sleep(every).await;
                }
            });
        }
    }
    if let Some(notifier) = notifier.clone() {
        let mut stop = shutdown_rx.clone();
        tokio::spawn(async move {
            if stop.wait_for(|stop| *stop).await.is_ok() {
                notifier.notify("STOPPING=1");
            }
        });
    }
    worker.serve(shutdown_rx).await;
    drop(api);
    drop(worker);
    cache.close().await;
    Ok(ExitCode::SUCCESS)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "worker".to_owned(), |h| h.trim().to_owned())
}

/// Milliseconds since the Unix epoch (the queue's clock).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
