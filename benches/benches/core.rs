//! moat-core's hot paths: parsing a chat request, decoding a stream, extracting keys.
//!
//! `serde_json::from_slice` into a `Value` is the baseline for parsing: moat's view adds the
//! segment index on top of it.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moat_core::identity::{ApiKey, ClientIp, KeyExtractor, PeerAddr};
use moat_core::llm::LlmRequest;
use moat_core::response::EventView;
use moat_core::sse::SseDecoder;

/// A ~2 KB chat request with nothing to find.
fn chat_2kb() -> Bytes {
    let filler = "The quick brown fox jumps over the lazy dog while the committee reviews the quarterly plan. ";
    let body = serde_json::json!({
        "model": "gpt-4o-mini", "stream": true, "temperature": 0.2,
        "messages": [
            {"role": "system", "content": filler.repeat(4)},
            {"role": "user", "content": filler.repeat(8)},
            {"role": "assistant", "content": filler.repeat(4)},
            {"role": "user", "content": filler.repeat(4)}
        ]
    });
    Bytes::from(serde_json::to_vec(&body).unwrap())
}

fn stream_of(deltas: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..deltas {
        out.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":null}}]}}\n\n"
        ));
    }
    out.push_str("data: [DONE]\n\n");
    out.into_bytes()
}

fn parse(c: &mut Criterion) {
    let body = chat_2kb();
    let mut group = c.benchmark_group("parse_chat_2kb");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("serde_json_value (baseline)", |b| {
        b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(black_box(&body)).unwrap()))
    });
    group.bench_function("moat LlmRequest::parse", |b| {
        b.iter(|| {
            black_box(LlmRequest::parse(black_box(body.clone()), "/v1/chat/completions").unwrap())
        })
    });
    group.bench_function("moat parse + scan every segment", |b| {
        b.iter(|| {
            let request = LlmRequest::parse(body.clone(), "/v1/chat/completions").unwrap();
            black_box(request.texts().map(|(_, t)| t.len()).sum::<usize>())
        })
    });
    group.finish();
}

fn sse(c: &mut Criterion) {
    let stream = stream_of(200);
    let mut group = c.benchmark_group("sse_200_chunks");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    for chunk in [16usize, 512] {
        group.bench_with_input(BenchmarkId::new("decode", chunk), &chunk, |b, &chunk| {
            b.iter(|| {
                let mut decoder = SseDecoder::new();
                let mut events = Vec::new();
                for piece in stream.chunks(chunk) {
                    decoder.decode_into(piece, &mut events).unwrap();
                }
                black_box(events.len())
            })
        });
    }
    group.bench_function("decode + typed view (deltas, usage)", |b| {
        b.iter(|| {
            let mut decoder = SseDecoder::new();
            let mut events = Vec::new();
            let mut text = 0;
            for piece in stream.chunks(512) {
                decoder.decode_into(piece, &mut events).unwrap();
                for event in events.drain(..) {
                    if let Some(data) = event.data() {
                        let view = EventView::read(data);
                        text += view.deltas().iter().map(|d| d.text.len()).sum::<usize>();
                    }
                }
            }
            black_box(text)
        })
    });
    group.finish();
    let chunk = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"tok1 "},"finish_reason":null}]}"#;
    let mut group = c.benchmark_group("one_chat_chunk");
    group.bench_function("serde_json_value (baseline)", |b| {
        b.iter(|| black_box(serde_json::from_str::<serde_json::Value>(black_box(chunk)).unwrap()))
    });
    group.bench_function("EventView::read", |b| {
        b.iter(|| black_box(EventView::read(black_box(chunk)).deltas().len()))
    });
    group.finish();
}

fn keys(c: &mut Criterion) {
    let mut req = http::Request::builder()
        .header(
            "authorization",
            "Bearer sk-proj-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGH",
        )
        .header("x-forwarded-for", "198.51.100.1, 203.0.113.7, 10.0.0.3")
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(PeerAddr("10.0.0.2:4000".parse().unwrap()));
    let api_key = ApiKey::default();
    let client_ip = ClientIp::new(["10.0.0.0/8".parse().unwrap()]);
    let mut group = c.benchmark_group("key_extraction");
    group.bench_function("api_key fingerprint", |b| {
        b.iter(|| black_box(api_key.extract_from(black_box(&req)).unwrap()))
    });
    group.bench_function("client_ip behind proxies", |b| {
        b.iter(|| black_box(client_ip.extract_from(black_box(&req)).unwrap()))
    });
    group.finish();
}

#[allow(missing_docs)] // generated by the macro
mod group {
    use super::*;
    criterion_group!(benches, parse, sse, keys);
}
use group::benches;
criterion_main!(benches);
