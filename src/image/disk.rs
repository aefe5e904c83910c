//! The files a VM boots from, as the image cache hands them out: the boot disk's chain
//! and the direct-boot kernel. The VM side only reads them.

use std::fmt;
use std::path::Path;

use super::member::Member;

/// The on-disk format of one disk file, as QEMU and qemu-img name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// The name QEMU's block layer and qemu-img's `-f`/`-F` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }

    /// The format a disk member of an image is declared to have (never probed).
    pub(crate) fn of_member(member: Member) -> Self {
        match member {
            Member::DiskImg => Self::Raw,
            _ => Self::Qcow2,
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One file of the boot disk's backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayer {
    pub path: String,
    pub format: DiskFormat,
}

impl DiskLayer {
    pub(crate) fn qcow2(path: &Path) -> Self {
        Self {
            path: path.display().to_string(),
            format: DiskFormat::Qcow2,
        }
    }
}

/// The boot disk as an explicit chain, bottom first; the last layer is the per-job
/// writable overlay. Every layer above the bottom must be qcow2.
///
/// QEMU is told each backing node by name, so it never follows a backing file name
/// written inside an image: a crafted qcow2 cannot make it open a host file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootDisk {
    pub layers: Vec<DiskLayer>,
}

impl BootDisk {
    /// `base` with qcow2 overlays stacked on it, bottom first.
    pub(crate) fn stacked(base: Vec<DiskLayer>, overlays: &[&Path]) -> Self {
        let mut layers = base;
        layers.extend(overlays.iter().map(|path| DiskLayer::qcow2(path)));
        Self { layers }
    }
}

/// Files for direct kernel boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFiles {
    pub kernel: String,
    pub initrd: Option<String>,
}
