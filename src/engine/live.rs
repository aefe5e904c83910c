//! The VMs of this worker's running jobs, for what is asked of them while they run (a
//! screenshot now, a shell, through the API).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::artifacts::{AgentError, AgentLink, Shell, ShellRequest};
use crate::qemu::QmpClient;
use crate::vm::{Screenshot, ScreenshotError, take_screenshot};

/// Shared by the engine (which registers each job's VM while it runs) and the API.
#[derive(Debug, Clone, Default)]
pub struct LiveVms(Arc<Mutex<HashMap<String, LiveVm>>>);

#[derive(Debug, Clone)]
struct LiveVm {
    qmp: QmpClient,
    run_dir: PathBuf,
    /// Its agent port, for shells.
    agent: AgentLink,
    /// QEMU's VNC socket (there only when the machine has a display).
    vnc: PathBuf,
    /// Off while the VM may still be saved as a boot snapshot (whose handshake needs
    /// the agent port to itself).
    shells: Arc<std::sync::atomic::AtomicBool>,
    /// Set while the job's VM is kept after a failure: notified to let it go.
    release: Option<Arc<tokio::sync::Notify>>,
}

/// Removes its job's VM from the registry when dropped (before the VM is torn down).
#[derive(Debug)]
pub(crate) struct Registered {
    vms: LiveVms,
    job_id: String,
}

impl Registered {
    /// Shells may open: the boot snapshot is saved, or never will be.
    pub(crate) fn allow_shells(&self) {
        if let Ok(vms) = self.vms.0.lock()
            && let Some(vm) = vms.get(&self.job_id)
        {
            vm.shells.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Marks the VM as kept after its job failed; the signal lets it go.
    pub(crate) fn release_signal(&self) -> Arc<tokio::sync::Notify> {
        let signal = Arc::new(tokio::sync::Notify::new());
        if let Ok(mut vms) = self.vms.0.lock()
            && let Some(vm) = vms.get_mut(&self.job_id)
        {
            vm.release = Some(Arc::clone(&signal));
        }
        signal
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut vms) = self.vms.0.lock() {
            vms.remove(&self.job_id);
        }
    }
}

impl LiveVms {
    pub(crate) fn register(
        &self,
        job_id: &str,
        qmp: QmpClient,
        run_dir: PathBuf,
        vnc: PathBuf,
        agent: AgentLink,
    ) -> Registered {
        if let Ok(mut vms) = self.0.lock() {
            vms.insert(
                job_id.to_owned(),
                LiveVm {
                    qmp,
                    run_dir,
                    agent,
                    vnc,
                    shells: Arc::default(),
                    release: None,
                },
            );
        }
        Registered {
            vms: self.clone(),
            job_id: job_id.to_owned(),
        }
    }

    /// Lets a kept VM go; `false` when the job has no VM kept here.
    pub fn release(&self, job_id: &str) -> bool {
        let signal = self
            .0
            .lock()
            .ok()
            .and_then(|vms| vms.get(job_id).and_then(|vm| vm.release.clone()));
        match signal {
            Some(signal) => {
                // notify_one stores a permit: a release asked just before the VM waits
                // for it is not lost.
                signal.notify_one();
                true
            }
            None => false,
        }
    }

    /// Whether the job's VM is kept here after its failure.
    pub fn is_kept(&self, job_id: &str) -> bool {
        self.0
            .lock()
            .is_ok_and(|vms| vms.get(job_id).is_some_and(|vm| vm.release.is_some()))
    }

    /// A screenshot of the job's VM now; `None` when it has no VM running here.
    pub async fn screenshot(&self, job_id: &str) -> Option<Result<Screenshot, ScreenshotError>> {
        let vm = self.0.lock().ok()?.get(job_id).cloned()?;
        Some(take_screenshot(&vm.qmp, &vm.run_dir, Duration::from_secs(10)).await)
    }

    /// A shell in the job's VM; `None` when it has no VM running here.
    pub async fn shell(
        &self,
        job_id: &str,
        request: &ShellRequest,
    ) -> Option<Result<Shell, AgentError>> {
        let (agent, allowed) = {
            let vms = self.0.lock().ok()?;
            let vm = vms.get(job_id)?;
            (
                vm.agent.clone(),
                vm.shells.load(std::sync::atomic::Ordering::SeqCst),
            )
        };
        if !allowed {
            return Some(Err(AgentError::Saving));
        }
        Some(agent.open_shell(request, Duration::from_secs(10)).await)
    }

    /// The VNC socket of the job's VM: `None` when it has no VM running here,
    /// `Some(None)` when its machine has no display.
    pub fn display_socket(&self, job_id: &str) -> Option<Option<PathBuf>> {
        let socket = self.0.lock().ok()?.get(job_id)?.vnc.clone();
        Some(socket.exists().then_some(socket))
    }
}
