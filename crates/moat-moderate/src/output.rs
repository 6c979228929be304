//! Which strings of a whole JSON reply are the model's output, and reading them without
//! building a document: a reply with nothing to moderate is then never parsed into a
//! `serde_json::Value` (nor re-encoded).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// JSON members that hold no model output: not moderated.
pub(crate) const NOT_OUTPUT: &[&str] = &[
    "id",
    "object",
    "model",
    "role",
    "type",
    "finish_reason",
    "stop_reason",
    "stop_sequence",
    "system_fingerprint",
    "created",
    "created_at",
    "status",
    "call_id",
    "tool_call_id",
    "name",
    "service_tier",
    "logprobs",
    "usage",
    "index",
    "encrypted_content",
    // Echoes of the request in a Responses object.
    "instructions",
    "tools",
    "tool_choice",
    "metadata",
    "user",
    "prompt",
];

/// The output strings of a JSON reply (every string outside the [`NOT_OUTPUT`] members, at any
/// depth), borrowed when they hold no escapes. `None` when the reply is not JSON or is an error
/// (an object with a top-level `error`), which are not moderated.
///
/// An object that repeats a key yields the strings of every copy: a superset of what a parsed
/// document (which keeps the last) holds.
pub(crate) fn output_texts(bytes: &[u8]) -> Option<Vec<Cow<'_, str>>> {
    let mut texts = Vec::new();
    let mut error = false;
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    Walk {
        texts: &mut texts,
        error: Some(&mut error),
    }
    .deserialize(&mut deserializer)
    .ok()?;
    deserializer.end().ok()?;
    (!error).then_some(texts)
}

/// Collects the output strings of one JSON value; `error` (only at the top) notes an `error`
/// member.
struct Walk<'a, 'v> {
    texts: &'v mut Vec<Cow<'a, str>>,
    error: Option<&'v mut bool>,
}

impl<'de, 'v> DeserializeSeed<'de> for Walk<'de, 'v> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, 'v> Visitor<'de> for Walk<'de, 'v> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<(), E> {
        self.texts.push(Cow::Borrowed(text));
        Ok(())
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<(), E> {
        self.texts.push(Cow::Owned(text.to_owned()));
        Ok(())
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<(), E> {
        self.texts.push(Cow::Owned(text));
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Walk {
                texts: &mut *self.texts,
                error: None,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Walk { texts, mut error } = self;
        while let Some(key) = map.next_key_seed(Key)? {
            if key == "error" {
                if let Some(error) = error.as_deref_mut() {
                    *error = true;
                }
            }
            if NOT_OUTPUT.contains(&key.as_ref()) {
                map.next_value::<IgnoredAny>()?;
            } else {
                map.next_value_seed(Walk {
                    texts: &mut *texts,
                    error: None,
                })?;
            }
        }
        Ok(())
    }
}

/// An object's key, borrowed when it holds no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_borrowed_str<E: de::Error>(self, key: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(key))
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(key.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_strings_are_read_and_the_rest_skipped() {
        let reply = br#"{"id":"chatcmpl-1","object":"chat.completion","model":"m",
            "choices":[{"index":0,"message":{"role":"assistant","content":"Hello \"there\"",
            "tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},
            "finish_reason":"stop","logprobs":{"content":[{"token":"x"}]}}],
            "usage":{"prompt_tokens":1},"extra":[1,2.5,true,null,"last"]}"#;
        let texts = output_texts(reply).unwrap();
        assert_eq!(texts, ["Hello \"there\"", "{\"a\":1}", "last"]);
        // Unescaped strings are borrowed, not copied.
        assert!(matches!(texts[2], Cow::Borrowed(_)));
    }

    #[test]
    fn errors_and_what_is_not_json_are_not_read() {
        assert_eq!(output_texts(br#"{"error":{"message":"no"}}"#), None);
        assert_eq!(output_texts(br#"{"a":"x","error":null}"#), None);
        assert_eq!(output_texts(b"not json"), None);
        assert_eq!(output_texts(br#"{"a":"x"} trailing"#), None);
        // Only a top-level `error` makes it an error reply.
        assert_eq!(
            output_texts(br#"{"choices":[{"error":"x"}]}"#).unwrap(),
            ["x"]
        );
        assert_eq!(output_texts(br#""just text""#).unwrap(), ["just text"]);
    }

    #[test]
    fn every_copy_of_a_repeated_key_is_read() {
        assert_eq!(
            output_texts(br#"{"content":"a","content":"b"}"#).unwrap(),
            ["a", "b"]
        );
    }
}
