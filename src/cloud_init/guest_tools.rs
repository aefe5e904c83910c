use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// The largest guest tools binary the worker serves (they are ~2 MiB).
const MAX_SIZE: u64 = 64 << 20;

/// The static guest tools binary this worker serves at `GET /v1/guest-tools`, read once.
#[derive(Debug, Clone)]
pub struct GuestTools {
    pub bytes: Bytes,
    /// Lowercase hex.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum GuestToolsError {
    #[error(
        "cannot read the guest tools to serve at {} (worker.yml `cloudInit.guestTools`; build \
         them with images/build-image, which writes images/out/qemu-worker-guest)",
        path.display()
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest tools at {} are {size} bytes, more than {MAX_SIZE}", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    #[error("the guest tools at {} are not an ELF executable", path.display())]
    NotElf { path: PathBuf },
}

impl GuestTools {
    /// Reads and hashes the binary (blocking: call it on the blocking pool).
    pub fn load(path: &Path) -> Result<Self, GuestToolsError> {
        let read = |source| GuestToolsError::Read {
            path: path.to_path_buf(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read)?.len();
        if size > MAX_SIZE {
            return Err(GuestToolsError::TooLarge {
                path: path.to_path_buf(),
                size,
            });
        }
        let bytes = std::fs::read(path).map_err(read)?;
        if !bytes.starts_with(b"\x7fELF") {
            return Err(GuestToolsError::NotElf {
                path: path.to_path_buf(),
            });
        }
        let sha256 = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            bytes: Bytes::from(bytes),
            sha256,
        })
    }
}
