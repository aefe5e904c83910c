use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::byte_size::ByteSize;
use crate::job::{MachineDefinition, MachineLimits};

/// worker.yml: how one worker host runs jobs. Every key is optional; relative paths are
/// relative to the directory that holds worker.yml (the current directory for the
/// embedded default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "Worker configuration (worker.yml)")]
pub struct WorkerConfig {
    /// Where the worker keeps its queue database, image cache, run dirs, logs and artifacts.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub queue: QueueConfig,
    /// How many jobs run at once (about one per two host cores under TCG).
    #[serde(default = "default_capacity")]
    #[schemars(range(min = 1, max = 64))]
    pub capacity: u32,
    #[serde(default = "default_limits")]
    pub limits: MachineLimits,
    /// Machine defaults under the image's machine.json and the payload's `machine`.
    #[serde(default)]
    pub machine: MachineDefinition,
    #[serde(default)]
    pub accelerator: AcceleratorChoice,
    #[serde(default)]
    pub firmware: FirmwareConfig,
    #[serde(default)]
    pub cloud_init: CloudInitConfig,
    #[serde(default)]
    pub images: ImageCacheConfig,
    #[serde(default)]
    pub network: NetworkConfig,
    #[serde(default)]
    pub artifacts: ArtifactStoreConfig,
    #[serde(default)]
    pub logs: LogConfig,
    #[serde(default)]
    pub metadata: MetadataConfig,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub snapshots: SnapshotConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub client: ClientConfig,
    #[serde(default)]
    pub debug: DebugConfig,
}

/// What jobs may ask for to debug their failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DebugConfig {
    /// The most minutes a payload's `debug.keepAliveOnFailure` may keep a failed job's
    /// VM running (counted against capacity); 0 keeps none.
    #[serde(default = "default_keep_alive")]
    #[schemars(range(max = 1440))]
    pub max_keep_alive_minutes: u32,
    /// Take a screenshot of each job's VM every this many seconds while it runs (from
    /// its start to the command's end) (`screenshots/every-NNNN.png` in the job directory, listed in the report's
    /// `screenshots`); 0 takes none.
    #[serde(default)]
    #[schemars(range(max = 86400))]
    pub screenshot_every_seconds: u32,
    /// The most such screenshots of one job (the first ones are kept).
    #[serde(default = "default_max_screenshots")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_screenshots: u32,
}

impl Default for DebugConfig {
    fn default() -> Self {
        Self {
            max_keep_alive_minutes: default_keep_alive(),
            screenshot_every_seconds: 0,
            max_screenshots: default_max_screenshots(),
        }
    }
}

fn default_max_screenshots() -> u32 {
    20
}

fn default_keep_alive() -> u32 {
    60
}

/// How the CLI's queue commands (`submit`, `status`, `jobs`, `logs`, `artifacts`,
/// `cancel`) reach a worker's API instead of opening the queue database, and what this
/// worker trusts when it passes requests on to the others of its pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientConfig {
    /// `http://HOST:PORT`, `https://HOST:PORT` or `unix:PATH`; `--server` overrides it.
    /// Unset: the commands open the queue database themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(unix:.+|https?://[^/]+/?)$"))]
    pub server: Option<String>,
    /// A file holding the bearer token (`QEMU_WORKER_TOKEN` overrides it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// PEM certificates of the CAs (or the self-signed certificates) that HTTPS servers
    /// are checked against, besides the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// The HTTP API of `qemu-worker serve` (docs/api.md): health, Prometheus metrics, and
/// the jobs in the queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApiConfig {
    /// `unix:PATH` (a socket only its owner may use; relative to worker.yml), or
    /// `HOST:PORT` for TCP (HTTPS with `tls`, else plain HTTP: then put it on loopback
    /// or a private network). By
    /// default `unix:<stateDir>/api.sock`; `off` serves no API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(off|unix:.+|\[?[0-9A-Za-z.:-]+\]?:[0-9]{1,5})$"))]
    pub listen: Option<String>,
    /// The base URL other workers of a PostgreSQL pool reach this API at, to pass on
    /// requests for the logs, artifacts and screenshots this worker holds. By default
    /// `http://HOST:PORT` (`https://` with `tls`) of a TCP `listen` on a specific
    /// address; none for a unix socket, an unspecified address (0.0.0.0) or loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^https?://[^/]+$"))]
    pub advertise: Option<String>,
    /// Who may call it: each bearer token by the sha256 of its text (never the token
    /// itself; `qemu-worker token new` makes one), with a scope. Every request but
    /// `/healthz` and `/readyz` needs one.
    #[serde(default)]
    pub tokens: Vec<ApiToken>,
    /// Serve HTTPS on a TCP `listen` (rustls; TLS 1.2 and 1.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ApiTls>,
    /// Where noVNC is (the folder holding `core/rfb.js`), for the web page's view of a
    /// running job's display: by default Debian's `/usr/share/novnc` (package
    /// `novnc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub novnc: Option<PathBuf>,
}

/// The API's certificate and key (PEM files, read when `serve` starts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApiTls {
    /// The certificate chain, leaf first.
    pub certificate: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// One API bearer token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApiToken {
    /// Who holds it (in the worker's log when a request is refused; never the token).
    #[schemars(length(min = 1, max = 64))]
    pub name: String,
    /// Lower-case hex sha256 of the token's text.
    #[schemars(pattern(r"^[0-9a-f]{64}$"))]
    pub sha256: String,
    pub scope: Scope,
}

/// What a token may do; each scope includes those before it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read jobs, logs and metrics.
    Read,
    /// Also submit and cancel jobs.
    Submit,
    /// Everything.
    Admin,
}

/// Where the API listens, once paths are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiListen {
    Off,
    Unix(PathBuf),
    Tcp(String),
}

impl std::fmt::Display for ApiListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(address) => f.write_str(address),
        }
    }
}

/// Boot snapshots (docs/snapshots.md): the first job on an image and machine saves its
/// VM where the guest tools ask for the task; later jobs resume that VM instead of
/// booting. User networking only; machines QEMU cannot migrate (NVMe storage) boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SnapshotConfig {
    #[serde(default)]
    pub enabled: bool,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}

fn default_capacity() -> u32 {
    2
}

fn default_limits() -> MachineLimits {
    MachineLimits {
        max_memory: 1024,
        max_cpus: 2,
        default_threads: 1,
    }
}

/// The job queue: an embedded SQLite database, or PostgreSQL shared by many hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum QueueConfig {
    Sqlite {
        /// Database file; `<stateDir>/queue.sqlite` when not given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<PathBuf>,
    },
    Postgres {
        /// A `postgres://` or `postgresql://` connection URL.
        #[schemars(pattern("^postgres(ql)?://"))]
        url: String,
    },
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self::Sqlite { path: None }
    }
}

/// Which accelerator runs guests. `auto` uses KVM only after a probe guest proved that it
/// works, and falls back to TCG (software emulation) otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AcceleratorChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The host's UEFI firmware, for machines with `firmware: uefi` (docs/machine.md): OVMF
/// as Debian's `ovmf` package installs it. Checked when such a VM starts, not at load:
/// a host that runs only BIOS machines needs no OVMF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FirmwareConfig {
    /// The firmware's code, mapped read-only into every UEFI VM.
    #[serde(default = "default_ovmf_code")]
    pub ovmf_code: PathBuf,
    /// The variable store template: each UEFI VM gets a writable copy in its run dir.
    /// It must be the one made for `ovmfCode` (the same flash size).
    #[serde(default = "default_ovmf_vars")]
    pub ovmf_vars: PathBuf,
}

fn default_ovmf_code() -> PathBuf {
    PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd")
}

fn default_ovmf_vars() -> PathBuf {
    PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.fd")
}

impl Default for FirmwareConfig {
    fn default() -> Self {
        Self {
            ovmf_code: default_ovmf_code(),
            ovmf_vars: default_ovmf_vars(),
        }
    }
}

/// The cloud-init datasource (docs/metadata.md) that VMs with `machine.cloudInit` get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CloudInitConfig {
    /// The static guest tools binary served at `GET /v1/guest-tools`, which the default
    /// user-data installs in a stock cloud image. Read once, when the first such VM
    /// starts.
    #[serde(default = "default_guest_tools")]
    pub guest_tools: PathBuf,
}

fn default_guest_tools() -> PathBuf {
    PathBuf::from("/usr/lib/qemu-worker/qemu-worker-guest")
}

impl Default for CloudInitConfig {
    fn default() -> Self {
        Self {
            guest_tools: default_guest_tools(),
        }
    }
}

/// The image cache and where images may come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImageCacheConfig {
    /// Cache directory; `<stateDir>/images` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Evict least recently used images to stay under this size.
    #[serde(default = "default_cache_size")]
    pub max_size: ByteSize,
    /// Claim no job while the cache's file system has less free space than this.
    #[serde(default = "default_min_free")]
    pub min_free_space: ByteSize,
    /// Largest archive download, and largest unpacked image.
    #[serde(default = "default_max_image")]
    pub max_image_size: ByteSize,
    /// Directories from which payloads may name local image files (absolute paths).
    #[serde(default)]
    pub allowed_local_dirs: Vec<PathBuf>,
}

fn default_cache_size() -> ByteSize {
    ByteSize::gib(20)
}

fn default_min_free() -> ByteSize {
    ByteSize::gib(2)
}

fn default_max_image() -> ByteSize {
    ByteSize::gib(16)
}

impl Default for ImageCacheConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_size: default_cache_size(),
            min_free_space: default_min_free(),
            max_image_size: default_max_image(),
            allowed_local_dirs: Vec::new(),
        }
    }
}

/// How guests are networked. Either way a guest reaches only its own metadata service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkConfig {
    #[serde(default)]
    pub backend: NetworkBackend,
    /// Whether jobs may ask for outbound NAT to public addresses (`network.outbound` in
    /// the payload). Needs `backend: tap`.
    #[serde(default)]
    pub allow_outbound: bool,
}

/// `user`: QEMU user-mode networking, unprivileged. `tap`: a network namespace and tap
/// device per VM with nftables rules (root only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkBackend {
    #[default]
    User,
    Tap,
}

/// Caps on what one job may store as artifacts, and on the time their collection may
/// take. Everything here is counted on the host: the guest is not trusted to keep them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ArtifactStoreConfig {
    /// Largest single file.
    #[serde(default = "default_artifact_file")]
    pub max_file_size: ByteSize,
    /// All artifacts of a job together.
    #[serde(default = "default_artifact_total")]
    pub max_total_size: ByteSize,
    /// Files a job may store, all artifacts together.
    #[serde(default = "default_max_entries")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_entries: u64,
    /// Entries a directory artifact may skip (links, devices, unreadable files) before its
    /// collection fails; the first few are named in the report, the rest counted.
    #[serde(default = "default_max_skipped")]
    #[schemars(range(min = 0, max = 10_000_000))]
    pub max_skipped: u64,
    /// Longest file name inside a directory artifact, in bytes, `/`s included.
    #[serde(default = "default_max_name_length")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_name_length: u64,
    /// Deepest nesting inside a directory artifact (`a/b/c.txt` is depth 3).
    #[serde(default = "default_max_depth")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_depth: u64,
    /// The whole collection, every artifact together: a job ends within maxRunTime plus
    /// this.
    #[serde(default = "default_collect_seconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub collect_seconds: u64,
    /// Longest silence on the agent port in the middle of an answer.
    #[serde(default = "default_stall_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub stall_seconds: u64,
}

fn default_artifact_file() -> ByteSize {
    ByteSize::gib(1)
}

fn default_artifact_total() -> ByteSize {
    ByteSize::gib(4)
}

fn default_max_entries() -> u64 {
    10_000
}

fn default_max_skipped() -> u64 {
    1_000
}

fn default_max_name_length() -> u64 {
    1_024
}

fn default_max_depth() -> u64 {
    32
}

fn default_collect_seconds() -> u64 {
    300
}

fn default_stall_seconds() -> u64 {
    30
}

impl Default for ArtifactStoreConfig {
    fn default() -> Self {
        Self {
            max_file_size: default_artifact_file(),
            max_total_size: default_artifact_total(),
            max_entries: default_max_entries(),
            max_skipped: default_max_skipped(),
            max_name_length: default_max_name_length(),
            max_depth: default_max_depth(),
            collect_seconds: default_collect_seconds(),
            stall_seconds: default_stall_seconds(),
        }
    }
}

/// Caps on the job log (the command's output) and the serial console log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LogConfig {
    /// The job log; output past it is dropped and counted.
    #[serde(default = "default_log_size")]
    pub max_size: ByteSize,
    /// The serial console log (`console.log`), capped while QEMU writes it; the rest is
    /// read and dropped, and counted.
    #[serde(default = "default_console_size")]
    pub max_console_size: ByteSize,
    /// A log stream that sends nothing for this long is closed (the guest tools open a
    /// new one for what follows).
    #[serde(default = "default_log_idle")]
    #[schemars(range(min = 1, max = 86400))]
    pub idle_seconds: u64,
}

fn default_log_size() -> ByteSize {
    ByteSize::mib(64)
}

fn default_console_size() -> ByteSize {
    ByteSize::mib(16)
}

fn default_log_idle() -> u64 {
    300
}

fn default_max_connections() -> u32 {
    16
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            max_size: default_log_size(),
            max_console_size: default_console_size(),
            idle_seconds: default_log_idle(),
        }
    }
}

/// The per-VM metadata service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MetadataConfig {
    /// Connections one VM may hold open at once; more are closed as they arrive (with
    /// user networking each open connection costs a helper process on the host).
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 2, max = 1024))]
    pub max_connections: u32,
}

impl Default for MetadataConfig {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
        }
    }
}

/// Timeouts, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Timeouts {
    /// From QEMU start until the guest tools fetch their task.
    #[serde(default = "default_guest_ready")]
    #[schemars(range(min = 1, max = 3600))]
    pub guest_ready_seconds: u64,
    /// From the first ACPI power-down request until QEMU is killed.
    #[serde(default = "default_shutdown")]
    #[schemars(range(min = 1, max = 600))]
    pub shutdown_seconds: u64,
    /// How often a running job's queue lease is renewed.
    #[serde(default = "default_heartbeat")]
    #[schemars(range(min = 1, max = 600))]
    pub heartbeat_seconds: u64,
    /// How long a lease lasts without a heartbeat before the job is given to another worker.
    #[serde(default = "default_lease")]
    #[schemars(range(min = 2, max = 3600))]
    pub lease_seconds: u64,
    /// On shutdown, how long running jobs may finish before they are stopped and given
    /// back to the queue.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 0, max = 86400))]
    pub grace_seconds: u64,
}

fn default_grace() -> u64 {
    60
}

fn default_guest_ready() -> u64 {
    120
}

fn default_shutdown() -> u64 {
    20
}

fn default_heartbeat() -> u64 {
    10
}

fn default_lease() -> u64 {
    60
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            guest_ready_seconds: default_guest_ready(),
            shutdown_seconds: default_shutdown(),
            heartbeat_seconds: default_heartbeat(),
            lease_seconds: default_lease(),
            grace_seconds: default_grace(),
        }
    }
}

impl WorkerConfig {
    /// Makes every relative path absolute against `base` (the directory of worker.yml).
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        let absolute = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        self.state_dir = absolute(&self.state_dir);
        if let QueueConfig::Sqlite { path } = &mut self.queue {
            *path = Some(
                path.as_deref()
                    .map_or_else(|| self.state_dir.join("queue.sqlite"), absolute),
            );
        }
        self.images.dir = Some(
            self.images
                .dir
                .as_deref()
                .map_or_else(|| self.state_dir.join("images"), absolute),
        );
        for dir in &mut self.images.allowed_local_dirs {
            *dir = absolute(dir);
        }
        self.firmware.ovmf_code = absolute(&self.firmware.ovmf_code);
        self.firmware.ovmf_vars = absolute(&self.firmware.ovmf_vars);
        self.cloud_init.guest_tools = absolute(&self.cloud_init.guest_tools);
        if let Some(listen) = &self.api.listen
            && let Some(path) = listen.strip_prefix("unix:")
        {
            self.api.listen = Some(format!("unix:{}", absolute(Path::new(path)).display()));
        }
        if let Some(tls) = &mut self.api.tls {
            tls.certificate = absolute(&tls.certificate);
            tls.key = absolute(&tls.key);
        }
        for file in [&mut self.client.token_file, &mut self.client.ca_file]
            .into_iter()
            .flatten()
        {
            *file = absolute(file);
        }
        if let Some(server) = &self.client.server
            && let Some(path) = server.strip_prefix("unix:")
        {
            self.client.server = Some(format!("unix:{}", absolute(Path::new(path)).display()));
        }
    }

    /// Where the API listens (set once paths are resolved).
    pub fn api_listen(&self) -> ApiListen {
        match self.api.listen.as_deref() {
            None => ApiListen::Unix(self.state_dir.join("api.sock")),
            Some("off") => ApiListen::Off,
            Some(listen) => match listen.strip_prefix("unix:") {
                Some(path) => ApiListen::Unix(PathBuf::from(path)),
                None => ApiListen::Tcp(listen.to_owned()),
            },
        }
    }

    /// The SQLite queue's database (set once paths are resolved).
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        match &self.queue {
            QueueConfig::Sqlite { path } => Some(
                path.clone()
                    .unwrap_or_else(|| self.state_dir.join("queue.sqlite")),
            ),
            QueueConfig::Postgres { .. } => None,
        }
    }

    /// The image cache directory (set once paths are resolved).
    pub fn image_dir(&self) -> PathBuf {
        self.images
            .dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("images"))
    }
}
