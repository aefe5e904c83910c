use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use serde_saphyr::{DuplicateKeyPolicy, Spanned};

use super::issue::{Issue, pointer_push};

/// A YAML or JSON document (JSON is parsed as the YAML 1.2 subset it is) parsed into a JSON value, with the source line of every value.
///
/// One parser serves payloads, machine definitions and worker.yml so that all of them get
/// the same treatment: YAML 1.2 booleans only (`yes`/`on` stay strings), duplicate keys
/// reported as issues at their path instead of silently dropped, and every schema or
/// semantic issue annotated with the line it is about.
#[derive(Debug, Clone)]
pub struct Document {
    value: Value,
    lines: HashMap<String, u64>,
    duplicate_keys: Vec<Issue>,
}

/// Why a document could not be parsed at all (before any validation could run).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("document is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("{message}")]
    Syntax { message: String, line: Option<u64> },
}

impl DocumentError {
    /// The parse failure as an issue, so it can be reported like any other problem.
    pub fn to_issue(&self) -> Issue {
        match self {
            Self::TooLarge { .. } => Issue::new("", self.to_string()),
            Self::Syntax { message, line } => {
                Issue::new("", format!("not valid YAML or JSON: {message}")).with_line(*line)
            }
        }
    }
}

impl Document {
    /// Parses `text`, which must be at most `limit` bytes.
    pub fn parse(text: &str, limit: usize) -> Result<Self, DocumentError> {
        if text.len() > limit {
            return Err(DocumentError::TooLarge {
                size: text.len(),
                limit,
            });
        }
        let options = serde_saphyr::options! {
            strict_booleans: true,
            duplicate_keys: DuplicateKeyPolicy::PassThrough,
        };
        let root: Spanned<Node> =
            serde_saphyr::from_str_with_options(text, options).map_err(|error| {
                DocumentError::Syntax {
                    message: error.without_snippet().to_string(),
                    line: error.location().map(|l| l.line()).filter(|&l| l > 0),
                }
            })?;
        let mut document = Self {
            value: Value::Null,
            lines: HashMap::new(),
            duplicate_keys: Vec::new(),
        };
        document.value = document.flatten(root, "");
        Ok(document)
    }

    /// Wraps a value that did not come from text (so no lines are known).
    pub fn from_value(value: Value) -> Self {
        Self {
            value,
            lines: HashMap::new(),
            duplicate_keys: Vec::new(),
        }
    }

    pub fn value(&self) -> &Value {
        &self.value
    }

    pub fn into_value(self) -> Value {
        self.value
    }

    /// Issues for keys that appeared twice in one mapping (the first occurrence is kept).
    pub fn duplicate_keys(&self) -> &[Issue] {
        &self.duplicate_keys
    }

    /// The line of the value at `pointer`, or of its nearest ancestor that has one.
    pub fn line_of(&self, pointer: &str) -> Option<u64> {
        let mut pointer = pointer;
        loop {
            if let Some(&line) = self.lines.get(pointer) {
                return Some(line);
            }
            let cut = pointer.rfind('/')?;
            pointer = &pointer[..cut];
        }
    }

    /// Fills in the line of each issue that does not have one yet.
    pub fn annotate(&self, issues: &mut [Issue]) {
        for issue in issues.iter_mut().filter(|issue| issue.line.is_none()) {
            issue.line = self.line_of(&issue.path);
        }
    }

    fn flatten(&mut self, node: Spanned<Node>, path: &str) -> Value {
        self.record_line(path, node.referenced.line());
        match node.value {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(b),
            Node::Number(n) => Value::Number(n),
            Node::String(s) => Value::String(s),
            Node::Seq(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (index, item) in items.into_iter().enumerate() {
                    let child = pointer_push(path, &index.to_string());
                    out.push(self.flatten(item, &child));
                }
                Value::Array(out)
            }
            Node::Map(entries) => {
                let mut out = Map::new();
                for (key, value) in entries {
                    let Spanned {
                        value: Key(name),
                        referenced: key_location,
                        ..
                    } = key;
                    let child = pointer_push(path, &name);
                    let key_line = key_location.line();
                    if out.contains_key(&name) {
                        let first = self.lines.get(&child).copied();
                        let message = match first {
                            Some(first) => format!(
                                "duplicate key `{name}`; it is already defined on line {first}"
                            ),
                            None => format!("duplicate key `{name}`"),
                        };
                        self.duplicate_keys
                            .push(Issue::new(child, message).with_line(Some(key_line)));
                        continue;
                    }
                    // The key's line reads better than the value's for block values.
                    self.record_line(&child, key_line);
                    let value = self.flatten(value, &child);
                    self.record_line(&child, key_line);
                    out.insert(name, value);
                }
                Value::Object(out)
            }
        }
    }

    fn record_line(&mut self, path: &str, line: u64) {
        if line > 0 {
            self.lines.insert(path.to_owned(), line);
        }
    }
}

/// A parsed YAML node whose children keep their locations.
enum Node {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<Key>, Spanned<Node>)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Number(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Node, E> {
        i64::try_from(v)
            .map(|v| Node::Number(v.into()))
            .map_err(|_| E::custom(format!("integer {v} is out of range")))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Node, E> {
        u64::try_from(v)
            .map(|v| Node::Number(v.into()))
            .map_err(|_| E::custom(format!("integer {v} is out of range")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Number::from_f64(v)
            .map(Node::Number)
            .ok_or_else(|| E::custom("non-finite numbers are not allowed"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Node>>()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<Key>>()? {
            let value = map.next_value::<Spanned<Node>>()?;
            entries.push((key, value));
        }
        Ok(Node::Map(entries))
    }
}

/// A mapping key: any scalar, read as the string JSON would use for it.
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scalar mapping key")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Key, E> {
                Ok(Key(v))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_unit<E>(self) -> Result<Key, E> {
                Ok(Key("null".to_owned()))
            }
        }
        deserializer.deserialize_any(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMIT: usize = 1 << 20;

    #[test]
    fn yaml_values_become_json_with_lines() {
        let doc = Document::parse("image: a\nenv:\n  A: \"1\"\nlist:\n  - x\n  - y\n", LIMIT)
            .expect("valid yaml");
        assert_eq!(
            doc.value(),
            &json!({"image": "a", "env": {"A": "1"}, "list": ["x", "y"]})
        );
        assert_eq!(doc.line_of("/image"), Some(1));
        assert_eq!(doc.line_of("/env/A"), Some(3));
        assert_eq!(doc.line_of("/list/1"), Some(6));
        // A path below a scalar falls back to the nearest known ancestor.
        assert_eq!(doc.line_of("/env/A/deeper"), Some(3));
    }

    #[test]
    fn yaml_1_1_booleans_stay_strings() {
        let doc = Document::parse("a: yes\nb: on\nc: true\nd: off\n", LIMIT).expect("valid");
        assert_eq!(
            doc.value(),
            &json!({"a": "yes", "b": "on", "c": true, "d": "off"})
        );
    }

    #[test]
    fn json_text_parses_with_lines() {
        let doc = Document::parse("{\n  \"image\": \"x\",\n  \"maxRunTime\": 5\n}", LIMIT)
            .expect("valid json");
        assert_eq!(doc.value(), &json!({"image": "x", "maxRunTime": 5}));
        assert_eq!(doc.line_of("/maxRunTime"), Some(3));
    }

    #[test]
    fn duplicate_keys_are_reported_at_their_path() {
        let doc =
            Document::parse("env:\n  A: \"1\"\n  B: \"2\"\n  A: \"3\"\n", LIMIT).expect("parses");
        let dups = doc.duplicate_keys();
        assert_eq!(dups.len(), 1);
        assert_eq!(dups[0].path, "/env/A");
        assert_eq!(dups[0].line, Some(4));
        assert!(dups[0].message.contains("line 2"), "{}", dups[0].message);
        // The first definition is kept.
        assert_eq!(doc.value()["env"]["A"], json!("1"));
    }

    #[test]
    fn syntax_errors_carry_a_line() {
        let err = Document::parse("a: 1\nb: [1, 2\nc: 3\n", LIMIT).expect_err("unclosed");
        match err {
            DocumentError::Syntax { line, .. } => assert!(line.is_some()),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn oversize_documents_are_refused_before_parsing() {
        let err = Document::parse("a: 1234567890\n", 4).expect_err("too large");
        assert_eq!(err, DocumentError::TooLarge { size: 14, limit: 4 });
    }

    #[test]
    fn numeric_keys_become_strings() {
        let doc = Document::parse("1A: x\n2: y\n", LIMIT).expect("valid");
        assert_eq!(doc.value(), &json!({"1A": "x", "2": "y"}));
    }
}
