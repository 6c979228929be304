//! moat-quota: counting a prompt's tokens, and a whole request reserved and settled in memory.
//!
//! - `token_estimate_1kb`: 1 KB of English prose counted exactly (o200k, as for `gpt-4o`)
//!   and with the byte-length upper bound used for models without a tokenizer.
//! - `request_2kb`: a 2 KB chat request through a bare service that reads the body and answers
//!   with usage (the baseline); through the shared parse alone (`read_llm_request`, which every
//!   content layer of a stack shares); and through `QuotaLayer` (parse, count, reserve, call,
//!   settle from the response's usage when its body has been read).

use std::convert::Infallible;
use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use moat_core::body::{RequestBody, DEFAULT_BODY_LIMIT};
use moat_core::identity::{Global, PeerAddr};
use moat_core::request::{read_llm_request, LlmBody};
use moat_quota::{Budget, Period, QuotaLayer};
use tower::{Layer, Service};

fn prose(bytes: usize) -> String {
    let filler = "The quick brown fox jumps over the lazy dog while the committee reviews the quarterly plan. ";
    filler.repeat(bytes / filler.len() + 1)[..bytes].to_owned()
}

fn token_estimate(c: &mut Criterion) {
    let text = prose(1024);
    let mut group = c.benchmark_group("token_estimate_1kb");
    group.throughput(Throughput::Bytes(1024));
    group.bench_function("exact o200k (gpt-4o)", |b| {
        b.iter(|| black_box(moat_core::tokens::count(Some("gpt-4o"), black_box(&text))))
    });
    group.bench_function("byte upper bound (unknown model)", |b| {
        b.iter(|| {
            black_box(moat_core::tokens::count(
                Some("local-llama"),
                black_box(&text),
            ))
        })
    });
    group.finish();
}

const USAGE: &str = r#"{"choices":[{"message":{"content":"ok"}}],"usage":{"prompt_tokens":500,"completion_tokens":20,"total_tokens":520}}"#;

fn body_2kb() -> Bytes {
    let text = prose(2000);
    Bytes::from(serde_json::json!({"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": text}]}).to_string())
}

fn request(body: &Bytes) -> Request<Full<Bytes>> {
    let mut r = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .unwrap();
    r.extensions_mut()
        .insert(PeerAddr("192.0.2.1:1".parse().unwrap()));
    r
}

/// An upstream that reads the body and answers with usage, whatever the request body type.
async fn upstream<B: http_body::Body<Data = Bytes>>(
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let _ = req.into_body().collect().await;
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(USAGE.as_bytes())))
        .unwrap())
}

/// Times one request through `svc`, reading the response body to its end (where usage settles).
fn bench<S, B>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    body: &Bytes,
    mut svc: S,
) where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    group.bench_function(name, |b| {
        b.iter_batched(
            || request(body),
            |req| {
                let res = svc.call(req).now_or_never().unwrap().unwrap();
                black_box(res.into_body().collect().now_or_never())
            },
            BatchSize::SmallInput,
        )
    });
}

fn requests(c: &mut Criterion) {
    let body = body_2kb();
    let mut group = c.benchmark_group("request_2kb");
    let budget = || Budget::new("b", Global, Period::Day).tokens(u64::MAX / 2);
    bench(
        &mut group,
        "bare service (baseline)",
        &body,
        tower::service_fn(upstream::<Full<Bytes>>),
    );
    let inner = tower::service_fn(upstream::<RequestBody<Full<Bytes>>>);
    let parse_only = tower::service_fn(|req: Request<Full<Bytes>>| async move {
        match read_llm_request(req, DEFAULT_BODY_LIMIT).await {
            Ok(LlmBody::Parsed { request, .. } | LlmBody::Unparsed(request)) => {
                upstream(request).await
            }
            Err(_) => unreachable!("the benchmark's request parses"),
        }
    });
    bench(&mut group, "shared parse only", &body, parse_only);
    bench(
        &mut group,
        "QuotaLayer, exact count: reserve + settle in memory",
        &body,
        QuotaLayer::new(budget()).layer(inner),
    );
    let bound = QuotaLayer::new(budget())
        .with_exact_counting(false)
        .layer(inner);
    bench(
        &mut group,
        "QuotaLayer, byte upper bound: reserve + settle in memory",
        &body,
        bound,
    );
    group.finish();
}

#[allow(missing_docs)] // generated by the macro
mod group {
    use super::*;
    criterion_group!(benches, token_estimate, requests);
}
use group::benches;
criterion_main!(benches);
