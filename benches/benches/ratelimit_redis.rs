//! Redis-backed decisions per second and latency percentiles with concurrent clients, through
//! `RateLimitLayer`, against a private redis-server on loopback and then a private 3-primary
//! Redis Cluster; and, in the same run, what `redis-benchmark` (`--cluster` for the cluster)
//! gets from the same servers running the same script with the same arguments (captured with
//! `MONITOR`) and as many clients: the ceiling a client library could reach.
//!
//! Run: `cargo bench -p moat-benches --bench ratelimit_redis`

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use moat_core::body::RequestBody;
use moat_core::identity::{PeerAddr, PeerIp};
use moat_core::store::RedisConnection;
use moat_ratelimit::{Headers, Limit, OnStoreError, RateLimitLayer, RedisStore, Rule};
use moat_testkit::redis::{RedisCluster, RedisServer};
use tower::{ServiceBuilder, ServiceExt};

const PER_LEVEL: usize = 20_000;

fn main() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let cluster = RedisCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let node = Arc::new(RedisConnection::open(&redis.url()).unwrap());
    // The script and arguments one decision sends, captured on the single node.
    let script = {
        let service = limited(node.clone());
        let (warm, one) = (service.clone(), service);
        // Once before capturing: the first call loads the scripts.
        runtime.block_on(async move {
            let _ = warm.oneshot(request(0)).await;
        });
        moat_benches::capture_evalsha(redis.port(), || {
            runtime.block_on(async move {
                let _ = one.oneshot(request(0)).await;
            });
        })
        .into_iter()
        .next()
        .expect("a decision runs the script")
    };
    let clustered = Arc::new(RedisConnection::open_cluster(&cluster.urls()).unwrap());
    println!("redis decisions through RateLimitLayer ({PER_LEVEL} requests per row, 1,000 keys)");
    println!("| redis | concurrent clients | decisions/s | p50 | p99 | redis-benchmark, same script/s | its p99 | moat ÷ redis-benchmark |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, conn, port, is_cluster) in [
        ("one node", node, redis.port(), false),
        (
            "3-primary cluster",
            clustered,
            cluster.nodes()[0].port(),
            true,
        ),
    ] {
        for clients in [1usize, 8, 32, 128] {
            let service = limited(conn.clone());
            let (elapsed, mut latencies) = runtime.block_on(async move {
                // Warm up the connections and every node's script cache.
                for i in 0..1000u32 {
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
            let peer = moat_benches::redis_benchmark(port, is_cluster, &script, clients, PER_LEVEL);
            println!(
                "| {name} {row} {:.0} | {:?} | {:.0}% |",
                peer.rps,
                peer.p99,
                100.0 * moat / peer.rps
            );
        }
    }
}

/// A layer deciding every request in Redis over `conn`, with a limit no bench reaches.
fn limited(
    conn: Arc<RedisConnection>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<moat_ratelimit::ResponseBody<Full<Bytes>>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    let store = RedisStore::with_connection(conn)
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
    ServiceBuilder::new().layer(layer).service(inner)
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
