//! Redis-backed decisions per second and latency percentiles with concurrent clients, against
//! a private redis-server on loopback, through `RateLimitLayer`; and, in the same run, what
//! `redis-benchmark` gets from the same server running the same script with the same arguments
//! (captured with `MONITOR`) and as many clients: the ceiling a client library could reach.
//!
//! Run: `cargo bench -p moat-benches --bench ratelimit_redis`

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use moat_core::body::RequestBody;
use moat_core::identity::{PeerAddr, PeerIp};
use moat_ratelimit::{Headers, Limit, OnStoreError, RateLimitLayer, RedisStore, Rule};
use moat_testkit::redis::RedisServer;
use tower::{ServiceBuilder, ServiceExt};

const PER_LEVEL: usize = 20_000;

fn main() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("redis decisions through RateLimitLayer ({PER_LEVEL} requests per row, 1,000 keys)");
    println!("| concurrent clients | decisions/s | p50 | p99 | redis-benchmark, same script/s | moat ÷ redis-benchmark |");
    println!("|---|---|---|---|---|---|");
    let mut script = None;
    for clients in [1usize, 8, 32, 128] {
        let store = RedisStore::open(&redis.url())
            .unwrap()
            .with_on_error(OnStoreError::FailClosed)
            .with_timeout(Duration::from_secs(2));
        let layer = RateLimitLayer::new(
            Rule::new("bench", PeerIp)
                .limit(Limit::new(u64::from(u32::MAX), Duration::from_secs(1)).unwrap()),
        )
        .with_headers(Headers::NONE)
        .with_redis(store);
        let inner = tower::service_fn(|_req: Request<RequestBody<Full<Bytes>>>| async {
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
        });
        let service = ServiceBuilder::new().layer(layer).service(inner);
        let script = script.get_or_insert_with(|| {
            // Once before capturing: the first call loads the scripts.
            let (warm, one) = (service.clone(), service.clone());
            runtime.block_on(async move {
                let _ = warm.oneshot(request(0)).await;
            });
            let commands = moat_benches::capture_evalsha(redis.port(), || {
                runtime.block_on(async move {
                    let _ = one.oneshot(request(0)).await;
                });
            });
            commands
                .into_iter()
                .next()
                .expect("a decision runs the script")
        });
        let (elapsed, mut latencies) = runtime.block_on(async move {
            // Warm up the connection and script cache.
            for i in 0..100u32 {
                let _ = service.clone().oneshot(request(i)).await;
            }
            moat_benches::concurrent_clients(clients, PER_LEVEL, move |c, i| {
                let service = service.clone();
                let req = request(u32::try_from((c * 7919 + i) % 1000).unwrap());
                async move {
                    let response = service.oneshot(req).await.unwrap();
                    assert_eq!(response.status(), 200);
                }
            })
            .await
        });
        let moat = latencies.len() as f64 / elapsed.as_secs_f64();
        let row = moat_benches::latency_row(clients, &mut latencies, elapsed);
        let peer = moat_benches::redis_benchmark(redis.port(), script, clients, PER_LEVEL);
        println!("{row} {peer:.0} | {:.0}% |", 100.0 * moat / peer);
    }
}

fn request(i: u32) -> Request<Full<Bytes>> {
    let mut req = Request::post("/v1/chat/completions")
        .body(Full::default())
        .unwrap();
    req.extensions_mut().insert(PeerAddr(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + i)),
        1,
    )));
    req
}
