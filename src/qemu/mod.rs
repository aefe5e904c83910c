//! Wire clients for QEMU's control channels: QMP (the monitor, one per VM, owned by the
//! supervisor) and QGA (qemu-ga inside the guest, over a virtio-serial port).

mod qga;
mod qmp;

pub use qga::{ExecOutput, FileRead, QgaClient, QgaError};
pub use qmp::{QmpClient, QmpError, QmpEvent, RunState};
