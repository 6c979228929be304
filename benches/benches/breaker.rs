//! moat-breaker's closed path against failsafe, recloser and tower-resilience, in one run.
//!
//! - `breaker_closed_call`: one call through a closed breaker that succeeds: admitted, then its success
//!   recorded (moat's `try_acquire` + `record`, failsafe's and recloser's `call`). Each breaker
//!   has a 100-call count window (failsafe: its default policy, consecutive failures). moat's
//!   window is full of successes, so a success is not written; also measured with a failure in
//!   the window (every call written) and with slow-call timing on (two clock reads a call).
//! - `breaker_closed_call_2_threads`: the same from two threads on one breaker; time per pair of calls.
//! - `breaker_service`: a request through a tower service with a breaker in front, the response body
//!   read to its end (moat records the outcome there): a bare service (baseline), moat's
//!   `CircuitBreaker`, tower-resilience's `CircuitBreaker` classifying the response status.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use failsafe::CircuitBreaker as _;
use http::{Request, Response};
use http_body_util::Full;
use moat_benches::{round_trip, Plain};
use moat_breaker::{Breaker, BreakerConfig, CallOutcome, CircuitBreakerLayer, Window};
use tower::Layer;

fn moat() -> Breaker {
    Breaker::builder("bench")
        .config(BreakerConfig::default().with_window(Window::Count(100)))
        .build()
        .unwrap()
}

fn recloser() -> recloser::Recloser {
    recloser::Recloser::custom()
        .closed_len(100)
        .error_rate(0.5)
        .build()
}

fn closed_call(c: &mut Criterion) {
    let mut group = c.benchmark_group("breaker_closed_call");
    let breaker = moat();
    group.bench_function("moat", |b| {
        b.iter(|| breaker.try_acquire().unwrap().record(CallOutcome::Success))
    });
    // A window that always holds a failure (one call in 50 fails, 2%, under the 50% rate):
    // every success is written, as after any recent failure.
    let failing = moat();
    let mut n = 0u32;
    group.bench_function("moat, a failure in the window", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let outcome = if n % 50 == 0 {
                CallOutcome::Failure
            } else {
                CallOutcome::Success
            };
            failing.try_acquire().unwrap().record(outcome)
        })
    });
    let timed = Breaker::builder("timed")
        .config(
            BreakerConfig::default()
                .with_window(Window::Count(100))
                .with_slow_call(Duration::from_secs(30)),
        )
        .build()
        .unwrap();
    group.bench_function("moat, timing slow calls", |b| {
        b.iter(|| timed.try_acquire().unwrap().record(CallOutcome::Success))
    });
    let failsafe = failsafe::Config::new().build();
    group.bench_function("failsafe", |b| {
        b.iter(|| black_box(failsafe.call(|| Ok::<u32, ()>(1))))
    });
    let recloser = recloser();
    group.bench_function("recloser", |b| {
        b.iter(|| black_box(recloser.call(|| Ok::<u32, ()>(1))))
    });
    group.finish();
}

/// Time for `iters` calls of `call` on each of two threads at once.
fn two_threads(iters: u64, call: impl Fn() + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| (0..iters).for_each(|_| call()));
        }
    });
    start.elapsed()
}

fn closed_call_2_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("breaker_closed_call_2_threads");
    let breaker = moat();
    group.bench_function("moat", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                breaker.try_acquire().unwrap().record(CallOutcome::Success)
            })
        })
    });
    let failsafe = failsafe::Config::new().build();
    group.bench_function("failsafe", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let _ = black_box(failsafe.call(|| Ok::<u32, ()>(1)));
            })
        })
    });
    let recloser = recloser();
    group.bench_function("recloser", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let _ = black_box(recloser.call(|| Ok::<u32, ()>(1)));
            })
        })
    });
    group.finish();
}

fn answer() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn service(c: &mut Criterion) {
    let mut group = c.benchmark_group("breaker_service");
    let inner = tower::service_fn(|_req: Plain| std::future::ready(Ok::<_, Infallible>(answer())));
    let mut bare = inner;
    group.bench_function("bare (baseline)", |b| {
        b.iter(|| round_trip(&mut bare, Request::new(Full::default())))
    });

    let mut moat = CircuitBreakerLayer::new(moat()).layer(inner);
    group.bench_function("moat", |b| {
        b.iter(|| round_trip(&mut moat, Request::new(Full::default())))
    });

    let resilience = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .classify_response(|response: &Response<Full<Bytes>>| response.status().is_server_error())
        .build()
        .unwrap();
    let mut resilience = resilience.layer(inner);
    group.bench_function("tower-resilience", |b| {
        b.iter(|| round_trip(&mut resilience, Request::new(Full::default())))
    });
    group.finish();
}

#[allow(missing_docs)] // generated by the macro
mod group {
    use super::*;
    criterion_group!(benches, closed_call, closed_call_2_threads, service);
}
use group::benches;
criterion_main!(benches);
