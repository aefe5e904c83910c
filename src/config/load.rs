use std::fmt;
use std::path::{Path, PathBuf};

use super::model::{NetworkBackend, WorkerConfig};
use crate::job::{Identity, MachineLayers};
use crate::schema::{Document, Issue, SchemaKind, validate_against};

/// The committed worker.yml, used when no config file is given and none is in the
/// current directory, so that a fresh checkout runs with no set-up.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../worker.yml");

const MAX_CONFIG_BYTES: usize = 1 << 20;

/// Where the configuration in force came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    Embedded,
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Embedded => f.write_str("the embedded default worker.yml"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: WorkerConfig,
    pub source: ConfigSource,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to determine the current directory")]
    CurrentDir {
        #[source]
        source: std::io::Error,
    },
    #[error("{origin} is invalid:{}", list(.issues))]
    Invalid {
        origin: ConfigSource,
        issues: Vec<Issue>,
    },
}

fn list(issues: &[Issue]) -> String {
    issues.iter().map(|i| format!("\n  {i}")).collect()
}

/// Loads the config at `path`; with no path, `./worker.yml` if it exists, otherwise the
/// embedded default. Every problem is reported at once, with its key path and line.
pub fn load_config(path: Option<&Path>) -> Result<LoadedConfig, ConfigError> {
    let cwd = std::env::current_dir().map_err(|source| ConfigError::CurrentDir { source })?;
    let chosen = match path {
        Some(path) => Some(path.to_path_buf()),
        None => Some(cwd.join("worker.yml")).filter(|p| p.is_file()),
    };
    match chosen {
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let absolute = if path.is_absolute() {
                path
            } else {
                cwd.join(path)
            };
            let base = absolute
                .parent()
                .map_or_else(|| cwd.clone(), Path::to_path_buf);
            parse_config(&text, ConfigSource::File(absolute), &base)
        }
        None => parse_config(EMBEDDED_DEFAULT, ConfigSource::Embedded, &cwd),
    }
}

/// Parses worker.yml text; relative paths in it are resolved against `base`.
pub(crate) fn parse_config(
    text: &str,
    source: ConfigSource,
    base: &Path,
) -> Result<LoadedConfig, ConfigError> {
    let invalid = |issues| ConfigError::Invalid {
        origin: source.clone(),
        issues,
    };
    let document =
        Document::parse(text, MAX_CONFIG_BYTES).map_err(|e| invalid(vec![e.to_issue()]))?;
    // An empty file is an empty configuration: every key has a default.
    let value = match document.value() {
        serde_json::Value::Null => serde_json::json!({}),
        other => other.clone(),
    };
    let mut issues = document.duplicate_keys().to_vec();
    issues.extend(validate_against(SchemaKind::WorkerConfig, &value));
    if issues.is_empty() {
        match serde_json::from_value::<WorkerConfig>(value) {
            Ok(mut config) => {
                config.resolve_paths(base);
                check_semantics(&config, &mut issues);
                if issues.is_empty() {
                    return Ok(LoadedConfig { config, source });
                }
            }
            Err(e) => issues.push(Issue::new(
                "",
                format!("configuration does not decode: {e}"),
            )),
        }
    }
    document.annotate(&mut issues);
    Err(invalid(issues))
}

fn check_semantics(config: &WorkerConfig, issues: &mut Vec<Issue>) {
    // The default machine must itself be runnable within the limits; the machine issues
    // use `/machine/...` paths, which are worker.yml paths too.
    let layers = MachineLayers {
        worker_config: config.machine.clone(),
        ..MachineLayers::default()
    };
    if let Err(machine_issues) =
        layers.resolve(&config.limits, &Identity::derive("config-check", 0))
    {
        issues.extend(machine_issues);
    }
    if config.limits.default_threads > config.limits.max_cpus {
        issues.push(Issue::new(
            "/limits/defaultThreads",
            format!(
                "defaultThreads {} is more than maxCPUs {}",
                config.limits.default_threads, config.limits.max_cpus
            ),
        ));
    }
    if config.network.allow_outbound && config.network.backend != NetworkBackend::Tap {
        issues.push(Issue::new(
            "/network/allowOutbound",
            "allowOutbound needs `backend: tap`: user networking is restricted to the \
             metadata service",
        ));
    }
    for (index, dir) in config.images.allowed_local_dirs.iter().enumerate() {
        if dir
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            issues.push(Issue::new(
                format!("/images/allowedLocalDirs/{index}"),
                format!(
                    "allowed image directory {} must not contain `..`",
                    dir.display()
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AcceleratorChoice, ByteSize, QueueConfig};

    fn parse(text: &str) -> Result<LoadedConfig, ConfigError> {
        parse_config(
            text,
            ConfigSource::File("/etc/qw/worker.yml".into()),
            Path::new("/etc/qw"),
        )
    }

    fn issues(text: &str) -> Vec<Issue> {
        match parse(text) {
            Err(ConfigError::Invalid { issues, .. }) => issues,
            other => panic!("expected invalid config, got {other:?}"),
        }
    }

    #[test]
    fn the_embedded_default_is_valid() {
        let loaded = parse_config(EMBEDDED_DEFAULT, ConfigSource::Embedded, Path::new("/repo"))
            .expect("embedded worker.yml must be valid");
        assert_eq!(loaded.config.state_dir, Path::new("/repo/state"));
    }

    #[test]
    fn an_empty_file_means_all_defaults() {
        let config = parse("").expect("empty is valid").config;
        assert_eq!(config.capacity, 2);
        assert_eq!(config.accelerator, AcceleratorChoice::Auto);
        assert_eq!(config.images.max_size, ByteSize::gib(20));
        assert_eq!(
            config.queue,
            QueueConfig::Sqlite {
                path: Some("/etc/qw/state/queue.sqlite".into())
            }
        );
        assert_eq!(config.image_dir(), Path::new("/etc/qw/state/images"));
    }

    #[test]
    fn errors_name_the_key_path_and_line() {
        let found = issues(
            "capacity: 2\nlimits:\n  maxMemory: 1024\n  maxCPUs: 0\n  defaultThreads: 1\nacclerator: kvm\n",
        );
        let described: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(described.len(), 2, "{described:?}");
        assert!(
            described[0].starts_with("/limits/maxCPUs (line 4): "),
            "{described:?}"
        );
        assert_eq!(
            described[1],
            "/acclerator (line 6): unknown field `acclerator`"
        );
    }

    #[test]
    fn yaml_1_1_booleans_are_not_booleans() {
        // `accelerator: on` is the string "on", which is not an accelerator.
        let found = issues("accelerator: on\n");
        assert_eq!(found[0].path, "/accelerator");
    }

    #[test]
    fn queue_backends_are_checked_by_their_tag() {
        let found = issues("queue:\n  backend: postgres\n  path: /x\n");
        let paths: Vec<&str> = found.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["/queue/url", "/queue/path"]);
        let config = parse("queue: {backend: postgres, url: 'postgres:///q?host=/run/pg'}\n")
            .expect("valid")
            .config;
        assert!(matches!(config.queue, QueueConfig::Postgres { .. }));
    }

    #[test]
    fn sizes_accept_units_and_report_bad_ones() {
        let config = parse("images: {maxSize: 5 GiB, allowedLocalDirs: [imgs]}\n")
            .expect("valid")
            .config;
        assert_eq!(config.images.max_size, ByteSize::gib(5));
        assert_eq!(
            config.images.allowed_local_dirs,
            [Path::new("/etc/qw/imgs")]
        );
        let found = issues("images: {maxSize: 5 GB}\n");
        assert_eq!(found[0].path, "/images/maxSize");
    }

    #[test]
    fn the_default_machine_must_fit_the_limits() {
        let found = issues(
            "limits: {maxMemory: 512, maxCPUs: 2, defaultThreads: 1}\nmachine: {memory: 1024}\n",
        );
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].path, "/machine/memory");
        assert_eq!(found[0].line, Some(2));
        assert_eq!(
            found[0].message,
            "machine memory 1024 MiB is larger than the allowed 512 MiB (set by worker.yml `machine`)"
        );
    }

    #[test]
    fn outbound_access_needs_the_tap_backend() {
        let found = issues("network: {allowOutbound: true}\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, "/network/allowOutbound");
        assert!(found[0].message.contains("backend: tap"), "{found:?}");
        let config = parse("network: {backend: tap, allowOutbound: true}\n").expect("valid");
        assert!(config.config.network.allow_outbound);
    }

    #[test]
    fn ovmf_defaults_to_debians_files_and_relative_paths_are_the_configs() {
        let config = parse("").expect("valid").config;
        assert_eq!(
            config.firmware.ovmf_code,
            Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd")
        );
        assert_eq!(
            config.firmware.ovmf_vars,
            Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd")
        );
        let config = parse("firmware: {ovmfCode: fw/CODE.fd}\n")
            .expect("valid")
            .config;
        assert_eq!(config.firmware.ovmf_code, Path::new("/etc/qw/fw/CODE.fd"));
        assert_eq!(
            config.firmware.ovmf_vars,
            Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd")
        );
        let found = issues("firmware: {code: /x}\n");
        assert_eq!(found[0].path, "/firmware/code");
    }

    #[test]
    fn a_default_uefi_machine_on_microvm_is_refused() {
        let found = issues("machine: {firmware: uefi, chipset: microvm, kernel: kernel}\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, "/machine/firmware");
    }

    #[test]
    fn a_missing_explicit_file_is_a_read_error() {
        let err = load_config(Some(Path::new("/nonexistent/worker.yml"))).expect_err("missing");
        assert!(matches!(err, ConfigError::Read { .. }));
    }
}
