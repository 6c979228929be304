//! Server-Sent Events, incrementally.
//!
//! [`SseDecoder`] takes a byte stream in chunks of any size and yields [`SseEvent`]s. Every event
//! keeps its exact bytes ([`SseEvent::raw`]), so a layer that only inspects events re-emits them
//! byte-for-byte, and the events are the same however the stream is split: LF, CRLF and CR line
//! ends (a CR at the end of a chunk waits for the next byte), comments, multi-line `data`,
//! `event`, `id`, `retry` and a leading BOM. An event larger than the decoder's cap is an error
//! rather than unbounded memory. Fields are slices of the event's bytes, not copies, unless a
//! field spans several lines or is not UTF-8 (then it is decoded lossily).
//!
//! What an event says for each provider (text deltas, usage, errors) is read by
//! [`response`](crate::response).
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
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// The default cap on one event's size: 1 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

/// One event: its exact bytes and its fields (UTF-8, as slices of the bytes where they can be).
#[derive(Clone, PartialEq, Eq)]
pub struct SseEvent {
    raw: Bytes,
    event: Option<Bytes>,
    data: Option<Bytes>,
    id: Option<Bytes>,
    retry: Option<u64>,
    complete: bool,
}

/// A field's text: always UTF-8 (checked, or decoded lossily, when the event was read).
fn text(field: &Option<Bytes>) -> Option<&str> {
    field
        .as_deref()
        .map(|bytes| std::str::from_utf8(bytes).unwrap_or_default())
}

impl SseEvent {
    /// A new event with this data (split over several `data:` lines if it has newlines) and an
    /// optional event type.
    pub fn new(event: Option<&str>, data: &str) -> Self {
        Self::build(event, None, data)
    }

    /// This event with other data: its `event` and `id` kept, `retry` dropped.
    pub fn with_data(&self, data: &str) -> Self {
        Self::build(self.event(), self.id(), data)
    }

    fn build(event: Option<&str>, id: Option<&str>, data: &str) -> Self {
        let mut raw = String::with_capacity(data.len() + 16);
        if let Some(event) = event {
            raw.push_str("event: ");
            raw.push_str(event);
            raw.push('\n');
        }
        if let Some(id) = id {
            raw.push_str("id: ");
            raw.push_str(id);
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
            event: event.map(|e| Bytes::copy_from_slice(e.as_bytes())),
            data: Some(Bytes::copy_from_slice(data.as_bytes())),
            id: id.map(|i| Bytes::copy_from_slice(i.as_bytes())),
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
        text(&self.event)
    }

    /// The data lines joined by `\n`, or `None` when the event had no `data` field (a comment or
    /// keep-alive).
    pub fn data(&self) -> Option<&str> {
        text(&self.data)
    }

    /// The `id` field.
    pub fn id(&self) -> Option<&str> {
        text(&self.id)
    }

    /// The `retry` field.
    pub fn retry(&self) -> Option<u64> {
        self.retry
    }

    /// Whether this is OpenAI's end marker, `data: [DONE]`.
    pub fn is_done(&self) -> bool {
        self.data.as_deref() == Some(b"[DONE]")
    }

    /// `false` only for bytes left at the end of a stream without a terminating blank line.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The data parsed as JSON, when it is.
    pub fn json(&self) -> Option<Value> {
        self.data
            .as_deref()
            .and_then(|d| serde_json::from_slice(d).ok())
    }
}

impl fmt::Debug for SseEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseEvent")
            .field("event", &self.event())
            .field("data", &self.data())
            .field("id", &self.id())
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

/// A field value found so far: where it is in the event's bytes, or (several `data` lines, or
/// bytes that are not UTF-8) a copy.
#[derive(Debug, Default)]
enum FieldValue {
    #[default]
    None,
    At(Range<usize>),
    Owned(Vec<u8>),
}

impl FieldValue {
    /// A value at `range` of `buf`, copied (lossily) if it is not UTF-8.
    fn at(buf: &[u8], range: Range<usize>) -> Self {
        match std::str::from_utf8(&buf[range.clone()]) {
            Ok(_) => Self::At(range),
            Err(_) => Self::Owned(
                String::from_utf8_lossy(&buf[range])
                    .into_owned()
                    .into_bytes(),
            ),
        }
    }

    /// Another `data` line: joined to what came before with `\n`.
    fn append(&mut self, buf: &[u8], range: Range<usize>) {
        let mut joined = match std::mem::take(self) {
            Self::None => return *self = Self::at(buf, range),
            Self::At(first) => buf[first].to_vec(),
            Self::Owned(first) => first,
        };
        joined.push(b'\n');
        joined.extend_from_slice(String::from_utf8_lossy(&buf[range]).as_bytes());
        *self = Self::Owned(joined);
    }

    fn resolve(self, raw: &Bytes) -> Option<Bytes> {
        match self {
            Self::None => None,
            Self::At(range) => Some(raw.slice(range)),
            Self::Owned(bytes) => Some(Bytes::from(bytes)),
        }
    }
}

#[derive(Debug, Default)]
struct Fields {
    event: FieldValue,
    data: FieldValue,
    id: FieldValue,
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

    /// Takes the bytes held for an event that has not ended yet (after an
    /// [`EventTooLarge`](SseError::EventTooLarge), to pass them on undecoded), and starts over.
    pub fn take_buffered(&mut self) -> Bytes {
        self.fields = Fields::default();
        self.line_start = 0;
        self.scan = 0;
        self.buf.split().freeze()
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
            let raw = self.buf.split().freeze();
            out.push(SseEvent {
                event: fields.event.resolve(&raw),
                data: None,
                id: fields.id.resolve(&raw),
                retry: fields.retry,
                complete: false,
                raw,
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
            let Some(offset) = memchr::memchr2(b'\n', b'\r', &self.buf[self.scan..]) else {
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
                let fields = std::mem::take(&mut self.fields);
                let raw = self.buf.split_to(next).freeze();
                out.push(SseEvent {
                    event: fields.event.resolve(&raw),
                    data: fields.data.resolve(&raw),
                    id: fields.id.resolve(&raw),
                    retry: fields.retry,
                    complete: true,
                    raw,
                });
                self.line_start = 0;
                self.scan = 0;
            } else {
                self.fields.parse_line(&self.buf, self.line_start..end);
                self.line_start = next;
                self.scan = next;
            }
        }
    }
}

impl Fields {
    /// One line, at `line` of `buf`.
    fn parse_line(&mut self, buf: &[u8], line: Range<usize>) {
        let bytes = &buf[line.clone()];
        let (name, value) = match memchr::memchr(b':', bytes) {
            Some(0) => return,
            Some(i) => {
                let mut start = line.start + i + 1;
                if buf.get(start) == Some(&b' ') && start < line.end {
                    start += 1;
                }
                (&bytes[..i], start..line.end)
            }
            None => (bytes, line.end..line.end),
        };
        match name {
            b"data" => self.data.append(buf, value),
            b"event" => self.event = FieldValue::at(buf, value),
            b"id" if memchr::memchr(0, &buf[value.clone()]).is_none() => {
                self.id = FieldValue::at(buf, value)
            }
            b"retry" if !value.is_empty() && buf[value.clone()].iter().all(u8::is_ascii_digit) => {
                self.retry = std::str::from_utf8(&buf[value])
                    .ok()
                    .and_then(|v| v.parse().ok());
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
}
