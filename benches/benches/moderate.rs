//! moat-moderate: checking output as it streams, beside rustrict (issue 13's target: under
//! 1 µs per streamed chunk of a few tokens).
//!
//! - `moderate_text`: a 2 KB answer with nothing to find, checked whole: moat's scan (lexicon
//!   and model) beside rustrict's analysis of the same text.
//! - `moderate_chunks`: the same answer as 400 deltas of a word or so, as a stream arrives:
//!   moat's incremental scan (each word read once) beside rustrict re-analysing the text so far
//!   at each delta (what a checker without incremental state must do to hold every byte back).
//! - `moderate_layer`: a 200-event chat stream through `ModerateLayer` beside the bare service.

use std::convert::Infallible;
use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http_body_util::Full;
use moat_benches::{round_trip, Plain};
use moat_moderate::{check_text, ModerateLayer, Policy, Scan, StreamMode};
use rustrict::{Censor, Type};
use tower::{service_fn, Layer};

/// An assistant's answer about a museum visit: ordinary English with nothing to find.
const ANSWER: &str = "The museum opens at nine on weekdays and at ten on weekends. The main hall holds the collection of Roman pottery, and the east wing shows paintings from the Dutch golden age, including two portraits that were restored last year. Guided tours start every hour from the information desk; they last about forty minutes and are free with a ticket. If you are visiting with children, the workshop on the second floor runs drawing sessions in the afternoon, and the cafe near the garden serves lunch until three. ";

fn answer(bytes: usize) -> String {
    let mut text = String::new();
    while text.len() < bytes {
        text.push_str(ANSWER);
    }
    text
}

/// `text` cut into deltas the way models stream: a leading space and a word.
fn deltas(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices().skip(1) {
        if c == ' ' {
            out.push(&text[start..i]);
            start = i;
        }
    }
    out.push(&text[start..]);
    out
}

fn text(c: &mut Criterion) {
    let policy = Policy::new();
    let text = answer(2048);
    assert!(!check_text(&text, &policy).1.is_blocked());
    let mut group = c.benchmark_group("moderate_text");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("2 KB answer: moat check_text (lexicon + model)", |b| {
        b.iter(|| black_box(check_text(black_box(&text), &policy)))
    });
    group.bench_function("2 KB answer: rustrict analyze", |b| {
        b.iter(|| black_box(Censor::from_str(black_box(&text)).analyze()))
    });
    group.finish();
}

fn chunks(c: &mut Criterion) {
    let policy = Policy::new();
    let text = answer(2048);
    let pieces = deltas(&text);
    let mut group = c.benchmark_group("moderate_chunks");
    group.throughput(Throughput::Elements(pieces.len() as u64));
    group.bench_function(
        format!("{} deltas: moat Scan::push each (hold-back)", pieces.len()),
        |b| {
            b.iter(|| {
                let mut scan = Scan::new(StreamMode::HoldBack);
                let mut sent = 0;
                for piece in &pieces {
                    sent += scan.push(piece, &policy).len();
                }
                sent += scan.finish(&policy).len();
                black_box(sent)
            })
        },
    );
    group.bench_function(
        format!(
            "{} deltas: rustrict re-analysing the text so far",
            pieces.len()
        ),
        |b| {
            b.iter(|| {
                let mut so_far = String::new();
                let mut flagged = false;
                for piece in &pieces {
                    so_far.push_str(piece);
                    flagged |= Censor::from_str(&so_far)
                        .analyze()
                        .is(Type::INAPPROPRIATE & Type::MODERATE_OR_HIGHER);
                }
                black_box(flagged)
            })
        },
    );
    group.finish();
}

fn stream_body(deltas: &[&str]) -> Bytes {
    let mut out = String::new();
    for d in deltas {
        let data = serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": d}, "finish_reason": null}]});
        out.push_str(&format!("data: {data}\n\n"));
    }
    out.push_str("data: [DONE]\n\n");
    Bytes::from(out)
}

fn layer(c: &mut Criterion) {
    let text = answer(1024);
    let pieces = deltas(&text);
    let pieces = &pieces[..200.min(pieces.len())];
    let stream = stream_body(pieces);
    let request = || -> Plain {
        http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            )))
            .unwrap()
    };
    // The same handler for both: it answers the stream at once.
    fn upstream<B>(
        stream: Bytes,
        content_type: &'static str,
    ) -> impl tower::Service<
        http::Request<B>,
        Response = http::Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
           + Send
           + 'static {
        service_fn(move |_req: http::Request<B>| {
            let stream = stream.clone();
            async move {
                Ok::<_, Infallible>(
                    http::Response::builder()
                        .header("content-type", content_type)
                        .body(Full::new(stream))
                        .unwrap(),
                )
            }
        })
    }
    let mut group = c.benchmark_group("moderate_layer");
    group.throughput(Throughput::Elements(pieces.len() as u64));
    let mut bare = upstream(stream.clone(), "text/event-stream");
    group.bench_function(
        format!("{}-event chat stream: bare service", pieces.len()),
        |b| b.iter(|| round_trip(&mut bare, request())),
    );
    let mut guarded =
        ModerateLayer::new(Policy::new()).layer(upstream(stream.clone(), "text/event-stream"));
    group.bench_function(
        format!(
            "{}-event chat stream: ModerateLayer (hold-back)",
            pieces.len()
        ),
        |b| b.iter(|| round_trip(&mut guarded, request())),
    );
    // The same answer whole, as a JSON chat completion.
    let reply = Bytes::from(
        serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
            "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 200, "total_tokens": 210}})
        .to_string(),
    );
    group.throughput(Throughput::Bytes(reply.len() as u64));
    let mut bare = upstream(reply.clone(), "application/json");
    group.bench_function("1 KB JSON reply: bare service", |b| {
        b.iter(|| round_trip(&mut bare, request()))
    });
    let mut guarded =
        ModerateLayer::new(Policy::new()).layer(upstream(reply.clone(), "application/json"));
    group.bench_function("1 KB JSON reply: ModerateLayer", |b| {
        b.iter(|| round_trip(&mut guarded, request()))
    });
    group.finish();
}

#[allow(missing_docs)] // generated by the macro
mod group {
    use super::*;
    criterion_group!(benches, text, chunks, layer);
}
use group::benches;
criterion_main!(benches);
