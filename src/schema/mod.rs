//! Contracts as data: parsing documents with their source lines, JSON Schema
//! generation and validation, and the `{path, message}` issues every check returns.

mod document;
mod generate;
mod issue;
mod validate;

pub use document::{Document, DocumentError};
pub use generate::{SchemaFile, SchemaWriteError, schema_files, write_schemas};
pub use issue::{Issue, pointer_push};
pub use validate::{SchemaKind, validate_against};
