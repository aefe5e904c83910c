use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};

/// Commands that set up a VM's network must not hang a job.
const COMMAND_TIMEOUT_SECS: &str = "10";

/// The tap device inside each VM's network namespace.
pub const TAP_DEVICE: &str = "tap0";

/// nftables rules of a VM's namespace: the guest may open TCP connections to the
/// metadata service and nothing else; nothing is forwarded anywhere.
const RULES: &str = r#"table inet qemu_worker {
  chain input {
    type filter hook input priority 0; policy drop;
    iif "lo" accept
    ct state established,related accept
    iifname "tap0" ip daddr 169.254.169.254 tcp dport 80 accept
  }
  chain forward {
    type filter hook forward priority 0; policy drop;
  }
  chain output {
    type filter hook output priority 0; policy accept;
  }
}
"#;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network: tap needs root (this process runs as uid {uid}); use network: user")]
    NotRoot { uid: u32 },
    #[error("`{command}` failed: {detail} (install iproute2 and nftables)")]
    Command { command: String, detail: String },
    #[error("failed to bind the metadata service inside network namespace {netns}")]
    Bind {
        netns: String,
        #[source]
        source: std::io::Error,
    },
}

/// A network namespace with a tap device for one VM (`network: tap`). The guest sees
/// the same addresses as with user networking (169.254.169.15/24, gateway .2, metadata
/// at .254); the namespace has no route anywhere, and nftables lets the guest reach
/// only the metadata service. Dropping it deletes the namespace, and the tap with it.
#[derive(Debug)]
pub struct TapNetwork {
    netns: String,
}

impl TapNetwork {
    pub fn create(name: &str) -> Result<Self, NetworkError> {
        let uid = rustix::process::geteuid().as_raw();
        if uid != 0 {
            return Err(NetworkError::NotRoot { uid });
        }
        let netns = format!("qw-{name}");
        run(&["ip", "netns", "add", &netns])?;
        // From here on, Drop removes the namespace whatever fails next.
        let network = Self { netns };
        let ns = network.netns.as_str();
        run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        run(&[
            "ip", "-n", ns, "tuntap", "add", "dev", TAP_DEVICE, "mode", "tap",
        ])?;
        // The guest's gateway, and the metadata address the service listens on.
        for address in ["169.254.169.2/24", "169.254.169.254/32"] {
            run(&["ip", "-n", ns, "addr", "add", address, "dev", TAP_DEVICE])?;
        }
        run(&["ip", "-n", ns, "link", "set", TAP_DEVICE, "up"])?;
        run_with_input(&["ip", "netns", "exec", ns, "nft", "-f", "-"], RULES)?;
        Ok(network)
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// A TCP listener on 169.254.169.254:80 inside the namespace: a thread enters the
    /// namespace, binds, and leaves; the socket stays where it was created.
    pub fn bind_metadata(&self) -> Result<std::net::TcpListener, NetworkError> {
        let path = Path::new("/run/netns").join(&self.netns);
        let netns = self.netns.clone();
        let bind_err = move |source| NetworkError::Bind {
            netns: netns.clone(),
            source,
        };
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path)?;
            rustix::thread::move_into_link_name_space(
                file.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            let listener = std::net::TcpListener::bind("169.254.169.254:80")?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the binding thread panicked")))
        .map_err(bind_err)
    }
}

impl Drop for TapNetwork {
    fn drop(&mut self) {
        if let Err(error) = run(&["ip", "netns", "del", &self.netns]) {
            tracing::warn!(netns = %self.netns, %error, "failed to delete a VM network namespace");
        }
    }
}

fn run(argv: &[&str]) -> Result<(), NetworkError> {
    run_with_input(argv, "")
}

fn run_with_input(argv: &[&str], input: &str) -> Result<(), NetworkError> {
    use std::io::Write;
    let command = argv.join(" ");
    let failed = |detail: String| NetworkError::Command {
        command: command.clone(),
        detail,
    };
    let mut child = Command::new("timeout")
        .arg(COMMAND_TIMEOUT_SECS)
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| failed(e.to_string()))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(failed(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}
