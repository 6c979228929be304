//! Server-Sent Events, incrementally.
//!
//! [`SseDecoder`] takes a byte stream in chunks of any size and yields [`SseEvent`]s. Every event
//! keeps its exact bytes ([`SseEvent::raw`]), so a layer that only inspects events re-emits them
//! byte-for-byte, and the events are the same however the stream is split: LF, CRLF and CR line
//! ends (a CR at the end of a chunk waits for the next byte), comments, multi-line `data`,
//! `event`, `id`, `retry` and a leading BOM. An event larger than the decoder's cap is an error
//! rather than unbounded memory.
//!
//! [`text_deltas`] pulls the per-choice text out of a streamed event of OpenAI chat and
//! completions chunks, the Responses API, or Anthropic messages.
//!
//! ```
//! use moat_core::sse::SseDecoder;
//!
//! let mut decoder = SseDecoder::new();
//! let mut events = decoder.decode(b"data: {\"a\":1}\r\n\r\ndata: [DO").unwrap();
//! events.extend(decoder.decode(b"NE]\n\n").unwrap());
//! assert_eq!(events[0].data(), Some("{\"a\":1}"));
//! assert_eq!(&events[0].raw()[..], b"data: {\"a\":1}\r\n\r\n");
//! assert!(events[1].is_done());
//! ```

use std::fmt;

use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// The default cap on one event's size: 1 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

/// One event: its exact bytes and its parsed fields.
#[derive(Clone, PartialEq, Eq)]
pub struct SseEvent {
    raw: Bytes,
    event: Option<String>,
    data: Option<String>,
    id: Option<String>,
    retry: Option<u64>,
    complete: bool,
}

impl SseEvent {
    /// A new event with this data (split over several `data:` lines if it has newlines) and an
    /// optional event type.
    pub fn new(event: Option<&str>, data: &str) -> Self {
        let mut raw = String::with_capacity(data.len() + 16);
        if let Some(event) = event {
            raw.push_str("event: ");
            raw.push_str(event);
            raw.push('\n');
        }
        for line in data.split('\n') {
            raw.push_str("data: ");
            raw.push_str(line.strip_suffix('\r').unwrap_or(line));
            raw.push('\n');
        }
        raw.push('\n');
        Self {
            raw: Bytes::from(raw),
            event: event.map(str::to_owned),
            data: Some(data.to_owned()),
            id: None,
            retry: None,
            complete: true,
        }
    }

    /// The exact bytes of the event, its terminating blank line included.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// The `event` field.
    pub fn event(&self) -> Option<&str> {
        self.event.as_deref()
    }

    /// The data lines joined by `\n`, or `None` when the event had no `data` field (a comment or
    /// keep-alive).
    pub fn data(&self) -> Option<&str> {
        self.data.as_deref()
    }

    /// The `id` field.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The `retry` field.
    pub fn retry(&self) -> Option<u64> {
        self.retry
    }

    /// Whether this is OpenAI's end marker, `data: [DONE]`.
    pub fn is_done(&self) -> bool {
        self.data.as_deref() == Some("[DONE]")
    }

    /// `false` only for bytes left at the end of a stream without a terminating blank line.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The data parsed as JSON, when it is.
    pub fn json(&self) -> Option<Value> {
        self.data
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok())
    }
}

impl fmt::Debug for SseEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseEvent")
            .field("event", &self.event)
            .field("data", &self.data)
            .field("id", &self.id)
            .field("retry", &self.retry)
            .field("raw_len", &self.raw.len())
            .finish()
    }
}

/// The stream broke the decoder's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SseError {
    /// One event grew past the cap without ending.
    EventTooLarge {
        /// The cap in bytes.
        limit: usize,
    },
}

impl fmt::Display for SseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SseError::EventTooLarge { limit } => {
                write!(f, "server-sent event larger than {limit} bytes")
            }
        }
    }
}

impl std::error::Error for SseError {}

#[derive(Default)]
struct Fields {
    event: Option<String>,
    data: String,
    has_data: bool,
    id: Option<String>,
    retry: Option<u64>,
}

/// An incremental SSE decoder.
pub struct SseDecoder {
    buf: BytesMut,
    line_start: usize,
    scan: usize,
    bom_checked: bool,
    fields: Fields,
    max_event_bytes: usize,
}

impl fmt::Debug for SseDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseDecoder")
            .field("buffered", &self.buf.len())
            .field("max_event_bytes", &self.max_event_bytes)
            .finish()
    }
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::new()
    }
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl SseDecoder {
    /// A decoder with the default event cap.
    pub fn new() -> Self {
        Self::with_max_event_bytes(DEFAULT_MAX_EVENT_BYTES)
    }

    /// A decoder that refuses events over `limit` bytes.
    pub fn with_max_event_bytes(limit: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            line_start: 0,
            scan: 0,
            bom_checked: false,
            fields: Fields::default(),
            max_event_bytes: limit,
        }
    }

    /// Bytes held for an event that has not ended yet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Feeds a chunk; returns the events it completed.
    pub fn decode(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut out = Vec::new();
        self.decode_into(chunk, &mut out)?;
        Ok(out)
    }

    /// Feeds a chunk, appending the events it completed to `out`.
    pub fn decode_into(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        self.buf.extend_from_slice(chunk);
        self.run(false, out);
        if self.buf.len() > self.max_event_bytes {
            return Err(SseError::EventTooLarge {
                limit: self.max_event_bytes,
            });
        }
        Ok(())
    }

    /// Ends the stream: a CR held back becomes a line end, and bytes without a terminating blank
    /// line come out as a last, incomplete event (`is_complete() == false`, no `data`).
    pub fn finish(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        self.run(true, &mut out);
        if !self.buf.is_empty() {
            let fields = std::mem::take(&mut self.fields);
            out.push(SseEvent {
                raw: self.buf.split().freeze(),
                event: fields.event,
                data: None,
                id: fields.id,
                retry: fields.retry,
                complete: false,
            });
        }
        self.line_start = 0;
        self.scan = 0;
        out
    }

    fn run(&mut self, eof: bool, out: &mut Vec<SseEvent>) {
        if !self.bom_checked {
            let n = self.buf.len().min(BOM.len());
            if self.buf[..n] != BOM[..n] {
                self.bom_checked = true;
            } else if n == BOM.len() {
                self.bom_checked = true;
                self.line_start = BOM.len();
                self.scan = BOM.len();
            } else if !eof {
                return;
            } else {
                self.bom_checked = true;
            }
        }
        loop {
            let Some(offset) = self.buf[self.scan..]
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
            else {
                self.scan = self.buf.len();
                return;
            };
            let end = self.scan + offset;
            let terminator = if self.buf[end] == b'\r' {
                match self.buf.get(end + 1) {
                    Some(b'\n') => 2,
                    Some(_) => 1,
                    // A CR at the end may be the first half of CRLF: wait for the next byte.
                    None if !eof => {
                        self.scan = end;
                        return;
                    }
                    None => 1,
                }
            } else {
                1
            };
            let next = end + terminator;
            if end == self.line_start {
                let raw = self.buf.split_to(next).freeze();
                let fields = std::mem::take(&mut self.fields);
                let data = fields.has_data.then(|| {
                    let mut data = fields.data;
                    data.pop();
                    data
                });
                out.push(SseEvent {
                    raw,
                    event: fields.event,
                    data,
                    id: fields.id,
                    retry: fields.retry,
                    complete: true,
                });
                self.line_start = 0;
                self.scan = 0;
            } else {
                let line = String::from_utf8_lossy(&self.buf[self.line_start..end]);
                self.fields.parse_line(&line);
                self.line_start = next;
                self.scan = next;
            }
        }
    }
}

impl Fields {
    fn parse_line(&mut self, line: &str) {
        let (name, value) = match line.find(':') {
            Some(0) => return,
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(' ').unwrap_or(value))
            }
            None => (line, ""),
        };
        let fields = self;
        match name {
            "data" => {
                fields.data.push_str(value);
                fields.data.push('\n');
                fields.has_data = true;
            }
            "event" => fields.event = Some(value.to_owned()),
            "id" if !value.contains('\0') => fields.id = Some(value.to_owned()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                fields.retry = value.parse().ok();
            }
            _ => {}
        }
    }
}

/// What a streamed piece of text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeltaKind {
    /// Text for the user.
    Content,
    /// A fragment of the JSON arguments of a tool call (OpenAI) or tool use (Anthropic), with the
    /// call's index.
    ToolArguments {
        /// The tool call's (or content block's) index.
        index: u32,
    },
}

/// One piece of streamed text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextDelta<'a> {
    /// The choice (OpenAI chat and completions) or output item (Responses); 0 for Anthropic.
    pub choice: u32,
    /// What the text is.
    pub kind: DeltaKind,
    /// The text.
    pub text: &'a str,
}

fn index(value: &Value, key: &str) -> u32 {
    value
        .get(key)
        .and_then(Value::as_u64)
        .and_then(|i| u32::try_from(i).ok())
        .unwrap_or(0)
}

/// The text pieces in one streamed event's JSON data, whatever the provider's format.
pub fn text_deltas(data: &Value) -> Vec<TextDelta<'_>> {
    let mut out = Vec::new();
    if let Some(Value::Array(choices)) = data.get("choices") {
        for choice in choices {
            let i = index(choice, "index");
            fn push<'a>(
                out: &mut Vec<TextDelta<'a>>,
                choice: u32,
                kind: DeltaKind,
                text: Option<&'a Value>,
            ) {
                if let Some(text) = text.and_then(Value::as_str).filter(|t| !t.is_empty()) {
                    out.push(TextDelta { choice, kind, text });
                }
            }
            if let Some(delta) = choice.get("delta") {
                push(&mut out, i, DeltaKind::Content, delta.get("content"));
                push(&mut out, i, DeltaKind::Content, delta.get("refusal"));
                if let Some(Value::Array(calls)) = delta.get("tool_calls") {
                    for call in calls {
                        let kind = DeltaKind::ToolArguments {
                            index: index(call, "index"),
                        };
                        push(&mut out, i, kind, call.pointer("/function/arguments"));
                    }
                }
            } else {
                push(&mut out, i, DeltaKind::Content, choice.get("text"));
            }
        }
        return out;
    }
    let text = |key: &str| {
        data.get(key)
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
    };
    match data.get("type").and_then(Value::as_str) {
        Some("response.output_text.delta" | "response.refusal.delta") => {
            if let Some(delta) = text("delta") {
                out.push(TextDelta {
                    choice: index(data, "output_index"),
                    kind: DeltaKind::Content,
                    text: delta,
                });
            }
        }
        Some("response.function_call_arguments.delta") => {
            if let Some(delta) = text("delta") {
                out.push(TextDelta {
                    choice: 0,
                    kind: DeltaKind::ToolArguments {
                        index: index(data, "output_index"),
                    },
                    text: delta,
                });
            }
        }
        Some("content_block_delta") => {
            let delta = data.get("delta");
            let (kind, text) = match delta.and_then(|d| d.get("type")).and_then(Value::as_str) {
                Some("text_delta") => (DeltaKind::Content, delta.and_then(|d| d.get("text"))),
                Some("input_json_delta") => (
                    DeltaKind::ToolArguments {
                        index: index(data, "index"),
                    },
                    delta.and_then(|d| d.get("partial_json")),
                ),
                _ => return out,
            };
            if let Some(text) = text.and_then(Value::as_str).filter(|t| !t.is_empty()) {
                out.push(TextDelta {
                    choice: 0,
                    kind,
                    text,
                });
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn decode_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut decoder = SseDecoder::new();
        let mut out = Vec::new();
        for chunk in chunks {
            decoder.decode_into(chunk, &mut out).unwrap();
        }
        out.extend(decoder.finish());
        out
    }

    const STREAM: &[u8] = b"\xEF\xBB\xBF: keep-alive\r\n\r\nevent: add\r\ndata: line1\r\ndata: line2\r\nid: 7\r\nretry: 3000\r\n\r\ndata\rdata:x\r\rdata: {\"choices\":[]}\n\nretry: soon\nid: a\0b\nfield-no-colon\ndata:  two spaces\n\ndata: [DONE]\n\n";

    #[test]
    fn fields_line_ends_comments_and_bom() {
        let events = decode_all(&[STREAM]);
        assert_eq!(events.len(), 6, "{events:?}");
        assert_eq!(events[0].data(), None);
        assert_eq!(events[1].event(), Some("add"));
        assert_eq!(events[1].data(), Some("line1\nline2"));
        assert_eq!(events[1].id(), Some("7"));
        assert_eq!(events[1].retry(), Some(3000));
        assert_eq!(events[2].data(), Some("\nx"));
        assert_eq!(events[3].data(), Some("{\"choices\":[]}"));
        assert_eq!(events[4].data(), Some(" two spaces"));
        assert_eq!(events[4].retry(), None);
        assert_eq!(events[4].id(), None);
        assert!(events[5].is_done());
        let rejoined: Vec<u8> = events.iter().flat_map(|e| e.raw().to_vec()).collect();
        assert_eq!(rejoined, STREAM);
    }

    #[test]
    fn cr_at_chunk_end_waits_for_the_next_byte() {
        let whole = decode_all(&[b"data: a\r\n\r\ndata: b\r\r"]);
        let split = decode_all(&[b"data: a\r", b"\n\r", b"\ndata: b\r", b"\r"]);
        assert_eq!(whole, split);
        assert_eq!(&split[0].raw()[..], b"data: a\r\n\r\n");
    }

    #[test]
    fn unterminated_tail_is_an_incomplete_event() {
        let events = decode_all(&[b"data: a\n\ndata: partial"]);
        assert_eq!(events.len(), 2);
        assert!(!events[1].is_complete());
        assert_eq!(&events[1].raw()[..], b"data: partial");
    }

    #[test]
    fn oversized_event_is_an_error_not_unbounded_memory() {
        let mut decoder = SseDecoder::with_max_event_bytes(64);
        assert!(decoder.decode(&[b'a'; 32]).is_ok());
        assert_eq!(
            decoder.decode(&[b'a'; 64]),
            Err(SseError::EventTooLarge { limit: 64 })
        );
    }

    #[test]
    fn new_events_encode_and_decode_back() {
        let event = SseEvent::new(Some("error"), "{\"a\":1}\nsecond");
        assert_eq!(
            &event.raw()[..],
            b"event: error\ndata: {\"a\":1}\ndata: second\n\n"
        );
        let back = decode_all(&[event.raw()]);
        assert_eq!(back, vec![event]);
    }

    proptest! {
        #[test]
        fn every_split_gives_the_same_events(cuts in proptest::collection::vec(0..STREAM.len(), 0..8)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for cut in cuts {
                chunks.push(&STREAM[start..cut]);
                start = cut;
            }
            chunks.push(&STREAM[start..]);
            prop_assert_eq!(decode_all(&chunks), decode_all(&[STREAM]));
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_raw_is_lossless(bytes in proptest::collection::vec(any::<u8>(), 0..256), cut in 0usize..256) {
            let cut = cut.min(bytes.len());
            let events = decode_all(&[&bytes[..cut], &bytes[cut..]]);
            let rejoined: Vec<u8> = events.iter().flat_map(|e| e.raw().to_vec()).collect();
            prop_assert_eq!(rejoined, bytes);
        }
    }

    #[test]
    fn every_single_split_point_of_a_realistic_stream() {
        for cut in 0..=STREAM.len() {
            assert_eq!(
                decode_all(&[&STREAM[..cut], &STREAM[cut..]]),
                decode_all(&[STREAM]),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn openai_chat_and_completion_deltas() {
        let chunk = json!({"object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": "Hel"}},
            {"index": 1, "delta": {"tool_calls": [{"index": 2, "function": {"arguments": "{\"a\""}}]}},
            {"index": 2, "delta": {"content": ""}, "finish_reason": "stop"}
        ]});
        assert_eq!(
            text_deltas(&chunk),
            vec![
                TextDelta {
                    choice: 0,
                    kind: DeltaKind::Content,
                    text: "Hel"
                },
                TextDelta {
                    choice: 1,
                    kind: DeltaKind::ToolArguments { index: 2 },
                    text: "{\"a\""
                },
            ]
        );
        let completion = json!({"choices": [{"index": 0, "text": "abc"}]});
        assert_eq!(text_deltas(&completion)[0].text, "abc");
    }

    #[test]
    fn responses_and_anthropic_deltas() {
        let r = json!({"type": "response.output_text.delta", "output_index": 1, "content_index": 0, "delta": "hi"});
        assert_eq!(
            text_deltas(&r),
            vec![TextDelta {
                choice: 1,
                kind: DeltaKind::Content,
                text: "hi"
            }]
        );
        let f = json!({"type": "response.function_call_arguments.delta", "output_index": 3, "delta": "{}"});
        assert_eq!(
            text_deltas(&f)[0].kind,
            DeltaKind::ToolArguments { index: 3 }
        );
        let a = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "yo"}});
        assert_eq!(text_deltas(&a)[0].text, "yo");
        let j = json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"c"}});
        assert_eq!(
            text_deltas(&j)[0],
            TextDelta {
                choice: 0,
                kind: DeltaKind::ToolArguments { index: 1 },
                text: "{\"c"
            }
        );
        assert!(text_deltas(&json!({"type": "message_stop"})).is_empty());
        assert!(text_deltas(&json!("x")).is_empty());
    }
}
