//! Requests reserved and settled in Redis through `QuotaLayer`: throughput and latency with
//! concurrent clients against a private redis-server on loopback; and, in the same run, what
//! `redis-benchmark` gets running the same two scripts (reserve, settle) with the same arguments
//! (captured with `MONITOR`) and as many clients, combined as one request: 1 ÷ (1/reserve +
//! 1/settle).
//!
//! Run: `cargo bench -p moat-benches --bench quota_redis`

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use moat_core::body::RequestBody;
use moat_core::identity::{ApiKey, PeerAddr};
use moat_quota::{Budget, OnStoreError, Period, QuotaLayer, RedisStore};
use moat_testkit::redis::RedisServer;
use tower::{ServiceBuilder, ServiceExt};

const PER_ROW: usize = 10_000;

fn main() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("QuotaLayer with Redis: reserve before, settle after ({PER_ROW} requests per row, 1,000 keys)");
    println!("| concurrent clients | requests/s | p50 | p99 | redis-benchmark, same scripts/s | moat ÷ redis-benchmark |");
    println!("|---|---|---|---|---|---|");
    let mut scripts = None;
    for clients in [1usize, 8, 32] {
        let store = RedisStore::open(&redis.url())
            .unwrap()
            .with_on_error(OnStoreError::FailClosed)
            .with_timeout(Duration::from_secs(2));
        let layer = QuotaLayer::new(
            Budget::new("bench", ApiKey::default(), Period::Day).tokens(u64::MAX / 4),
        )
        .with_headers(false)
        .with_redis(store);
        let inner = tower::service_fn(|req: Request<RequestBody<Full<Bytes>>>| async move {
            let _ = req.into_body().collect().await;
            let usage = r#"{"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":20,"total_tokens":50}}"#;
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(usage.as_bytes())))
                    .unwrap(),
            )
        });
        let service = ServiceBuilder::new().layer(layer).service(inner);
        let scripts = scripts.get_or_insert_with(|| {
            // Once before capturing: the first call loads the scripts.
            let (warm, one) = (service.clone(), service.clone());
            runtime.block_on(async move {
                let res = warm.oneshot(request(0)).await.unwrap();
                let _ = res.into_body().collect().await;
            });
            let commands = moat_benches::capture_evalsha(redis.port(), || {
                runtime.block_on(async move {
                    let res = one.oneshot(request(0)).await.unwrap();
                    let _ = res.into_body().collect().await;
                });
            });
            assert_eq!(commands.len(), 2, "one reserve, one settle: {commands:?}");
            commands
        });
        let (elapsed, mut latencies) = runtime.block_on(async move {
            for i in 0..50 {
                let _ = service.clone().oneshot(request(i)).await;
            }
            moat_benches::concurrent_clients(clients, PER_ROW, move |c, i| {
                let service = service.clone();
                async move {
                    let res = service.oneshot(request(c * 7919 + i)).await.unwrap();
                    assert_eq!(res.status(), 200);
                    let _ = res.into_body().collect().await;
                }
            })
            .await
        });
        let moat = latencies.len() as f64 / elapsed.as_secs_f64();
        let row = moat_benches::latency_row(clients, &mut latencies, elapsed);
        let per_request: f64 = scripts
            .iter()
            .map(|s| {
                1.0 / moat_benches::redis_benchmark(redis.port(), false, s, clients, PER_ROW).rps
            })
            .sum();
        let peer = 1.0 / per_request;
        println!("{row} {peer:.0} | {:.0}% |", 100.0 * moat / peer);
    }
}

fn request(i: usize) -> Request<Full<Bytes>> {
    let body = r#"{"model":"gpt-4o","max_tokens":20,"messages":[{"role":"user","content":"hello there"}]}"#;
    let mut r = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer sk-{}", i % 1000))
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    r.extensions_mut()
        .insert(PeerAddr("192.0.2.1:1".parse().unwrap()));
    r
}
