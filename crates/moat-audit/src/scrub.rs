//! What keeps secrets and forged lines out of the log.
//!
//! Bodies (logged only at the `request` and `request_response` levels) go through a
//! [`Scrubber`] before they are written; the API key the request presented is always replaced,
//! whatever the scrubber. Every string of a record has its control characters escaped, so no
//! field can start a new line, move the cursor or reorder text in a terminal.

use std::borrow::Cow;
use std::fmt;

use serde_json::Value;

/// Removes secrets and personal data from a body before it is logged. Runs on the log's
/// writer thread, never on the request path.
///
/// Closures `Fn(&str) -> String` are scrubbers; moat-redact's detector plugs in as one (the
/// gateway does this).
pub trait Scrubber: Send + Sync + 'static {
    /// `text` with what must not be logged replaced.
    fn scrub(&self, text: &str) -> String;
}

impl<F> Scrubber for F
where
    F: Fn(&str) -> String + Send + Sync + 'static,
{
    fn scrub(&self, text: &str) -> String {
        self(text)
    }
}

/// Leaves bodies as they are (the presented key is still removed).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoScrub;

impl Scrubber for NoScrub {
    fn scrub(&self, text: &str) -> String {
        text.to_owned()
    }
}

/// Replaces known secret values (client keys, the provider key) wherever they appear.
#[derive(Clone, Default)]
pub struct Literals {
    secrets: Vec<String>,
}

impl fmt::Debug for Literals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Literals")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

/// What a removed secret is replaced with.
pub const REDACTED: &str = "[REDACTED]";

impl Literals {
    /// Replaces each of `secrets` (empty ones and those under 8 bytes are ignored: too short
    /// to be a key, too likely to be ordinary text).
    pub fn new<I, S>(secrets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut secrets: Vec<String> = secrets
            .into_iter()
            .map(Into::into)
            .filter(|s| s.len() >= 8)
            .collect();
        // Longest first, so a key that contains another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Self { secrets }
    }
}

impl Scrubber for Literals {
    fn scrub(&self, text: &str) -> String {
        let mut out = Cow::Borrowed(text);
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), REDACTED));
            }
        }
        out.into_owned()
    }
}

/// Whether `c` must not reach a log line as it is: C0 and C1 controls, DEL, the line and
/// paragraph separators, and the bidirectional overrides and isolates.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every unsafe character written as `\u{XXXX}` and every backslash doubled, so the
/// escape is reversible and cannot be faked.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    // Most strings are printable ASCII: one pass over bytes settles them; other text is read
    // as characters.
    let plain = |b: u8| (0x20..0x7f).contains(&b) && b != b'\\';
    if text.bytes().all(plain) || !text.chars().any(|c| c == '\\' || is_unsafe(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if is_unsafe(c) => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Escapes every string in `value`, keys included.
pub(crate) fn escape_all(value: &mut Value) {
    match value {
        Value::String(s) => {
            if let Cow::Owned(escaped) = escape_controls(s) {
                *s = escaped;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(escape_all),
        Value::Object(map) => {
            let unsafe_keys: Vec<String> = map
                .keys()
                .filter(|k| matches!(escape_controls(k), Cow::Owned(_)))
                .cloned()
                .collect();
            for key in unsafe_keys {
                if let Some(v) = map.remove(&key) {
                    map.insert(escape_controls(&key).into_owned(), v);
                }
            }
            map.values_mut().for_each(escape_all);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_bidi_are_escaped_and_escapes_cannot_be_faked() {
        assert_eq!(escape_controls("plain text é 🎉"), "plain text é 🎉");
        assert_eq!(
            escape_controls("a\nb\u{1b}[31m\u{85}\u{2028}\u{202e}"),
            "a\\u{000a}b\\u{001b}[31m\\u{0085}\\u{2028}\\u{202e}"
        );
        assert_eq!(escape_controls("x\\u{000a}"), "x\\\\u{000a}");
        assert_eq!(escape_controls("a\\b"), "a\\\\b");
        // A backslash before a newline and the text of an escape stay apart.
        assert_ne!(escape_controls("\\\n"), escape_controls("\\u{000a}"));
    }

    #[test]
    fn literals_replace_longest_first_and_ignore_short_values() {
        let s = Literals::new(["sk-live-abcdefgh", "sk-live-abcdefgh-extra", "abc"]);
        assert_eq!(
            s.scrub("use sk-live-abcdefgh-extra or sk-live-abcdefgh, abc"),
            "use [REDACTED] or [REDACTED], abc"
        );
    }

    #[test]
    fn escape_all_reaches_keys_and_nested_values() {
        let mut v = serde_json::json!({"a\nb": ["x\ry", {"k": "\u{7f}"}]});
        escape_all(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"a\\u{000a}b": ["x\\u{000d}y", {"k": "\\u{007f}"}]})
        );
    }
}
