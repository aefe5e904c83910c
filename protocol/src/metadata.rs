//! The metadata service's API, as the guest sees it at 169.254.169.254:80.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where every VM reaches its metadata service.
pub const ADDRESS: &str = "169.254.169.254:80";

/// `GET`: the task. With [`PARK_QUERY`] the caller offers to park for a boot snapshot.
pub const TASK_PATH: &str = "/v1/task";
/// The query by which guest tools say they can park for a boot snapshot over the agent
/// port (`/v1/task?park=2`). `park=1` offered the console handshake of older tools: such
/// tools get their task at once, and their image no snapshot.
pub const PARK_QUERY: &str = "park=2";
/// `POST` (chunked): the command's output, appended live to the job log.
pub const LOG_PATH: &str = "/v1/log";
/// `PUT`: the exit code, once.
pub const RESULT_PATH: &str = "/v1/result";
/// `GET`: liveness.
pub const PING_PATH: &str = "/v1/ping";
/// `GET`: the static guest tools binary this worker serves to cloud-init images.
pub const GUEST_TOOLS_PATH: &str = "/v1/guest-tools";
/// The header of a `GUEST_TOOLS_PATH` reply that carries the binary's sha256 (hex).
pub const GUEST_TOOLS_SHA256_HEADER: &str = "x-qemu-worker-sha256";

/// `GET /v1/task`: what the guest tools must run. Unknown fields are allowed so that
/// older guest tools read what newer workers send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Task {
    /// Program and arguments, run without a shell.
    pub command: Vec<String>,
    /// Variables to set over the guest's base environment.
    pub env: BTreeMap<String, String>,
    /// Seconds the worker lets the command run (enforced by the host).
    pub max_run_time: u64,
    /// Directory to run the command in.
    pub working_directory: String,
}

/// `GET /v1/task` answer: the task, and what the guest needs from the host to run it in
/// a fresh state. A guest resumed from a boot snapshot wakes with the snapshot's clock
/// and RNG state; the guest tools set the clock and reseed the RNG from these. Both are
/// optional on the wire (0 and "" when absent) so that guest tools run under workers that
/// predate them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct TaskReply {
    #[serde(flatten)]
    pub task: Task,
    /// The host's clock when the task was served, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub unix_time_millis: u64,
    /// 32 random bytes from the host, hex, for the guest kernel's RNG (one value per VM).
    #[serde(default)]
    pub entropy: String,
    /// The job's host name, which the guest tools set: a VM resumed from a boot snapshot
    /// has the saved VM's otherwise ("" from workers that predate it: left alone).
    #[serde(default)]
    pub hostname: String,
}

/// `PUT /v1/result`: the command's exit code (128 + N when killed by signal N).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TaskResult {
    #[serde(deserialize_with = "integral_i32")]
    pub exit_code: i32,
}

/// An `i32` from any JSON number with no fraction: JSON Schema's `integer` includes
/// `3.0`, so a client that writes one is within the document.
fn integral_i32<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i32, D::Error> {
    struct Integral;
    impl serde::de::Visitor<'_> for Integral {
        type Value = i32;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an integer from -2147483648 to 2147483647")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i32, E> {
            i32::try_from(v).map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i32, E> {
            i32::try_from(v)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<i32, E> {
            if v.fract() == 0.0 && v >= f64::from(i32::MIN) && v <= f64::from(i32::MAX) {
                // Exact: integral and within i32's range.
                Ok(v as i32)
            } else {
                Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    deserializer.deserialize_any(Integral)
}

/// `POST /v1/log` answer: how many bytes of this stream the job log took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LogReceipt {
    pub bytes: u64,
}

/// `GET /v1/ping` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Ping {
    pub status: String,
}

/// Every error response: a stable code and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_without_the_host_state_still_reads() {
        // What a worker from before the clock and entropy fields sends.
        let old =
            r#"{"command":["true"],"env":{},"maxRunTime":5,"workingDirectory":"/","extra":1}"#;
        let reply: TaskReply = serde_json::from_str(old).expect("reads");
        assert_eq!(reply.task.command, ["true"]);
        assert_eq!((reply.unix_time_millis, reply.entropy.as_str()), (0, ""));
        assert_eq!(reply.hostname, "");
    }

    #[test]
    fn an_exit_code_is_any_integral_number_within_i32() {
        let code = |body: &str| serde_json::from_str::<TaskResult>(body).map(|r| r.exit_code);
        assert_eq!(code(r#"{"exitCode": 3}"#).ok(), Some(3));
        assert_eq!(code(r#"{"exitCode": 478065.0}"#).ok(), Some(478065));
        assert_eq!(code(r#"{"exitCode": -2147483648}"#).ok(), Some(i32::MIN));
        for bad in ["2.5", "2147483648", "-2147483649", "1e300", "\"3\"", "null"] {
            let error = code(&format!(r#"{{"exitCode": {bad}}}"#)).expect_err(bad);
            assert!(
                error.to_string().contains("exitCode") || error.to_string().contains("integer"),
                "{bad}: {error}"
            );
        }
    }
}
