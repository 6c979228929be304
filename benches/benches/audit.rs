//! moat-audit: what it costs a request, how fast the writer chains and writes, how fast a log
//! verifies; beside tower-http's `TraceLayer` writing JSON lines through tracing-appender's
//! non-blocking writer (the usual way to log each request from a tower stack).
//!
//! - `audit_request_path`: one request (`POST /v1/chat/completions` with a bearer key and an
//!   `x-request-id`), its body read to the end, through a bare service (baseline), moat's
//!   `AuditLayer` (metadata level, a JSON Lines file, fsync per batch), and `TraceLayer` with
//!   a JSON `tracing-subscriber` on a non-blocking file writer. Time on the caller's thread; the
//!   writer threads run beside it (moat's queue is drained every 256 requests, outside the
//!   timing, so it stays as short as in a process whose writer keeps up).
//! - `audit_enqueue`: handing one event to the writer (`AuditLog::record_event`, the same queue
//!   a request's event goes through), drained every 256 outside the timing.
//! - `audit_writer`: records per second from one client into a file until flushed (chained,
//!   hashed, canonical JSON), for each fsync policy.
//! - `audit_verify`: the verifier over a 20,000-record log (MB/s).

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{Request, Response};
use http_body_util::Full;
use moat_audit::{AuditLayer, AuditLog, FileSink, Fsync};
use moat_benches::{round_trip, Plain};
use tower::{Layer, Service};

fn request() -> Plain {
    Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-bench-0123456789abcdef")
        .header("x-request-id", "bench-request-0001")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}"#,
        )))
        .unwrap()
}

/// The app behind the layers: answers at once, whatever the request body.
#[derive(Clone, Copy)]
struct App;

impl<B> Service<Request<B>> for App {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(
            br#"{"choices":[]}"#,
        )))))
    }
}

fn log(dir: &std::path::Path, fsync: Fsync) -> AuditLog {
    AuditLog::builder("moat-audit/bench")
        .sink(FileSink::new(dir.join("moat-audit.jsonl")).with_fsync(fsync))
        .capacity(1 << 20)
        .start()
        .unwrap()
}

fn request_path(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("audit_request_path");
    let inner = App;
    let mut bare = inner;
    group.bench_function("bare (baseline)", |b| {
        b.iter(|| round_trip(&mut bare, request()))
    });

    let dir = tempfile::tempdir().unwrap();
    let audit = log(dir.path(), Fsync::Batch);
    let mut moat = AuditLayer::new(audit.clone()).layer(inner);
    group.bench_function("moat AuditLayer (chained file)", |b| {
        // In chunks, each written out before the next starts (untimed), so the queue stays
        // short as in a process whose writer keeps up; the writer works beside the chunk.
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let chunk = left.min(256);
                let start = Instant::now();
                for _ in 0..chunk {
                    round_trip(&mut moat, request());
                }
                elapsed += start.elapsed();
                runtime.block_on(audit.flush()).unwrap();
                left -= chunk;
            }
            elapsed
        })
    });

    let trace_dir = tempfile::tempdir().unwrap();
    let (writer, guard) = tracing_appender::non_blocking(tracing_appender::rolling::never(
        trace_dir.path(),
        "trace.jsonl",
    ));
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(writer)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let trace = tower_http::trace::TraceLayer::new_for_http()
        .make_span_with(tower_http::trace::DefaultMakeSpan::new().level(tracing::Level::INFO))
        .on_response(tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO));
    let mut traced = trace.layer(inner);
    tracing::subscriber::with_default(subscriber, || {
        group.bench_function("tower-http TraceLayer (tracing-appender JSON)", |b| {
            b.iter(|| round_trip(&mut traced, request()))
        });
    });
    drop(guard);
    group.finish();
}

fn enqueue(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = log(dir.path(), Fsync::Never);
    let mut group = c.benchmark_group("audit_enqueue");
    let mut fields = serde_json::Map::new();
    fields.insert("key_id".into(), "alpha".into());
    group.bench_function("record_event (a small event of the app's own)", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let chunk = left.min(256);
                let batch: Vec<_> = (0..chunk).map(|_| fields.clone()).collect();
                let start = Instant::now();
                for f in batch {
                    audit.record_event("bench", f);
                }
                elapsed += start.elapsed();
                runtime.block_on(audit.flush()).unwrap();
                left -= chunk;
            }
            elapsed
        })
    });
    group.finish();
}

fn writer(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("audit_writer");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(8));
    let inner = App;
    for (name, fsync) in [("fsync=never", Fsync::Never), ("fsync=batch", Fsync::Batch)] {
        let dir = tempfile::tempdir().unwrap();
        let audit = log(dir.path(), fsync);
        let mut service = AuditLayer::new(audit.clone()).layer(inner);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    round_trip(&mut service, request());
                }
                runtime.block_on(audit.flush()).unwrap();
                start.elapsed()
            })
        });
    }
    group.finish();
}

fn verify(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = log(dir.path(), Fsync::Never);
    let mut service = AuditLayer::new(audit.clone()).layer(App);
    for _ in 0..20_000 {
        round_trip(&mut service, request());
    }
    runtime.block_on(audit.shutdown()).unwrap();
    let files = vec![dir.path().join("moat-audit.jsonl")];
    let bytes = std::fs::metadata(&files[0]).unwrap().len();
    let mut group = c.benchmark_group("audit_verify");
    group.throughput(Throughput::Bytes(bytes));
    group.sample_size(10);
    group.bench_function("20k records", |b| {
        b.iter(|| {
            let report = moat_audit::verify(&files, &[], &[]).unwrap();
            assert!(report.is_ok());
            black_box(report)
        })
    });
    group.finish();
}

#[allow(missing_docs)] // generated by the macro
mod group {
    use super::*;
    criterion_group!(benches, request_path, enqueue, writer, verify);
}
use group::benches;
criterion_main!(benches);
