//! Rewriting replies: new personal data scrubbed (optional), placeholders restored, in JSON and
//! in OpenAI chat/completions, Responses and Anthropic streams.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use moat_core::sse::SseEvent;
use serde_json::{json, Value};

use crate::detect::Finding;
use crate::redactor::{Redactor, StreamRestorer, Vault};
use crate::session::{lock, SharedVault};

/// The most a [`StreamRedactor`] holds back, in bytes: a value longer than this that arrives
/// across chunks may be cut before it is recognised.
pub const MAX_CARRY: usize = 1024;

/// Held back at the end of every piece: values with spaces in them (a spaced IBAN is up to 42
/// bytes) may still be arriving.
const TAIL: usize = 48;

/// Context kept from text already sent, so a context word before a value still counts.
const CONTEXT: usize = 64;

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Redacts personal data in text that arrives in pieces (a streamed reply), holding back a
/// bounded carry: the trailing ASCII word (a key or an address still arriving), the last 48
/// bytes, and any value that reaches into them, never more than [`MAX_CARRY`].
///
/// ```
/// use moat_redact::{Entity, Operator, Redactor, StreamRedactor};
///
/// let redactor = Redactor::new(&Entity::ALL).with_operator(Operator::Redact);
/// let mut scrub = StreamRedactor::new();
/// let mut out = scrub.push("Write to jane.d", &redactor);
/// out += &scrub.push("oe@example.com today.", &redactor);
/// out += &scrub.finish(&redactor);
/// assert_eq!(out, "Write to [EMAIL] today.");
/// ```
#[derive(Debug, Clone, Default)]
pub struct StreamRedactor {
    /// The end of what was already sent (unredacted, for context words and boundaries), then
    /// what is held: one buffer, scanned as it is.
    buf: String,
    /// Where the held text starts in `buf`.
    sent: usize,
}

impl StreamRedactor {
    /// An empty one.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held back now.
    pub fn held(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// Takes the next piece; returns what can be sent now, redacted.
    pub fn push(&mut self, piece: &str, redactor: &Redactor) -> String {
        self.buf.push_str(piece);
        let found = self.scan(redactor);
        let held = &self.buf[self.sent..];
        let len = held.len();
        let word = held
            .bytes()
            .rposition(|b| !b.is_ascii_graphic())
            .map_or(0, |i| i + 1);
        let mut cut = floor_boundary(held, len.saturating_sub(TAIL)).min(word);
        if let Some(f) = found.iter().find(|f| f.start < cut && f.end > cut) {
            cut = f.start;
        }
        if len - cut > MAX_CARRY {
            cut = floor_boundary(held, len - MAX_CARRY);
            if let Some(f) = found.iter().find(|f| f.start < cut && f.end > cut) {
                cut = f.end;
            }
        }
        let sending: Vec<Finding> = found.into_iter().filter(|f| f.end <= cut).collect();
        self.send(cut, &sending, redactor)
    }

    /// Ends the stream: returns everything still held, redacted.
    pub fn finish(&mut self, redactor: &Redactor) -> String {
        let found = self.scan(redactor);
        self.send(self.held(), &found, redactor)
    }

    /// Findings in the held text (scanned after the sent context), relative to the held text.
    fn scan(&self, redactor: &Redactor) -> Vec<Finding> {
        redactor
            .detector()
            .find(&self.buf)
            .into_iter()
            .filter(|f| f.start >= self.sent)
            .map(|f| Finding {
                start: f.start - self.sent,
                end: f.end - self.sent,
                ..f
            })
            .collect()
    }

    /// Sends the first `cut` held bytes, redacted; keeps the last 64 of them as context.
    fn send(&mut self, cut: usize, found: &[Finding], redactor: &Redactor) -> String {
        let end = self.sent + cut;
        let out = redactor
            .replace(&self.buf[self.sent..end], found, &mut Vault::new())
            .text
            .into_owned();
        let keep_from = floor_boundary(&self.buf, end.saturating_sub(CONTEXT));
        self.buf.drain(..keep_from);
        self.sent = end - keep_from;
        out
    }
}

/// What a reply goes through: scrubbing of new values (optional), then restoring.
#[derive(Clone)]
pub(crate) struct Rewriter {
    pub(crate) redactor: Arc<Redactor>,
    pub(crate) scrub: Option<Arc<Redactor>>,
    pub(crate) vault: SharedVault,
    pub(crate) restore: bool,
}

/// One streamed text (a choice's content, a tool call's arguments, a content block).
struct TextStream {
    scrub: StreamRedactor,
    restore: StreamRestorer,
}

/// Which API the stream speaks, for the events written for text held at the end.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Dialect {
    #[default]
    OpenAi,
    Anthropic,
    Responses,
}

/// The open text streams of one response: (choice, block or output item, is arguments).
#[derive(Default)]
pub(crate) struct Streams {
    open: HashMap<(u64, bool), TextStream>,
    dialect: Dialect,
}

impl Rewriter {
    /// Every string of a JSON document: scrubbed, then restored. Whether anything changed.
    pub(crate) fn json(&self, doc: &mut Value) -> bool {
        let mut changed = 0;
        if let Some(scrub) = &self.scrub {
            changed += scrub.redact_json(doc, &mut Vault::new());
        }
        if self.restore {
            changed += self.redactor.restore_json(doc, &lock(&self.vault));
        }
        changed > 0
    }

    fn push(&self, streams: &mut Streams, key: (u64, bool), piece: &str) -> String {
        let stream = streams.open.entry(key).or_insert_with(|| TextStream {
            scrub: StreamRedactor::new(),
            restore: if key.1 {
                StreamRestorer::json()
            } else {
                StreamRestorer::new()
            },
        });
        let scrubbed = match &self.scrub {
            Some(scrub) => stream.scrub.push(piece, scrub),
            None => piece.to_owned(),
        };
        if self.restore {
            stream.restore.push(&scrubbed, &lock(&self.vault))
        } else {
            scrubbed
        }
    }

    fn flush(&self, streams: &mut Streams, key: (u64, bool)) -> String {
        let Some(mut stream) = streams.open.remove(&key) else {
            return String::new();
        };
        let vault = lock(&self.vault);
        let mut out = String::new();
        if let Some(scrub) = &self.scrub {
            let rest = stream.scrub.finish(scrub);
            out = if self.restore {
                stream.restore.push(&rest, &vault)
            } else {
                rest
            };
        }
        if self.restore {
            out.push_str(&stream.restore.finish(&vault));
        }
        out
    }

    /// Rewrites one streamed event; returns the bytes to send.
    pub(crate) fn event(&self, streams: &mut Streams, event: &SseEvent) -> Bytes {
        let Some(mut doc) = event.json() else {
            if event.is_done() {
                let mut out = self.held(streams);
                out.extend_from_slice(event.raw());
                return out.freeze();
            }
            return event.raw().clone();
        };
        let kind = doc.get("type").and_then(Value::as_str).map(str::to_owned);
        let mut before = BytesMut::new();
        let changed = match kind.as_deref() {
            Some(t) if t.starts_with("response.") => {
                streams.dialect = Dialect::Responses;
                self.responses_event(streams, t, &mut doc, &mut before)
            }
            Some("content_block_delta" | "content_block_stop") => {
                streams.dialect = Dialect::Anthropic;
                self.anthropic_event(streams, &mut doc, &mut before)
            }
            _ if doc.get("choices").is_some() => self.openai_chunk(streams, &mut doc),
            _ => self.json(&mut doc),
        };
        if !changed && before.is_empty() {
            return event.raw().clone();
        }
        if changed {
            before.extend_from_slice(SseEvent::new(event.event(), &doc.to_string()).raw());
        } else {
            before.extend_from_slice(event.raw());
        }
        before.freeze()
    }

    /// OpenAI chat and completions chunks: content, text and tool-call argument deltas; what a
    /// choice held goes out with its `finish_reason`.
    fn openai_chunk(&self, streams: &mut Streams, doc: &mut Value) -> bool {
        let mut changed = false;
        let Some(Value::Array(choices)) = doc.get_mut("choices") else {
            return false;
        };
        for choice in choices.iter_mut() {
            let i = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let finishing = choice.get("finish_reason").is_some_and(|f| !f.is_null());
            if let Some(Value::String(text)) = choice.get_mut("text") {
                *text = self.push(streams, (i, false), text);
                if finishing {
                    text.push_str(&self.flush(streams, (i, false)));
                }
                changed = true;
                continue;
            }
            let Some(delta) = choice.get_mut("delta").and_then(Value::as_object_mut) else {
                continue;
            };
            if let Some(Value::String(text)) = delta.get_mut("content") {
                *text = self.push(streams, (i, false), text);
                changed = true;
            }
            if let Some(Value::Array(calls)) = delta.get_mut("tool_calls") {
                for call in calls.iter_mut() {
                    let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                    if let Some(Value::String(args)) = call.pointer_mut("/function/arguments") {
                        *args = self.push(streams, ((i << 16) | index, true), args);
                        changed = true;
                    }
                }
            }
            if finishing {
                let held = self.flush(streams, (i, false));
                if !held.is_empty() {
                    let content = delta
                        .entry("content")
                        .or_insert(Value::String(String::new()));
                    if let Value::String(text) = content {
                        text.push_str(&held);
                    }
                    changed = true;
                }
            }
        }
        changed
    }

    /// Anthropic content blocks: text and `partial_json` deltas; what a block held goes out
    /// before its `content_block_stop`.
    fn anthropic_event(
        &self,
        streams: &mut Streams,
        doc: &mut Value,
        before: &mut BytesMut,
    ) -> bool {
        let i = doc.get("index").and_then(Value::as_u64).unwrap_or(0);
        if doc.get("type").and_then(Value::as_str) == Some("content_block_stop") {
            for args in [false, true] {
                before.extend_from_slice(&self.held_event(Dialect::Anthropic, (i, args), streams));
            }
            return false;
        }
        if let Some(Value::String(text)) = doc.pointer_mut("/delta/text") {
            *text = self.push(streams, (i, false), text);
            true
        } else if let Some(Value::String(text)) = doc.pointer_mut("/delta/partial_json") {
            *text = self.push(streams, (i, true), text);
            true
        } else {
            false
        }
    }

    /// Responses API events: text and argument deltas by output item and content part; the
    /// `.done` events carry the whole text, which is rewritten as a whole; every other event
    /// (`response.completed`, items and parts done) has each of its strings rewritten.
    fn responses_event(
        &self,
        streams: &mut Streams,
        kind: &str,
        doc: &mut Value,
        before: &mut BytesMut,
    ) -> bool {
        let output = doc.get("output_index").and_then(Value::as_u64).unwrap_or(0);
        let part = doc
            .get("content_index")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let key = match kind {
            "response.output_text.delta" | "response.output_text.done" => {
                ((output << 16) | part, false)
            }
            "response.function_call_arguments.delta" | "response.function_call_arguments.done" => {
                (output << 16, true)
            }
            _ => return self.json(doc),
        };
        if kind.ends_with(".delta") {
            if let Some(Value::String(delta)) = doc.get_mut("delta") {
                *delta = self.push(streams, key, delta);
                return true;
            }
            return false;
        }
        before.extend_from_slice(&self.held_event(Dialect::Responses, key, streams));
        self.json(doc)
    }

    /// The event that carries what one stream still holds, in the stream's dialect.
    fn held_event(&self, dialect: Dialect, key: (u64, bool), streams: &mut Streams) -> BytesMut {
        let held = self.flush(streams, key);
        let mut out = BytesMut::new();
        if held.is_empty() {
            return out;
        }
        let (i, args) = key;
        let (name, data) = match (dialect, args) {
            (Dialect::OpenAi, false) => (
                None,
                json!({"choices": [{"index": i, "delta": {"content": held}}]}),
            ),
            (Dialect::OpenAi, true) => (
                None,
                json!({"choices": [{"index": i >> 16, "delta": {"tool_calls": [{"index": i & 0xffff, "function": {"arguments": held}}]}}]}),
            ),
            (Dialect::Anthropic, false) => (
                Some("content_block_delta"),
                json!({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": held}}),
            ),
            (Dialect::Anthropic, true) => (
                Some("content_block_delta"),
                json!({"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": held}}),
            ),
            (Dialect::Responses, false) => (
                Some("response.output_text.delta"),
                json!({"type": "response.output_text.delta", "output_index": i >> 16, "content_index": i & 0xffff, "delta": held}),
            ),
            (Dialect::Responses, true) => (
                Some("response.function_call_arguments.delta"),
                json!({"type": "response.function_call_arguments.delta", "output_index": i >> 16, "delta": held}),
            ),
        };
        out.extend_from_slice(SseEvent::new(name, &data.to_string()).raw());
        out
    }

    /// Everything still held (before `[DONE]`, or at the end of a stream without one).
    pub(crate) fn held(&self, streams: &mut Streams) -> BytesMut {
        let mut keys: Vec<(u64, bool)> = streams.open.keys().copied().collect();
        keys.sort_unstable();
        let mut out = BytesMut::new();
        for key in keys {
            out.extend_from_slice(&self.held_event(streams.dialect, key, streams));
        }
        out
    }

    /// A whole JSON reply: rewritten, or `None` when nothing changed.
    pub(crate) fn json_reply(&self, bytes: &[u8]) -> Option<Bytes> {
        let mut doc: Value = serde_json::from_slice(bytes).ok()?;
        self.json(&mut doc).then(|| Bytes::from(doc.to_string()))
    }

    /// Whether replies are scrubbed of new values.
    pub(crate) fn scrubs(&self) -> bool {
        self.scrub.is_some()
    }

    /// Whether the rewriter would change nothing (no scrubbing, nothing to restore).
    pub(crate) fn is_noop(&self) -> bool {
        self.scrub.is_none() && (!self.restore || lock(&self.vault).is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Entity;
    use proptest::prelude::*;

    const REPLY: &str = "Sure. Contact jane.doe@example.com or +44 20 7946 0958, IBAN GB82 WEST 1234 5698 7654 32, token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U — 日本語のテキスト, card 4111 1111 1111 1111.";

    /// Built once: compiling the detector is the slow part of a debug-build test.
    fn scrubber() -> &'static Redactor {
        static SCRUBBER: std::sync::LazyLock<Redactor> =
            std::sync::LazyLock::new(|| Redactor::new(&Entity::ALL).redacting());
        &SCRUBBER
    }

    proptest! {
        #[test]
        fn reply_side_redaction_is_the_same_for_every_split(cuts in proptest::collection::vec(0..REPLY.len(), 0..12)) {
            let r = scrubber();
            let whole = r.redact_str(REPLY, &mut Vault::new()).text.into_owned();
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| REPLY.is_char_boundary(c)).collect();
            cuts.sort_unstable();
            let mut s = StreamRedactor::new();
            let mut out = String::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain([REPLY.len()]) {
                out.push_str(&s.push(&REPLY[start..cut], r));
                prop_assert!(s.held() <= MAX_CARRY);
                start = cut;
            }
            out.push_str(&s.finish(r));
            prop_assert_eq!(out, whole);
        }
    }

    #[test]
    fn one_byte_at_a_time_and_the_carry_is_bounded() {
        let r = scrubber();
        let whole = r.redact_str(REPLY, &mut Vault::new()).text.into_owned();
        assert!(whole.contains("[EMAIL]") && whole.contains("[IBAN]") && whole.contains("[JWT]"));
        let mut s = StreamRedactor::new();
        let mut out = String::new();
        for c in REPLY.chars() {
            out.push_str(&s.push(&c.to_string(), r));
        }
        out.push_str(&s.finish(r));
        assert_eq!(out, whole);
        // A long run without spaces is not held forever.
        let mut s = StreamRedactor::new();
        let mut sent = 0;
        for _ in 0..100 {
            sent += s.push(&"x".repeat(100), r).len();
            assert!(s.held() <= MAX_CARRY);
        }
        assert!(sent >= 100 * 100 - MAX_CARRY);
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;
    use crate::Entity;
    use moat_core::sse::SseDecoder;

    fn rewriter(vault: Vault) -> Rewriter {
        Rewriter {
            redactor: Arc::new(Redactor::new(&Entity::ALL)),
            scrub: None,
            vault: Arc::new(std::sync::Mutex::new(vault)),
            restore: true,
        }
    }

    /// Runs events through a rewriter and decodes what comes out.
    fn rewrite(rewriter: &Rewriter, events: &[(&str, Value)]) -> Vec<Value> {
        let mut streams = Streams::default();
        let mut out = BytesMut::new();
        for (name, data) in events {
            let event = SseEvent::new(Some(name), &data.to_string());
            out.extend_from_slice(&rewriter.event(&mut streams, &event));
        }
        out.extend_from_slice(&rewriter.held(&mut streams));
        let mut decoder = SseDecoder::new();
        decoder
            .decode(&out)
            .unwrap()
            .iter()
            .filter_map(SseEvent::json)
            .collect()
    }

    #[test]
    fn responses_function_call_arguments_are_restored_as_json() {
        let mut vault = Vault::new();
        let r = Redactor::new(&Entity::ALL);
        let sent = r.redact_str("to \"Jane\" <jane@example.com>", &mut vault);
        assert_eq!(sent.text, "to \"Jane\" <[EMAIL_1]>");
        let rw = rewriter(vault);
        let delta = |d: &str| json!({"type": "response.function_call_arguments.delta", "output_index": 1, "delta": d});
        let events = rewrite(
            &rw,
            &[
                (
                    "response.function_call_arguments.delta",
                    delta("{\"to\":\"[EM"),
                ),
                ("response.function_call_arguments.delta", delta("AIL_1]\"}")),
                (
                    "response.function_call_arguments.done",
                    json!({"type": "response.function_call_arguments.done", "output_index": 1, "arguments": "{\"to\":\"[EMAIL_1]\"}"}),
                ),
            ],
        );
        let streamed: String = events
            .iter()
            .filter(|e| e["type"] == "response.function_call_arguments.delta")
            .map(|e| e["delta"].as_str().unwrap())
            .collect();
        let args: Value = serde_json::from_str(&streamed).unwrap();
        assert_eq!(args["to"], "jane@example.com");
        let done = events.last().unwrap();
        let args: Value = serde_json::from_str(done["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args["to"], "jane@example.com");
    }

    #[test]
    fn anthropic_text_held_at_a_block_stop_comes_out_before_it() {
        let mut vault = Vault::new();
        let _ = Redactor::new(&Entity::ALL).redact_str("jane@example.com", &mut vault);
        let rw = rewriter(vault);
        let events = rewrite(
            &rw,
            &[
                (
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi [EMAIL_1"}}),
                ),
                (
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 0}),
                ),
            ],
        );
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "content_block_delta",
                "content_block_delta",
                "content_block_stop"
            ]
        );
        // An unclosed placeholder is not a placeholder: it comes out as written.
        let text: String = events[..2]
            .iter()
            .map(|e| e["delta"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, "Hi [EMAIL_1");
    }
}
