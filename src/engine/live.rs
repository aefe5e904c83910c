//! The VMs of this worker's running jobs, for what is asked of them while they run (a
//! screenshot now, through the API).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::qemu::QmpClient;
use crate::vm::{Screenshot, ScreenshotError, take_screenshot};

/// Shared by the engine (which registers each job's VM while it runs) and the API.
#[derive(Debug, Clone, Default)]
pub struct LiveVms(Arc<Mutex<HashMap<String, LiveVm>>>);

#[derive(Debug, Clone)]
struct LiveVm {
    qmp: QmpClient,
    run_dir: PathBuf,
}

/// Removes its job's VM from the registry when dropped (before the VM is torn down).
#[derive(Debug)]
pub(crate) struct Registered {
    vms: LiveVms,
    job_id: String,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut vms) = self.vms.0.lock() {
            vms.remove(&self.job_id);
        }
    }
}

impl LiveVms {
    pub(crate) fn register(&self, job_id: &str, qmp: QmpClient, run_dir: PathBuf) -> Registered {
        if let Ok(mut vms) = self.0.lock() {
            vms.insert(job_id.to_owned(), LiveVm { qmp, run_dir });
        }
        Registered {
            vms: self.clone(),
            job_id: job_id.to_owned(),
        }
    }

    /// A screenshot of the job's VM now; `None` when it has no VM running here.
    pub async fn screenshot(&self, job_id: &str) -> Option<Result<Screenshot, ScreenshotError>> {
        let vm = self.0.lock().ok()?.get(job_id).cloned()?;
        Some(take_screenshot(&vm.qmp, &vm.run_dir, Duration::from_secs(10)).await)
    }
}
