//! A failed job's VM kept running after its result is recorded (payload
//! `debug.keepAliveOnFailure`), for a look: until its time is up, it is released, or
//! the worker stops; then it is torn down like any other.

use std::time::Duration;

use tokio::sync::watch;

use super::boot::Running;
use super::live::Registered;
use crate::metadata::LogSink;

/// Why a kept VM was let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// Its time was up.
    Deadline,
    /// `qemu-worker release` (or the API) asked.
    Asked,
    /// The worker is stopping.
    Stopping,
}

/// The VM, its metadata service and network, still up.
#[derive(Debug)]
pub struct KeptVm {
    pub(super) running: Running,
    /// Keeps the VM in the live registry (screenshots, release) while it is kept.
    pub(super) live: Registered,
    pub(super) minutes: u32,
    pub(super) log: LogSink,
    pub(super) release: std::sync::Arc<tokio::sync::Notify>,
}

impl KeptVm {
    /// Holds the VM until its time is up, `release` is notified, or `stop` turns true;
    /// then tears it down and says so in the job log.
    pub async fn hold(self, mut stop: watch::Receiver<bool>) -> Released {
        let release = std::sync::Arc::clone(&self.release);
        let why = tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(u64::from(self.minutes) * 60)) => Released::Deadline,
            () = release.notified() => Released::Asked,
            _ = stop.wait_for(|stop| *stop) => Released::Stopping,
        };
        self.discard(why).await;
        why
    }

    /// Tears the VM down now.
    pub async fn discard(self, why: Released) {
        let Self {
            running, live, log, ..
        } = self;
        // Out of the registry first: nothing may reach a VM being torn down.
        drop(live);
        let Running {
            vm, service, tap, ..
        } = running;
        let _ = vm.discard().await;
        drop(service);
        drop(tap);
        let said = match why {
            Released::Deadline => "its time was up",
            Released::Asked => "it was released",
            Released::Stopping => "the worker is stopping",
        };
        log.line(&format!(
            "[qemu-worker] the VM kept for debugging is torn down: {said}"
        ))
        .await;
        log.flush().await;
    }
}
