//! Strict JSON: one reading of a document, the same one every parser downstream makes.
//!
//! A guard that reads a request one way while the provider reads it another is no guard. JSON
//! leaves one such gap open: an object may repeat a key, and parsers disagree on which copy wins
//! (serde_json and Python keep the last, others the first). [`parse_strict`] refuses duplicate
//! keys (after unescaping, so `"m\u0065ssages"` repeats `"messages"`), as well as everything
//! serde_json refuses: invalid UTF-8, lone surrogates, trailing data, numbers out of range and
//! nesting deeper than 128 levels.
//!
//! ```
//! use moat_core::json::{parse_strict, JsonError};
//!
//! assert!(parse_strict(br#"{"model":"m","messages":[]}"#).is_ok());
//! let err = parse_strict(br#"{"messages":[],"m\u0065ssages":[]}"#).unwrap_err();
//! assert!(matches!(err, JsonError::DuplicateKey { ref key } if key == "messages"));
//! ```

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Why a body is not strict JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JsonError {
    /// Not JSON at all, or not UTF-8: serde_json's message, with line and column.
    Syntax(String),
    /// Nested deeper than the parser's recursion limit (128).
    TooDeep,
    /// An object names the same key twice.
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Syntax(message) => write!(f, "not valid JSON: {message}"),
            Self::TooDeep => f.write_str("nested too deeply"),
            Self::DuplicateKey { key } => write!(f, "the key {key:?} appears twice in one object"),
        }
    }
}

impl std::error::Error for JsonError {}

/// Marks the serde error raised for a duplicate key, so it can be told from a syntax error.
const DUPLICATE: &str = "\u{0}moat-duplicate-key\u{0}";

/// Parses `bytes` as one JSON document, refusing duplicate keys.
pub fn parse_strict(bytes: &[u8]) -> Result<Value, JsonError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = StrictValue
        .deserialize(&mut deserializer)
        .map_err(classify)?;
    deserializer.end().map_err(classify)?;
    Ok(value)
}

fn classify(err: serde_json::Error) -> JsonError {
    let message = err.to_string();
    if let Some(rest) = message.strip_prefix(DUPLICATE) {
        // The key is what follows the marker, up to serde_json's " at line ..." suffix.
        let key = rest.rsplit_once(" at line ").map_or(rest, |(key, _)| key);
        return JsonError::DuplicateKey {
            key: key.to_owned(),
        };
    }
    if message.starts_with("recursion limit exceeded") {
        return JsonError::TooDeep;
    }
    JsonError::Syntax(message)
}

/// Deserializes a [`Value`] exactly as serde_json does, but fails on a repeated object key.
struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // serde_json never yields a non-finite float, so this is never `Null`.
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element_seed(StrictValue)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(StrictValue)?;
            if object.contains_key(&key) {
                return Err(de::Error::custom(format_args!("{DUPLICATE}{key}")));
            }
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_values_as_serde_json() {
        let docs: [&[u8]; 6] = [
            br#"{"a":1,"b":[true,null,-2,3.5,"x\u00e9"],"c":{"d":{}}}"#,
            b"[]",
            b"  \"s\"  ",
            b"18446744073709551615",
            b"-9223372036854775808",
            br#"{"z":1,"a":2}"#,
        ];
        for doc in docs {
            let strict = parse_strict(doc).unwrap();
            let loose: Value = serde_json::from_slice(doc).unwrap();
            assert_eq!(strict, loose);
            assert_eq!(strict.to_string(), loose.to_string(), "key order kept");
        }
    }

    #[test]
    fn duplicate_keys_at_any_depth_and_through_escapes() {
        for (doc, key) in [
            (r#"{"messages":[],"messages":[]}"#, "messages"),
            (
                r#"{"messages":[{"role":"user","content":"a","content":"b"}]}"#,
                "content",
            ),
            (r#"{"a":{"x at line 3":1,"x at line 3":2}}"#, "x at line 3"),
            (r#"{"m\u0065ssages":1,"messages":2}"#, "messages"),
        ] {
            assert_eq!(
                parse_strict(doc.as_bytes()),
                Err(JsonError::DuplicateKey { key: key.into() }),
                "{doc}"
            );
        }
    }

    #[test]
    fn what_serde_json_refuses_is_refused() {
        assert!(matches!(
            parse_strict(b"{\"a\": }"),
            Err(JsonError::Syntax(m)) if m.contains("line 1")
        ));
        assert!(matches!(
            parse_strict(b"\"\xff\xfe\""),
            Err(JsonError::Syntax(_))
        ));
        assert!(matches!(
            parse_strict(br#""\ud800""#),
            Err(JsonError::Syntax(_))
        ));
        assert!(matches!(parse_strict(b"{} x"), Err(JsonError::Syntax(_))));
        assert!(matches!(parse_strict(b"1e400"), Err(JsonError::Syntax(_))));
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert_eq!(parse_strict(deep.as_bytes()), Err(JsonError::TooDeep));
        let deep = "{\"a\":".repeat(200) + "1" + &"}".repeat(200);
        assert_eq!(parse_strict(deep.as_bytes()), Err(JsonError::TooDeep));
    }
}
