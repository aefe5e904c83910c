//! The image recipe (`qemu-worker image build RECIPE OUT`): a base, steps, and what the
//! output is. YAML or JSON; its schema is `schemas/image-recipe.schema.json`. Checked
//! like payloads: every problem at once, each with its JSON pointer and line.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::ByteSize;
use crate::job::{ImageReference, MachineDefinition};
use crate::schema::{Document, Issue, SchemaKind, validate_against};

/// A recipe is a small document.
const MAX_RECIPE_BYTES: usize = 1 << 20;
/// The smallest root file system a build makes.
const MIN_DISK_SIZE: u64 = 64 << 20;
/// A `boot` step's default and largest run time, in seconds.
const DEFAULT_BOOT_SECONDS: u64 = 1800;
const MAX_BOOT_SECONDS: u64 = 86_400;

/// How to build a VM image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "Image recipe")]
pub struct Recipe {
    /// What the image starts from.
    pub base: Base,
    /// Applied in order: `copy` and `run` to a Debian base's root tree, then `boot` steps
    /// in the booted image.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub steps: Vec<Step>,
    /// The image's boot mode, disk and machine definition.
    pub output: Output,
}

/// The base: exactly one of its keys. (A struct rather than an enum, as for steps: a
/// mistake inside it is reported at its own path.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct Base {
    /// A Debian root built by `mmdebstrap --mode=root` from the archive the host's apt
    /// uses (its `sources.list` / `.sources` files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debian: Option<DebianBase>,
    /// An existing image archive, named as a payload names one (an `http(s)://` URL or
    /// a path, here relative to the recipe's directory; with its sha256 or not). It takes
    /// `boot` steps only: its disk is used as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageReference>,
}

/// What the base is.
#[derive(Debug, Clone, Copy)]
pub enum BaseKind<'a> {
    Debian(&'a DebianBase),
    Image(&'a ImageReference),
}

impl Base {
    pub fn kind(&self) -> BaseKind<'_> {
        match (&self.debian, &self.image) {
            (Some(debian), _) => BaseKind::Debian(debian),
            (None, Some(image)) => BaseKind::Image(image),
            // The schema admits exactly one key.
            (None, None) => unreachable!("check_recipe admits a base with one key"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DebianBase {
    /// The suite, e.g. `bookworm`.
    #[schemars(regex(pattern = r"^[a-z][a-z0-9-]{1,31}$"))]
    pub suite: String,
    /// mmdebstrap's variant: `apt` (Essential and apt; the default), `minbase`,
    /// `required` or `important`.
    #[serde(default)]
    pub variant: Variant,
    /// Packages installed on top (`name` or `name=version`).
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub packages: Vec<Package>,
}

/// A Debian package name, optionally `=version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Package(
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9+.-]{1,127}(=[A-Za-z0-9.+~:-]{1,127})?$"))]
    pub  String,
);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    #[default]
    Apt,
    Minbase,
    Required,
    Important,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Apt => "apt",
            Self::Minbase => "minbase",
            Self::Required => "required",
            Self::Important => "important",
        }
    }
}

/// One step of a recipe: exactly one of its keys. (A struct rather than an enum, so that
/// a mistake inside a step is reported at its own path, not as "no form matches".)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct Step {
    /// A host file into the tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyStep>,
    /// A shell command (`sh -ec`) run on the host in the tree's directory, with `ROOT`
    /// set to it: `chroot "$ROOT" …` runs a program of the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub run: Option<String>,
    /// The image booted by the worker's engine with this script as a job's command; once
    /// it exits 0 the guest powers off and its disk becomes the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootStep>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BootStep {
    /// A shell script, run in the guest as root by `sh -ec`.
    #[schemars(length(min = 1, max = 65536))]
    pub script: String,
    /// Seconds the step may take (the job's `maxRunTime`).
    #[serde(default = "default_boot_seconds")]
    #[schemars(range(min = 1, max = MAX_BOOT_SECONDS))]
    pub max_run_time: u64,
}

fn default_boot_seconds() -> u64 {
    DEFAULT_BOOT_SECONDS
}

/// What a step does.
#[derive(Debug, Clone, Copy)]
pub enum StepKind<'a> {
    Copy(&'a CopyStep),
    Run(&'a str),
    Boot(&'a BootStep),
}

impl Step {
    pub fn kind(&self) -> StepKind<'_> {
        match (&self.copy, &self.run, &self.boot) {
            (Some(copy), _, _) => StepKind::Copy(copy),
            (None, Some(run), _) => StepKind::Run(run),
            (None, None, Some(boot)) => StepKind::Boot(boot),
            // The schema admits exactly one key.
            (None, None, None) => StepKind::Run("true"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CopyStep {
    /// A host file, relative to the recipe's directory (or absolute).
    #[schemars(length(min = 1, max = 4096))]
    pub from: String,
    /// Where it goes in the image: an absolute path.
    #[schemars(length(min = 2, max = 4096), regex(pattern = r"^/"))]
    pub to: String,
    /// Its mode, in octal (`"0644"`, `"0755"`).
    #[serde(default = "default_mode")]
    #[schemars(regex(pattern = r"^0?[0-7]{3}$"))]
    pub mode: String,
}

fn default_mode() -> String {
    "0644".into()
}

/// How the image boots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BootMode {
    /// Direct kernel boot: the tree's `/boot/vmlinuz-*` and `/boot/initrd.img-*` become
    /// the image's `kernel` and `initrd`, the tree its ext4 root on `/dev/vda`.
    #[default]
    Kernel,
    /// A stock cloud image's shape, booted by OVMF with no kernel member: a GPT disk with
    /// an EFI system partition (systemd-boot, the kernel and the initramfs) and the ext4
    /// root partition. The machine gets `firmware: uefi`.
    Uefi,
    /// The same GPT disk, which SeaBIOS boots too: syslinux on the EFI system partition
    /// (marked legacy-BIOS-bootable) and syslinux's GPT boot code in the protective MBR.
    /// The machine gets `firmware: bios`.
    Bios,
}

impl BootMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Uefi => "uefi",
            Self::Bios => "bios",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Output {
    /// By default the base's: `kernel` for a Debian base, an image base's own shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootMode>,
    /// The disk's size (`"4 GiB"`; sparse), for a Debian base: the root file system's
    /// with `kernel`, the whole GPT disk's with `uefi` or `bios`. An image base keeps its
    /// disk's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size: Option<ByteSize>,
    /// Kernel arguments after the ones the build puts first (`root=… rw` and the
    /// consoles); an image base's own arguments other than `root=` are kept before them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub cmdline: Option<String>,
    /// The image's `machine.json` (the boot members and the firmware are filled in by
    /// the build); by default an image base's own, else the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<MachineDefinition>,
}

/// A recipe that passed every check, with the directory its paths are relative to.
#[derive(Debug, Clone)]
pub struct CheckedRecipe {
    pub recipe: Recipe,
    pub dir: PathBuf,
}

impl CheckedRecipe {
    /// Where a `copy` step's `from` is on the host.
    pub fn host_path(&self, from: &str) -> PathBuf {
        self.dir.join(from)
    }
}

/// Parses and checks a recipe; `dir` is where its relative paths start. Every problem
/// is returned at once: the rules beyond the schema read the document itself, so a
/// schema error elsewhere hides none of them.
pub fn check_recipe(text: &str, dir: &Path) -> Result<CheckedRecipe, Vec<Issue>> {
    let document = Document::parse(text, MAX_RECIPE_BYTES).map_err(|e| vec![e.to_issue()])?;
    let value = document.value();
    let mut issues = document.duplicate_keys().to_vec();
    issues.extend(validate_against(SchemaKind::Recipe, value));
    issues.extend(semantic_issues(value, dir));
    if issues.is_empty() {
        match serde_json::from_value::<Recipe>(value.clone()) {
            Ok(recipe) => {
                return Ok(CheckedRecipe {
                    recipe,
                    dir: dir.to_path_buf(),
                });
            }
            // The schema is generated from this type, so this is a bug; still report it.
            Err(e) => issues.push(Issue::new("", format!("recipe does not decode: {e}"))),
        }
    }
    issues.dedup();
    document.annotate(&mut issues);
    issues.sort_by_key(|issue| issue.line.unwrap_or(u64::MAX));
    Err(issues)
}

fn semantic_issues(value: &Value, dir: &Path) -> Vec<Issue> {
    let mut issues = Vec::new();
    let image_base = value.pointer("/base/image").is_some();
    // The base image's location, checked as a payload's is (after the recipe's directory
    // is put before a relative path).
    let location = match value.pointer("/base/image") {
        Some(Value::String(location)) => Some(("/base/image", location.as_str())),
        Some(pinned) => pinned
            .get("url")
            .and_then(Value::as_str)
            .map(|url| ("/base/image/url", url)),
        None => None,
    };
    if let Some((path, location)) = location {
        let reference = ImageReference::Location(location.to_owned());
        let absolute = super::boot::absolute_location(&reference, dir);
        if let Err(e) = crate::job::ImageSource::parse(&absolute) {
            issues.push(Issue::new(path, e.to_string()));
        }
    }
    let steps = value.get("steps").and_then(Value::as_array);
    let mut booted = false;
    for (n, step) in steps.into_iter().flatten().enumerate() {
        if step.get("boot").is_some() {
            booted = true;
            continue;
        }
        if image_base {
            issues.push(Issue::new(
                format!("/steps/{n}"),
                "an image base takes `boot` steps only (`copy` and `run` change a Debian base's tree before its disk is made)",
            ));
        } else if booted {
            issues.push(Issue::new(
                format!("/steps/{n}"),
                "`copy` and `run` steps come before the first `boot` step (the tree becomes the disk that boots)",
            ));
        }
        let Some(copy) = step.get("copy") else {
            continue;
        };
        if let Some(from) = copy.get("from").and_then(Value::as_str) {
            let from = dir.join(from);
            match std::fs::metadata(&from) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => issues.push(Issue::new(
                    format!("/steps/{n}/copy/from"),
                    format!("{} is not a regular file", from.display()),
                )),
                Err(e) => issues.push(Issue::new(
                    format!("/steps/{n}/copy/from"),
                    format!("cannot read {}: {e}", from.display()),
                )),
            }
        }
        if let Some(to) = copy.get("to").and_then(Value::as_str)
            && to.starts_with('/')
            && (to.split('/').any(|part| part == ".." || part == ".") || to.ends_with('/'))
        {
            issues.push(Issue::new(
                format!("/steps/{n}/copy/to"),
                format!(
                    "`{to}` must name a file by a plain absolute path (no `.`, `..` or trailing `/`)"
                ),
            ));
        }
    }
    let size = value
        .pointer("/output/diskSize")
        .and_then(|v| serde_json::from_value::<ByteSize>(v.clone()).ok());
    let has_size = value.pointer("/output/diskSize").is_some();
    if image_base && has_size {
        issues.push(Issue::new(
            "/output/diskSize",
            "an image base keeps its disk as it is: remove diskSize",
        ));
    } else if !image_base && !has_size && value.pointer("/base/debian").is_some() {
        issues.push(Issue::new(
            "/output/diskSize",
            "a Debian base needs the disk's size (e.g. `4 GiB`)",
        ));
    }
    let smallest = match value.pointer("/output/boot").and_then(Value::as_str) {
        Some("uefi" | "bios") => MIN_DISK_SIZE + super::assemble::GPT_OVERHEAD,
        _ => MIN_DISK_SIZE,
    };
    if let Some(size) = size.map(ByteSize::bytes)
        && size < smallest
    {
        issues.push(Issue::new(
            "/output/diskSize",
            format!(
                "a disk of {size} bytes is smaller than the smallest this boot mode makes, {} MiB",
                smallest >> 20
            ),
        ));
    }
    for field in ["kernel", "initrd", "cmdline", "firmware"] {
        if value.pointer(&format!("/output/machine/{field}")).is_some() {
            issues.push(Issue::new(
                format!("/output/machine/{field}"),
                "set by the build from the boot mode (/output/boot); use /output/cmdline for kernel arguments",
            ));
        }
    }
    issues
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_of_a_recipe_is_reported_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("a-dir")).expect("dir");
        let text = "base: {debian: {suite: bookworm, packages: [ok-pkg, 'Bad Name']}}\n\
                    steps:\n  - copy: {from: missing.txt, to: /etc/x}\n  - copy: {from: a-dir, to: /etc/../y}\n  - run: ''\n\
                    output: {diskSize: 1 MiB, machine: {memory: 512, kernel: kernel}}\n";
        let issues = check_recipe(text, dir.path()).expect_err("invalid");
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        for expected in [
            "/base/debian/packages/1",
            "/steps/0/copy/from",
            "/steps/1/copy/from",
            "/steps/1/copy/to",
            "/steps/2/run",
            "/output/diskSize",
            "/output/machine/kernel",
        ] {
            assert!(paths.contains(&expected), "{expected} in {issues:?}");
        }
        assert!(issues.iter().all(|i| i.line.is_some()), "{issues:?}");
        let missing = issues
            .iter()
            .find(|i| i.path == "/steps/0/copy/from")
            .expect("from");
        assert!(missing.message.contains("missing.txt"), "{issues:?}");
    }

    #[test]
    fn an_image_base_takes_boot_steps_only_and_keeps_its_disk_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("f"), "x").expect("file");
        let bad = "base: {image: 'ftp://example.org/x.tar.zst'}\noutput: {}\n";
        let issues = check_recipe(bad, dir.path()).expect_err("invalid");
        assert_eq!(issues[0].path, "/base/image", "{issues:?}");
        assert!(issues[0].message.contains("http or https"), "{issues:?}");

        let text = "base: {image: base.tar.zst}\n\
                    steps:\n  - boot: {script: 'apt-get install -y foo'}\n  - run: echo no\n\
                    output: {boot: uefi, diskSize: 8 GiB, machine: {firmware: bios}}\n";
        let issues = check_recipe(text, dir.path()).expect_err("invalid");
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            ["/steps/1", "/output/diskSize", "/output/machine/firmware"],
            "{issues:?}"
        );

        let debian = "base: {debian: {suite: bookworm}}\n\
                      steps:\n  - boot: {script: 'true', maxRunTime: 0}\n  - copy: {from: f, to: /f}\n\
                      output: {boot: uefi, diskSize: 100 MiB}\n";
        let issues = check_recipe(debian, dir.path()).expect_err("invalid");
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        for expected in ["/steps/0/boot/maxRunTime", "/steps/1", "/output/diskSize"] {
            assert!(paths.contains(&expected), "{expected} in {issues:?}");
        }
        let no_size = "base: {debian: {suite: bookworm}}\noutput: {}\n";
        let issues = check_recipe(no_size, dir.path()).expect_err("invalid");
        assert_eq!(issues[0].path, "/output/diskSize", "{issues:?}");

        let good = "base: {image: {url: 'https://example.org/ci.tar.zst', sha256: '%'}}\n\
                    steps: [{boot: {script: 'echo hi'}}]\noutput: {boot: uefi}\n"
            .replace('%', &"a".repeat(64));
        let checked = check_recipe(&good, dir.path()).expect("valid");
        let StepKind::Boot(boot) = checked.recipe.steps[0].kind() else {
            panic!("a boot step")
        };
        assert_eq!(boot.max_run_time, DEFAULT_BOOT_SECONDS);
    }

    #[test]
    fn a_good_recipe_decodes_with_its_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("unit"), "x").expect("file");
        let text = r#"{"base": {"debian": {"suite": "bookworm", "packages": ["curl", "git=1:2.39.5-0+deb12u2"]}},
            "steps": [{"copy": {"from": "unit", "to": "/etc/unit"}}, {"run": "echo hi"}],
            "output": {"diskSize": "2 GiB", "machine": {"memory": 1024}}}"#;
        let checked = check_recipe(text, dir.path()).expect("valid");
        let BaseKind::Debian(base) = checked.recipe.base.kind() else {
            panic!("a Debian base")
        };
        assert_eq!(base.variant, Variant::Apt);
        assert_eq!(checked.recipe.output.boot, None);
        let StepKind::Copy(copy) = checked.recipe.steps[0].kind() else {
            panic!("a copy step")
        };
        assert_eq!(copy.mode, "0644");
        assert_eq!(checked.host_path("unit"), dir.path().join("unit"));
    }
}
