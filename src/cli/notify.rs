//! systemd's readiness and watchdog protocol (sd_notify(3)), spoken directly: one
//! datagram per state to the socket in `NOTIFY_SOCKET`. Without it (not under systemd,
//! or not `Type=notify`) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where systemd listens, if it does.
#[derive(Debug)]
pub(super) struct Notifier {
    socket: UnixDatagram,
    address: std::os::unix::net::SocketAddr,
}

impl Notifier {
    pub(super) fn from_env() -> Option<Self> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let path = path.to_str()?;
        let address = match path.strip_prefix('@') {
            // An abstract socket (systemd uses these for services in containers).
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            }
            None => std::os::unix::net::SocketAddr::from_pathname(path).ok()?,
        };
        let socket = UnixDatagram::unbound().ok()?;
        Some(Self { socket, address })
    }

    /// Sends `state` (`READY=1`, `STOPPING=1`, `WATCHDOG=1`, …); a failure is logged
    /// once per call and otherwise ignored: systemd may have gone away.
    pub(super) fn notify(&self, state: &str) {
        if let Err(error) = self.socket.send_to_addr(state.as_bytes(), &self.address) {
            tracing::warn!(%error, state, "cannot notify systemd");
        }
    }

    /// How often to ping the watchdog: half of `WATCHDOG_USEC`, when it is meant for
    /// this process (`WATCHDOG_PID` unset or ours).
    pub(super) fn watchdog_interval() -> Option<Duration> {
        if let Some(pid) = std::env::var_os("WATCHDOG_PID")
            && pid.to_str() != Some(&std::process::id().to_string())
        {
            return None;
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}
