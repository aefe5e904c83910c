use bytes::Bytes;
use sha2::{Digest, Sha256};

use qemu_worker_protocol::metadata::GUEST_TOOLS_PATH;

/// The largest `userData` a payload may carry, in bytes.
pub const MAX_USER_DATA: usize = 64 << 10;

/// The worker's own part: fetch, check and start the guest tools (a POSIX sh script).
const START_GUEST_TOOLS: &str = include_str!("start-guest-tools.sh");

/// The two forms a payload's `userData` may take, as cloud-init tells them apart: by
/// their first line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    CloudConfig,
    Script,
}

impl Form {
    fn of(text: &str) -> Option<Self> {
        let first = text.lines().next().unwrap_or_default().trim_end();
        if first == "#cloud-config" {
            Some(Self::CloudConfig)
        } else if first.starts_with("#!") {
            Some(Self::Script)
        } else {
            None
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Self::CloudConfig => "text/cloud-config",
            Self::Script => "text/x-shellscript",
        }
    }
}

/// Why a payload's `userData` cannot be used, if it cannot: it must be a `#cloud-config`
/// document that is a YAML mapping, or a `#!` script, within `MAX_USER_DATA` bytes.
pub fn user_data_problem(text: &str) -> Option<String> {
    if text.len() > MAX_USER_DATA {
        return Some(format!(
            "userData is {} bytes; at most {MAX_USER_DATA} are accepted",
            text.len()
        ));
    }
    match Form::of(text) {
        Some(Form::Script) => None,
        Some(Form::CloudConfig) => match serde_saphyr::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(_) | serde_json::Value::Null) => None,
            Ok(_) => Some("a #cloud-config document must be a YAML mapping".into()),
            Err(e) => Some(format!("the #cloud-config document is not YAML: {e}")),
        },
        None => Some(
            "userData must start with a `#cloud-config` line (cloud-config) or `#!` (a \
             script); the worker makes the MIME multipart itself"
                .into(),
        ),
    }
}

/// A VM's user-data: a MIME multipart whose first part starts the worker's guest tools
/// and whose second, if any, is the payload's own. cloud-init runs both; the tools'
/// unit starts after cloud-final, so the payload's part runs before the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserData {
    bytes: Bytes,
}

impl UserData {
    pub fn new(guest_tools_sha256: &str, payload: Option<&str>) -> Self {
        let url = format!("http://169.254.169.254{GUEST_TOOLS_PATH}");
        let script = START_GUEST_TOOLS
            .replace("@URL@", &url)
            .replace("@SHA256@", guest_tools_sha256);
        let mut parts = vec![(
            Form::Script.content_type(),
            "qemu-worker-guest-tools.sh",
            script,
        )];
        if let Some(text) = payload {
            // Checked by validation; a payload that skipped it goes in as a script part,
            // which cloud-init then refuses visibly in its own log.
            let form = Form::of(text).unwrap_or(Form::Script);
            let name = match form {
                Form::CloudConfig => "payload.cfg",
                Form::Script => "payload.sh",
            };
            parts.push((form.content_type(), name, text.to_owned()));
        }
        // A boundary derived from the parts cannot occur in them.
        let mut hash = Sha256::new();
        for (_, _, body) in &parts {
            hash.update((body.len() as u64).to_le_bytes());
            hash.update(body);
        }
        let digest: String = hash
            .finalize()
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect();
        let boundary = format!("==qemu-worker-{digest}==");
        let mut text = format!(
            "Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n"
        );
        for (content_type, name, body) in parts {
            text.push_str(&format!(
                "--{boundary}\nContent-Type: {content_type}; charset=\"utf-8\"\nMIME-Version: \
                 1.0\nContent-Transfer-Encoding: 8bit\nContent-Disposition: attachment; \
                 filename=\"{name}\"\n\n{body}"
            ));
            if !body.ends_with('\n') {
                text.push('\n');
            }
            text.push('\n');
        }
        text.push_str(&format!("--{boundary}--\n"));
        Self {
            bytes: Bytes::from(text),
        }
    }

    pub fn bytes(&self) -> Bytes {
        self.bytes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_gives_a_cloud_config_or_a_script() {
        assert_eq!(
            user_data_problem("#cloud-config\nruncmd: [[touch, /x]]\n"),
            None
        );
        assert_eq!(user_data_problem("#cloud-config\n"), None);
        assert_eq!(user_data_problem("#!/bin/sh\ntouch /x\n"), None);
        let list = user_data_problem("#cloud-config\n- a\n").expect("refused");
        assert!(list.contains("mapping"), "{list}");
        let broken = user_data_problem("#cloud-config\nruncmd: [\n").expect("refused");
        assert!(broken.contains("not YAML"), "{broken}");
        let mime = user_data_problem("Content-Type: multipart/mixed\n").expect("refused");
        assert!(mime.contains("#cloud-config"), "{mime}");
        let big = format!("#!/bin/sh\n{}", "#".repeat(MAX_USER_DATA));
        assert!(
            user_data_problem(&big)
                .expect("refused")
                .contains("at most")
        );
    }

    /// Splits the multipart on its boundary into each part's headers and body (the real
    /// parse, cloud-init's, is in the engine tests).
    fn parts(user_data: &UserData) -> Vec<(String, String)> {
        let text = String::from_utf8(user_data.bytes().to_vec()).expect("utf-8");
        let boundary = text
            .split("boundary=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("boundary")
            .to_owned();
        assert!(text.ends_with(&format!("--{boundary}--\n")));
        text.split(&format!("\n--{boundary}"))
            .skip(1)
            .filter(|part| !part.starts_with("--"))
            .map(|part| {
                let (head, body) = part.split_once("\n\n").expect("headers");
                (head.to_owned(), body.to_owned())
            })
            .collect()
    }

    #[test]
    fn the_worker_part_comes_first_and_the_payload_part_is_kept_whole() {
        let payload = "#cloud-config\nwrite_files:\n  - path: /x\n    content: \"--==\"\n";
        let user_data = UserData::new(&"ab".repeat(32), Some(payload));
        let split = parts(&user_data);
        assert_eq!(split.len(), 2);
        assert!(split[0].0.contains("text/x-shellscript"), "{}", split[0].0);
        assert!(split[0].1.contains(&format!("sha256={}", "ab".repeat(32))));
        assert!(
            split[0]
                .1
                .contains("url=http://169.254.169.254/v1/guest-tools")
        );
        assert!(split[1].0.contains("text/cloud-config"), "{}", split[1].0);
        assert_eq!(split[1].1, payload);
        let alone = UserData::new("00", None);
        assert_eq!(parts(&alone).len(), 1);
    }
}
