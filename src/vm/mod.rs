//! Virtual machines: the run directory layout and the QEMU command line (a pure function
//! of the resolved machine; supervision lives elsewhere).

mod argv;
mod run_dir;

pub use argv::{
    AGENT_PORT_NAME, Accelerator, BootDisk, DiskFormat, DiskLayer, KernelFiles, NetworkAttachment,
    QGA_PORT_NAME, VmSpec, qemu_argv,
};
pub use run_dir::{RunDir, RunDirError};
