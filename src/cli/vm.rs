//! `vm`: developer tools for VMs.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use qemu_worker::config::LoadedConfig;
use qemu_worker::image::{CacheSettings, ImageRequest};

use super::exit::{EXIT_OTHER, EXIT_USAGE, ExitWith, Failure};
use super::image::{cli_image_source, open_cache, progress_bar};
use super::model::VmCommand;

pub(super) async fn vm(loaded: &LoadedConfig, command: VmCommand) -> Result<ExitCode, Failure> {
    use qemu_worker::job::{Identity, MachineLayers};
    use qemu_worker::vm::{
        LaunchPlan, NetworkAttachment, RunDir, Vm, VmTimeouts, choose_accelerator_cached,
        prepare_launch, take_screenshot,
    };
    let VmCommand::Boot {
        image,
        until,
        seconds,
        screenshot,
    } = command;
    let config = &loaded.config;
    let source = cli_image_source(&image)?;
    let accelerator = choose_accelerator_cached(config.accelerator, &config.state_dir)
        .await
        .exit_with(EXIT_OTHER)?;
    let cache = open_cache(CacheSettings::from_config(config)).await?;
    let (progress, bar) = progress_bar();
    let lease = cache
        .acquire(
            &ImageRequest {
                source,
                sha256: None,
            },
            progress,
        )
        .await
        .exit_with(EXIT_USAGE)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let layers = MachineLayers {
        image: lease.contents().machine.clone(),
        worker_config: config.machine.clone(),
        ..Default::default()
    };
    let name = format!("vm-boot-{}", std::process::id());
    let machine = layers
        .resolve(&config.limits, &Identity::derive(&name, 0))
        .map_err(|issues| {
            let lines: Vec<String> = issues.iter().map(ToString::to_string).collect();
            anyhow::anyhow!(
                "the image's machine is not allowed here: {}",
                lines.join("; ")
            )
        })
        .exit_with(EXIT_USAGE)?;
    let job_dir = qemu_worker::job::JobDir::at(config.state_dir.join("vm-boot"));
    let run_dir = RunDir::new(&config.state_dir.join("run").join(&name)).exit_with(EXIT_OTHER)?;
    let launch = prepare_launch(LaunchPlan {
        name: &name,
        image: &lease,
        machine: &machine,
        run_dir,
        job_dir: job_dir.clone(),
        // No metadata service yet: the guest's connections to 169.254.169.254 fail.
        network: NetworkAttachment::User {
            guestfwd_command: vec!["/bin/false".into()],
        },
        accelerator,
        max_console: config.logs.max_console_size.bytes(),
    })
    .await
    .exit_with(EXIT_OTHER)?;
    let timeouts = VmTimeouts::default();
    let mut vm = Vm::start(launch, timeouts).await.exit_with(EXIT_OTHER)?;
    vm.resume().await.exit_with(EXIT_OTHER)?;

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
        let path = screenshot.unwrap_or_else(|| job_dir.file("screenshot.png"));
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
    cache.close().await;
    summary.push_str(&format!(
        "accelerator: {accelerator:?}\nconsole {}: {until:?}\nexit: {exit:?}\nlogs: {}\n",
        if found { "reached" } else { "did not reach" },
        job_dir.path().display()
    ));
    eprint!("\n{summary}");
    Ok(if found {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
