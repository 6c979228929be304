//! moat-ratelimit against governor and tower_governor, in one run.
//!
//! - `keyed_check`: the bare keyed decision, `governor::RateLimiter::check_key` against
//!   `moat_ratelimit::KeyedLimiter::check`, allowing (1,000 keys in turn) and denying (one
//!   exhausted key).
//! - `service`: the same through a tower service keyed by peer IP, 1,000 requests a second per
//!   IP over 10,000 IPs in turn (so nothing is denied): a bare service (baseline),
//!   tower_governor's `Governor`, moat's `RateLimit`. The inner service answers with a
//!   `content-type`, as every upstream does. Requests are built outside the timing.
//! - `hot_key_2_threads`: two threads checking one key at once; time per pair of checks.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use futures_util::FutureExt;
use governor::{Quota, RateLimiter};
use http::{Request, Response};
use http_body_util::Full;
use moat_core::body::RequestBody;
use moat_core::identity::{PeerAddr, PeerIp};
use moat_core::Key;
use moat_ratelimit::{Headers, KeyedLimiter, Limit, RateLimitLayer, Rule};
use tower::{Layer, Service};

const KEYS: u32 = 1000;

fn ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + i))
}

fn huge() -> Limit {
    Limit::new(u64::from(u32::MAX), Duration::from_secs(1)).unwrap()
}

fn keyed_check(c: &mut Criterion) {
    let mut group = c.benchmark_group("keyed_check");
    let governor = RateLimiter::keyed(Quota::per_second(NonZeroU32::MAX));
    let moat = KeyedLimiter::new([huge()]);
    let ips: Vec<IpAddr> = (0..KEYS).map(ip).collect();
    let keys: Vec<Key> = ips.iter().map(|ip| Key::ip(*ip)).collect();
    let mut i = 0usize;
    group.bench_function("allow/governor", |b| {
        b.iter(|| {
            i = (i + 1) % ips.len();
            black_box(governor.check_key(&ips[i]).is_ok())
        })
    });
    group.bench_function("allow/moat", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(moat.check(&keys[i]).is_ok())
        })
    });
    let governor = RateLimiter::keyed(Quota::per_hour(NonZeroU32::new(1).unwrap()));
    let moat = KeyedLimiter::new([Limit::per_hour(1)]);
    let (hot_ip, hot_key) = (ip(1), Key::ip(ip(1)));
    let _ = governor.check_key(&hot_ip);
    let _ = moat.check(&hot_key);
    group.bench_function("deny/governor", |b| {
        b.iter(|| black_box(governor.check_key(&hot_ip).is_err()))
    });
    group.bench_function("deny/moat", |b| {
        b.iter(|| black_box(moat.check(&hot_key).is_err()))
    });
    group.finish();
}

type Plain = Request<Full<Bytes>>;

fn request(i: u32) -> Plain {
    let addr = SocketAddr::new(ip(i), 4000);
    let mut req = Request::post("/v1/chat/completions")
        .body(Full::default())
        .unwrap();
    req.extensions_mut().insert(PeerAddr(addr));
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(addr));
    req
}

/// IPs the service benchmarks rotate through.
const SERVICE_KEYS: u32 = 10_000;

/// An upstream's answer: empty, but with the `content-type` every real one has.
fn answer<B: Default>() -> Response<B> {
    let mut response = Response::new(B::default());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn service(c: &mut Criterion) {
    let mut group = c.benchmark_group("service");
    let requests = |n: u32| {
        let mut i = 0;
        move || {
            i = (i + 1) % n;
            request(i)
        }
    };

    let mut bare = tower::service_fn(|_req: Plain| {
        std::future::ready(Ok::<_, Infallible>(answer::<Full<Bytes>>()))
    });
    group.bench_function("allow/bare (baseline)", |b| {
        b.iter_batched(
            requests(SERVICE_KEYS),
            |req| black_box(bare.call(req).now_or_never()),
            BatchSize::SmallInput,
        )
    });

    let axum_inner = tower::service_fn(|_req: Plain| {
        std::future::ready(Ok::<_, Infallible>(answer::<axum::body::Body>()))
    });
    let governed = |per_second: u64, burst: u32| {
        let config = tower_governor::governor::GovernorConfigBuilder::default()
            .per_nanosecond(1_000_000_000 / per_second)
            .burst_size(burst)
            .finish()
            .unwrap();
        tower_governor::GovernorLayer::<_, _, axum::body::Body>::new(Arc::new(config))
            .layer(axum_inner)
    };
    let mut tg = governed(1000, 1000);
    group.bench_function("allow/tower_governor", |b| {
        b.iter_batched(
            requests(SERVICE_KEYS),
            |req| black_box(tg.call(req).now_or_never()),
            BatchSize::SmallInput,
        )
    });

    let moat_inner = tower::service_fn(|_req: Request<RequestBody<Full<Bytes>>>| {
        std::future::ready(Ok::<_, Infallible>(answer::<Full<Bytes>>()))
    });
    let moat_layer = |limit: Limit, headers: Headers| {
        RateLimitLayer::new(Rule::new("per-ip", PeerIp).limit(limit))
            .with_headers(headers)
            .layer(moat_inner)
    };
    let mut moat = moat_layer(Limit::per_second(1000), Headers::NONE);
    group.bench_function("allow/moat", |b| {
        b.iter_batched(
            requests(SERVICE_KEYS),
            |req| black_box(moat.call(req).now_or_never()),
            BatchSize::SmallInput,
        )
    });
    let mut moat_headers = moat_layer(Limit::per_second(1000), Headers::OPENAI);
    group.bench_function("allow/moat with x-ratelimit headers", |b| {
        b.iter_batched(
            requests(SERVICE_KEYS),
            |req| black_box(moat_headers.call(req).now_or_never()),
            BatchSize::SmallInput,
        )
    });

    // Values of 4 billion (as token limits have) are formatted per response.
    let mut moat_big = moat_layer(huge(), Headers::OPENAI);
    group.bench_function(
        "allow/moat with x-ratelimit headers, 10-digit values",
        |b| {
            b.iter_batched(
                requests(SERVICE_KEYS),
                |req| black_box(moat_big.call(req).now_or_never()),
                BatchSize::SmallInput,
            )
        },
    );

    let mut tg = governed(1, 1);
    let _ = tg.call(request(0)).now_or_never();
    group.bench_function("deny/tower_governor", |b| {
        b.iter_batched(
            || request(0),
            |req| black_box(tg.call(req).now_or_never()),
            BatchSize::SmallInput,
        )
    });
    let mut moat = moat_layer(Limit::per_hour(1), Headers::NONE);
    let _ = moat.call(request(0)).now_or_never();
    group.bench_function("deny/moat", |b| {
        b.iter_batched(
            || request(0),
            |req| black_box(moat.call(req).now_or_never()),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn hot_key(c: &mut Criterion) {
    let mut group = c.benchmark_group("hot_key_2_threads");
    let governor = Arc::new(RateLimiter::keyed(Quota::per_second(NonZeroU32::MAX)));
    let moat = Arc::new(KeyedLimiter::new([huge()]));
    let hot = ip(7);
    group.bench_function("governor", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    let g = governor.clone();
                    s.spawn(move || {
                        (0..iters).for_each(|_| {
                            let _ = black_box(g.check_key(&hot));
                        })
                    });
                }
            });
            start.elapsed()
        })
    });
    let key = Key::ip(hot);
    group.bench_function("moat", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    let m = moat.clone();
                    s.spawn(move || {
                        (0..iters).for_each(|_| {
                            let _ = black_box(m.check(&key));
                        })
                    });
                }
            });
            start.elapsed()
        })
    });
    group.finish();
}

#[allow(missing_docs)] // generated by the macro
mod group {
    use super::*;
    criterion_group!(benches, keyed_check, service, hot_key);
}
use group::benches;
criterion_main!(benches);
