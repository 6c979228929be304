//! Replacing what was found, and putting it back.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use moat_core::identity::Fingerprinter;
use serde_json::Value;

use crate::cipher::Cipher;
use crate::detect::{Detector, Finding};
use crate::entity::Entity;
use crate::fake::fake;

/// How a found value is replaced.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum Operator {
    /// `[EMAIL_1]`-style placeholders, the same for the same value within a vault, restorable.
    #[default]
    Pseudonymize,
    /// `[EMAIL]`: gone for good.
    Redact,
    /// Every character but the last four replaced with `*` (separators kept).
    Mask,
    /// `[EMAIL#3fa91c0b]`: a keyed hash, equal for equal values, not restorable.
    Hash(Fingerprinter),
    /// `[EMAIL:…]`: AES-256-GCM under the [`Cipher`]'s key; restored in the reply, and opened by
    /// whoever holds the key (see [`Cipher::decrypt_str`]).
    Encrypt(Cipher),
    /// A realistic fake of the same kind (`alex.chen42@example.org`, a test-range card, an
    /// address from the documentation ranges), the same for the same value under the same seed.
    /// Fakes read naturally to a model but are not restored.
    Fake(Fingerprinter),
}

/// The values behind one request's (or one session's) placeholders.
///
/// A vault belongs to one request or one bounded session; values never move between vaults.
#[derive(Debug, Clone)]
pub struct Vault {
    by_value: HashMap<(Entity, String), String>,
    by_placeholder: HashMap<String, String>,
    counters: HashMap<Entity, u32>,
    limit: usize,
    longest: usize,
}

impl Default for Vault {
    fn default() -> Self {
        Self::with_limit(MAX_VAULT_ENTRIES)
    }
}

/// The most placeholders one vault hands out by default; past it values are redacted, not
/// restorable.
pub const MAX_VAULT_ENTRIES: usize = 10_000;

impl Vault {
    /// An empty vault.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty vault that holds at most `limit` values.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            by_value: HashMap::new(),
            by_placeholder: HashMap::new(),
            counters: HashMap::new(),
            limit,
            longest: 0,
        }
    }

    /// How many values it holds.
    pub fn len(&self) -> usize {
        self.by_placeholder.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.by_placeholder.is_empty()
    }

    /// The longest token it holds, in bytes: a stream holds back at most this much.
    pub fn longest(&self) -> usize {
        self.longest
    }

    fn remember(&mut self, entity: Entity, value: &str, token: String) {
        self.longest = self.longest.max(token.len());
        self.by_value
            .insert((entity, value.to_owned()), token.clone());
        self.by_placeholder.insert(token, value.to_owned());
    }

    fn placeholder(&mut self, entity: Entity, value: &str) -> String {
        if let Some(p) = self.by_value.get(&(entity, value.to_owned())) {
            return p.clone();
        }
        if self.by_placeholder.len() >= self.limit {
            return format!("[{}]", entity.label());
        }
        let n = self.counters.entry(entity).or_insert(0);
        *n += 1;
        let p = format!("[{}_{}]", entity.label(), n);
        self.remember(entity, value, p.clone());
        p
    }

    /// Records an encrypted token so the reply to this request is restored without the key.
    fn sealed(&mut self, entity: Entity, value: &str, cipher: &Cipher) -> String {
        if let Some(p) = self.by_value.get(&(entity, value.to_owned())) {
            return p.clone();
        }
        let token = cipher.seal(entity, value);
        if self.by_placeholder.len() < self.limit {
            self.remember(entity, value, token.clone());
        }
        token
    }

    /// The value behind a placeholder.
    pub fn value(&self, placeholder: &str) -> Option<&str> {
        self.by_placeholder.get(placeholder).map(String::as_str)
    }
}

/// Finds entities and replaces them. Clones share the detector.
///
/// ```
/// use moat_redact::{Entity, Operator, Redactor, Vault};
///
/// let redactor = Redactor::new(&Entity::ALL).with_operator_for(Entity::CreditCard, Operator::Mask);
/// let mut vault = Vault::new();
/// let out = redactor.redact_str("mail jane@example.com, card 4111 1111 1111 1111", &mut vault);
/// assert_eq!(out.text, "mail [EMAIL_1], card **** **** **** 1111");
/// assert_eq!(redactor.restore_str("Wrote to [EMAIL_1].", &vault), "Wrote to jane@example.com.");
/// ```
#[derive(Debug, Clone)]
pub struct Redactor {
    detector: Arc<Detector>,
    operator: Operator,
    per_entity: HashMap<Entity, Operator>,
}

/// A redacted text and how many values were replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redacted<'a> {
    /// The text; borrowed when nothing was found.
    pub text: Cow<'a, str>,
    /// How many values were replaced.
    pub count: usize,
}

fn mask(value: &str) -> String {
    let total = value.chars().filter(char::is_ascii_alphanumeric).count();
    let mut seen = 0;
    value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                seen += 1;
                if seen + 4 > total {
                    c
                } else {
                    '*'
                }
            } else {
                c
            }
        })
        .collect()
}

impl From<Detector> for Redactor {
    fn from(detector: Detector) -> Self {
        Self {
            detector: Arc::new(detector),
            operator: Operator::default(),
            per_entity: HashMap::new(),
        }
    }
}

impl Redactor {
    /// A redactor for these entities, with placeholder pseudonyms. For thresholds, allow and deny
    /// lists, build a [`Detector`] and convert it: `Redactor::from(detector)`.
    pub fn new(entities: &[Entity]) -> Self {
        Self::from(Detector::new(entities))
    }

    /// Replaces values with `operator` (entities without one of their own).
    #[must_use]
    pub fn with_operator(mut self, operator: Operator) -> Self {
        self.operator = operator;
        self
    }

    /// Replaces values of `entity` with `operator`.
    #[must_use]
    pub fn with_operator_for(mut self, entity: Entity, operator: Operator) -> Self {
        self.per_entity.insert(entity, operator);
        self
    }

    /// The detector.
    pub fn detector(&self) -> &Detector {
        &self.detector
    }

    /// The same detector with `[EMAIL]`-style redaction for everything: what replies are
    /// scrubbed with.
    pub(crate) fn redacting(&self) -> Redactor {
        Redactor {
            detector: self.detector.clone(),
            operator: Operator::Redact,
            per_entity: HashMap::new(),
        }
    }

    /// Replaces every entity in `text`; placeholders go into `vault`.
    pub fn redact_str<'a>(&self, text: &'a str, vault: &mut Vault) -> Redacted<'a> {
        let found = self.detector.find(text);
        self.replace(text, &found, vault)
    }

    /// Replaces `found` (from this redactor's detector) in `text`.
    pub(crate) fn replace<'a>(
        &self,
        text: &'a str,
        found: &[Finding],
        vault: &mut Vault,
    ) -> Redacted<'a> {
        if found.is_empty() {
            return Redacted {
                text: Cow::Borrowed(text),
                count: 0,
            };
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for f in found {
            out.push_str(&text[at..f.start]);
            let value = &text[f.start..f.end];
            let label = f.entity.label();
            match self.per_entity.get(&f.entity).unwrap_or(&self.operator) {
                Operator::Pseudonymize => out.push_str(&vault.placeholder(f.entity, value)),
                Operator::Redact => {
                    out.push('[');
                    out.push_str(label);
                    out.push(']');
                }
                Operator::Mask => out.push_str(&mask(value)),
                Operator::Hash(fp) => {
                    let digest = fp.fingerprint(value.as_bytes()).to_string();
                    out.push_str(&format!("[{label}#{}]", &digest[..8]));
                }
                Operator::Encrypt(cipher) => out.push_str(&vault.sealed(f.entity, value, cipher)),
                Operator::Fake(seed) => out.push_str(&fake(f.entity, value, seed)),
            }
            at = f.end;
        }
        out.push_str(&text[at..]);
        Redacted {
            text: Cow::Owned(out),
            count: found.len(),
        }
    }

    /// Redacts every string in a JSON document, in place; returns how many values were
    /// replaced. (The audit layer scrubs its records this way.)
    pub fn redact_json(&self, value: &mut Value, vault: &mut Vault) -> usize {
        match value {
            Value::String(s) => {
                let redacted = self.redact_str(s, vault);
                let count = redacted.count;
                if let Cow::Owned(text) = redacted.text {
                    *s = text;
                }
                count
            }
            Value::Array(items) => items.iter_mut().map(|v| self.redact_json(v, vault)).sum(),
            Value::Object(map) => map.values_mut().map(|v| self.redact_json(v, vault)).sum(),
            _ => 0,
        }
    }

    /// Puts the vault's values back for its placeholders; anything else is left as is.
    pub fn restore_str<'a>(&self, text: &'a str, vault: &Vault) -> Cow<'a, str> {
        restore(text, vault, false)
    }

    /// Restores every string in a JSON document, in place; returns how many were changed. A
    /// string that holds a JSON document itself (tool-call `arguments`) is restored inside and
    /// written back, so values with quotes stay correctly escaped.
    pub fn restore_json(&self, value: &mut Value, vault: &Vault) -> usize {
        match value {
            Value::String(s) => {
                let embedded = (s.trim_start().starts_with(['{', '[']) && s.contains('['))
                    .then(|| serde_json::from_str::<Value>(s).ok())
                    .flatten()
                    .filter(|v| v.is_object() || v.is_array());
                if let Some(mut doc) = embedded {
                    let changed = self.restore_json(&mut doc, vault);
                    if changed > 0 {
                        *s = doc.to_string();
                    }
                    return changed;
                }
                match restore(s, vault, false) {
                    Cow::Owned(restored) => {
                        *s = restored;
                        1
                    }
                    Cow::Borrowed(_) => 0,
                }
            }
            Value::Array(items) => items.iter_mut().map(|v| self.restore_json(v, vault)).sum(),
            Value::Object(map) => map.values_mut().map(|v| self.restore_json(v, vault)).sum(),
            _ => 0,
        }
    }
}

/// Replaces placeholders with their values; with `json`, the values are escaped for the inside of
/// a JSON string (for streamed fragments of JSON such as tool-call arguments).
fn restore<'a>(text: &'a str, vault: &Vault, json: bool) -> Cow<'a, str> {
    if vault.is_empty() || !text.contains('[') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        // A token is at most `longest` bytes: look no further for its `]` (text full of `[`
        // stays linear).
        let window = &tail.as_bytes()[..tail.len().min(vault.longest())];
        let close = window.iter().position(|&b| b == b']');
        match close
            .map(|c| &tail[..=c])
            .and_then(|p| vault.value(p).map(|v| (p, v)))
        {
            Some((p, value)) => {
                if json {
                    let quoted = serde_json::to_string(value).unwrap_or_default();
                    out.push_str(&quoted[1..quoted.len() - 1]);
                } else {
                    out.push_str(value);
                }
                rest = &tail[p.len()..];
                changed = true;
            }
            None => {
                out.push('[');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(text)
    }
}

/// Restores placeholders in text that arrives in pieces (a streamed reply), holding back only
/// the longest tail that could still be the start of a placeholder (shorter than the vault's
/// longest token). The output is the same however the text is split.
#[derive(Debug, Clone, Default)]
pub struct StreamRestorer {
    held: String,
    json: bool,
}

impl StreamRestorer {
    /// A restorer for plain text.
    pub fn new() -> Self {
        Self::default()
    }

    /// A restorer for a stream of JSON text (tool-call argument fragments): values are escaped
    /// as JSON string content.
    pub fn json() -> Self {
        Self {
            held: String::new(),
            json: true,
        }
    }

    /// Takes the next piece; returns what can be emitted now.
    pub fn push(&mut self, piece: &str, vault: &Vault) -> String {
        self.held.push_str(piece);
        let keep_from = self.hold_from(vault.longest());
        let ready: String = self.held.drain(..keep_from).collect();
        restore(&ready, vault, self.json).into_owned()
    }

    /// Ends the stream: returns everything still held.
    pub fn finish(&mut self, vault: &Vault) -> String {
        let rest = std::mem::take(&mut self.held);
        restore(&rest, vault, self.json).into_owned()
    }

    /// Bytes held back now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Where the held tail starts: the last `[` whose tail may still grow into a token of at
    /// most `longest` bytes (labels, digits, `_`, and the base64url of encrypted tokens).
    fn hold_from(&self, longest: usize) -> usize {
        let bytes = self.held.as_bytes();
        let window = bytes.len().saturating_sub(longest.saturating_sub(1));
        for i in (window..bytes.len()).rev() {
            if bytes[i] == b'[' {
                let tail = &bytes[i + 1..];
                if tail
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-'))
                {
                    return i;
                }
                return bytes.len();
            }
        }
        bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vault_with(values: &[(Entity, &str)]) -> Vault {
        let mut v = Vault::new();
        for (e, s) in values {
            v.placeholder(*e, s);
        }
        v
    }

    #[test]
    fn operators() {
        let text = "pay with 4111 1111 1111 1111, mail jane@example.com";
        let mut vault = Vault::new();
        let r = Redactor::new(&Entity::ALL);
        assert_eq!(
            r.redact_str(text, &mut vault).text,
            "pay with [CARD_1], mail [EMAIL_1]"
        );
        let r = Redactor::new(&Entity::ALL).with_operator(Operator::Redact);
        assert_eq!(
            r.redact_str(text, &mut Vault::new()).text,
            "pay with [CARD], mail [EMAIL]"
        );
        let r = Redactor::new(&[Entity::CreditCard]).with_operator(Operator::Mask);
        assert_eq!(
            r.redact_str(text, &mut Vault::new()).text,
            "pay with **** **** **** 1111, mail jane@example.com"
        );
        let r = Redactor::new(&[Entity::Email])
            .with_operator(Operator::Hash(Fingerprinter::new(b"salt")));
        let once = r.redact_str("a@b.co", &mut Vault::new()).text.into_owned();
        assert!(
            once.starts_with("[EMAIL#") && once.len() == "[EMAIL#".len() + 9,
            "{once}"
        );
        assert_eq!(r.redact_str("a@b.co", &mut Vault::new()).text, once);
        assert!(matches!(
            Redactor::new(&Entity::ALL)
                .redact_str("nothing here", &mut vault)
                .text,
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn restore_text_and_json_with_escaping() {
        let vault = vault_with(&[
            (Entity::Email, "jane\"o'hara@example.com"),
            (Entity::Phone, "+44 20 7946 0958"),
        ]);
        let r = Redactor::new(&Entity::ALL);
        assert_eq!(
            r.restore_str("[EMAIL_1] / [PHONE_1] / [EMAIL_2] / [x]", &vault),
            "jane\"o'hara@example.com / +44 20 7946 0958 / [EMAIL_2] / [x]"
        );
        let mut doc = serde_json::json!({"choices": [{"message": {"content": "to [EMAIL_1]", "tool_calls": [{"function": {"arguments": "{\"to\":\"[EMAIL_1]\"}"}}]}}]});
        assert_eq!(r.restore_json(&mut doc, &vault), 2);
        let serialized = doc.to_string();
        let back: Value = serde_json::from_str(&serialized).unwrap();
        assert_eq!(
            back["choices"][0]["message"]["content"],
            "to jane\"o'hara@example.com"
        );
        let args: Value = serde_json::from_str(
            back["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap(),
        )
        .expect("the arguments are still valid JSON after restoring a value with quotes");
        assert_eq!(args["to"], "jane\"o'hara@example.com");
        // Streamed argument fragments are escaped as JSON string content.
        let mut r = StreamRestorer::json();
        let streamed =
            r.push("{\"to\":\"[EMA", &vault) + &r.push("IL_1]\"}", &vault) + &r.finish(&vault);
        let parsed: Value = serde_json::from_str(&streamed).expect("valid JSON");
        assert_eq!(parsed["to"], "jane\"o'hara@example.com");
    }

    #[test]
    fn per_entity_operators_encrypt_and_fake() {
        let cipher = Cipher::new(&[3; 32]);
        let r = Redactor::new(&Entity::ALL)
            .with_operator(Operator::Encrypt(cipher.clone()))
            .with_operator_for(Entity::CreditCard, Operator::Mask)
            .with_operator_for(Entity::IpAddress, Operator::Fake(Fingerprinter::new(b"s")));
        let mut vault = Vault::new();
        let text = "mail jane@example.com, card 4111 1111 1111 1111, from 10.1.2.3";
        let out = r.redact_str(text, &mut vault).text.into_owned();
        assert!(out.starts_with("mail [EMAIL:"), "{out}");
        assert!(
            out.contains("card **** **** **** 1111, from 192.0.2."),
            "{out}"
        );
        assert!(!out.contains("jane"));
        // The key opens it anywhere; the request's vault restores it without the key.
        assert!(cipher
            .decrypt_str(&out)
            .starts_with("mail jane@example.com,"));
        let token = &out[5..out.find(']').unwrap() + 1];
        assert_eq!(
            r.restore_str(&format!("Sent to {token}."), &vault),
            "Sent to jane@example.com."
        );
        // Streamed, the long token is held back whole and restored, however it is split.
        let reply = format!("Sent to {token}. Bye [EMAIL");
        for cut in (0..=reply.len()).filter(|&c| reply.is_char_boundary(c)) {
            let mut s = StreamRestorer::new();
            let got =
                s.push(&reply[..cut], &vault) + &s.push(&reply[cut..], &vault) + &s.finish(&vault);
            assert_eq!(got, "Sent to jane@example.com. Bye [EMAIL", "cut at {cut}");
        }
    }

    #[test]
    fn json_documents_are_redacted_in_every_string() {
        let r = Redactor::new(&Entity::ALL);
        let mut vault = Vault::new();
        let mut doc =
            serde_json::json!({"user": "jane@example.com", "n": 1, "tags": ["ok", "ip 10.0.0.1"]});
        assert_eq!(r.redact_json(&mut doc, &mut vault), 2);
        assert_eq!(
            doc,
            serde_json::json!({"user": "[EMAIL_1]", "n": 1, "tags": ["ok", "ip [IP_1]"]})
        );
    }

    #[test]
    fn vaults_are_bounded() {
        let mut v = Vault::new();
        for i in 0..MAX_VAULT_ENTRIES + 5 {
            v.placeholder(Entity::Email, &format!("u{i}@x.io"));
        }
        assert_eq!(v.len(), MAX_VAULT_ENTRIES);
        assert_eq!(v.placeholder(Entity::Email, "late@x.io"), "[EMAIL]");
        let mut small = Vault::with_limit(2);
        for i in 0..5 {
            small.placeholder(Entity::Phone, &format!("+44 20 7946 000{i}"));
        }
        assert_eq!(small.len(), 2);
    }

    const REPLY: &str = "Dear [EMAIL_1], your card [CARD_1] and [EMAIL_1] — not [EMAIL_9] nor [lower] nor [ unclosed [CARD_";

    proptest! {
        #[test]
        fn streamed_restore_is_the_same_for_every_split(cuts in proptest::collection::vec(0..REPLY.len(), 0..10)) {
            let vault = vault_with(&[(Entity::Email, "jane@example.com"), (Entity::CreditCard, "4111 1111 1111 1111")]);
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| REPLY.is_char_boundary(c)).collect();
            cuts.sort_unstable();
            let mut restorer = StreamRestorer::new();
            let mut out = String::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain([REPLY.len()]) {
                out.push_str(&restorer.push(&REPLY[start..cut], &vault));
                prop_assert!(restorer.held() < vault.longest());
                start = cut;
            }
            out.push_str(&restorer.finish(&vault));
            prop_assert_eq!(out, restore(REPLY, &vault, false).into_owned());
        }
    }

    #[test]
    fn every_single_split_point_and_one_char_at_a_time() {
        let vault = vault_with(&[
            (Entity::Email, "jane@example.com"),
            (Entity::CreditCard, "4111 1111 1111 1111"),
        ]);
        let whole = restore(REPLY, &vault, false).into_owned();
        assert!(whole.starts_with("Dear jane@example.com, your card 4111 1111 1111 1111"));
        for cut in (0..=REPLY.len()).filter(|&c| REPLY.is_char_boundary(c)) {
            let mut r = StreamRestorer::new();
            let out =
                r.push(&REPLY[..cut], &vault) + &r.push(&REPLY[cut..], &vault) + &r.finish(&vault);
            assert_eq!(out, whole, "cut at {cut}");
        }
        let mut r = StreamRestorer::new();
        let mut out = String::new();
        for c in REPLY.chars() {
            out.push_str(&r.push(&c.to_string(), &vault));
        }
        out.push_str(&r.finish(&vault));
        assert_eq!(out, whole);
    }
}
