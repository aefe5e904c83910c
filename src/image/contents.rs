use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::disk::{DiskFormat, DiskLayer, KernelFiles};
use super::member::{ImageProblem, Member};
use super::qemu_img::{self, QemuImgError};
use crate::error_chain::display_chain;
use crate::job::{MachineDefinition, load_machine_json};

/// The largest machine.json an image may carry.
pub const MAX_MACHINE_JSON_BYTES: u64 = 1 << 20;

/// Caps that an image must respect, from worker.yml `images`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest archive, largest unpacked member and largest virtual disk size.
    pub max_image_bytes: u64,
}

/// How the boot disk is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DiskLayout {
    /// `disk.img`, optionally with `layer.qcow2` over it (taskcluster-worker's layout).
    Raw { layer: bool },
    /// `disk.qcow2` with no backing file.
    Qcow2,
}

impl std::fmt::Display for DiskLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Raw { layer: false } => "disk.img (raw)",
            Self::Raw { layer: true } => "disk.img (raw) with layer.qcow2 over it",
            Self::Qcow2 => "disk.qcow2",
        })
    }
}

/// One disk member as qemu-img saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskSummary {
    pub member: Member,
    pub format: String,
    pub virtual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocated_size: Option<u64>,
}

/// An unpacked image that passed every check: what the VM is built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageContents {
    #[serde(skip)]
    pub dir: PathBuf,
    pub machine: MachineDefinition,
    pub disk: DiskLayout,
    pub disks: Vec<DiskSummary>,
    pub kernel: bool,
    pub initrd: bool,
}

impl ImageContents {
    /// The read-only base of the boot disk, bottom first (the job overlay goes on top).
    pub fn base_layers(&self) -> Vec<DiskLayer> {
        let members: &[Member] = match self.disk {
            DiskLayout::Raw { layer: false } => &[Member::DiskImg],
            DiskLayout::Raw { layer: true } => &[Member::DiskImg, Member::LayerQcow2],
            DiskLayout::Qcow2 => &[Member::DiskQcow2],
        };
        members
            .iter()
            .map(|&member| DiskLayer {
                path: self.dir.join(member.name()).display().to_string(),
                format: DiskFormat::of_member(member),
            })
            .collect()
    }

    pub fn kernel_files(&self) -> Option<KernelFiles> {
        self.kernel.then(|| KernelFiles {
            kernel: self.dir.join(Member::Kernel.name()).display().to_string(),
            initrd: self
                .initrd
                .then(|| self.dir.join(Member::Initrd.name()).display().to_string()),
        })
    }
}

/// Checks the members unpacked (or about to be packed) in `dir`: machine.json, the disk
/// layout, direct-boot files, and every disk through its header and `qemu-img info`.
/// Returns every problem found.
pub fn check_image_dir(
    dir: &Path,
    members: &BTreeSet<Member>,
    limits: ImageLimits,
) -> Result<ImageContents, Vec<ImageProblem>> {
    let mut problems = Vec::new();
    if dir.to_str().is_none() {
        problems.push(ImageProblem::image(format!(
            "image directory {dir:?} is not valid UTF-8"
        )));
        return Err(problems);
    }

    let machine = if members.contains(&Member::MachineJson) {
        read_machine(dir, &mut problems)
    } else {
        problems.push(ImageProblem::image("the image has no machine.json"));
        None
    };

    let has = |m: Member| members.contains(&m);
    let disk = match (has(Member::DiskImg), has(Member::DiskQcow2)) {
        (true, true) => {
            problems.push(ImageProblem::image(
                "the image has both disk.img and disk.qcow2; it must have exactly one boot disk",
            ));
            None
        }
        (false, false) => {
            problems.push(ImageProblem::image(
                "the image has no boot disk: expected disk.img or disk.qcow2",
            ));
            None
        }
        (true, false) => Some(DiskLayout::Raw {
            layer: has(Member::LayerQcow2),
        }),
        (false, true) => {
            if has(Member::LayerQcow2) {
                problems.push(ImageProblem::entry(
                    "layer.qcow2",
                    "layer.qcow2 may only be layered over disk.img",
                ));
            }
            Some(DiskLayout::Qcow2)
        }
    };

    if let Some(machine) = &machine {
        for (member, wanted, field) in [
            (Member::Kernel, machine.kernel.is_some(), "kernel"),
            (Member::Initrd, machine.initrd.is_some(), "initrd"),
        ] {
            match (has(member), wanted) {
                (true, false) => problems.push(ImageProblem::entry(
                    member.name(),
                    format!("the image has {member}, but machine.json does not set `{field}`"),
                )),
                (false, true) => problems.push(ImageProblem::image(format!(
                    "machine.json sets `{field}`, but the image has no {member}"
                ))),
                _ => {}
            }
        }
    }

    let mut disks = Vec::new();
    for member in [Member::DiskImg, Member::DiskQcow2, Member::LayerQcow2] {
        if has(member) {
            match check_disk(&dir.join(member.name()), member, limits) {
                Ok(summary) => disks.push(summary),
                Err(error) => {
                    problems.push(ImageProblem::entry(member.name(), display_chain(&error)));
                }
            }
        }
    }

    match (machine, disk, problems.is_empty()) {
        (Some(machine), Some(disk), true) => Ok(ImageContents {
            dir: dir.to_path_buf(),
            machine,
            disk,
            disks,
            kernel: has(Member::Kernel),
            initrd: has(Member::Initrd),
        }),
        _ => Err(problems),
    }
}

fn read_machine(dir: &Path, problems: &mut Vec<ImageProblem>) -> Option<MachineDefinition> {
    let text = match std::fs::read(dir.join(Member::MachineJson.name())) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(_) => {
                problems.push(ImageProblem::entry(
                    "machine.json",
                    "machine.json is not UTF-8 text",
                ));
                return None;
            }
        },
        Err(e) => {
            problems.push(ImageProblem::entry(
                "machine.json",
                format!("cannot be read: {e}"),
            ));
            return None;
        }
    };
    match load_machine_json(&text) {
        Ok(machine) => Some(machine),
        Err(issues) => {
            for issue in issues {
                problems.push(ImageProblem::entry("machine.json", issue.to_string()));
            }
            None
        }
    }
}

/// Why one disk member of an image is refused.
#[derive(Debug, thiserror::Error)]
enum DiskCheckError {
    #[error("cannot be read")]
    Unreadable {
        #[source]
        source: std::io::Error,
    },
    #[error("{member} is not a qcow2 image (bad magic)")]
    BadMagic { member: Member },
    #[error("{member} uses an external data file, which is not allowed")]
    ExternalDataFile { member: Member },
    #[error("qemu-img cannot read it as {format}: {stderr}")]
    Rejected { format: DiskFormat, stderr: String },
    #[error(transparent)]
    QemuImg(QemuImgError),
    #[error("qemu-img reports format {reported}, expected {expected}")]
    Format {
        reported: String,
        expected: DiskFormat,
    },
    #[error("virtual size {virtual_size} bytes is over the limit of {limit} bytes")]
    TooLarge { virtual_size: u64, limit: u64 },
    #[error("the image is marked dirty (not cleanly closed)")]
    Dirty,
    #[error("encrypted images are not supported")]
    Encrypted,
    #[error("qemu-img reports the image as corrupt")]
    Corrupt,
    #[error("layer.qcow2 must declare its backing file disk.img as raw (found {found})")]
    LayerBackingFormat { found: String },
    #[error("layer.qcow2 must have the backing file disk.img, not {found}")]
    LayerBacking { found: String },
    #[error("{member} must not have a backing file (it names {backing:?})")]
    Backing { member: Member, backing: String },
}

/// Checks one disk: qcow2 header first (no QEMU code has opened the file yet), then
/// `qemu-img info` with the declared format.
fn check_disk(
    path: &Path,
    member: Member,
    limits: ImageLimits,
) -> Result<DiskSummary, DiskCheckError> {
    let format = DiskFormat::of_member(member);
    if format == DiskFormat::Qcow2 {
        let header = qemu_img::read_qcow2_header(path)
            .map_err(|source| DiskCheckError::Unreadable { source })?
            .ok_or(DiskCheckError::BadMagic { member })?;
        if header.external_data_file {
            return Err(DiskCheckError::ExternalDataFile { member });
        }
        check_backing(
            member,
            header.backing_file.as_deref(),
            Some(DiskFormat::Raw.as_str()),
            false,
        )?;
    }
    let info = qemu_img::info(path, format).map_err(|e| match e {
        QemuImgError::Failed { stderr, .. } => DiskCheckError::Rejected { format, stderr },
        other => DiskCheckError::QemuImg(other),
    })?;
    if info.format != format.as_str() {
        return Err(DiskCheckError::Format {
            reported: info.format,
            expected: format,
        });
    }
    if info.virtual_size > limits.max_image_bytes {
        return Err(DiskCheckError::TooLarge {
            virtual_size: info.virtual_size,
            limit: limits.max_image_bytes,
        });
    }
    if info.dirty {
        return Err(DiskCheckError::Dirty);
    }
    if info.encrypted {
        return Err(DiskCheckError::Encrypted);
    }
    if let Some(data) = info.format_specific.as_ref().and_then(|f| f.get("data")) {
        if data.get("corrupt").and_then(serde_json::Value::as_bool) == Some(true) {
            return Err(DiskCheckError::Corrupt);
        }
        if data.get("data-file").is_some() {
            return Err(DiskCheckError::ExternalDataFile { member });
        }
    }
    if format == DiskFormat::Qcow2 {
        check_backing(
            member,
            info.backing_filename.as_deref(),
            info.backing_format.as_deref(),
            true,
        )?;
    }
    Ok(DiskSummary {
        member,
        format: info.format,
        virtual_size: info.virtual_size,
        allocated_size: info.actual_size,
    })
}

/// disk.qcow2 has no backing file; layer.qcow2's is exactly `disk.img`, format raw.
fn check_backing(
    member: Member,
    backing: Option<&str>,
    backing_format: Option<&str>,
    check_format: bool,
) -> Result<(), DiskCheckError> {
    match (member, backing) {
        (Member::LayerQcow2, Some("disk.img")) => {
            if check_format && backing_format != Some(DiskFormat::Raw.as_str()) {
                return Err(DiskCheckError::LayerBackingFormat {
                    found: backing_format.unwrap_or("no format").to_owned(),
                });
            }
            Ok(())
        }
        (Member::LayerQcow2, other) => Err(DiskCheckError::LayerBacking {
            found: other.map_or_else(|| "none".to_owned(), |b| format!("{b:?}")),
        }),
        (_, Some(other)) => Err(DiskCheckError::Backing {
            member,
            backing: other.to_owned(),
        }),
        (_, None) => Ok(()),
    }
}
