use std::path::{Path, PathBuf};

use schemars::generate::SchemaSettings;
use schemars::transform::{RecursiveTransform, Transform};
use schemars::{JsonSchema, Schema};
use serde_json::Value;

use super::validate::SchemaKind;

/// One generated schema file: its name under `schemas/` and its pretty JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaFile {
    pub file_name: &'static str,
    pub text: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaWriteError {
    #[error("failed to create schema directory {path:?}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write schema file {path:?}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Every schema the project publishes, generated from the Rust types: the JSON Schemas
/// of its documents and the OpenAPI descriptions of the metadata service and the API.
pub fn schema_files() -> Vec<SchemaFile> {
    let pretty = |value: &Value| {
        let mut text = serde_json::to_string_pretty(value)
            .unwrap_or_else(|e| unreachable!("a JSON value always serializes: {e}"));
        text.push('\n');
        text
    };
    let mut files: Vec<SchemaFile> = SchemaKind::ALL
        .iter()
        .map(|kind| SchemaFile {
            file_name: kind.file_name(),
            text: pretty(&kind.schema()),
        })
        .collect();
    files.push(SchemaFile {
        file_name: "metadata-api.openapi.json",
        text: pretty(&crate::metadata::openapi_document()),
    });
    files.push(SchemaFile {
        file_name: "worker-api.openapi.json",
        text: pretty(&crate::api::openapi_document()),
    });
    files
}

/// Writes every schema into `dir` (what `qemu-worker schema --out DIR` does).
pub fn write_schemas(dir: &Path) -> Result<Vec<PathBuf>, SchemaWriteError> {
    std::fs::create_dir_all(dir).map_err(|source| SchemaWriteError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    schema_files()
        .into_iter()
        .map(|file| {
            let path = dir.join(file.file_name);
            std::fs::write(&path, file.text).map_err(|source| SchemaWriteError::Write {
                path: path.clone(),
                source,
            })?;
            Ok(path)
        })
        .collect()
}

/// Draft 2020-12 schema of `T`, with an `$id` naming the published file.
pub(crate) fn generate<T: JsonSchema>(file_name: &str) -> Value {
    let settings = SchemaSettings::draft2020_12().with(|s| {
        s.transforms
            .push(Box::new(RecursiveTransform(StripOptionalNull)));
    });
    let mut schema = settings.into_generator().into_root_schema_for::<T>();
    schema.insert(
        "$id".into(),
        format!("https://qemu-worker.invalid/schemas/{file_name}").into(),
    );
    schema.to_value()
}

/// Optional fields are written as absent, never as `null`: a `null` in a document is a
/// mistake worth reporting, and without the null branch errors point at the real cause
/// instead of "not valid under any of anyOf".
#[derive(Clone)]
struct StripOptionalNull;

impl Transform for StripOptionalNull {
    fn transform(&mut self, schema: &mut Schema) {
        let Some(object) = schema.as_object_mut() else {
            return;
        };
        if object.get("default") == Some(&Value::Null) {
            object.remove("default");
        }
        if let Some(Value::Array(types)) = object.get_mut("type") {
            types.retain(|t| t != "null");
            if types.len() == 1 {
                let single = types.remove(0);
                object.insert("type".into(), single);
            }
        }
        let null_branch = serde_json::json!({"type": "null"});
        if let Some(Value::Array(branches)) = object.get_mut("anyOf") {
            branches.retain(|b| b != &null_branch);
            if branches.len() == 1 {
                let only = branches.remove(0);
                object.remove("anyOf");
                if let Value::Object(fields) = only {
                    for (key, value) in fields {
                        object.entry(key).or_insert(value);
                    }
                }
            }
        }
    }
}
