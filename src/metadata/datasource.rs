//! The cloud-init datasource paths of a VM's metadata service (docs/metadata.md):
//! NoCloud under `/nocloud/`, the EC2 paths under `/latest/` (and dated versions) with
//! IMDSv2 sessions as Firecracker's MMDS keeps them, and the guest tools binary.

use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode};
use tokio::time::Instant;

use super::service::{Reply, error, method_not_allowed};
use crate::cloud_init::{GuestTools, NOCLOUD_PREFIX, Seed, UserData};
use qemu_worker_protocol::metadata::{GUEST_TOOLS_PATH, GUEST_TOOLS_SHA256_HEADER};

/// What a VM's cloud-init is offered. A VM without one gets 404 on these paths.
#[derive(Debug, Clone)]
pub struct Datasource {
    pub seed: Seed,
    pub user_data: UserData,
    pub guest_tools: GuestTools,
}

/// `PUT` here with a TTL header opens an IMDSv2 session.
pub const TOKEN_PATH: &str = "/latest/api/token";
/// The TTL of a session token, in seconds (AWS's name, and Firecracker's).
const TTL_HEADERS: [&str; 2] = [
    "x-aws-ec2-metadata-token-ttl-seconds",
    "x-metadata-token-ttl-seconds",
];
/// The session token on a read.
const TOKEN_HEADERS: [&str; 2] = ["x-aws-ec2-metadata-token", "x-metadata-token"];
/// AWS's bounds on a token's TTL.
const MAX_TTL_SECONDS: u64 = 21_600;
/// Live tokens kept per VM; beyond it the one that expires first is dropped (a guest
/// asking for more only loses its own).
const MAX_TOKENS: usize = 64;

/// The IMDSv2 sessions of one VM. Tokens are random and live only in this VM's service,
/// so one VM's token means nothing to another's.
#[derive(Debug, Default)]
pub struct Sessions {
    inner: Mutex<SessionState>,
}

#[derive(Debug, Default)]
struct SessionState {
    /// Once a token was issued, every EC2 read must carry a valid one.
    issued: bool,
    live: Vec<(String, Instant)>,
}

impl Sessions {
    fn issue(&self, ttl: Duration) -> String {
        let mut bytes = [0u8; 32];
        // A short read leaves zeros; the kernel's RNG does not fail once initialized.
        let _ = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty());
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let now = Instant::now();
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        state.issued = true;
        state.live.retain(|(_, expiry)| *expiry > now);
        if state.live.len() >= MAX_TOKENS
            && let Some(first) = (0..state.live.len()).min_by_key(|&i| state.live[i].1)
        {
            state.live.swap_remove(first);
        }
        state.live.push((token.clone(), now + ttl));
        token
    }

    /// Whether a read may go on: with a live token, or with none while none was issued.
    fn admits(&self, token: Option<&[u8]>) -> Result<(), &'static str> {
        let state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match token {
            None if state.issued => Err(
                "a session token was issued in this VM: every read needs a live one in X-aws-ec2-metadata-token",
            ),
            None => Ok(()),
            Some(token) => {
                let live = state
                    .live
                    .iter()
                    .any(|(t, expiry)| *expiry > now && constant_time_eq(t.as_bytes(), token));
                if live {
                    Ok(())
                } else {
                    Err(
                        "the session token is unknown or expired: PUT /latest/api/token for a new one",
                    )
                }
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `path` is one of the datasource's (these are answered by `route`).
pub fn is_datasource_path(path: &str) -> bool {
    path == GUEST_TOOLS_PATH || path.starts_with(NOCLOUD_PREFIX) || ec2_version(path).is_some()
}

/// The EC2 version segment of `path` (`latest`, `1.0` or a date) and the rest.
fn ec2_version(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (version, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let dated = version.len() == 10
        && version.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            _ => b.is_ascii_digit(),
        });
    (version == "latest" || version == "1.0" || dated).then_some((version, tail))
}

fn text(body: impl Into<Bytes>) -> Reply {
    let mut reply = Response::new(Full::new(body.into()));
    reply.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    reply
}

fn not_found(path: &str) -> Reply {
    error(
        StatusCode::NOT_FOUND,
        "not-found",
        format!("no such endpoint: {path}"),
    )
}

/// Answers a request for one of the datasource's paths.
pub fn route(
    datasource: Option<&Datasource>,
    sessions: &Sessions,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Reply {
    let Some(datasource) = datasource else {
        return error(
            StatusCode::NOT_FOUND,
            "cloud-init-off",
            format!(
                "{path}: this VM has no cloud-init datasource (machine.cloudInit is off, or auto \
                 on an image that boots a kernel directly)"
            ),
        );
    };
    if path == GUEST_TOOLS_PATH {
        if method != Method::GET {
            return method_not_allowed(path, Method::GET);
        }
        let tools = &datasource.guest_tools;
        let mut reply = Response::new(Full::new(tools.bytes.clone()));
        let headers = reply.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        if let Ok(value) = HeaderValue::from_str(&tools.sha256) {
            headers.insert(HeaderName::from_static(GUEST_TOOLS_SHA256_HEADER), value);
        }
        return reply;
    }
    if let Some(file) = path.strip_prefix(NOCLOUD_PREFIX) {
        let body = match file {
            "meta-data" => Bytes::from(datasource.seed.meta_data()),
            "user-data" => datasource.user_data.bytes(),
            // Nothing of the platform's own: the worker's part is in the user-data.
            "vendor-data" => Bytes::new(),
            "network-config" => Bytes::from(datasource.seed.network_config()),
            _ => return not_found(path),
        };
        if method != Method::GET {
            return method_not_allowed(path, Method::GET);
        }
        return text(body);
    }
    ec2(datasource, sessions, method, path, headers)
}

/// The EC2 paths, behind IMDSv2's rules.
fn ec2(
    datasource: &Datasource,
    sessions: &Sessions,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Reply {
    // A request relayed by a proxy in the guest is not the guest's own (AWS and
    // Firecracker refuse it for the same reason).
    if headers.contains_key("x-forwarded-for") {
        return error(
            StatusCode::FORBIDDEN,
            "forwarded",
            "requests that carry X-Forwarded-For are refused",
        );
    }
    if path == TOKEN_PATH {
        if method != Method::PUT {
            return method_not_allowed(path, Method::PUT);
        }
        return issue_token(sessions, headers);
    }
    let Some((_, tail)) = ec2_version(path) else {
        return not_found(path);
    };
    let body = match ec2_file(datasource, tail) {
        Some(body) => body,
        None => return not_found(path),
    };
    if method != Method::GET {
        return method_not_allowed(path, Method::GET);
    }
    let token = TOKEN_HEADERS
        .iter()
        .find_map(|name| headers.get(*name))
        .map(HeaderValue::as_bytes);
    if let Err(why) = sessions.admits(token) {
        return error(StatusCode::UNAUTHORIZED, "token", why);
    }
    let mut reply = text(body);
    if tail.ends_with("document") {
        reply
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    reply
}

fn issue_token(sessions: &Sessions, headers: &HeaderMap) -> Reply {
    let Some(value) = TTL_HEADERS.iter().find_map(|name| headers.get(*name)) else {
        return error(
            StatusCode::BAD_REQUEST,
            "ttl",
            "a token needs X-aws-ec2-metadata-token-ttl-seconds (1 to 21600)",
        );
    };
    let ttl = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ttl| (1..=MAX_TTL_SECONDS).contains(ttl));
    let Some(ttl) = ttl else {
        return error(
            StatusCode::BAD_REQUEST,
            "ttl",
            format!(
                "X-aws-ec2-metadata-token-ttl-seconds must be an integer from 1 to {MAX_TTL_SECONDS}"
            ),
        );
    };
    let token = sessions.issue(Duration::from_secs(ttl));
    let mut reply = text(token);
    if let Ok(value) = HeaderValue::from_str(&ttl.to_string()) {
        reply
            .headers_mut()
            .insert(HeaderName::from_static(TTL_HEADERS[0]), value);
    }
    reply
}

/// The EC2 tree below a version: directory listings end their entries that are
/// directories with `/`, as EC2's do.
fn ec2_file(datasource: &Datasource, tail: &str) -> Option<Bytes> {
    let seed = &datasource.seed;
    let value = |s: &str| Some(Bytes::from(s.to_owned()));
    match tail.trim_end_matches('/') {
        "" => value("dynamic/\nmeta-data/\nuser-data"),
        "meta-data" => value(
            "hostname\ninstance-id\ninstance-type\nlocal-hostname\nlocal-ipv4\nmac\nplacement/",
        ),
        "meta-data/hostname" | "meta-data/local-hostname" => value(&seed.hostname),
        "meta-data/instance-id" => value(&seed.instance_id),
        "meta-data/instance-type" => value(INSTANCE_TYPE),
        "meta-data/local-ipv4" => value(GUEST_ADDRESS),
        "meta-data/mac" => value(&seed.mac),
        "meta-data/placement" => value("availability-zone\nregion"),
        "meta-data/placement/availability-zone" => value(ZONE),
        "meta-data/placement/region" => value(REGION),
        "user-data" => Some(datasource.user_data.bytes()),
        "dynamic" => value("instance-identity/"),
        "dynamic/instance-identity" => value("document"),
        "dynamic/instance-identity/document" => value(
            &serde_json::json!({
                "instanceId": seed.instance_id,
                "instanceType": INSTANCE_TYPE,
                "privateIp": GUEST_ADDRESS,
                "region": REGION,
                "availabilityZone": ZONE,
                "architecture": "x86_64",
            })
            .to_string(),
        ),
        _ => None,
    }
}

const INSTANCE_TYPE: &str = "qemu-worker";
const GUEST_ADDRESS: &str = "169.254.169.15";
const REGION: &str = "local";
const ZONE: &str = "local-1";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec2_versions_are_latest_1_0_and_dates() {
        assert_eq!(
            ec2_version("/latest/meta-data/"),
            Some(("latest", "meta-data/"))
        );
        assert_eq!(
            ec2_version("/2009-04-04/user-data"),
            Some(("2009-04-04", "user-data"))
        );
        assert_eq!(ec2_version("/1.0"), Some(("1.0", "")));
        assert_eq!(ec2_version("/v1/task"), None);
        assert_eq!(ec2_version("/2009-4-04/user-data"), None);
        assert!(is_datasource_path("/nocloud/meta-data"));
        assert!(!is_datasource_path("/nocloudx"));
    }

    #[test]
    fn a_token_admits_reads_until_it_expires_and_none_is_needed_before_the_first() {
        let sessions = Sessions::default();
        assert_eq!(sessions.admits(None), Ok(()));
        let token = sessions.issue(Duration::from_secs(60));
        assert_eq!(sessions.admits(Some(token.as_bytes())), Ok(()));
        assert!(sessions.admits(None).is_err());
        assert!(sessions.admits(Some(b"not-a-token")).is_err());
        let short = sessions.issue(Duration::ZERO);
        assert!(sessions.admits(Some(short.as_bytes())).is_err());
    }

    #[test]
    fn a_guest_that_asks_for_many_tokens_keeps_at_most_the_cap() {
        let sessions = Sessions::default();
        let first = sessions.issue(Duration::from_secs(1));
        for _ in 0..MAX_TOKENS {
            sessions.issue(Duration::from_secs(3600));
        }
        let state = sessions.inner.lock().expect("lock");
        assert_eq!(state.live.len(), MAX_TOKENS);
        assert!(state.live.iter().all(|(t, _)| *t != first));
    }
}
