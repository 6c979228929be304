//! Canonical JSON (RFC 8785, the JSON Canonicalization Scheme) for what the chain hashes.
//!
//! Object members sorted by their UTF-16 code units, no whitespace, strings escaped as JCS
//! (and serde_json) do, integers in decimal. A record is hashed over this form, so a reader that
//! re-serializes a record (another language, a log shipper) can still verify it. Records hold
//! integers only; a float is written as serde_json writes it, which matches JCS for the values a
//! record could carry but is not relied on.

use serde_json::Value;

/// Appends the canonical form of `value` to `out`.
pub(crate) fn write(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
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

fn write_str(s: &str, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// The canonical form of `value`.
pub(crate) fn to_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    write(value, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
