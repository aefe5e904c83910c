use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::identity::Identity;
use super::limits::MachineLimits;
use super::machine::MachineDefinition;
use super::payload::{
    ArtifactSpec, ImageReference, ImageSource, JobPayload, artifact_name_problem,
};
use super::report::ValidationReport;
use super::resolve::{Machine, MachineLayers};
use crate::config::WorkerConfig;
use crate::schema::{Document, Issue, SchemaKind, pointer_push, validate_against};

/// The largest payload or machine.json the worker reads (DESIGN §2.1).
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// What a payload is checked against besides its schema.
#[derive(Debug, Clone)]
pub struct PayloadContext {
    pub limits: MachineLimits,
    /// worker.yml's `machine`, the layer under the payload (the image is not known yet).
    pub machine: MachineDefinition,
    pub allowed_image_dirs: Vec<PathBuf>,
    /// worker.yml `network.allowOutbound`.
    pub allow_outbound: bool,
    /// worker.yml `debug.maxKeepAliveMinutes`.
    pub max_keep_alive_minutes: u32,
}

impl PayloadContext {
    pub fn from_config(config: &WorkerConfig) -> Self {
        Self {
            limits: config.limits,
            machine: config.machine.clone(),
            allowed_image_dirs: config.images.allowed_local_dirs.clone(),
            allow_outbound: config.network.allow_outbound,
            max_keep_alive_minutes: config.debug.max_keep_alive_minutes,
        }
    }
}

/// The outcome of checking one payload: every issue, and what could be built from it.
#[derive(Debug, Clone)]
pub struct PayloadCheck {
    pub payload: Option<JobPayload>,
    pub machine: Option<Machine>,
    pub issues: Vec<Issue>,
}

impl PayloadCheck {
    pub fn is_valid(&self) -> bool {
        self.issues.is_empty() && self.payload.is_some()
    }

    pub fn report(&self) -> ValidationReport {
        ValidationReport {
            valid: self.is_valid(),
            errors: self.issues.clone(),
            machine: self.machine.clone(),
        }
    }
}

/// Checks a payload (YAML or JSON text) against its schema and the semantic rules, and
/// returns every problem at once, each with its JSON pointer and source line.
///
/// Sections are checked independently, so a schema error in `env` does not hide a limit
/// violation in `machine` or an unsafe artifact name.
pub fn validate_payload(text: &str, context: &PayloadContext, identity: &Identity) -> PayloadCheck {
    let document = match Document::parse(text, MAX_DOCUMENT_BYTES) {
        Ok(document) => document,
        Err(error) => {
            return PayloadCheck {
                payload: None,
                machine: None,
                issues: vec![error.to_issue()],
            };
        }
    };
    let value = document.value();
    let mut issues = document.duplicate_keys().to_vec();
    issues.extend(validate_against(SchemaKind::Payload, value));

    if let Some(image) = section::<ImageReference>(value, "image") {
        check_image(&image, context, &mut issues);
    }
    check_strings_without_nul(value, &mut issues);
    check_artifacts(value, &mut issues);
    if let Some(Value::String(text)) = value.get("userData")
        && let Some(problem) = crate::cloud_init::user_data_problem(text)
    {
        issues.push(Issue::new("/userData", problem));
    }
    if value.pointer("/network/outbound") == Some(&serde_json::Value::Bool(true))
        && !context.allow_outbound
    {
        issues.push(Issue::new(
            "/network/outbound",
            "this worker does not allow outbound network access (worker.yml \
             `network.allowOutbound`)",
        ));
    }

    if let Some(minutes) = value
        .pointer("/debug/keepAliveOnFailure")
        .and_then(Value::as_u64)
        && minutes > u64::from(context.max_keep_alive_minutes)
    {
        issues.push(Issue::new(
            "/debug/keepAliveOnFailure",
            match context.max_keep_alive_minutes {
                0 => "this worker keeps no failed job's VM (worker.yml `debug.maxKeepAliveMinutes` is 0)".to_owned(),
                max => format!(
                    "{minutes} minutes is more than this worker keeps a VM ({max}, worker.yml `debug.maxKeepAliveMinutes`)"
                ),
            },
        ));
    }

    let mut machine = None;
    let payload_machine = match value.get("machine") {
        None => Some(MachineDefinition::default()),
        Some(_) => valid_machine_fields(value, &issues),
    };
    if let Some(payload_machine) = payload_machine {
        let layers = MachineLayers {
            payload: payload_machine,
            image: MachineDefinition::default(),
            worker_config: context.machine.clone(),
        };
        match layers.resolve(&context.limits, identity) {
            Ok(resolved) => machine = Some(resolved),
            Err(machine_issues) => issues.extend(machine_issues),
        }
    }

    document.annotate(&mut issues);
    issues.sort_by_key(|issue| issue.line.unwrap_or(u64::MAX));

    let mut payload = None;
    if issues.is_empty() {
        match serde_json::from_value::<JobPayload>(value.clone()) {
            Ok(parsed) => payload = Some(parsed),
            // The schema is generated from this type, so this is a bug; still report it.
            Err(error) => issues.push(Issue::new("", format!("payload does not decode: {error}"))),
        }
    }
    PayloadCheck {
        payload,
        machine: if issues.is_empty() { machine } else { None },
        issues,
    }
}

/// One top-level section decoded on its own; `None` if absent or malformed (the schema
/// check has reported why).
fn section<T: DeserializeOwned>(value: &Value, key: &str) -> Option<T> {
    value
        .get(key)
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// The payload's machine without the fields the schema rejected, so that the limits and
/// device rules still run on the rest (a bad `graphics` must not hide a bad `memory`).
fn valid_machine_fields(value: &Value, issues: &[Issue]) -> Option<MachineDefinition> {
    let mut machine = value.get("machine")?.as_object()?.clone();
    for issue in issues {
        if let Some(rest) = issue.path.strip_prefix("/machine/") {
            let field = rest.split('/').next().unwrap_or(rest);
            machine.remove(&field.replace("~1", "/").replace("~0", "~"));
        }
    }
    serde_json::from_value(Value::Object(machine)).ok()
}

fn check_image(image: &ImageReference, context: &PayloadContext, issues: &mut Vec<Issue>) {
    let path = match image {
        ImageReference::Location(_) => "/image".to_owned(),
        ImageReference::Pinned(_) => "/image/url".to_owned(),
    };
    match ImageSource::parse(image.location()) {
        Err(error) => issues.push(Issue::new(path, error.to_string())),
        Ok(ImageSource::Http(_)) => {}
        Ok(ImageSource::Local(local)) => {
            if context.allowed_image_dirs.is_empty() {
                issues.push(Issue::new(
                    path,
                    format!(
                        "local image `{}` is not allowed: worker.yml \
                         `images.allowedLocalDirs` is empty",
                        local.display()
                    ),
                ));
            } else if !context
                .allowed_image_dirs
                .iter()
                .any(|dir| local.starts_with(dir))
            {
                let allowed: Vec<String> = context
                    .allowed_image_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect();
                issues.push(Issue::new(
                    path,
                    format!(
                        "local image `{}` is outside the allowed image directories ({})",
                        local.display(),
                        allowed.join(", ")
                    ),
                ));
            }
        }
    }
}

/// NUL bytes cannot be passed to exec(2) or used in a path, whatever the schema says.
fn check_strings_without_nul(value: &Value, issues: &mut Vec<Issue>) {
    if let Some(Value::Array(items)) = value.get("command") {
        for (index, item) in items.iter().enumerate() {
            if item.as_str().is_some_and(|s| s.contains('\0')) {
                issues.push(Issue::new(
                    format!("/command/{index}"),
                    "command argument contains a NUL byte",
                ));
            }
        }
    }
    if let Some(Value::Object(env)) = value.get("env") {
        for (name, item) in env {
            if item.as_str().is_some_and(|s| s.contains('\0')) {
                issues.push(Issue::new(
                    pointer_push("/env", name),
                    "environment value contains a NUL byte",
                ));
            }
        }
    }
}

fn check_artifacts(value: &Value, issues: &mut Vec<Issue>) {
    let Some(Value::Array(items)) = value.get("artifacts") else {
        return;
    };
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (index, item) in items.iter().enumerate() {
        let Ok(artifact) = serde_json::from_value::<ArtifactSpec>(item.clone()) else {
            continue;
        };
        let name_path = format!("/artifacts/{index}/name");
        if artifact.path.contains('\0') {
            issues.push(Issue::new(
                format!("/artifacts/{index}/path"),
                "artifact path contains a NUL byte",
            ));
        }
        if let Some(problem) = artifact_name_problem(&artifact.name) {
            issues.push(Issue::new(name_path, problem));
            continue;
        }
        if let Some(&first) = seen.get(&artifact.name) {
            issues.push(Issue::new(
                name_path,
                format!(
                    "duplicate artifact name `{}` (also /artifacts/{first}/name)",
                    artifact.name
                ),
            ));
            continue;
        }
        // Stored names form one tree: `logs` and `logs/a.txt` cannot both be artifacts.
        let overlapping = seen.iter().find(|(other, _)| {
            artifact.name.starts_with(&format!("{other}/"))
                || other.starts_with(&format!("{}/", artifact.name))
        });
        if let Some((other, &other_index)) = overlapping {
            issues.push(Issue::new(
                name_path,
                format!(
                    "artifact name `{}` overlaps `{other}` (/artifacts/{other_index}/name)",
                    artifact.name
                ),
            ));
            continue;
        }
        seen.insert(artifact.name, index);
    }
}

/// Reads an image's machine.json: version 1 as is, version 0 (no `version` field, the
/// format before taskcluster-worker numbered them) migrated to version 1 first.
/// Issue paths are relative to the machine.json document.
pub fn load_machine_json(text: &str) -> Result<MachineDefinition, Vec<Issue>> {
    let document = Document::parse(text, MAX_DOCUMENT_BYTES).map_err(|e| vec![e.to_issue()])?;
    let mut issues = document.duplicate_keys().to_vec();
    let value = document.value();
    let Some(object) = value.as_object() else {
        issues.push(Issue::new("", "machine definition must be a JSON object").with_line(Some(1)));
        return Err(issues);
    };
    let current = if object.contains_key("version") {
        value.clone()
    } else {
        match migrate_v0(value) {
            Ok(migrated) => migrated,
            Err(issue) => {
                issues.push(issue);
                document.annotate(&mut issues);
                return Err(issues);
            }
        }
    };
    issues.extend(validate_against(SchemaKind::Machine, &current));
    document.annotate(&mut issues);
    if !issues.is_empty() {
        return Err(issues);
    }
    serde_json::from_value(current).map_err(|e| {
        vec![Issue::new(
            "",
            format!("machine definition does not decode: {e}"),
        )]
    })
}

/// The version 0 machine definition of taskcluster-worker.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineV0 {
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    memory: Option<u64>,
    #[serde(default)]
    cpu: CpuV0,
    #[serde(default)]
    network: NetworkV0,
    #[serde(default)]
    keyboard: KeyboardV0,
    #[serde(default)]
    sound: Option<SoundV0>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CpuV0 {
    threads: Option<u32>,
    cores: Option<u32>,
    sockets: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkV0 {
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "version 0 named a device, which version 1 always sets to e1000"
    )]
    device: Option<String>,
    #[serde(default)]
    mac: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyboardV0 {
    #[serde(default)]
    layout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SoundV0 {
    device: String,
    controller: String,
}

/// taskcluster-worker's `migrate0to1`: the fixed devices of version 0 made explicit.
fn migrate_v0(value: &Value) -> Result<Value, Issue> {
    let v0: MachineV0 = serde_json::from_value(value.clone()).map_err(|e| {
        Issue::new(
            "",
            format!("not a valid version 0 machine definition (no `version`): {e}"),
        )
    })?;
    let sound = v0.sound.map_or_else(
        || "none".to_owned(),
        |s| {
            if s.controller == "pci" {
                s.device
            } else {
                format!("{}/{}", s.device, s.controller)
            }
        },
    );
    let mut v1 = json!({
        "version": 1,
        "chipset": "pc-i440fx-2.8",
        "cpu": "host",
        "threads": v0.cpu.threads.unwrap_or(1),
        "flags": [],
        "usb": "nec-usb-xhci",
        "network": "e1000",
        "storage": "virtio-blk-pci",
        "graphics": "vmware-svga",
        "sound": sound,
        "keyboard": "usb-kbd",
        "mouse": "usb-mouse",
        "tablet": "none",
    });
    let fields = [
        ("uuid", v0.uuid.filter(|s| !s.is_empty()).map(Value::from)),
        (
            "mac",
            v0.network.mac.filter(|s| !s.is_empty()).map(Value::from),
        ),
        (
            "keyboardLayout",
            v0.keyboard
                .layout
                .filter(|s| !s.is_empty())
                .map(Value::from),
        ),
        ("cores", v0.cpu.cores.map(Value::from)),
        ("sockets", v0.cpu.sockets.map(Value::from)),
        ("memory", v0.memory.map(Value::from)),
    ];
    for (key, field) in fields {
        if let Some(field) = field {
            v1[key] = field;
        }
    }
    Ok(v1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Chipset, GraphicsDevice, KeyboardLayout, SoundDevice};

    fn context() -> PayloadContext {
        PayloadContext {
            limits: MachineLimits {
                max_memory: 2048,
                max_cpus: 2,
                default_threads: 1,
            },
            machine: MachineDefinition::default(),
            allowed_image_dirs: vec![PathBuf::from("/srv/images")],
            allow_outbound: false,
            max_keep_alive_minutes: 30,
        }
    }

    #[test]
    fn keep_alive_is_bounded_by_the_worker() {
        let payload = |minutes: u32| {
            format!(
                "image: https://example.com/i.tar.zst\ncommand: [/bin/false]\nmaxRunTime: 60\n\
                 debug: {{keepAliveOnFailure: {minutes}}}\n"
            )
        };
        assert!(check(&payload(30)).issues.is_empty());
        let denied = check(&payload(31));
        assert_eq!(denied.issues.len(), 1, "{:?}", denied.issues);
        assert_eq!(denied.issues[0].path, "/debug/keepAliveOnFailure");
        assert!(
            denied.issues[0].message.contains("(30, worker.yml"),
            "{:?}",
            denied.issues
        );
        let none = PayloadContext {
            max_keep_alive_minutes: 0,
            ..context()
        };
        let refused = validate_payload(&payload(1), &none, &Identity::derive("job", 0));
        assert!(
            refused.issues[0]
                .message
                .contains("keeps no failed job's VM"),
            "{:?}",
            refused.issues
        );
    }

    #[test]
    fn outbound_network_needs_a_worker_that_allows_it() {
        let payload = "image: https://example.com/i.tar.zst\ncommand: [/bin/true]\nmaxRunTime: 60\n\
                       network: {outbound: true}\n";
        let denied = check(payload);
        assert_eq!(denied.issues.len(), 1, "{:?}", denied.issues);
        assert_eq!(denied.issues[0].path, "/network/outbound");
        assert!(denied.issues[0].message.contains("network.allowOutbound"));
        let allowing = PayloadContext {
            allow_outbound: true,
            ..context()
        };
        let allowed = validate_payload(payload, &allowing, &Identity::derive("job", 0));
        assert!(allowed.is_valid(), "{:?}", allowed.issues);
        assert!(allowed.payload.expect("payload").wants_outbound());
        // Asking for nothing is always fine, and unknown wishes are schema errors.
        assert!(check(&payload.replace("true}", "false}")).is_valid());
        let unknown = check(&payload.replace("outbound: true", "inbound: true"));
        assert_eq!(
            unknown.issues[0].path, "/network/inbound",
            "{:?}",
            unknown.issues
        );
    }

    #[test]
    fn an_alias_bomb_is_stopped_not_expanded() {
        // The billion laughs: nine levels of nine aliases each.
        let mut bomb = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        let names = ["b", "c", "d", "e", "f", "g", "h", "i"];
        let mut previous = "a";
        for name in names {
            bomb.push_str(&format!(
                "{name}: &{name} [{}]\n",
                vec![format!("*{previous}"); 9].join(",")
            ));
            previous = name;
        }
        bomb.push_str("image: https://example.com/i.tar.zst\ncommand: [*i]\nmaxRunTime: 60\n");
        let result = check(&bomb);
        assert!(!result.is_valid(), "refused");
        assert!(result.payload.is_none());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// Whatever bytes arrive, validation answers with issues or a payload, never a
        /// panic.
        #[test]
        fn any_text_is_answered_without_a_panic(text in "\\PC{0,300}") {
            let _ = check(&text);
        }

        #[test]
        fn any_payload_shaped_text_is_answered_without_a_panic(
            key in "[a-zA-Z/*&!]{1,12}",
            value in "[\\[\\]{}:,&*!|>a-z0-9 \\n-]{0,60}",
        ) {
            let text = format!("image: https://example.com/i.tar.zst\ncommand: [x]\nmaxRunTime: 60\n{key}: {value}\n");
            let _ = check(&text);
        }
    }

    fn check(text: &str) -> PayloadCheck {
        validate_payload(text, &context(), &Identity::derive("job", 0))
    }

    fn paths(check: &PayloadCheck) -> Vec<&str> {
        check.issues.iter().map(|i| i.path.as_str()).collect()
    }

    #[test]
    fn a_good_payload_resolves_a_machine() {
        let result = check(
            "image: /srv/images/test.tar.zst\ncommand: [sh, -c, 'echo hi']\nmaxRunTime: 60\n\
             env: {CI: 'true'}\nartifacts:\n  - {type: file, path: /out/a.txt, name: public/a.txt}\n",
        );
        assert!(result.is_valid(), "{:?}", result.issues);
        let machine = result.machine.expect("resolved");
        assert_eq!(machine.memory, 2048);
        assert_eq!(machine.topology.vcpus(), 2);
    }

    #[test]
    fn a_payload_may_ask_for_uefi_and_only_for_a_known_firmware() {
        let payload = |firmware: &str| {
            format!(
                "image: /srv/images/test.tar.zst\ncommand: [x]\nmaxRunTime: 60\n\
                 machine: {{chipset: q35, firmware: {firmware}}}\n"
            )
        };
        let result = check(&payload("uefi"));
        assert!(result.is_valid(), "{:?}", result.issues);
        let machine = result.machine.expect("resolved");
        assert_eq!(machine.firmware, crate::job::Firmware::Uefi);
        let result = check(&payload("efi"));
        assert_eq!(paths(&result), ["/machine/firmware"]);
        assert_eq!(result.issues[0].line, Some(4));
    }

    #[test]
    fn every_mistake_is_reported_with_its_path_and_line() {
        let text = "\
image: file:///etc/shadow
command: [make]
maxRunTime: -5
env:
  1A: x
machine:
  memory: 4096
  graphics: cga
artifacts:
  - {type: file, path: relative/path, name: ok}
  - {type: file, path: /a, name: ../escape}
colour: blue
";
        let result = check(text);
        assert_eq!(
            paths(&result),
            [
                "/image",
                "/maxRunTime",
                "/env/1A",
                "/machine/memory",
                "/machine/graphics",
                "/artifacts/0/path",
                "/artifacts/1/name",
                "/colour"
            ],
            "{:#?}",
            result.issues
        );
        let lines: Vec<Option<u64>> = result.issues.iter().map(|i| i.line).collect();
        assert_eq!(
            lines,
            [
                Some(1),
                Some(3),
                Some(5),
                Some(7),
                Some(8),
                Some(10),
                Some(11),
                Some(12)
            ]
        );
        assert!(result.payload.is_none() && result.machine.is_none());
    }

    #[test]
    fn duplicate_env_names_are_malformed() {
        let result =
            check("image: https://x.test/i\ncommand: [a]\nmaxRunTime: 1\nenv:\n  A: x\n  A: y\n");
        assert_eq!(paths(&result), ["/env/A"]);
        assert_eq!(result.issues[0].line, Some(6));
    }

    #[test]
    fn local_images_must_be_inside_allowed_dirs() {
        let result = check("image: /srv/imagesX/a.tar.zst\ncommand: [a]\nmaxRunTime: 1\n");
        assert_eq!(paths(&result), ["/image"]);
        assert!(
            result.issues[0].message.contains("outside the allowed"),
            "{}",
            result.issues[0].message
        );
        let pinned = check(&format!(
            "image: {{url: /etc/passwd, sha256: {}}}\ncommand: [a]\nmaxRunTime: 1\n",
            "a".repeat(64)
        ));
        assert_eq!(paths(&pinned), ["/image/url"]);
    }

    #[test]
    fn overlapping_and_duplicate_artifact_names_are_rejected() {
        let result = check(
            "image: https://x.test/i\ncommand: [a]\nmaxRunTime: 1\nartifacts:\n\
             - {type: directory, path: /logs, name: logs}\n\
             - {type: file, path: /x, name: logs/x}\n\
             - {type: file, path: /y, name: logs}\n",
        );
        assert_eq!(paths(&result), ["/artifacts/1/name", "/artifacts/2/name"]);
    }

    #[test]
    fn syntax_errors_are_a_single_issue_with_a_line() {
        let result = check("image: [unclosed\ncommand: x\n");
        assert_eq!(result.issues.len(), 1);
        assert!(result.issues[0].line.is_some());
        assert!(
            result.issues[0]
                .message
                .starts_with("not valid YAML or JSON")
        );
    }

    // taskcluster-worker's migrate_test.go fixtures.
    #[test]
    fn taskcluster_v0_machine_is_migrated() {
        let machine = load_machine_json(
            r#"{"uuid": "52bab607-10f1-4049-a0f8-ee4725cb715b",
                "network": {"device": "e1000", "mac": "aa:54:1a:30:5c:de"},
                "keyboard": {"layout": "en-us"}}"#,
        )
        .expect("v0 migrates");
        assert_eq!(machine.version, Some(1));
        assert_eq!(machine.chipset, Some(Chipset::PcI440fx28));
        assert_eq!(machine.graphics, Some(GraphicsDevice::VmwareSvga));
        assert_eq!(machine.mac.as_deref(), Some("aa:54:1a:30:5c:de"));
        assert_eq!(machine.keyboard_layout, Some(KeyboardLayout::EnUs));
        assert_eq!(machine.sound, Some(SoundDevice::None));
        assert_eq!(machine.threads, Some(1));
    }

    #[test]
    fn taskcluster_v0_sound_controller_is_folded_in() {
        let machine = load_machine_json(
            r#"{"sound": {"device": "hda-duplex", "controller": "intel-hda"}, "memory": 512}"#,
        )
        .expect("v0 migrates");
        assert_eq!(machine.sound, Some(SoundDevice::HdaDuplexIntel));
        assert_eq!(machine.memory, Some(512));
    }

    #[test]
    fn taskcluster_invalid_v0_is_rejected() {
        let issues = load_machine_json(
            r#"{"uuid": "52bab607-10f1-4049-a0f8-ee4725cb715b", "network": "e1000",
                "keyboard": {"layout": "en-us"}}"#,
        )
        .expect_err("network must be an object in v0");
        assert_eq!(issues.len(), 1);
        assert!(
            issues[0].message.contains("version 0"),
            "{}",
            issues[0].message
        );
    }

    #[test]
    fn taskcluster_v1_machine_loads() {
        let machine = load_machine_json(
            r#"{
                "version": 1, "uuid": "52bab607-10f1-4049-a0f8-ee4725cb715b",
                "chipset": "pc-i440fx-2.8", "cpu": "host", "flags": [],
                "usb": "nec-usb-xhci", "network": "e1000", "mac": "aa:54:1a:30:5c:de",
                "storage": "virtio-blk-pci", "graphics": "qxl-vga", "vgaMemory": 16,
                "graphicsRam": 64, "graphicsVRam": 32, "sound": "none", "keyboard": "usb-kbd",
                "keyboardLayout": "en-us", "mouse": "usb-mouse", "tablet": "usb-tablet"
            }"#,
        )
        .expect("v1 loads");
        assert_eq!(machine.graphics, Some(GraphicsDevice::QxlVga));
        assert_eq!(machine.graphics_vram, Some(32));
    }

    #[test]
    fn invalid_v1_enum_is_rejected_with_its_path_and_line() {
        let issues = load_machine_json("{\n  \"version\": 1,\n  \"graphics\": \"cga\"\n}")
            .expect_err("cga is not a display adapter");
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].path, "/graphics");
        assert_eq!(issues[0].line, Some(3));
    }

    #[test]
    fn unsupported_versions_are_rejected() {
        let issues = load_machine_json(r#"{"version": 2}"#).expect_err("version 2");
        assert_eq!(issues[0].path, "/version");
    }
}
