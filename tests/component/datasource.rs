//! The cloud-init datasource of the metadata service over real HTTP on its unix socket:
//! the NoCloud seed, the guest tools, the EC2 paths and IMDSv2's rules (a token once
//! issued is required, expires, is refused with X-Forwarded-For, and means nothing to
//! another VM's service). Every reply's status and media type are checked against the
//! committed OpenAPI document.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use qemu_worker::cloud_init::{GuestTools, Seed, SeedNetwork, UserData};
use qemu_worker::job::Identity;
use qemu_worker::metadata::{
    Datasource, LogSink, MetadataHandle, MetadataLimits, Offer, Task, start_metadata_service,
    start_metadata_service_tcp,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::metadata::{Reply, request};

struct Vm {
    dir: tempfile::TempDir,
    _handle: MetadataHandle,
    tools: Vec<u8>,
}

impl Vm {
    async fn start(cloud_init: bool) -> Self {
        Self::start_on(cloud_init, None).await
    }

    /// On the unix socket in its directory, or on `tcp` (a loopback listener).
    async fn start_on(cloud_init: bool, tcp: Option<std::net::TcpListener>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("qw-ds")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let mut tools = b"\x7fELF".to_vec();
        tools.extend((0..200_000u32).map(|i| (i % 251) as u8));
        let path = dir.path().join("qemu-worker-guest");
        std::fs::write(&path, &tools).expect("tools");
        let guest_tools = GuestTools::load(&path).expect("load");
        let identity = Identity::derive("job-ds", 0);
        let datasource = cloud_init.then(|| Datasource {
            seed: Seed::new(&identity, "jtest-0", &identity.mac, SeedNetwork::Dhcp),
            user_data: UserData::new(
                &guest_tools.sha256,
                Some("#cloud-config\nruncmd: [[touch, /x]]\n"),
            ),
            guest_tools,
        });
        let log = LogSink::create(&dir.path().join("job.log"), 1 << 20)
            .await
            .expect("log");
        let offer = Offer {
            task: Task {
                command: vec!["true".into()],
                env: BTreeMap::new(),
                max_run_time: 60,
                working_directory: "/root".into(),
            },
            datasource,
        };
        let handle = match tcp {
            Some(listener) => {
                listener.set_nonblocking(true).expect("nonblocking");
                start_metadata_service_tcp(listener, offer, log, MetadataLimits::default())
                    .expect("service")
            }
            None => start_metadata_service(
                &dir.path().join("meta.sock"),
                offer,
                log,
                MetadataLimits::default(),
            )
            .await
            .expect("service"),
        };
        Self {
            dir,
            _handle: handle,
            tools,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("meta.sock")
    }

    /// `method path` with extra header lines, checked against the document under the
    /// path template `documented`.
    async fn ask(&self, method: &str, path: &str, headers: &[&str], documented: &str) -> Reply {
        let mut raw = format!(
            "{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\nContent-Length: 0\r\n"
        );
        for header in headers {
            raw.push_str(header);
            raw.push_str("\r\n");
        }
        raw.push_str("\r\n");
        let reply = request(&self.socket(), raw.as_bytes()).await;
        conforms(&reply, documented, &method.to_ascii_lowercase());
        reply
    }
}

fn text(reply: &Reply) -> String {
    String::from_utf8(reply.body.clone()).expect("utf-8")
}

/// The reply's status is documented for the path and method, with the media type the
/// reply has; a JSON body matches its schema.
fn conforms(reply: &Reply, path: &str, method: &str) {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/metadata-api.openapi.json"),
        )
        .expect("committed OpenAPI document"),
    )
    .expect("JSON");
    let mut documented = &doc["paths"][path][method]["responses"][reply.status.to_string()];
    // A method the path does not have: the document's shared 405 answer.
    if documented.is_null() && reply.status == 405 {
        documented = &doc["components"]["responses"]["MethodNotAllowed"];
    }
    assert!(
        !documented.is_null(),
        "{method} {path} answered {} which the document does not list",
        reply.status
    );
    let content = documented["content"].as_object().expect("content");
    let media = reply
        .headers
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .expect("a content type")
        .trim();
    let schema = &content.get(media).unwrap_or_else(|| {
        panic!(
            "{method} {path} {}: {media} is not documented",
            reply.status
        )
    })["schema"];
    if media == "application/json" {
        let mut root = doc.clone();
        root["$ref"] = schema.get("$ref").cloned().unwrap_or(Value::Null);
        let root = if root["$ref"].is_null() {
            schema.clone()
        } else {
            root
        };
        let validator = jsonschema::draft202012::new(&root).expect("schema compiles");
        let body: Value = serde_json::from_slice(&reply.body).expect("JSON body");
        assert!(validator.is_valid(&body), "{method} {path}: {body}");
    }
}

#[tokio::test]
async fn the_nocloud_seed_and_the_guest_tools_are_served() {
    let vm = Vm::start(true).await;
    let meta = vm
        .ask("GET", "/nocloud/meta-data", &[], "/nocloud/meta-data")
        .await;
    assert_eq!(meta.status, 200);
    let meta = text(&meta);
    assert!(meta.starts_with("instance-id: i-"), "{meta}");
    assert!(meta.contains("local-hostname: jtest-0"), "{meta}");

    let tools = vm
        .ask("GET", "/v1/guest-tools", &[], "/v1/guest-tools")
        .await;
    assert_eq!(tools.status, 200);
    assert_eq!(tools.body, vm.tools);
    let sha: String = Sha256::digest(&vm.tools)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        tools
            .headers
            .contains(&format!("x-qemu-worker-sha256: {sha}")),
        "{}",
        tools.headers
    );

    let user_data = vm
        .ask("GET", "/nocloud/user-data", &[], "/nocloud/user-data")
        .await;
    let user_data = text(&user_data);
    assert!(
        user_data.starts_with("Content-Type: multipart/mixed"),
        "{user_data}"
    );
    assert!(user_data.contains(&format!("sha256={sha}")), "{user_data}");
    assert!(user_data.contains("runcmd: [[touch, /x]]"), "{user_data}");

    let network = vm
        .ask(
            "GET",
            "/nocloud/network-config",
            &[],
            "/nocloud/network-config",
        )
        .await;
    assert!(text(&network).contains("dhcp4: true"));
    let vendor = vm
        .ask("GET", "/nocloud/vendor-data", &[], "/nocloud/vendor-data")
        .await;
    assert_eq!((vendor.status, vendor.body.len()), (200, 0));
    let wrong = vm
        .ask("POST", "/nocloud/meta-data", &[], "/nocloud/meta-data")
        .await;
    assert_eq!(wrong.status, 405);
}

#[tokio::test]
async fn a_vm_without_cloud_init_gets_404_on_every_datasource_path() {
    let vm = Vm::start(false).await;
    for (path, documented) in [
        ("/nocloud/meta-data", "/nocloud/meta-data"),
        ("/v1/guest-tools", "/v1/guest-tools"),
        ("/latest/user-data", "/{version}/user-data"),
    ] {
        let reply = vm.ask("GET", path, &[], documented).await;
        assert_eq!(reply.status, 404, "{path}");
        assert!(text(&reply).contains("cloud-init-off"), "{path}");
    }
}

#[tokio::test]
async fn ec2_reads_work_without_a_token_until_one_is_issued_then_need_a_live_one() {
    let vm = Vm::start(true).await;
    let id = "/{version}/meta-data/{key}";
    let before = vm
        .ask("GET", "/latest/meta-data/instance-id", &[], id)
        .await;
    assert_eq!(before.status, 200, "IMDSv1 until a token is issued");
    let instance_id = text(&before);
    assert!(instance_id.starts_with("i-"), "{instance_id}");
    let dated = vm
        .ask("GET", "/2009-04-04/meta-data/instance-id", &[], id)
        .await;
    assert_eq!(text(&dated), instance_id);
    let listing = vm
        .ask("GET", "/latest/meta-data/", &[], "/{version}/meta-data/")
        .await;
    assert!(text(&listing).lines().any(|l| l == "local-ipv4"));

    let token_path = "/latest/api/token";
    for ttl in [
        "",
        "X-aws-ec2-metadata-token-ttl-seconds: 0",
        "X-aws-ec2-metadata-token-ttl-seconds: 21601",
        "X-aws-ec2-metadata-token-ttl-seconds: soon",
    ] {
        let headers: Vec<&str> = [ttl].into_iter().filter(|h| !h.is_empty()).collect();
        let refused = vm.ask("PUT", token_path, &headers, token_path).await;
        assert_eq!(refused.status, 400, "{ttl:?}");
    }
    let get = vm.ask("GET", token_path, &[], token_path).await;
    assert_eq!(get.status, 405);
    let token = vm
        .ask(
            "PUT",
            token_path,
            &["X-aws-ec2-metadata-token-ttl-seconds: 1"],
            token_path,
        )
        .await;
    assert_eq!(token.status, 200);
    let token = text(&token);
    let with_token = format!("X-aws-ec2-metadata-token: {token}");

    let without = vm
        .ask("GET", "/latest/meta-data/instance-id", &[], id)
        .await;
    assert_eq!(without.status, 401, "a token was issued: reads need one");
    let with = vm
        .ask("GET", "/latest/meta-data/instance-id", &[&with_token], id)
        .await;
    assert_eq!((with.status, text(&with)), (200, instance_id.clone()));
    // Firecracker's name for the header is read too.
    let firecracker = vm
        .ask(
            "GET",
            "/latest/meta-data/instance-id",
            &[&format!("X-metadata-token: {token}")],
            id,
        )
        .await;
    assert_eq!(firecracker.status, 200);
    let document = vm
        .ask(
            "GET",
            "/latest/dynamic/instance-identity/document",
            &[&with_token],
            "/{version}/dynamic/instance-identity/document",
        )
        .await;
    let document: Value = serde_json::from_slice(&document.body).expect("JSON");
    assert_eq!(document["instanceId"], instance_id.as_str());

    // The TTL was 1 s.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = vm
        .ask("GET", "/latest/meta-data/instance-id", &[&with_token], id)
        .await;
    assert_eq!(expired.status, 401, "the token expired");
}

#[tokio::test]
async fn x_forwarded_for_is_refused_and_a_token_means_nothing_to_another_vm() {
    let a = Vm::start(true).await;
    let b = Vm::start(true).await;
    let token_path = "/latest/api/token";
    let forwarded = a
        .ask(
            "PUT",
            token_path,
            &[
                "X-aws-ec2-metadata-token-ttl-seconds: 60",
                "X-Forwarded-For: 10.0.0.1",
            ],
            token_path,
        )
        .await;
    assert_eq!(forwarded.status, 403);
    let token = a
        .ask(
            "PUT",
            token_path,
            &["X-aws-ec2-metadata-token-ttl-seconds: 60"],
            token_path,
        )
        .await;
    let token = format!("X-aws-ec2-metadata-token: {}", text(&token));
    let user_data = "/{version}/user-data";
    let read = a
        .ask("GET", "/latest/user-data", &[&token], user_data)
        .await;
    assert_eq!(read.status, 200);
    let relayed = a
        .ask(
            "GET",
            "/latest/user-data",
            &[&token, "X-Forwarded-For: 10.0.0.1"],
            user_data,
        )
        .await;
    assert_eq!(relayed.status, 403);
    let elsewhere = b
        .ask("GET", "/latest/user-data", &[&token], user_data)
        .await;
    assert_eq!(elsewhere.status, 401, "A's token in B");
}

/// schemathesis (from PyPI, installed by the script into target/) against the whole
/// OpenAPI document of a live service on loopback TCP: no server error, no reply that
/// breaks the document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_reply_that_breaks_the_document() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let _vm = Vm::start_on(true, Some(listener)).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fuzz-metadata");
    let output = tokio::process::Command::new(&script)
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("fuzz-metadata: "))
        .unwrap_or_else(|| panic!("no summary line:\n{stdout}\n{stderr}"));
    println!("{summary}");
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let cases: u64 = summary
        .trim_start_matches("fuzz-metadata: ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a case count");
    assert!(cases > 0, "{summary}");
    assert!(summary.ends_with(" 0 failures"), "{summary}");
}
