use crate::job::Identity;

/// Where the NoCloud seed is on the metadata service: `meta-data`, `user-data`,
/// `vendor-data` and `network-config` under it.
pub const NOCLOUD_PREFIX: &str = "/nocloud/";

/// The SMBIOS system serial that points an unchanged cloud-init at the seed: ds-identify
/// reads it from DMI and picks NoCloud, which fetches from `s=` once the network is up
/// (the trailing slash matters: cloud-init appends the file names). `dsmode=net`: without
/// it cloud-init 22.4 (Debian 12) fetches the seed in its network stage but keeps the
/// local mode that `ds=nocloud` implies, and never applies the user-data.
pub fn smbios_serial() -> String {
    format!("ds=nocloud;s=http://169.254.169.254{NOCLOUD_PREFIX};dsmode=net")
}

/// How the guest's first NIC gets its address, as network-config says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedNetwork {
    /// User networking answers DHCP with 169.254.169.15.
    Dhcp,
    /// A tap network has no DHCP server: 169.254.169.15/24, with a default route through
    /// .2 when the job may reach out.
    Static { outbound: bool },
}

/// What cloud-init learns about the instance. Resumed VMs keep what the VM they were
/// saved from learned (docs/snapshots.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// `i-` and 17 hex digits, derived from the job and run (EC2's shape).
    pub instance_id: String,
    pub hostname: String,
    /// The first NIC's MAC, which network-config matches.
    pub mac: String,
    pub network: SeedNetwork,
}

impl Seed {
    pub fn new(identity: &Identity, hostname: &str, mac: &str, network: SeedNetwork) -> Self {
        Self {
            instance_id: format!("i-{}", &identity.disk_serial[2..19]),
            hostname: hostname.to_owned(),
            mac: mac.to_owned(),
            network,
        }
    }

    /// NoCloud `meta-data` (YAML).
    pub fn meta_data(&self) -> String {
        format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            self.instance_id, self.hostname
        )
    }

    /// NoCloud `network-config`, version 2.
    pub fn network_config(&self) -> String {
        let mut text = format!(
            "version: 2\nethernets:\n  qw0:\n    match:\n      macaddress: \"{}\"\n",
            self.mac
        );
        match self.network {
            SeedNetwork::Dhcp => text.push_str("    dhcp4: true\n"),
            SeedNetwork::Static { outbound } => {
                text.push_str("    dhcp4: false\n    addresses: [169.254.169.15/24]\n");
                if outbound {
                    text.push_str(
                        "    routes:\n      - to: 0.0.0.0/0\n        via: 169.254.169.2\n",
                    );
                }
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(network: SeedNetwork) -> Seed {
        Seed::new(
            &Identity::derive("job-1", 0),
            "jabc-0",
            "52:54:00:12:34:56",
            network,
        )
    }

    #[test]
    fn the_instance_id_differs_per_run_and_has_ec2s_shape() {
        let a = Seed::new(&Identity::derive("job-1", 0), "h", "m", SeedNetwork::Dhcp);
        let b = Seed::new(&Identity::derive("job-1", 1), "h", "m", SeedNetwork::Dhcp);
        assert_ne!(a.instance_id, b.instance_id);
        assert!(a.instance_id.starts_with("i-") && a.instance_id.len() == 19);
        assert_eq!(
            a.meta_data(),
            format!("instance-id: {}\nlocal-hostname: h\n", a.instance_id)
        );
    }

    #[test]
    fn network_config_is_dhcp_or_the_static_address() {
        assert_eq!(
            seed(SeedNetwork::Dhcp).network_config(),
            "version: 2\nethernets:\n  qw0:\n    match:\n      macaddress: \"52:54:00:12:34:56\"\n    dhcp4: true\n"
        );
        let fixed = seed(SeedNetwork::Static { outbound: true }).network_config();
        let value: serde_json::Value = serde_saphyr::from_str(&fixed).expect("YAML");
        let nic = &value["ethernets"]["qw0"];
        assert_eq!(nic["addresses"][0], "169.254.169.15/24");
        assert_eq!(nic["routes"][0]["via"], "169.254.169.2");
        assert_eq!(nic["match"]["macaddress"], "52:54:00:12:34:56");
        let closed = seed(SeedNetwork::Static { outbound: false }).network_config();
        assert!(!closed.contains("routes"), "{closed}");
    }
}
