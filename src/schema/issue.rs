use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One problem found in a document: where it is (a JSON pointer) and what is wrong.
///
/// Every validator in the worker returns all of its problems as a list of these, so a
/// job author sees every mistake in one round trip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Issue {
    /// JSON pointer (RFC 6901) to the offending value; empty for the whole document.
    pub path: String,
    /// What is wrong, in words a job author can act on.
    pub message: String,
    /// 1-based line of the offending value in the source document, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
}

impl Issue {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            line: None,
        }
    }

    #[must_use]
    pub fn with_line(mut self, line: Option<u64>) -> Self {
        self.line = line;
        self
    }

    /// The same issue with `prefix` (a JSON pointer) put in front of its path: used when
    /// a nested document (an image's machine.json) is reported as part of a larger one.
    #[must_use]
    pub fn nested_under(mut self, prefix: &str) -> Self {
        self.path = format!("{prefix}{}", self.path);
        self
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "(document)"
        } else {
            &self.path
        };
        match self.line {
            Some(line) => write!(f, "{path} (line {line}): {}", self.message),
            None => write!(f, "{path}: {}", self.message),
        }
    }
}

/// Appends one reference token to a JSON pointer, escaping `~` and `/` as RFC 6901 says.
pub fn pointer_push(pointer: &str, token: &str) -> String {
    let escaped = token.replace('~', "~0").replace('/', "~1");
    format!("{pointer}/{escaped}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_tokens_are_escaped() {
        assert_eq!(pointer_push("/env", "A/B~C"), "/env/A~1B~0C");
        assert_eq!(pointer_push("", "image"), "/image");
    }

    #[test]
    fn display_names_path_and_line() {
        let issue = Issue::new("/env/1A", "bad name").with_line(Some(4));
        assert_eq!(issue.to_string(), "/env/1A (line 4): bad name");
        assert_eq!(Issue::new("", "empty").to_string(), "(document): empty");
    }
}
