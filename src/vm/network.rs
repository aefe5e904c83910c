use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};

/// Commands that set up a VM's network must not hang a job.
const COMMAND_TIMEOUT_SECS: &str = "10";

/// The tap device inside each VM's network namespace.
pub const TAP_DEVICE: &str = "tap0";

/// The veth inside a VM's namespace that carries outbound traffic to the host.
const NS_VETH: &str = "veth0";
/// Host-side veth names: `qwo<index>`, the index also choosing the link's addresses.
const HOST_VETH_PREFIX: &str = "qwo";
/// Outbound links are /30s in 169.254.192.0/18: link-local, so never routed off the
/// host and never clashing with a network the host must reach, and clear of the guest's
/// 169.254.169.0/24 and of cloud metadata at 169.254.169.254.
const LINKS: u32 = 4096;

/// What no guest may reach even with outbound access: "this" network, private,
/// shared (CGNAT), loopback, link-local, IETF protocol, benchmarking, multicast,
/// reserved and broadcast ranges. The host's own addresses are refused on the host side
/// (see [`HOST_RULES`]), so a new host address is covered too.
const BLOCKED: &str = "0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, \
                       172.16.0.0/12, 192.0.0.0/24, 192.168.0.0/16, 198.18.0.0/15, 224.0.0.0/3";

/// nftables rules of a VM's namespace: the guest may open TCP connections to the
/// metadata service, and, with outbound access, connections to public addresses,
/// masqueraded behind the namespace's end of its veth.
fn namespace_rules(outbound: bool) -> String {
    let (forward, nat) = if outbound {
        (
            format!(
                "    ct state established,related accept\n    \
                 iifname \"{TAP_DEVICE}\" oifname \"{NS_VETH}\" ip daddr != {{ {BLOCKED} }} accept\n"
            ),
            format!(
                "  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n    \
                 oifname \"{NS_VETH}\" masquerade\n  }}\n"
            ),
        )
    } else {
        (String::new(), String::new())
    };
    format!(
        r#"table inet qemu_worker {{
  chain input {{
    type filter hook input priority 0; policy drop;
    iif "lo" accept
    ct state established,related accept
    iifname "{TAP_DEVICE}" ip daddr 169.254.169.254 tcp dport 80 accept
  }}
  chain forward {{
    type filter hook forward priority 0; policy drop;
{forward}  }}
  chain output {{
    type filter hook output priority 0; policy accept;
  }}
{nat}}}
"#
    )
}

/// The host's rules for outbound links, replaced as a whole (idempotent, atomic): nothing
/// from a VM reaches the host itself or another VM, and what leaves is masqueraded
/// behind the host's address on the way out.
const HOST_RULES: &str = r#"table inet qemu_worker_outbound
delete table inet qemu_worker_outbound
table inet qemu_worker_outbound {
  chain input {
    type filter hook input priority 0; policy accept;
    iifname "qwo*" drop
  }
  chain forward {
    type filter hook forward priority 0; policy accept;
    iifname "qwo*" oifname "qwo*" drop
  }
  chain postrouting {
    type nat hook postrouting priority 100; policy accept;
    ip saddr 169.254.192.0/18 oifname != "qwo*" masquerade
  }
}
"#;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network: tap needs root (this process runs as uid {uid}); use network: user")]
    NotRoot { uid: u32 },
    #[error("`{command}` failed: {detail} (install iproute2 and nftables)")]
    Command { command: String, detail: String },
    #[error("all {links} outbound links (169.254.192.0/18) are in use")]
    NoLink { links: u32 },
    #[error("failed to enable forwarding inside network namespace {netns}")]
    Forwarding {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to enable IPv4 forwarding on the host")]
    HostForwarding {
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the VM's network was interrupted")]
    Interrupted {
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("failed to bind the metadata service inside network namespace {netns}")]
    Bind {
        netns: String,
        #[source]
        source: std::io::Error,
    },
}

/// A network namespace with a tap device for one VM (`network: tap`). The guest sees
/// the same addresses as with user networking (169.254.169.15/24, gateway .2, metadata
/// at .254); without outbound access the namespace has no route anywhere and nftables
/// lets the guest reach only the metadata service. Dropping it deletes the namespace,
/// and the tap and veth with it.
#[derive(Debug)]
pub struct TapNetwork {
    netns: String,
}

impl TapNetwork {
    /// Creates the namespace, its tap and its rules; `ip` and `nft` run on the blocking
    /// pool. A caller that stops waiting leaves nothing: the namespace made meanwhile is
    /// dropped, and deleted, with the task's result.
    pub async fn create(name: &str, outbound: bool) -> Result<Self, NetworkError> {
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || Self::create_blocking(&name, outbound))
            .await
            .map_err(|source| NetworkError::Interrupted { source })?
    }

    fn create_blocking(name: &str, outbound: bool) -> Result<Self, NetworkError> {
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
        if outbound {
            network.connect_outbound()?;
        }
        run_with_input(
            &["ip", "netns", "exec", ns, "nft", "-f", "-"],
            &namespace_rules(outbound),
        )?;
        Ok(network)
    }

    /// Links the namespace to the host with a veth pair and routes through it; the
    /// host forwards and masquerades. The pair goes with the namespace.
    fn connect_outbound(&self) -> Result<(), NetworkError> {
        let ns = self.netns.as_str();
        enable_host_forwarding()?;
        run_with_input(&["nft", "-f", "-"], HOST_RULES)?;
        // Creating the link claims its index: a clash with another VM (or worker) fails
        // with "File exists" and the next index is tried.
        let mut claimed = None;
        for index in 0..LINKS {
            let host = format!("{HOST_VETH_PREFIX}{index}");
            if Path::new("/sys/class/net").join(&host).exists() {
                continue;
            }
            let created = run(&[
                "ip", "link", "add", &host, "type", "veth", "peer", "name", NS_VETH, "netns", ns,
            ]);
            match created {
                Ok(()) => {
                    claimed = Some((index, host));
                    break;
                }
                Err(NetworkError::Command { ref detail, .. }) if detail.contains("File exists") => {
                }
                Err(error) => return Err(error),
            }
        }
        let Some((index, host)) = claimed else {
            return Err(NetworkError::NoLink { links: LINKS });
        };
        let (host_address, ns_address) = link_addresses(index);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{host_address}/30"),
            "dev",
            &host,
        ])?;
        run(&["ip", "link", "set", &host, "up"])?;
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{ns_address}/30"),
            "dev",
            NS_VETH,
        ])?;
        run(&["ip", "-n", ns, "link", "set", NS_VETH, "up"])?;
        run(&[
            "ip",
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &host_address.to_string(),
        ])?;
        in_namespace(&self.netns, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        })
        .map_err(|source| NetworkError::Forwarding {
            netns: self.netns.clone(),
            source,
        })
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// A TCP listener on 169.254.169.254:80 inside the namespace; the socket stays in
    /// the namespace it was created in.
    /// The metadata service's listener, bound inside the namespace (waiting for the
    /// namespace thread on the blocking pool).
    pub async fn bind_metadata(&self) -> Result<std::net::TcpListener, NetworkError> {
        let netns = self.netns.clone();
        tokio::task::spawn_blocking(move || {
            in_namespace(&netns, || {
                let listener = std::net::TcpListener::bind("169.254.169.254:80")?;
                listener.set_nonblocking(true)?;
                Ok(listener)
            })
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(|source| NetworkError::Bind {
            netns: self.netns.clone(),
            source,
        })
    }
}

/// Runs `f` on a thread that enters the namespace `netns` and ends with it, so no thread
/// of the worker is ever left inside.
fn in_namespace<T: Send>(
    netns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    let path = Path::new("/run/netns").join(netns);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(&path)?;
                rustix::thread::move_into_link_name_space(
                    file.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
    })
}

/// The addresses of outbound link `index`: the host's end and the namespace's end.
fn link_addresses(index: u32) -> (std::net::Ipv4Addr, std::net::Ipv4Addr) {
    let base = u32::from(std::net::Ipv4Addr::new(169, 254, 192, 0)) + index * 4;
    (
        std::net::Ipv4Addr::from(base + 1),
        std::net::Ipv4Addr::from(base + 2),
    )
}

/// Turns on IPv4 forwarding on the host, as outbound NAT needs (and as container
/// runtimes do); says so once, since it changes the host.
fn enable_host_forwarding() -> Result<(), NetworkError> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    let failed = |source| NetworkError::HostForwarding { source };
    if std::fs::read_to_string(path).map_err(failed)?.trim() == "1" {
        return Ok(());
    }
    std::fs::write(path, "1").map_err(failed)?;
    tracing::info!("enabled IPv4 forwarding on the host (net.ipv4.ip_forward=1) for outbound NAT");
    Ok(())
}

impl Drop for TapNetwork {
    fn drop(&mut self) {
        let delete = || run(&["ip", "netns", "del", &self.netns]);
        // Dropped at the end of a job, on the executor.
        let deleted = super::in_drop::blocking_in_drop(delete);
        if let Err(error) = deleted {
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
