//! `vm`: developer tools for VMs.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use qemu_worker::config::LoadedConfig;
use qemu_worker::engine::{BareVm, Engine};
use qemu_worker::image::{CacheSettings, ImageRequest};
use qemu_worker::job::ExceptionReason;
use qemu_worker::vm::{VmTimeouts, take_screenshot};

use super::exit::{EXIT_OTHER, EXIT_USAGE, ExitWith, Failure};
use super::image::{cli_image_source, open_cache, progress_bar};
use super::model::VmCommand;

pub(super) async fn vm(loaded: &LoadedConfig, command: VmCommand) -> Result<ExitCode, Failure> {
    let VmCommand::Boot {
        image,
        until,
        seconds,
        screenshot,
    } = command;
    let config = &loaded.config;
    let source = cli_image_source(&image)?;
    let cache = open_cache(CacheSettings::from_config(config)).await?;
    let engine = Engine {
        config: config.clone(),
        cache: cache.clone(),
        helper: std::env::current_exe().exit_with(EXIT_OTHER)?,
        guest_tools: Default::default(),
        live: Default::default(),
    };
    let (progress, bar) = progress_bar();
    let name = format!("vm-boot-{}", std::process::id());
    let request = ImageRequest {
        source,
        sha256: None,
    };
    let booted = engine.boot_bare(&request, progress, &name).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let BareVm {
        mut vm,
        lease,
        accelerator,
        dir,
    } = booted.map_err(|e| {
        let code = if e.reason() == ExceptionReason::MalformedPayload {
            EXIT_USAGE
        } else {
            EXIT_OTHER
        };
        Failure::new(code, anyhow::Error::new(e))
    })?;
    let timeouts = VmTimeouts::default();

    // Follow the serial console until the marker, the deadline, or the guest ends.
    let serial = PathBuf::from(vm.run_dir().serial_log());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let mut shown = 0;
    let mut found = false;
    let mut ended = None;
    while std::time::Instant::now() < deadline {
        let text = tokio::fs::read(&serial).await.unwrap_or_default();
        if text.len() > shown {
            let _ = std::io::stdout().write_all(&text[shown..]);
            shown = text.len();
        }
        if String::from_utf8_lossy(&text).contains(&until) {
            found = true;
            break;
        }
        if let Some(exit) = vm.wait(std::time::Duration::from_millis(100)).await {
            ended = Some(exit);
            break;
        }
    }
    let mut summary = String::new();
    if ended.is_none() {
        let path = screenshot.unwrap_or_else(|| dir.file("screenshot.png"));
        match take_screenshot(vm.qmp(), vm.run_dir().path(), timeouts.qmp).await {
            Ok(shot) => {
                tokio::fs::write(&path, &shot.png)
                    .await
                    .exit_with(EXIT_OTHER)?;
                summary.push_str(&format!(
                    "screenshot: {} ({}x{})\n",
                    path.display(),
                    shot.width,
                    shot.height
                ));
            }
            Err(error) => summary.push_str(&format!("screenshot: none ({error})\n")),
        }
    }
    let exit = vm.teardown().await;
    drop(lease);
    drop(engine);
    cache.close().await;
    summary.push_str(&format!(
        "accelerator: {}\nconsole {}: {until:?}\nexit: {exit}\nlogs: {}\n",
        accelerator.as_str(),
        if found { "reached" } else { "did not reach" },
        dir.path().display()
    ));
    eprint!("\n{summary}");
    Ok(if found {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
