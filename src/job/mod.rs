//! What a job asks for and how it ends: the payload, the machine definition and its
//! limits, deterministic VM identities, validation, and the resolution report.

mod dir;
mod identity;
mod limits;
mod machine;
mod payload;
mod report;
mod resolve;
pub(crate) mod string_enum;
mod validate;

pub use dir::{FINAL_SCREENSHOT, JobDir, periodic_screenshot};
pub use identity::Identity;
pub use limits::{CpuTopology, LimitViolation, MachineLimits, RequestedResources};
pub use machine::{
    Chipset, CloudInit, CpuModel, DEFAULT_KERNEL_CMDLINE, Firmware, GraphicsDevice, InitrdMember,
    KernelMember, KeyboardDevice, KeyboardLayout, MachineDefinition, MouseDevice, NetworkDevice,
    SoundDevice, StorageDevice, TabletDevice, UsbController,
};
pub(crate) use machine::{DISK_SERIAL_PATTERN, MAC_PATTERN, UUID_PATTERN};
pub use payload::{
    ArtifactKind, ArtifactSpec, ImageLocationError, ImageReference, ImageSource, JobPayload,
    PinnedImage,
};
pub(crate) use payload::{SHA256_PATTERN, artifact_name_problem};
pub use report::{
    ArtifactRecord, ExceptionReason, PhaseTiming, Resolution, ResultReport, ResultState,
    SkippedRecord, SnapshotEvent, ValidationReport,
};
pub use resolve::{KernelBoot, Machine, MachineLayers};
pub use validate::{
    MAX_DOCUMENT_BYTES, PayloadCheck, PayloadContext, load_machine_json, validate_payload,
};
