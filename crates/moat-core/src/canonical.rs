//! Canonical JSON (RFC 8785, the JSON Canonicalization Scheme): one byte form for one JSON
//! value whatever the order of its members, for what is hashed (the audit chain, cache keys).
//!
//! Object members sorted by their UTF-16 code units, no whitespace, strings escaped as JCS
//! (and serde_json) do, integers in decimal. A record is hashed over this form, so a reader that
//! re-serializes a record (another language, a log shipper) can still verify it. Records hold
//! integers only; a float is written as serde_json writes it, which matches JCS for the values a
//! record could carry but is not relied on.

use serde_json::{Map, Value};

/// Appends the canonical form of `value` to `out`.
pub fn write(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let (members, _) = sorted(map.iter());
            out.push(b'{');
            for (i, (key, value)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(key, out);
                out.push(b':');
                write(value, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(item, out);
            }
            out.push(b']');
        }
        Value::String(s) => write_str(s, out),
        // Null, booleans and numbers: serde_json's compact form is JCS's.
        other => serde_json::to_writer(&mut *out, other).expect("writing to a Vec cannot fail"),
    }
}

/// Whether `s` has a character above U+FFFF (a 4-byte UTF-8 sequence, a UTF-16 surrogate pair).
fn has_astral(s: &str) -> bool {
    s.bytes().any(|b| b >= 0xF0)
}

/// Orders strings as RFC 8785 sorts members: by their UTF-16 code units when `astral` (either
/// may hold a character above U+FFFF), else by their bytes. UTF-8 byte order is the same as
/// UTF-16's except where a character above U+FFFF meets one from U+E000 to U+FFFF.
fn order(a: &str, b: &str, astral: bool) -> std::cmp::Ordering {
    if astral {
        a.encode_utf16().cmp(b.encode_utf16())
    } else {
        a.as_bytes().cmp(b.as_bytes())
    }
}

/// An object's members in canonical order, and whether a key holds a character above U+FFFF.
/// The keys are looked at once, not at every comparison (a record's sort did that a few hundred
/// times); keys are unique, so an unstable sort orders them the same.
fn sorted<'a>(
    members: impl Iterator<Item = (&'a String, &'a Value)>,
) -> (Vec<(&'a String, &'a Value)>, bool) {
    let mut members: Vec<(&String, &Value)> = members.collect();
    let astral = members.iter().any(|(key, _)| has_astral(key));
    members.sort_unstable_by(|(a, _), (b, _)| order(a, b, astral));
    (members, astral)
}

/// The canonical form of the object `fields`, and the canonical form of it with a member
/// `name: text` added (a member it does not have), serializing the members once.
pub fn with_member(
    fields: &Map<String, Value>,
    name: &str,
    text: impl FnOnce(&[u8]) -> String,
) -> (Vec<u8>, Vec<u8>) {
    let (members, astral) = sorted(fields.iter());
    let astral = astral || has_astral(name);
    let mut without = Vec::with_capacity(1024);
    without.push(b'{');
    // Where the new member goes, and whether a member follows it.
    let mut slot = None;
    for (i, (key, value)) in members.iter().enumerate() {
        if slot.is_none() && order(key, name, astral).is_gt() {
            slot = Some((without.len(), i == 0));
        }
        if i > 0 {
            without.push(b',');
        }
        write_str(key, &mut without);
        without.push(b':');
        write(value, &mut without);
    }
    let (at, before_first) = slot.unwrap_or((without.len(), false));
    without.push(b'}');
    let mut member = Vec::with_capacity(name.len() + 80);
    if !before_first && !members.is_empty() {
        member.push(b',');
    }
    write_str(name, &mut member);
    member.push(b':');
    write_str(&text(&without), &mut member);
    if before_first {
        member.push(b',');
    }
    let mut with = Vec::with_capacity(without.len() + member.len());
    with.extend_from_slice(&without[..at]);
    with.extend_from_slice(&member);
    with.extend_from_slice(&without[at..]);
    (without, with)
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// The canonical form of `value` without the top-level members named in `skip` (when it is an
/// object), without copying the rest.
pub fn to_vec_without(value: &Value, skip: &[&str]) -> Vec<u8> {
    let Value::Object(map) = value else {
        return to_vec(value);
    };
    let (members, _) = sorted(map.iter().filter(|(key, _)| !skip.contains(&key.as_str())));
    let mut out = Vec::with_capacity(512);
    out.push(b'{');
    for (i, (key, value)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(key, &mut out);
        out.push(b':');
        write(value, &mut out);
    }
    out.push(b'}');
    out
}

/// The canonical form of `value`.
pub fn to_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    write(value, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn members_are_skipped_at_the_top_level_only() {
        let value = json!({"stream": true, "b": {"stream": 1}, "a": 2});
        assert_eq!(
            String::from_utf8(to_vec_without(&value, &["stream"])).unwrap(),
            r#"{"a":2,"b":{"stream":1}}"#
        );
        assert_eq!(to_vec_without(&json!([1]), &["x"]), to_vec(&json!([1])));
    }

    #[test]
    fn sorts_members_recursively_and_drops_whitespace() {
        let value = json!({"b": 1, "a": {"d": [true, null], "c": "x"}});
        assert_eq!(
            String::from_utf8(to_vec(&value)).unwrap(),
            r#"{"a":{"c":"x","d":[true,null]},"b":1}"#
        );
    }

    #[test]
    fn escapes_as_rfc_8785() {
        // The RFC's own string example: controls short or as lowercase \u00xx, the rest raw.
        let value = json!("\u{20ac}$\u{000F}\u{000a}A'\u{0042}\u{0022}\u{005c}\\\"/");
        assert_eq!(
            String::from_utf8(to_vec(&value)).unwrap(),
            "\"\u{20ac}$\\u000f\\nA'B\\\"\\\\\\\\\\\"/\""
        );
    }

    #[test]
    fn a_member_added_lands_where_a_full_serialization_puts_it() {
        for value in [
            json!({"a": 1, "z": {"hash": ",\"hash\":"}}),
            json!({"a": 1, "i": "x", "seq": 2}),
            json!({"prev": "p", "seq": 0, "type": "start"}),
            json!({"a": 1}),
            json!({}),
            // Only the added name has a character above U+FFFF: it still sorts before U+FB33.
            json!({"\u{fb33}": 1, "a": 2}),
        ] {
            for name in ["hash", "\u{1f600}"] {
                let fields = value.as_object().unwrap();
                let (without, with) = with_member(fields, name, |_| "abc".into());
                assert_eq!(without, to_vec(&value));
                let mut full = fields.clone();
                full.insert(name.into(), "abc".into());
                assert_eq!(
                    String::from_utf8(with).unwrap(),
                    String::from_utf8(to_vec(&Value::Object(full))).unwrap()
                );
            }
        }
    }

    #[test]
    fn orders_keys_by_utf16_code_units() {
        // RFC 8785 section 3.2.3: U+1F600 (a surrogate pair, 0xD83D...) sorts before U+FB33.
        let value =
            json!({"\u{fb33}": 1, "\u{1f600}": 2, "\r": 3, "1": 4, "\u{80}": 5, "\u{f6}": 6});
        let text = String::from_utf8(to_vec(&value)).unwrap();
        let order: Vec<usize> = ["\\r", "\"1\"", "\u{80}", "\u{f6}", "\u{1f600}", "\u{fb33}"]
            .iter()
            .map(|k| text.find(k).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
    }
}
