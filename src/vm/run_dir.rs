use std::path::{Path, PathBuf};

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// The longest file name the run dir holds a socket under.
const LONGEST_SOCKET_NAME: &str = "serial.sock";

/// The per-VM directory: QEMU's sockets, the serial console, the disk overlay and a UEFI
/// VM's variable store.
///
/// Constructed only for paths whose sockets fit in a unix socket address, so that a long
/// state directory fails at start-up with a clear message rather than at bind time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    root: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("run directory {path:?} is not valid UTF-8")]
    NotUtf8 { path: PathBuf },
    #[error("run directory {path:?} is not absolute")]
    NotAbsolute { path: PathBuf },
    #[error(
        "run directory {path:?} is too long for unix sockets: {length} bytes, at most {limit} \
         (use a shorter stateDir)"
    )]
    TooLong {
        path: PathBuf,
        length: usize,
        limit: usize,
    },
}

impl RunDir {
    pub fn new(path: &Path) -> Result<Self, RunDirError> {
        let root = path.to_str().ok_or_else(|| RunDirError::NotUtf8 {
            path: path.to_path_buf(),
        })?;
        if !path.is_absolute() {
            return Err(RunDirError::NotAbsolute {
                path: path.to_path_buf(),
            });
        }
        let root = root.trim_end_matches('/').to_owned();
        let limit = MAX_SOCKET_PATH - LONGEST_SOCKET_NAME.len() - 1;
        if root.len() > limit {
            return Err(RunDirError::TooLong {
                path: path.to_path_buf(),
                length: root.len(),
                limit,
            });
        }
        Ok(Self { root })
    }

    pub fn path(&self) -> &Path {
        Path::new(&self.root)
    }

    fn file(&self, name: &str) -> String {
        format!("{}/{name}", self.root)
    }

    /// QMP control socket (QEMU listens).
    pub fn qmp_socket(&self) -> String {
        self.file("qmp.sock")
    }

    /// qemu-ga channel (QEMU listens; the guest's qemu-ga answers).
    pub fn qga_socket(&self) -> String {
        self.file("qga.sock")
    }

    /// The guest tools' bulk channel (QEMU listens).
    pub fn agent_socket(&self) -> String {
        self.file("agent.sock")
    }

    /// VNC display on a unix socket: never on TCP.
    pub fn vnc_socket(&self) -> String {
        self.file("vnc.sock")
    }

    /// Where the metadata service of this VM listens for the guestfwd helper.
    pub fn metadata_socket(&self) -> String {
        self.file("meta.sock")
    }

    /// The job's copy-on-write disk overlay over the image (or a boot snapshot's disk).
    pub fn overlay(&self) -> PathBuf {
        self.path().join("overlay.qcow2")
    }

    /// A UEFI VM's own variable store: a copy of OVMF's template (or of a boot
    /// snapshot's store), mapped writable as the second flash device.
    pub fn uefi_vars(&self) -> String {
        self.file("uefi-vars.fd")
    }

    /// The guest's first serial port, as the worker keeps it (capped).
    pub fn serial_log(&self) -> String {
        self.file("serial.log")
    }

    /// The guest's first serial port (QEMU listens; the worker copies it into
    /// `serial_log`).
    pub fn serial_socket(&self) -> String {
        self.file("serial.sock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_fit_in_sun_path() {
        let longest = format!(
            "/{}",
            "d".repeat(MAX_SOCKET_PATH - LONGEST_SOCKET_NAME.len() - 2)
        );
        let dir = RunDir::new(Path::new(&longest)).expect("fits exactly");
        for socket in [
            dir.qmp_socket(),
            dir.qga_socket(),
            dir.agent_socket(),
            dir.vnc_socket(),
            dir.metadata_socket(),
            dir.serial_socket(),
        ] {
            assert!(socket.len() <= MAX_SOCKET_PATH, "{socket}");
        }
        let too_long = format!("{longest}x");
        assert!(matches!(
            RunDir::new(Path::new(&too_long)),
            Err(RunDirError::TooLong { .. })
        ));
    }

    #[test]
    fn relative_paths_are_refused() {
        assert!(matches!(
            RunDir::new(Path::new("state/run")),
            Err(RunDirError::NotAbsolute { .. })
        ));
    }
}
