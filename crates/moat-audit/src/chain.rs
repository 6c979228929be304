//! The hash chain: every record carries a contiguous sequence number, the hash of the record
//! before it, and its own hash, SHA-256 over its canonical form without the `hash` member.

use moat_core::hex::{decode_32, Hex};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use moat_core::canonical;

/// The `prev` of the first record: 32 zero bytes.
pub const GENESIS: [u8; 32] = [0; 32];

/// Where a chain stands: the sequence number the next record gets and the hash of the last one
/// ([`GENESIS`] before the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The next record's sequence number (so also how many records there are).
    pub next_seq: u64,
    /// The hash of the last record.
    pub hash: [u8; 32],
}

impl Head {
    /// An empty chain.
    pub const EMPTY: Self = Self {
        next_seq: 0,
        hash: GENESIS,
    };
}

/// One chained record, ready for the sinks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its sequence number.
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
    /// Its canonical JSON, without a newline.
    pub line: Vec<u8>,
}

impl Record {
    /// The record's JSON text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.line).expect("records are JSON text")
    }
}

/// Chains records: each [`append`](Chain::append) numbers and links one.
#[derive(Debug)]
pub(crate) struct Chain {
    head: Head,
}

impl Chain {
    pub(crate) fn new(head: Head) -> Self {
        Self { head }
    }

    pub(crate) fn head(&self) -> Head {
        self.head
    }

    /// Numbers, links and hashes `fields` (an object without `seq`, `prev` or `hash`).
    pub(crate) fn append(&mut self, mut fields: Map<String, Value>) -> Record {
        let seq = self.head.next_seq;
        fields.insert("seq".into(), seq.into());
        fields.insert("prev".into(), hex(&self.head.hash).into());
        let mut hash = GENESIS;
        let (_, line) = canonical::with_member(&fields, "hash", |without| {
            hash = digest(without);
            hex(&hash)
        });
        self.head = Head {
            next_seq: seq + 1,
            hash,
        };
        Record { seq, hash, line }
    }
}

/// What a record says of itself, read back from its JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Links {
    pub(crate) seq: u64,
    pub(crate) prev: [u8; 32],
    /// The hash it claims.
    pub(crate) claimed: [u8; 32],
    /// The hash of its content.
    pub(crate) actual: [u8; 32],
    /// Its `type`, and the `count` of a `gap` or `refused` record.
    pub(crate) kind: Option<String>,
    pub(crate) count: Option<u64>,
}

/// Reads a record's links, or says why it is not a record.
pub(crate) fn links(line: &[u8]) -> Result<Links, &'static str> {
    // Strict: a member named twice would let a reader that takes the first copy see other
    // content than the hash covers.
    let mut value = moat_core::json::parse_strict(line)
        .map_err(|_| "not strict JSON (a key given twice, or not JSON)")?;
    let fields = value.as_object_mut().ok_or("not a JSON object")?;
    let claimed = fields
        .remove("hash")
        .and_then(|h| h.as_str().and_then(decode_32))
        .ok_or("no valid hash")?;
    let seq = fields
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or("no valid seq")?;
    let prev = fields
        .get("prev")
        .and_then(|p| p.as_str().and_then(decode_32))
        .ok_or("no valid prev")?;
    let kind = fields
        .get("type")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let count = fields.get("count").and_then(Value::as_u64);
    Ok(Links {
        seq,
        prev,
        claimed,
        actual: digest(&canonical::to_vec(&value)),
        kind,
        count,
    })
}

pub(crate) fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Lowercase hex of a digest, as records and checkpoints write it.
pub(crate) fn hex(bytes: &[u8]) -> String {
    Hex(bytes).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn records_link_and_verify() {
        let mut chain = Chain::new(Head::EMPTY);
        let a = chain.append(fields(json!({"type": "request", "n": 1})));
        let b = chain.append(fields(json!({"type": "request", "n": 2})));
        let la = links(&a.line).unwrap();
        let lb = links(&b.line).unwrap();
        assert_eq!((la.seq, la.prev), (0, GENESIS));
        assert_eq!(la.claimed, la.actual);
        assert_eq!(lb.prev, a.hash);
        assert_eq!(lb.claimed, b.hash);
        assert_eq!(
            chain.head(),
            Head {
                next_seq: 2,
                hash: b.hash
            }
        );
    }

    #[test]
    fn an_edit_changes_the_content_hash_but_whitespace_does_not() {
        let mut chain = Chain::new(Head::EMPTY);
        let r = chain.append(fields(json!({"status": 200})));
        let edited = r.as_str().replace("200", "201");
        let l = links(edited.as_bytes()).unwrap();
        assert_ne!(l.claimed, l.actual);
        let spaced = r.as_str().replace(",", ", ");
        let l = links(spaced.as_bytes()).unwrap();
        assert_eq!(l.claimed, l.actual);
    }

    #[test]
    fn hex_round_trips() {
        let bytes = digest(b"x");
        assert_eq!(decode_32(&hex(&bytes)), Some(bytes));
        assert_eq!(decode_32("zz"), None);
    }
}
