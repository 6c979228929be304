//! The landed layers stacked as the gateway stacks them (rate limits, then budgets, then
//! redaction, then the breaker), in memory, with exact token counting, on a 2 KB chat request
//! with nothing to find; and a streamed reply of 200 events through them.
//!
//! - `request_2kb`: a bare service that reads the body and answers with usage (the baseline);
//!   the shared parse alone; each layer alone; the three together. Each request's response body
//!   is read to its end (where usage settles).
//! - `stream_200_events`: the same request with `stream: true`, answered by 200 chat chunks and a
//!   usage chunk in 512-byte frames, through a bare service and through the three layers. The
//!   per-event cost is (stack − bare − the request's own cost) ÷ 200.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use moat_audit::{AuditLayer, AuditLog, FileSink, Fsync};
use moat_breaker::{Breaker, CircuitBreakerLayer};
use moat_cache::{CacheLayer, MemoryStore};
use moat_core::body::{RequestBody, DEFAULT_BODY_LIMIT};
use moat_core::identity::{ClientIp, Global, PeerAddr};
use moat_core::request::{read_llm_request, LlmBody};
use moat_moderate::ModerateLayer;
use moat_quota::{Budget, Period, QuotaLayer};
use moat_ratelimit::{Limit, RateLimitLayer, Rule};
use moat_redact::{Entity, RedactLayer, Redactor};
use moat_sanitize::SanitizeLayer;
use tower::{Layer, Service, ServiceBuilder};

const USAGE: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":500,"completion_tokens":20,"total_tokens":520}}"#;

fn body_2kb(stream: bool) -> Bytes {
    body_of(2000, stream)
}

/// A chat request whose prompt is `bytes` long.
fn body_of(bytes: usize, stream: bool) -> Bytes {
    let filler =
        "Please summarise the attached notes about the quarterly plan and the open items. ";
    let text = filler.repeat(bytes / filler.len() + 1)[..bytes].to_owned();
    Bytes::from(
        serde_json::json!({"model": "gpt-4o", "stream": stream, "max_tokens": 100,
            "messages": [{"role": "user", "content": text}]})
        .to_string(),
    )
}

/// 200 chat chunks and a usage chunk, cut in 512-byte frames.
fn stream_frames() -> Vec<Bytes> {
    let mut sse = String::new();
    for i in 0..200 {
        sse.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":null}}]}}\n\n"
        ));
    }
    sse.push_str("data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":500,\"completion_tokens\":200,\"total_tokens\":700}}\n\ndata: [DONE]\n\n");
    sse.as_bytes()
        .chunks(512)
        .map(Bytes::copy_from_slice)
        .collect()
}

type Frames = StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>,
>;

/// An upstream that reads the body and answers: JSON with usage, or the stream when asked.
async fn upstream<B: http_body::Body<Data = Bytes>>(
    req: Request<B>,
    frames: Option<Vec<Bytes>>,
) -> Result<Response<http_body_util::Either<Full<Bytes>, Frames>>, Infallible> {
    let _ = req.into_body().collect().await;
    Ok(match frames {
        None => Response::builder()
            .header("content-type", "application/json")
            .body(http_body_util::Either::Left(Full::new(Bytes::from_static(
                USAGE.as_bytes(),
            ))))
            .unwrap(),
        Some(frames) => {
            let frames: Vec<_> = frames
                .into_iter()
                .map(|f| Ok(http_body::Frame::data(f)))
                .collect();
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(http_body_util::Either::Right(StreamBody::new(
                    futures_util::stream::iter(frames),
                )))
                .unwrap()
        }
    })
}

fn request(body: &Bytes) -> Request<Full<Bytes>> {
    let mut r = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header(
            "authorization",
            "Bearer sk-proj-0123456789abcdefghijklmnopqrstuvwxyz",
        )
        .body(Full::new(body.clone()))
        .unwrap();
    r.extensions_mut()
        .insert(PeerAddr("192.0.2.1:1".parse().unwrap()));
    r
}

fn ratelimit() -> RateLimitLayer {
    RateLimitLayer::new(
        Rule::new("per-ip", ClientIp::default())
            .limit(Limit::new(1 << 40, Duration::from_secs(1)).unwrap())
            .tokens(Limit::new(1 << 50, Duration::from_secs(60)).unwrap()),
    )
}

fn quota() -> QuotaLayer {
    QuotaLayer::new(Budget::new("daily", Global, Period::Day).tokens(u64::MAX / 4))
}

fn breaker() -> CircuitBreakerLayer {
    CircuitBreakerLayer::new(Breaker::new("bench"))
}

fn redact() -> RedactLayer {
    RedactLayer::new(Redactor::new(&Entity::ALL))
}

/// Times one request through `svc`, reading the response body to its end.
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
                black_box(res.into_body().collect().now_or_never().unwrap().unwrap())
            },
            BatchSize::SmallInput,
        )
    });
}

macro_rules! upstream_for {
    ($body:ty, $frames:expr) => {{
        let frames: Option<Vec<Bytes>> = $frames;
        tower::service_fn(move |req: Request<$body>| upstream(req, frames.clone()))
    }};
}

/// A service that reads and parses the request as the layers share it (and counts its tokens
/// exactly, with `count`), then answers.
fn parse_only(
    count: bool,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<http_body_util::Either<Full<Bytes>, Frames>>,
    Error = Infallible,
> {
    tower::service_fn(move |req: Request<Full<Bytes>>| async move {
        match read_llm_request(req, DEFAULT_BODY_LIMIT).await {
            Ok(LlmBody::Parsed { request, llm }) => {
                if count {
                    black_box(llm.input_tokens(true));
                }
                upstream(request, None).await
            }
            Ok(LlmBody::Unparsed(request)) => upstream(request, None).await,
            Err(_) => unreachable!("the benchmark's request parses"),
        }
    })
}

/// The bare service, each layer alone, the three layers of issue 10 and the six landed before
/// the audit log and the cache, each timed by `$bench`.
macro_rules! layer_by_layer {
    ($bench:ident, $group:ident, $body:ident) => {{
        $bench(
            &mut $group,
            "bare service (baseline)",
            &$body,
            upstream_for!(Full<Bytes>, None),
        );
        let inner = upstream_for!(RequestBody<Full<Bytes>>, None);
        $bench(
            &mut $group,
            "ratelimit alone",
            &$body,
            ratelimit().layer(inner.clone()),
        );
        $bench(
            &mut $group,
            "quota alone",
            &$body,
            quota().layer(inner.clone()),
        );
        let sanitize = SanitizeLayer::default().layer(inner.clone());
        $bench(&mut $group, "sanitize alone", &$body, sanitize);
        $bench(
            &mut $group,
            "redact alone",
            &$body,
            redact().layer(inner.clone()),
        );
        let moderate = ModerateLayer::default().layer(inner.clone());
        $bench(&mut $group, "moderate alone", &$body, moderate);
        let three = ServiceBuilder::new()
            .layer(ratelimit())
            .layer(quota())
            .layer(redact())
            .service(upstream_for!(
                RequestBody<RequestBody<RequestBody<Full<Bytes>>>>,
                None
            ));
        $bench(&mut $group, "ratelimit + quota + redact", &$body, three);
        let landed = ServiceBuilder::new()
            .layer(ratelimit())
            .layer(quota())
            .layer(SanitizeLayer::default())
            .layer(redact())
            .layer(ModerateLayer::default())
            .layer(breaker())
            .service(upstream_for!(
                RequestBody<RequestBody<RequestBody<RequestBody<RequestBody<Full<Bytes>>>>>>,
                None
            ));
        $bench(
            &mut $group,
            "ratelimit + quota + sanitize + redact + moderate + breaker",
            &$body,
            landed,
        );
    }};
}

/// The request body the upstream sees under every layer.
type EveryBody = RequestBody<
    RequestBody<
        RequestBody<RequestBody<RequestBody<RequestBody<moat_audit::RequestBody<Full<Bytes>>>>>>,
    >,
>;

fn requests(c: &mut Criterion) {
    let body = body_2kb(false);
    let mut group = c.benchmark_group("stack_request_2kb");
    group.throughput(Throughput::Bytes(body.len() as u64));
    layer_by_layer!(bench, group, body);
    bench(&mut group, "shared parse only", &body, parse_only(false));
    let whole = ServiceBuilder::new()
        .layer(ratelimit())
        .layer(quota())
        .layer(redact())
        .layer(breaker())
        .service(upstream_for!(
            RequestBody<RequestBody<RequestBody<Full<Bytes>>>>,
            None
        ));
    bench(
        &mut group,
        "ratelimit + quota + redact + breaker",
        &body,
        whole,
    );
    // Every layer, as `every-layer` in scripts/bench-gateway: the audit log (a chained file,
    // its writer thread's catching up timed too) and the cache (a miss: the request is not
    // deterministic) added.
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::builder("moat/bench")
        .sink(FileSink::new(dir.path().join("audit.jsonl")).with_fsync(Fsync::Batch))
        .capacity(1 << 20)
        .start()
        .unwrap();
    let mut every = ServiceBuilder::new()
        .layer(AuditLayer::new(log.clone()))
        .layer(ratelimit())
        .layer(quota())
        .layer(SanitizeLayer::default())
        .layer(redact())
        .layer(ModerateLayer::default())
        .layer(CacheLayer::new(MemoryStore::new(64 << 20)))
        .layer(breaker())
        .service(upstream_for!(EveryBody, None));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    group.bench_function("every layer (audit, cache added)", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let res = every.call(request(&body)).now_or_never().unwrap().unwrap();
                black_box(res.into_body().collect().now_or_never().unwrap().unwrap());
            }
            runtime.block_on(log.flush()).unwrap();
            start.elapsed()
        })
    });
    group.finish();

    // The gateway benchmark's size (scripts/bench-gateway): a 300-byte request.
    let body = body_of(160, false);
    let mut group = c.benchmark_group("stack_request_300b");
    layer_by_layer!(bench, group, body);
    group.finish();
}

/// As [`bench`], with the caches cold: before each request (untimed), 16 MiB of other memory
/// is written, as a busy server's other connections, its runtime and its neighbours do between
/// two requests of one connection. What a layer reads from its tables (model weights, automata,
/// counters) then comes from memory, not the cache a tight benchmark loop keeps warm.
fn bench_cold<S, B>(
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
    let mut other = vec![0u64; 2 << 20];
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                // One write per 64-byte line.
                for (j, word) in other.iter_mut().enumerate().step_by(8) {
                    *word = word.wrapping_add(i ^ j as u64);
                }
                black_box(&other);
                let req = request(body);
                let start = Instant::now();
                let res = svc.call(req).now_or_never().unwrap().unwrap();
                black_box(res.into_body().collect().now_or_never().unwrap().unwrap());
                total += start.elapsed();
            }
            total
        })
    });
}

/// The gateway benchmark's 300-byte request with cold caches, layer by layer and together.
fn cold(c: &mut Criterion) {
    let body = body_of(160, false);
    let mut group = c.benchmark_group("stack_request_300b_cold");
    bench_cold(&mut group, "shared parse only", &body, parse_only(false));
    let count = parse_only(true);
    bench_cold(&mut group, "shared parse and exact count", &body, count);
    let requests_only = RateLimitLayer::new(
        Rule::new("per-ip", ClientIp::default())
            .limit(Limit::new(1 << 40, Duration::from_secs(1)).unwrap()),
    );
    bench_cold(
        &mut group,
        "ratelimit, a request rule only (no parse)",
        &body,
        requests_only.layer(upstream_for!(RequestBody<Full<Bytes>>, None)),
    );
    layer_by_layer!(bench_cold, group, body);
    group.finish();
}

fn streams(c: &mut Criterion) {
    let body = body_2kb(true);
    let frames = stream_frames();
    let mut group = c.benchmark_group("stack_stream_200_events");
    group.throughput(Throughput::Elements(200));
    bench(
        &mut group,
        "bare service (baseline)",
        &body,
        upstream_for!(Full<Bytes>, Some(frames.clone())),
    );
    let stack = ServiceBuilder::new()
        .layer(ratelimit())
        .layer(quota())
        .layer(redact())
        .service(upstream_for!(
            RequestBody<RequestBody<RequestBody<Full<Bytes>>>>,
            Some(frames.clone())
        ));
    bench(&mut group, "ratelimit + quota + redact", &body, stack);
    let whole = ServiceBuilder::new()
        .layer(ratelimit())
        .layer(quota())
        .layer(redact())
        .layer(breaker())
        .service(upstream_for!(
            RequestBody<RequestBody<RequestBody<Full<Bytes>>>>,
            Some(frames.clone())
        ));
    bench(
        &mut group,
        "ratelimit + quota + redact + breaker",
        &body,
        whole,
    );
    let landed = ServiceBuilder::new()
        .layer(ratelimit())
        .layer(quota())
        .layer(SanitizeLayer::default())
        .layer(redact())
        .layer(ModerateLayer::default())
        .layer(breaker())
        .service(upstream_for!(
            RequestBody<RequestBody<RequestBody<RequestBody<RequestBody<Full<Bytes>>>>>>,
            Some(frames.clone())
        ));
    bench(
        &mut group,
        "ratelimit + quota + sanitize + redact + moderate + breaker",
        &body,
        landed,
    );
    group.finish();
}

#[allow(missing_docs)] // generated by the macro
mod group {
    use super::*;
    criterion_group!(benches, requests, streams, cold);
}
use group::benches;
criterion_main!(benches);
