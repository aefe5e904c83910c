use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The files an image archive may hold, all at its top level (DESIGN §2.1).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum Member {
    #[serde(rename = "machine.json")]
    MachineJson,
    #[serde(rename = "kernel")]
    Kernel,
    #[serde(rename = "initrd")]
    Initrd,
    #[serde(rename = "disk.img")]
    DiskImg,
    #[serde(rename = "disk.qcow2")]
    DiskQcow2,
    #[serde(rename = "layer.qcow2")]
    LayerQcow2,
}

impl Member {
    /// In archive order: small metadata first, so a bad machine.json fails before the
    /// disk is downloaded.
    pub const ALL: [Self; 6] = [
        Self::MachineJson,
        Self::Kernel,
        Self::Initrd,
        Self::DiskImg,
        Self::DiskQcow2,
        Self::LayerQcow2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::MachineJson => "machine.json",
            Self::Kernel => "kernel",
            Self::Initrd => "initrd",
            Self::DiskImg => "disk.img",
            Self::DiskQcow2 => "disk.qcow2",
            Self::LayerQcow2 => "layer.qcow2",
        }
    }

    pub fn from_name(name: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name().as_bytes() == name)
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One reason an image is refused, naming the archive entry when there is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct ImageProblem {
    /// The archive entry at fault, as it is written in the archive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    pub message: String,
}

impl ImageProblem {
    pub fn entry(entry: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            entry: Some(entry.into()),
            message: message.into(),
        }
    }

    pub fn image(message: impl Into<String>) -> Self {
        Self {
            entry: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ImageProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.entry {
            Some(entry) => write!(f, "entry {entry:?}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}
