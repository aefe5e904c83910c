use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const UNITS: [(&str, u64); 5] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("B", 1),
];

/// Why a size written as text is not a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ByteSizeError {
    #[error("`{text}` does not start with a whole number")]
    NotANumber { text: String },
    #[error("`{text}` has unit `{unit}`; use B, KiB, MiB, GiB or TiB")]
    Unit { text: String, unit: String },
    #[error("`{text}` is too large")]
    TooLarge { text: String },
}

/// A size in bytes, written in worker.yml as a number of bytes or as `"20 GiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }

    pub const fn gib(n: u64) -> Self {
        Self(n << 30)
    }

    pub fn bytes(self) -> u64 {
        self.0
    }

    fn parse(text: &str) -> Result<Self, ByteSizeError> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let number: u64 = digits.parse().map_err(|_| ByteSizeError::NotANumber {
            text: text.to_owned(),
        })?;
        let unit = unit.trim();
        let factor = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, factor)| *factor)
            .ok_or_else(|| ByteSizeError::Unit {
                text: text.to_owned(),
                unit: unit.to_owned(),
            })?;
        number
            .checked_mul(factor)
            .map(Self)
            .ok_or_else(|| ByteSizeError::TooLarge {
                text: text.to_owned(),
            })
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (unit, factor) = UNITS
            .iter()
            .find(|(_, factor)| self.0 >= *factor && self.0.is_multiple_of(*factor))
            .copied()
            .unwrap_or(("B", 1));
        write!(f, "{} {unit}", self.0 / factor)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of bytes or a size such as \"20 GiB\"")
            }
            fn visit_u64<E>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A size: a number of bytes, or a whole number with a unit (B, KiB, MiB, GiB, TiB), e.g. \"20 GiB\".",
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": "^[0-9]+ ?(B|KiB|MiB|GiB|TiB)$"}
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(ByteSize::parse("20 GiB"), Ok(ByteSize::gib(20)));
        assert_eq!(ByteSize::parse("512MiB"), Ok(ByteSize::mib(512)));
        assert_eq!(ByteSize::parse("7 B"), Ok(ByteSize(7)));
        assert!(ByteSize::parse("20 GB").is_err());
        assert!(ByteSize::parse("GiB").is_err());
        assert!(ByteSize::parse("99999999999 TiB").is_err());
    }

    #[test]
    fn sizes_display_in_the_largest_exact_unit() {
        assert_eq!(ByteSize::gib(20).to_string(), "20 GiB");
        assert_eq!(ByteSize(1536 << 10).to_string(), "1536 KiB");
        assert_eq!(ByteSize(0).to_string(), "0 B");
    }

    #[test]
    fn sizes_round_trip_through_serde() {
        let size: ByteSize = serde_json::from_str("\"4 GiB\"").expect("parses");
        assert_eq!(
            serde_json::to_string(&size).expect("serializes"),
            "\"4 GiB\""
        );
        let raw: ByteSize = serde_json::from_str("1024").expect("parses");
        assert_eq!(raw, ByteSize(1024));
    }
}
