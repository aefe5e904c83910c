use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::machine::MachineDefinition;
use super::string_enum::string_enum;

pub(crate) const SHA256_PATTERN: &str = "^[0-9a-f]{64}$";
pub(crate) const ENV_NAME_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]*$";

/// A job: which image to boot, what to run in it, and what to keep afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "Job payload")]
pub struct JobPayload {
    pub image: ImageReference,
    /// The program and its arguments, run inside the guest without a shell.
    #[schemars(length(min = 1, max = 1024))]
    pub command: Vec<String>,
    /// Environment variables for the command, over the guest's base environment.
    #[serde(default)]
    #[schemars(extend("propertyNames" = {"pattern": ENV_NAME_PATTERN}, "maxProperties" = 1024))]
    pub env: BTreeMap<String, String>,
    /// Seconds the command may run before the job is failed and the VM stopped.
    #[schemars(range(min = 1, max = 604_800))]
    pub max_run_time: u64,
    /// Overrides of the image's machine definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<MachineDefinition>,
    /// Files and folders to collect from the guest when the command ends.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub artifacts: Vec<ArtifactSpec>,
    /// What the guest may reach besides its own metadata service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<JobNetwork>,
    /// cloud-init user-data of the job's own: a `#cloud-config` document or a `#!`
    /// script (at most 64 KiB), run by the image's cloud-init before the task, after the
    /// worker's part that starts the guest tools. Needs a VM with the cloud-init
    /// datasource (`machine.cloudInit`); it is part of the boot snapshot's key, since it
    /// shapes the booted guest (docs/metadata.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub user_data: Option<String>,
    /// Help for debugging the job when it fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug: Option<JobDebug>,
}

/// What a job asks for to debug its failure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JobDebug {
    /// Minutes to keep the VM running after the job failed (its result is recorded at
    /// once): for `qemu-worker screenshot` and a look, until `qemu-worker release` or
    /// the time is up. At most worker.yml `debug.maxKeepAliveMinutes`; jobs run by
    /// `serve` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1440))]
    pub keep_alive_on_failure: Option<u32>,
}

/// A job's network wishes; the worker grants them only as far as worker.yml allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JobNetwork {
    /// Outbound connections to public addresses (NAT through the host). Needs a worker
    /// with `network: {backend: tap, allowOutbound: true}`; the host, private,
    /// link-local and other VMs' addresses stay unreachable.
    #[serde(default)]
    pub outbound: bool,
}

impl JobPayload {
    /// Whether the job asked for outbound network access.
    pub fn wants_outbound(&self) -> bool {
        self.network.is_some_and(|n| n.outbound)
    }
}

/// Where the image comes from: an `http(s)://` URL or an absolute path inside a directory
/// that worker.yml allows, either alone or with the sha256 the archive must have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ImageReference {
    Location(#[schemars(length(min = 1, max = 4096))] String),
    Pinned(PinnedImage),
}

/// An image location with the sha256 of the archive, checked while it downloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PinnedImage {
    #[schemars(length(min = 1, max = 4096))]
    pub url: String,
    /// Lowercase hex sha256 of the `.tar.zst` archive.
    #[schemars(pattern(SHA256_PATTERN))]
    pub sha256: String,
}

impl ImageReference {
    pub fn location(&self) -> &str {
        match self {
            Self::Location(location) => location,
            Self::Pinned(pinned) => &pinned.url,
        }
    }

    pub fn sha256(&self) -> Option<&str> {
        match self {
            Self::Location(_) => None,
            Self::Pinned(pinned) => Some(&pinned.sha256),
        }
    }
}

/// Why an image location has none of the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageLocationError {
    #[error("image location contains control characters")]
    ControlCharacters,
    #[error("image URL `{location}` has no valid host")]
    NoHost { location: String },
    #[error(
        "file: URLs are not accepted (`{location}`); give an absolute path inside a \
         directory that worker.yml `images.allowedLocalDirs` allows"
    )]
    FileUrl { location: String },
    #[error("image URL `{location}` must use http or https")]
    Scheme { location: String },
    #[error("image `{location}` is neither an http(s) URL nor an absolute path")]
    NotAbsolute { location: String },
    #[error("image path `{location}` must not contain `.` or `..`")]
    DotComponent { location: String },
}

/// An image location after its form has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    Http(String),
    Local(PathBuf),
}

impl ImageSource {
    /// Classifies a location; the error says what forms are accepted.
    pub fn parse(location: &str) -> Result<Self, ImageLocationError> {
        let owned = || location.to_owned();
        if location.chars().any(char::is_control) {
            return Err(ImageLocationError::ControlCharacters);
        }
        let lower = location.to_ascii_lowercase();
        if let Some(rest) = lower
            .strip_prefix("https://")
            .or_else(|| lower.strip_prefix("http://"))
        {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            let host = authority.rsplit('@').next().unwrap_or("");
            if host.is_empty() || host.starts_with(':') || location.contains(char::is_whitespace) {
                return Err(ImageLocationError::NoHost { location: owned() });
            }
            return Ok(Self::Http(location.to_owned()));
        }
        if lower.starts_with("file:") {
            return Err(ImageLocationError::FileUrl { location: owned() });
        }
        if lower.contains("://") {
            return Err(ImageLocationError::Scheme { location: owned() });
        }
        let path = Path::new(location);
        if !path.is_absolute() {
            return Err(ImageLocationError::NotAbsolute { location: owned() });
        }
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(ImageLocationError::DotComponent { location: owned() });
        }
        Ok(Self::Local(path.to_path_buf()))
    }
}

string_enum! {
    /// Whether an artifact is a single file or a folder collected recursively.
    pub enum ArtifactKind {
        File = "file",
        Directory = "directory",
    }
}

/// One file or folder to collect from the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ArtifactSpec {
    #[serde(rename = "type")]
    pub kind: ArtifactKind,
    /// Absolute path inside the guest.
    #[schemars(length(min = 2, max = 4096), pattern("^/"))]
    pub path: String,
    /// Relative name under which it is stored, e.g. `public/report.xml`.
    #[schemars(length(min = 1, max = 1024))]
    pub name: String,
}

/// Why an artifact name is unsafe, or `None` when it is a clean relative path.
pub(crate) fn artifact_name_problem(name: &str) -> Option<String> {
    if name.contains('\0') {
        return Some("artifact name contains a NUL byte".into());
    }
    if name.contains('\\') {
        return Some(format!(
            "artifact name `{name}` contains a backslash; use `/`"
        ));
    }
    if name.starts_with('/') {
        return Some(format!(
            "artifact name `{name}` must be relative, not start with `/`"
        ));
    }
    for segment in name.split('/') {
        match segment {
            "" => return Some(format!("artifact name `{name}` has an empty path segment")),
            "." | ".." => {
                return Some(format!(
                    "artifact name `{name}` must not contain `{segment}`"
                ));
            }
            s if s.len() > 255 => {
                return Some(format!(
                    "artifact name `{name}` has a segment over 255 bytes"
                ));
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_sources_are_classified() {
        assert_eq!(
            ImageSource::parse("https://example.test/a.tar.zst"),
            Ok(ImageSource::Http("https://example.test/a.tar.zst".into()))
        );
        assert_eq!(
            ImageSource::parse("/srv/images/a.tar.zst"),
            Ok(ImageSource::Local("/srv/images/a.tar.zst".into()))
        );
        for bad in [
            "file:///etc/shadow",
            "ftp://example.test/a",
            "images/a.tar.zst",
            "/srv/images/../../etc/shadow",
            "https:///nohost",
            "http://:80/x",
            "https://exa mple.test/",
        ] {
            assert!(ImageSource::parse(bad).is_err(), "{bad} should be rejected");
        }
        let err = ImageSource::parse("file:///etc/shadow").expect_err("file url");
        assert!(err.to_string().contains("allowedLocalDirs"), "{err}");
    }

    #[test]
    fn artifact_names_must_be_clean_relative_paths() {
        assert_eq!(artifact_name_problem("public/report.xml"), None);
        assert_eq!(artifact_name_problem("a"), None);
        for bad in ["/abs", "a/../b", "..", "a//b", "a/", "./a", "a\\b", "a\0b"] {
            assert!(
                artifact_name_problem(bad).is_some(),
                "{bad:?} should be rejected"
            );
        }
    }
}
