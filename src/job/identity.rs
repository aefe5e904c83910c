use sha2::{Digest, Sha256};

/// Hardware identities of one run of one job: stable across retries of the same run,
/// different between runs, so that guests and logs can be correlated without a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `52:54:00:xx:xx:xx`: QEMU's locally administered unicast prefix.
    pub mac: String,
    /// An RFC 9562 version 8 (custom, hash-based) UUID.
    pub uuid: String,
    /// 20 characters at most, the limit of virtio-blk, NVMe and IDE serials.
    pub disk_serial: String,
}

impl Identity {
    /// Derives every identity from `sha256("qemu-worker identity v1\0" job_id "\0" run_id)`.
    pub fn derive(job_id: &str, run_id: u32) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"qemu-worker identity v1\0");
        hasher.update(job_id.as_bytes());
        hasher.update(b"\0");
        hasher.update(run_id.to_be_bytes());
        let digest: [u8; 32] = hasher.finalize().into();

        let mac = format!(
            "52:54:00:{:02x}:{:02x}:{:02x}",
            digest[0], digest[1], digest[2]
        );

        let mut u = [0u8; 16];
        u.copy_from_slice(&digest[3..19]);
        u[6] = (u[6] & 0x0f) | 0x80; // version 8
        u[8] = (u[8] & 0x3f) | 0x80; // RFC 9562 variant
        let h = hex(&u);
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        );

        let disk_serial = format!("qw{}", &hex(&digest[19..28])[..18]);
        Self {
            mac,
            uuid,
            disk_serial,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::machine::{DISK_SERIAL_PATTERN, MAC_PATTERN, UUID_PATTERN};

    fn matches(pattern: &str, value: &str) -> bool {
        let schema = serde_json::json!({"type": "string", "pattern": pattern});
        jsonschema::is_valid(&schema, &serde_json::json!(value))
    }

    #[test]
    fn identities_are_deterministic_and_distinct_per_run() {
        let a = Identity::derive("job-a", 0);
        assert_eq!(a, Identity::derive("job-a", 0));
        let b = Identity::derive("job-a", 1);
        let c = Identity::derive("job-b", 0);
        assert_ne!(a.mac, b.mac);
        assert_ne!(a.uuid, c.uuid);
        assert_ne!(a.disk_serial, b.disk_serial);
    }

    #[test]
    fn identities_satisfy_the_machine_schema_patterns() {
        for run in 0..64 {
            let id = Identity::derive("pattern-check", run);
            assert!(id.mac.starts_with("52:54:00:"), "{}", id.mac);
            assert!(matches(MAC_PATTERN, &id.mac), "{}", id.mac);
            assert!(matches(UUID_PATTERN, &id.uuid), "{}", id.uuid);
            assert!(
                matches(DISK_SERIAL_PATTERN, &id.disk_serial),
                "{}",
                id.disk_serial
            );
            assert_eq!(id.disk_serial.len(), 20);
        }
    }
}
