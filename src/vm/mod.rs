//! Virtual machines: the run directory layout, the QEMU command line (a pure function of
//! the resolved machine), the accelerator preflight, and the supervisor that starts,
//! watches, stops and cleans up QEMU.

mod accel;
mod argv;
mod console;
mod firmware;
mod in_drop;
mod launch;
mod network;
mod run_dir;
mod screenshot;
mod snapshot;
mod strays;
mod supervisor;

pub use accel::{
    AccelError, PROBE_DEADLINE, ProbeFailure, choose_accelerator, choose_accelerator_cached, probe,
};
pub use argv::{AGENT_PORT_NAME, Accelerator, NetworkAttachment, QGA_PORT_NAME, VmSpec, qemu_argv};
pub use console::ConsoleUsage;
pub use firmware::FirmwareError;
pub use launch::{LaunchPlan, SnapshotPlan, prepare_launch, prepare_launch_with_snapshots};
pub use network::{NetworkError, TAP_DEVICE, TapNetwork};
pub use run_dir::{RunDir, RunDirError};
pub use screenshot::{Screenshot, ScreenshotError, take_screenshot, take_screenshot_ppm};
pub use snapshot::{
    Lookup, MigrationError, ResumeError, SaveError, Snapshot, SnapshotStore, Volatile,
    finish_resume, release_resumed,
};
pub use strays::kill_strays;
pub use supervisor::{
    StopStep, Vm, VmError, VmExit, VmLaunch, VmTimeouts, create_run_dir, read_tail,
};
