use std::sync::OnceLock;

use jsonschema::error::ValidationErrorKind;
use jsonschema::{ValidationError, Validator};
use serde_json::Value;

use super::generate::generate;
use super::issue::{Issue, pointer_push};
use crate::config::WorkerConfig;
use crate::job::{JobPayload, MachineDefinition, ResultReport, ValidationReport};

/// The documents the project has a schema for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaKind {
    Payload,
    Machine,
    WorkerConfig,
    ResultReport,
    ValidationReport,
    Recipe,
}

impl SchemaKind {
    pub const ALL: [Self; 6] = [
        Self::Payload,
        Self::Machine,
        Self::WorkerConfig,
        Self::ResultReport,
        Self::ValidationReport,
        Self::Recipe,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            Self::Payload => "payload.schema.json",
            Self::Machine => "machine.schema.json",
            Self::WorkerConfig => "worker-config.schema.json",
            Self::ResultReport => "result-report.schema.json",
            Self::ValidationReport => "validation-report.schema.json",
            Self::Recipe => "image-recipe.schema.json",
        }
    }

    /// The schema generated from the Rust type behind this document.
    pub fn schema(self) -> Value {
        let name = self.file_name();
        match self {
            Self::Payload => generate::<JobPayload>(name),
            Self::Machine => generate::<MachineDefinition>(name),
            Self::WorkerConfig => generate::<WorkerConfig>(name),
            Self::ResultReport => generate::<ResultReport>(name),
            Self::ValidationReport => generate::<ValidationReport>(name),
            Self::Recipe => generate::<crate::image::build::Recipe>(name),
        }
    }

    /// The compiled validator, built once per process.
    fn validator(self) -> &'static Validator {
        static CELLS: [OnceLock<Validator>; 6] = [const { OnceLock::new() }; 6];
        let index = Self::ALL
            .iter()
            .position(|k| *k == self)
            .unwrap_or_else(|| unreachable!("ALL lists every kind"));
        CELLS[index].get_or_init(|| {
            jsonschema::draft202012::options()
                .build(&self.schema())
                .unwrap_or_else(|e| {
                    panic!(
                        "generated schema {} does not compile: {e}",
                        self.file_name()
                    )
                })
        })
    }
}

/// Validates `instance` against the schema of `kind` and returns every problem, each at
/// the most precise path available (an unknown key is reported at the key itself).
pub fn validate_against(kind: SchemaKind, instance: &Value) -> Vec<Issue> {
    let mut issues = Vec::new();
    for error in kind.validator().iter_errors(instance) {
        collect(&error, &mut issues);
    }
    issues.dedup();
    issues
}

fn collect(error: &ValidationError<'_>, out: &mut Vec<Issue>) {
    let path = error.instance_path().as_str().to_owned();
    match error.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected }
        | ValidationErrorKind::UnevaluatedProperties { unexpected } => {
            for key in unexpected {
                out.push(Issue::new(
                    pointer_push(&path, key),
                    format!("unknown field `{key}`"),
                ));
            }
        }
        ValidationErrorKind::Required { property } => {
            let name = property
                .as_str()
                .map_or_else(|| property.to_string(), str::to_owned);
            out.push(Issue::new(
                pointer_push(&path, &name),
                format!("missing required field `{name}`"),
            ));
        }
        ValidationErrorKind::PropertyNames { error: inner } => {
            let name = inner
                .instance()
                .as_str()
                .map_or_else(|| inner.instance().to_string(), str::to_owned);
            let reason = match inner.kind() {
                ValidationErrorKind::Pattern { pattern } => format!("must match {pattern}"),
                _ => inner.to_string(),
            };
            out.push(Issue::new(
                pointer_push(&path, &name),
                format!("invalid name `{name}`: {reason}"),
            ));
        }
        ValidationErrorKind::AnyOf { context } | ValidationErrorKind::OneOfNotValid { context } => {
            let matching: Vec<&Vec<ValidationError<'static>>> = context
                .iter()
                .filter(|branch| !mismatched(branch, &path))
                .collect();
            match matching.as_slice() {
                [branch] => branch.iter().for_each(|e| collect(e, out)),
                _ => out.push(Issue::new(
                    path,
                    format!(
                        "{} does not match any of the accepted forms",
                        describe(error.instance())
                    ),
                )),
            }
        }
        ValidationErrorKind::Enum { options } => {
            let choices = options
                .as_array()
                .map(|values| {
                    values
                        .iter()
                        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            out.push(Issue::new(
                path,
                format!("{} is not one of: {choices}", describe(error.instance())),
            ));
        }
        ValidationErrorKind::Pattern { pattern } => {
            let message = match pattern_meaning(pattern) {
                Some(meaning) => format!("{} {meaning}", describe(error.instance())),
                None => error.to_string(),
            };
            out.push(Issue::new(path, message));
        }
        _ => out.push(Issue::new(path, error.to_string())),
    }
}

/// Words for the patterns our schemas use, so nobody has to read a regex to fix a value.
fn pattern_meaning(pattern: &str) -> Option<&'static str> {
    use crate::job::{DISK_SERIAL_PATTERN, MAC_PATTERN, SHA256_PATTERN, UUID_PATTERN};
    Some(match pattern {
        "^/" => "is not an absolute path",
        p if p == MAC_PATTERN => {
            "is not a lowercase, locally administered unicast MAC (e.g. 52:54:00:12:34:56)"
        }
        p if p == UUID_PATTERN => {
            "is not a lowercase UUID (e.g. 52bab607-10f1-4049-a0f8-ee4725cb715b)"
        }
        p if p == SHA256_PATTERN => "is not a sha256 (64 lowercase hex digits)",
        p if p == DISK_SERIAL_PATTERN => "is not a disk serial (1 to 20 letters, digits or `-`)",
        "^postgres(ql)?://" => "is not a postgres:// or postgresql:// URL",
        "^[0-9]+ ?(B|KiB|MiB|GiB|TiB)$" => "is not a size such as 512 MiB or 20 GiB",
        _ => return None,
    })
}

/// A branch of `anyOf`/`oneOf` that fails on the value's type or on a constant (an
/// internally tagged enum's tag) is for another form of the value, not this one.
fn mismatched(branch: &[ValidationError<'_>], path: &str) -> bool {
    branch.iter().any(|e| {
        let at = e.instance_path().as_str();
        match e.kind() {
            ValidationErrorKind::Type { .. } => at == path,
            ValidationErrorKind::Constant { .. } => at.starts_with(path),
            _ => false,
        }
    })
}

fn describe(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 80 {
        format!("{}…", &text[..text.floor_char_boundary(77)])
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn paths(issues: &[Issue]) -> Vec<&str> {
        issues.iter().map(|i| i.path.as_str()).collect()
    }

    #[test]
    fn every_generated_schema_compiles() {
        for kind in SchemaKind::ALL {
            let _ = kind.validator();
        }
    }

    #[test]
    fn unknown_and_missing_fields_point_at_the_field() {
        let issues = validate_against(
            SchemaKind::Payload,
            &json!({"image": "https://x.test/i.tar.zst", "command": ["true"], "colour": 1}),
        );
        assert_eq!(paths(&issues), ["/maxRunTime", "/colour"]);
        assert_eq!(issues[1].message, "unknown field `colour`");
        assert_eq!(issues[0].message, "missing required field `maxRunTime`");
    }

    #[test]
    fn untagged_forms_report_the_errors_of_the_matching_form() {
        let issues = validate_against(
            SchemaKind::Payload,
            &json!({"image": {"url": "https://x.test/i", "sha256": "nothex"},
                    "command": ["true"], "maxRunTime": 5}),
        );
        assert_eq!(paths(&issues), ["/image/sha256"]);
    }

    #[test]
    fn enum_errors_list_the_choices() {
        let issues = validate_against(SchemaKind::Machine, &json!({"graphics": "cga"}));
        assert_eq!(paths(&issues), ["/graphics"]);
        assert!(
            issues[0]
                .message
                .starts_with("\"cga\" is not one of: none, VGA,"),
            "{}",
            issues[0].message
        );
    }

    #[test]
    fn known_patterns_are_explained_in_words() {
        let issues = validate_against(SchemaKind::Machine, &json!({"mac": "00:0d:4b:ec:d6:18"}));
        assert_eq!(
            issues[0].message,
            "\"00:0d:4b:ec:d6:18\" is not a lowercase, locally administered unicast MAC \
             (e.g. 52:54:00:12:34:56)"
        );
    }

    // taskcluster-worker's MAC fixtures: local unicast accepted; global, multicast and
    // malformed addresses rejected.
    #[test]
    fn mac_addresses_follow_taskcluster_rules() {
        let valid = [
            "ba:47:78:65:e1:a5",
            "0e:54:fb:3a:45:d0",
            "52:e2:96:70:a2:f0",
            "02:3d:4b:b6:27:5e",
        ];
        let invalid = [
            "00:0d:4b:ec:d6:18",
            "00:00:0a:40:ce:1f",
            "df:db:a9:30:67:a1",
            "37:d6:97:2d:36:5f",
            "d:db:a9:30:67:a1",
            "9f:0a:11:bbd5:63",
            "0b:be:tt:5e:ca:d9",
            "",
            "--",
        ];
        for mac in valid {
            assert!(
                validate_against(SchemaKind::Machine, &json!({"mac": mac})).is_empty(),
                "{mac}"
            );
        }
        for mac in invalid {
            assert!(
                !validate_against(SchemaKind::Machine, &json!({"mac": mac})).is_empty(),
                "{mac}"
            );
        }
    }

    #[test]
    fn null_is_not_a_way_to_leave_a_field_out() {
        let issues = validate_against(SchemaKind::Machine, &json!({"memory": null}));
        assert_eq!(paths(&issues), ["/memory"]);
    }

    #[test]
    fn env_names_are_checked_one_by_one() {
        let issues = validate_against(
            SchemaKind::Payload,
            &json!({"image": "https://x.test/i", "command": ["true"], "maxRunTime": 5,
                    "env": {"GOOD": "1", "1A": "x", "#=#": "y"}}),
        );
        assert_eq!(paths(&issues), ["/env/#=#", "/env/1A"]);
        assert!(
            issues[1].message.starts_with("invalid name `1A`"),
            "{}",
            issues[1].message
        );
    }
}
