//! The bodies of the fuzz targets in `fuzz/` (cargo-fuzz, outside the workspace), kept here so
//! the corpora they grow replay as plain tests (`tests/fuzz_corpora.rs`) on a stable toolchain.
//!
//! Each target takes arbitrary bytes, must never panic, and checks what must hold for any input:
//!
//! - [`request_walker`]: a body parses or is refused with a 400; a parsed request lists only
//!   segments that are strings; editing every segment and parsing the result gives back the
//!   same segments with the new texts; an unedited request serializes to its own bytes.
//! - [`sse_decoder`]: the events are the same however the stream is split, and their bytes put
//!   together are the stream.
//! - [`restorer`]: restoring placeholders in a stream gives the same text however it is split,
//!   and the same text as restoring it whole.
//! - [`moderation_scan`]: moderating a stream sends the same text and finds the same things
//!   however it is split, holds back a bounded amount, and sends nothing after a block.

use std::sync::OnceLock;

use moat::core::llm::{LlmRequest, UnknownPolicy};
use moat::core::reject::Rejection;
use moat::core::response::EventView;
use moat::core::sse::{SseDecoder, SseEvent};
use moat::core::tokens::estimate_input_upper_bound;
use moat::moderate::{check_text, Action, Policy, Scan, StreamMode, MAX_HOLD};
use moat::redact::{Entity, Redactor, StreamRestorer, Vault};

const PATHS: [&str; 7] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/messages",
    "/api/custom",
    "/v1/messages/count_tokens",
];

/// A request body sent to a path chosen by the first byte.
pub fn request_walker(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let path = PATHS[usize::from(selector) % PATHS.len()];
    let mut request = match LlmRequest::parse(body.to_vec().into(), path) {
        Ok(request) => request,
        Err(err) => {
            assert_eq!(Rejection::from(err).status(), 400);
            return;
        }
    };
    assert_eq!(
        &request.to_bytes()[..],
        body,
        "an unedited request is its own bytes"
    );
    let _ = UnknownPolicy::Reject.check(&request);
    let _ = estimate_input_upper_bound(&request);
    for unknown in request.unknowns() {
        let _ = unknown.pointer(&request);
    }
    let count = request.segment_count();
    for i in 0..count {
        assert!(request.text(i).is_some(), "segment {i} is a string");
        let _ = request.segment(i).map(|s| s.pointer(&request));
    }
    for i in 0..count {
        assert!(request.set_text(i, format!("<{i}>")));
    }
    let edited = LlmRequest::parse(request.to_bytes(), path).expect("an edited request parses");
    let texts: Vec<&str> = edited.texts().map(|(_, t)| t).collect();
    let expected: Vec<String> = (0..count).map(|i| format!("<{i}>")).collect();
    assert_eq!(
        texts, expected,
        "edits land where the segments were, and nowhere else"
    );
}

fn decode_in(chunks: &[&[u8]]) -> Vec<SseEvent> {
    let mut decoder = SseDecoder::new();
    let mut out = Vec::new();
    for chunk in chunks {
        if decoder.decode_into(chunk, &mut out).is_err() {
            return Vec::new();
        }
    }
    out.extend(decoder.finish());
    out
}

/// A stream split at a point chosen by the first two bytes.
pub fn sse_decoder(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let (selector, stream) = data.split_at(2);
    let at = usize::from(u16::from_le_bytes([selector[0], selector[1]])) % (stream.len() + 1);
    let whole = decode_in(&[stream]);
    assert_eq!(decode_in(&[&stream[..at], &stream[at..]]), whole);
    if stream.len() <= 512 {
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(decode_in(&bytes), whole);
    }
    let raw: Vec<u8> = whole.iter().flat_map(|e| e.raw().iter().copied()).collect();
    assert_eq!(raw, stream, "every byte is in exactly one event");
    for event in &whole {
        if let Some(data) = event.data() {
            let view = EventView::read(data);
            let _ = (view.deltas(), view.usage(), view.error(), view.position());
        }
    }
}

/// Text restored against a vault holding a few values, split at a point chosen by the first two
/// bytes.
pub fn restorer(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let (selector, text) = data.split_at(2);
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    // Built once: compiling the detector costs more than a run.
    static SETUP: OnceLock<(Redactor, Vault)> = OnceLock::new();
    let (redactor, vault) = SETUP.get_or_init(|| {
        let redactor = Redactor::new(&[Entity::Email, Entity::Phone, Entity::CreditCard]);
        let mut vault = Vault::new();
        let _ = redactor.redact_str(
            "Write to jane@example.com or bob@example.org, call +44 20 7946 0958, card 4111 1111 1111 1111.",
            &mut vault,
        );
        (redactor, vault)
    });
    let whole = redactor.restore_str(text, vault);
    let mut at = usize::from(u16::from_le_bytes([selector[0], selector[1]])) % (text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let mut stream = StreamRestorer::new();
    let mut out = stream.push(&text[..at], vault);
    out.push_str(&stream.push(&text[at..], vault));
    out.push_str(&stream.finish(vault));
    assert_eq!(out, whole, "split at {at}");
    let mut json = StreamRestorer::json();
    let _ = json.push(text, vault);
    let _ = json.finish(vault);
}

/// Text moderated as a stream split at two points chosen by the first four bytes, masking or
/// blocking (the fifth byte), with the built-in lexicon and model.
pub fn moderation_scan(data: &[u8]) {
    if data.len() < 5 {
        return;
    }
    let (selector, text) = data.split_at(5);
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    static POLICIES: OnceLock<[Policy; 2]> = OnceLock::new();
    let policies = POLICIES.get_or_init(|| {
        [
            Policy::new().action(Action::Mask),
            Policy::new().action(Action::Block),
        ]
    });
    let policy = &policies[usize::from(selector[4] & 1)];
    let (whole, scan) = check_text(text, policy);
    let mut cuts: Vec<usize> = [selector[0..2].try_into(), selector[2..4].try_into()]
        .into_iter()
        .map(|b: Result<[u8; 2], _>| {
            usize::from(u16::from_le_bytes(b.unwrap_or_default())) % (text.len() + 1)
        })
        .map(|mut at| {
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            at
        })
        .collect();
    cuts.sort_unstable();
    let mut stream = Scan::new(StreamMode::HoldBack);
    let mut out = String::new();
    let mut from = 0;
    for at in cuts.into_iter().chain([text.len()]) {
        out.push_str(&stream.push(&text[from..at], policy));
        assert!(stream.held() <= MAX_HOLD + 4 * 64, "held {}", stream.held());
        from = at;
    }
    out.push_str(&stream.finish(policy));
    assert_eq!(out, whole, "the same text however it is split");
    assert_eq!(stream.flags(), scan.flags());
    assert!(
        text.starts_with(&whole) || !scan.masked().is_empty(),
        "a block only cuts"
    );
}
