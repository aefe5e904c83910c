//! worker.yml: the model, its defaults, and loading with every problem reported.

mod byte_size;
mod load;
mod model;

pub use byte_size::ByteSize;
pub use load::{ConfigError, ConfigSource, EMBEDDED_DEFAULT, LoadedConfig, load_config};
pub use model::{
    AcceleratorChoice, ApiConfig, ApiListen, ApiTls, ApiToken, ArtifactStoreConfig, ClientConfig,
    CloudInitConfig, FirmwareConfig, ImageCacheConfig, LogConfig, MetadataConfig, NetworkBackend,
    NetworkConfig, QueueConfig, Scope, SnapshotConfig, Timeouts, WorkerConfig,
};
