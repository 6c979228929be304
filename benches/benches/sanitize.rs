//! moat-sanitize: the screener on a 2 KB English prompt, a 2 KB non-ASCII prompt and a 50 KB
//! document, nothing to find (issue 12's target: under 5 µs for 2 KB of ASCII, linear in
//! length); and a 2 KB chat request through the whole layer beside the bare service.

use std::hint::black_box;

use std::convert::Infallible;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http_body_util::Full;
use moat_benches::{round_trip, Plain};
use moat_sanitize::{rule_hits, screen_text, Policy, SanitizeLayer, Screener};
use tower::{service_fn, Layer};

fn prose(bytes: usize, sentence: &str) -> String {
    let mut text = String::new();
    while text.len() < bytes {
        text.push_str(sentence);
    }
    text
}

/// Minutes of a meeting: ordinary English the word-level gate clears.
const MINUTES: &str = "The committee met on Tuesday to review the budget for the coming year. Most of the discussion centred on the cost of repairing the library roof, which has leaked since the storm in March, and on whether the summer reading programme should move to the community hall while the work is done. The treasurer presented three quotes from local builders; the cheapest would finish in six weeks, the most expensive in three. Several members asked whether the grant from the county council could cover part of the work, and the secretary agreed to write to the council before the next meeting. The committee also thanked the volunteers who ran the book sale in May, which raised enough to buy new shelves for the children's section. ";

fn screen(c: &mut Criterion) {
    let screener = Screener::new();
    let minutes = prose(2048, MINUTES);
    let ascii = prose(
        2048,
        "Please summarise the notes about the quarterly plan and list the open items for the review. ",
    );
    let non_ascii = prose(
        2048,
        "Bitte fasse die Notizen zum Quartalsplan zusammen und liste die offenen Punkte auf: ß, é, ü. ",
    );
    let document = prose(
        50 * 1024,
        "This document describes the release process, the checks each change goes through, and who signs off. ",
    );
    let mut group = c.benchmark_group("sanitize_screen");
    assert!(screener.screen(&minutes).cleared_by_gate());
    assert!(!screener.screen(&ascii).cleared_by_gate());
    let ungated = screener.without_gate();
    group.bench_function("2 KB ASCII, cleared by the gate: whole", |b| {
        b.iter(|| black_box(screener.screen(&minutes)))
    });
    group.bench_function(
        "2 KB ASCII, cleared by the gate: whole without the gate",
        |b| b.iter(|| black_box(ungated.screen(&minutes))),
    );
    for (name, text) in [
        ("2 KB ASCII", &ascii),
        ("2 KB non-ASCII", &non_ascii),
        ("50 KB document", &document),
    ] {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(format!("{name}: screen text"), |b| {
            b.iter(|| black_box(screen_text(text)))
        });
        let st = screen_text(text);
        group.bench_function(format!("{name}: rules"), |b| {
            b.iter(|| black_box(rule_hits(&st)))
        });
        group.bench_function(format!("{name}: whole (rules + model)"), |b| {
            b.iter(|| black_box(screener.screen(text)))
        });
    }
    group.finish();
}

fn layer(c: &mut Criterion) {
    let prompt = prose(
        2048,
        "Please summarise the notes about the quarterly plan and list the open items for the review. ",
    );
    let body = Bytes::from(
        serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]})
            .to_string(),
    );
    let request = || -> Plain {
        http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))
            .unwrap()
    };
    // The same handler for both: it reads nothing, answers at once.
    fn upstream<B>() -> impl tower::Service<
        http::Request<B>,
        Response = http::Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
           + Send
           + 'static {
        service_fn(|_req: http::Request<B>| async {
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"{}"))))
        })
    }
    let mut group = c.benchmark_group("sanitize_layer");
    let mut bare = upstream();
    group.bench_function("2 KB chat request: bare service", |b| {
        b.iter(|| round_trip(&mut bare, request()))
    });
    let mut guarded = SanitizeLayer::new(Policy::new()).layer(upstream());
    group.bench_function("2 KB chat request: SanitizeLayer (default policy)", |b| {
        b.iter(|| round_trip(&mut guarded, request()))
    });
    let minutes = Bytes::from(
        serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prose(2048, MINUTES)}]})
            .to_string(),
    );
    group.bench_function(
        "2 KB chat request the gate clears: SanitizeLayer (default policy)",
        |b| {
            b.iter(|| {
                let request = http::Request::post("/v1/chat/completions")
                    .header("content-type", "application/json")
                    .body(Full::new(minutes.clone()))
                    .unwrap();
                round_trip(&mut guarded, request)
            })
        },
    );
    group.finish();
}

#[allow(missing_docs)] // generated by the macro
mod group {
    use super::*;
    criterion_group!(benches, screen, layer);
}
use group::benches;
criterion_main!(benches);
