//! Rewriting replies: new personal data scrubbed (optional), placeholders restored, in JSON and
//! in OpenAI chat/completions, Responses and Anthropic streams.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use moat_core::llm::WireFormat;
use moat_core::response::{
    text_event, DeltaKind, Hook, Interest, JsonReply, StreamEvent, StreamKey,
};
use serde_json::Value;

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

    /// Whether replies are scrubbed of new values.
    pub(crate) fn scrubs(&self) -> bool {
        self.scrub.is_some()
    }

    /// Whether the rewriter would change nothing (no scrubbing, nothing to restore).
    pub(crate) fn is_noop(&self) -> bool {
        self.scrub.is_none() && (!self.restore || lock(&self.vault).is_empty())
    }

    /// The hook that rewrites a reply through this rewriter.
    pub(crate) fn hook(self) -> ReplyHook {
        ReplyHook {
            rewriter: self,
            open: HashMap::new(),
            dialect: Dialect::default(),
        }
    }
}

/// Rewrites one reply, streamed or whole: the [`Hook`] a redacting layer attaches.
pub(crate) struct ReplyHook {
    rewriter: Rewriter,
    open: HashMap<StreamKey, TextStream>,
    dialect: Dialect,
}

impl ReplyHook {
    fn push(&mut self, key: StreamKey, piece: &str) -> String {
        let rewriter = &self.rewriter;
        let stream = self.open.entry(key).or_insert_with(|| TextStream {
            scrub: StreamRedactor::new(),
            restore: if key.2.is_some() {
                StreamRestorer::json()
            } else {
                StreamRestorer::new()
            },
        });
        let scrubbed = match &rewriter.scrub {
            Some(scrub) => stream.scrub.push(piece, scrub),
            None => piece.to_owned(),
        };
        if rewriter.restore {
            stream.restore.push(&scrubbed, &lock(&rewriter.vault))
        } else {
            scrubbed
        }
    }

    fn flush(&mut self, key: StreamKey) -> String {
        let Some(mut stream) = self.open.remove(&key) else {
            return String::new();
        };
        let rewriter = &self.rewriter;
        let vault = lock(&rewriter.vault);
        let mut out = String::new();
        if let Some(scrub) = &rewriter.scrub {
            let rest = stream.scrub.finish(scrub);
            out = if rewriter.restore {
                stream.restore.push(&rest, &vault)
            } else {
                rest
            };
        }
        if rewriter.restore {
            out.push_str(&stream.restore.finish(&vault));
        }
        out
    }

    /// The event that carries what one stream still holds, in the stream's dialect.
    fn held_event(&mut self, key: StreamKey) -> BytesMut {
        let held = self.flush(key);
        let mut out = BytesMut::new();
        if held.is_empty() {
            return out;
        }
        let format = match self.dialect {
            Dialect::OpenAi => WireFormat::ChatCompletions,
            Dialect::Anthropic => WireFormat::AnthropicMessages,
            Dialect::Responses => WireFormat::Responses,
        };
        out.extend_from_slice(text_event(format, key, &held).raw());
        out
    }

    /// Everything still held (before `[DONE]`, or at the end of a stream without one).
    fn held(&mut self) -> BytesMut {
        let mut keys: Vec<StreamKey> = self.open.keys().copied().collect();
        keys.sort_unstable();
        let mut out = BytesMut::new();
        for key in keys {
            out.extend_from_slice(&self.held_event(key));
        }
        out
    }

    /// What an OpenAI choice still holds goes out with its `finish_reason`: appended to its
    /// content in this event (or its `text`, for legacy completions).
    fn finish_choice(&mut self, event: &mut StreamEvent<'_>, choice: u32) {
        let held = self.flush((choice, 0, None));
        if held.is_empty() {
            return;
        }
        let content = event
            .deltas()
            .iter()
            .position(|d| d.choice == choice && d.kind == DeltaKind::Content);
        if let Some(i) = content {
            let text = format!("{}{held}", event.deltas()[i].text);
            return event.set_delta(i, text);
        }
        event.edit_json(|doc| {
            let Some(Value::Array(choices)) = doc.get_mut("choices") else {
                return false;
            };
            let Some(c) = choices
                .iter_mut()
                .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == u64::from(choice))
            else {
                return false;
            };
            if let Some(Value::String(text)) = c.get_mut("text") {
                text.push_str(&held);
                return true;
            }
            let Some(delta) = c.get_mut("delta").and_then(Value::as_object_mut) else {
                return false;
            };
            match delta.entry("content").or_insert(Value::Null) {
                Value::String(text) => text.push_str(&held),
                slot => *slot = Value::String(held),
            }
            true
        });
    }
}

impl Hook for ReplyHook {
    fn interest(&self) -> Interest {
        if self.rewriter.scrubs() {
            // Unscrubbed values must not get through a reply too large to read.
            Interest::REWRITE.fail_closed()
        } else {
            Interest::REWRITE
        }
    }

    fn on_event(&mut self, event: &mut StreamEvent<'_>) {
        if event.is_done() {
            let held = self.held();
            return event.insert_before(&held);
        }
        let kind = event.view().kind().map(str::to_owned);
        match kind.as_deref() {
            Some(k) if k.starts_with("response.") => self.dialect = Dialect::Responses,
            Some(k) if k.starts_with("content_block_") || k.starts_with("message_") => {
                self.dialect = Dialect::Anthropic
            }
            _ => {}
        }
        for i in 0..event.deltas().len() {
            let delta = &event.deltas()[i];
            let (key, text) = (delta.stream_key(), delta.text.clone());
            let rewritten = self.push(key, &text);
            event.set_delta(i, rewritten);
        }
        let (output, part) = event.view().position();
        match kind.as_deref() {
            None => {
                let finished: Vec<u32> = event.view().finish_reasons().map(|(c, _)| c).collect();
                for choice in finished {
                    self.finish_choice(event, choice);
                }
                if event.view().error().is_some() {
                    event.edit_json(|doc| self.rewriter.json(doc));
                }
            }
            Some("content_block_stop") => {
                for key in [(0, part, None), (0, part, Some(part))] {
                    let held = self.held_event(key);
                    event.insert_before(&held);
                }
            }
            Some("response.output_text.done" | "response.function_call_arguments.done") => {
                let key = match kind.as_deref() {
                    Some("response.output_text.done") => (output, part, None),
                    _ => (output, 0, Some(output)),
                };
                let held = self.held_event(key);
                event.insert_before(&held);
                event.edit_json(|doc| self.rewriter.json(doc));
            }
            Some(k) if k.ends_with(".delta") || k == "content_block_delta" => {}
            // Every other event (items and parts done, `response.completed`, a message or block
            // started with content): each of its strings.
            Some(_) => event.edit_json(|doc| self.rewriter.json(doc)),
        }
    }

    fn on_stream_end(&mut self, out: &mut BytesMut) {
        out.extend_from_slice(&self.held());
    }

    fn on_json(&mut self, reply: &mut JsonReply<'_>) {
        let rewriter = &self.rewriter;
        reply.edit(|doc| rewriter.json(doc));
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
    use moat_core::sse::SseEvent;
    use serde_json::json;

    fn rewriter(vault: Vault) -> Rewriter {
        Rewriter {
            redactor: Arc::new(Redactor::new(&Entity::ALL)),
            scrub: None,
            vault: Arc::new(std::sync::Mutex::new(vault)),
            restore: true,
        }
    }

    /// Runs events through a rewriter's hook (in the response view) and decodes what comes out.
    async fn rewrite(rewriter: &Rewriter, events: &[(&str, Value)]) -> Vec<Value> {
        use http_body_util::BodyExt;
        let stream: Vec<u8> = events
            .iter()
            .flat_map(|(name, data)| SseEvent::new(Some(name), &data.to_string()).raw().to_vec())
            .collect();
        let hooks = moat_core::response::Hooks::default();
        hooks.attach(rewriter.clone().hook());
        let response = http::Response::builder()
            .header("content-type", "text/event-stream")
            .body(http_body_util::Full::new(bytes::Bytes::from(stream)))
            .unwrap();
        let out = hooks
            .view(response)
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let mut decoder = SseDecoder::new();
        decoder
            .decode(&out)
            .unwrap()
            .iter()
            .filter_map(SseEvent::json)
            .collect()
    }

    #[tokio::test]
    async fn responses_function_call_arguments_are_restored_as_json() {
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
        )
        .await;
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

    #[tokio::test]
    async fn anthropic_text_held_at_a_block_stop_comes_out_before_it() {
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
        )
        .await;
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
