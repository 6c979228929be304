//! The Redis store against a real, private redis-server.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use moat_core::body::RequestBody;
use moat_core::identity::{ApiKey, PeerAddr};
use moat_ratelimit::{Limit, OnStoreError, RateLimitLayer, RedisStore, Rule};
use moat_testkit::redis::RedisServer;
use serde_json::{json, Value};
use tower::{ServiceBuilder, ServiceExt};

type Inner = tower::util::BoxCloneService<
    Request<RequestBody<Full<Bytes>>>,
    Response<Full<Bytes>>,
    Infallible,
>;

fn usage_service(total: u64) -> Inner {
    tower::util::BoxCloneService::new(tower::service_fn(
        move |_req: Request<RequestBody<Full<Bytes>>>| async move {
            let reply = json!({"usage": {"prompt_tokens": total / 2, "completion_tokens": total - total / 2, "total_tokens": total}});
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(reply.to_string())))
                    .unwrap(),
            )
        },
    ))
}

fn req(key: &str) -> Request<Full<Bytes>> {
    let mut r = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .body(Full::default())
        .unwrap();
    r.extensions_mut()
        .insert(PeerAddr("203.0.113.1:5000".parse().unwrap()));
    r
}

fn start_redis() -> RedisServer {
    RedisServer::start().unwrap_or_else(|e| panic!("{e}"))
}

fn limiter(redis: &RedisServer, rule: Rule, policy: OnStoreError) -> RateLimitLayer {
    let store = RedisStore::open(&redis.url())
        .unwrap()
        .with_on_error(policy)
        .with_timeout(Duration::from_millis(500));
    RateLimitLayer::new(rule).with_redis(store)
}

async fn send(
    layer: &RateLimitLayer,
    inner: Inner,
    r: Request<Full<Bytes>>,
) -> (StatusCode, http::HeaderMap, Value) {
    let res = ServiceBuilder::new()
        .layer(layer.clone())
        .service(inner)
        .oneshot(r)
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_limiters_sharing_redis_never_over_admit() {
    let redis = start_redis();
    let rule = || Rule::new("shared", ApiKey::default()).limit(Limit::per_hour(20));
    let a = limiter(&redis, rule(), OnStoreError::FailClosed);
    let b = limiter(&redis, rule(), OnStoreError::FailClosed);
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let layer = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { send(&layer, usage_service(0), req("sk-shared")).await.0 })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        let status = t.await.unwrap();
        assert!(status == 200 || status == 429, "{status}");
        admitted += usize::from(status == 200);
    }
    assert_eq!(admitted, 20, "one limit across both processes");
}

#[tokio::test]
async fn state_expires_when_fully_reset_and_keys_are_hash_tagged() {
    let redis = start_redis();
    let layer = limiter(
        &redis,
        Rule::new("tagged", ApiKey::default()).limit(Limit::per_minute(10)),
        OnStoreError::FailClosed,
    );
    let (s, h, _) = send(&layer, usage_service(0), req("sk-ttl")).await;
    assert_eq!(s, 200);
    assert_eq!(h["x-ratelimit-remaining-requests"], "9");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("moat:rl:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1);
    assert!(
        keys[0].starts_with("moat:rl:{tagged:") && keys[0].ends_with('}'),
        "{}",
        keys[0]
    );
    assert!(!keys[0].contains("sk-ttl"));
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (1..=6001).contains(&ttl),
        "expires when one request's 6 s have come back: {ttl}"
    );
}

#[tokio::test]
async fn redis_down_fails_closed_then_recovers() {
    let mut redis = start_redis();
    let layer = limiter(
        &redis,
        Rule::new("fc", ApiKey::default()).limit(Limit::per_hour(100)),
        OnStoreError::FailClosed,
    );
    assert_eq!(send(&layer, usage_service(0), req("sk-1")).await.0, 200);
    redis.stop();
    let (s, h, body) = send(&layer, usage_service(0), req("sk-1")).await;
    assert_eq!(s, 503);
    assert_eq!(h["retry-after"], "1");
    assert_eq!(body["error"]["code"], "rate_limiter_unavailable");
    redis.restart().unwrap();
    let mut recovered = false;
    for _ in 0..100 {
        if send(&layer, usage_service(0), req("sk-1")).await.0 == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "decisions come back once redis does");
}

#[tokio::test]
async fn redis_down_fails_open_or_falls_back_to_local_limits() {
    let mut redis = start_redis();
    let open = limiter(
        &redis,
        Rule::new("fo", ApiKey::default()).limit(Limit::per_hour(2)),
        OnStoreError::FailOpen,
    );
    let local = limiter(
        &redis,
        Rule::new("lo", ApiKey::default()).limit(Limit::per_hour(2)),
        OnStoreError::Local,
    );
    redis.stop();
    for _ in 0..5 {
        assert_eq!(
            send(&open, usage_service(0), req("sk-2")).await.0,
            200,
            "fail open: unlimited"
        );
    }
    assert_eq!(send(&local, usage_service(0), req("sk-2")).await.0, 200);
    assert_eq!(send(&local, usage_service(0), req("sk-2")).await.0, 200);
    let (s, _, body) = send(&local, usage_service(0), req("sk-2")).await;
    assert_eq!(s, 429, "local limits still hold");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
}

#[tokio::test]
async fn keys_already_denied_skip_redis() {
    let mut redis = start_redis();
    let layer = limiter(
        &redis,
        Rule::new("cache", ApiKey::default()).limit(Limit::per_hour(1)),
        OnStoreError::FailClosed,
    );
    assert_eq!(send(&layer, usage_service(0), req("sk-3")).await.0, 200);
    assert_eq!(send(&layer, usage_service(0), req("sk-3")).await.0, 429);
    redis.stop();
    let (s, h, body) = send(&layer, usage_service(0), req("sk-3")).await;
    assert_eq!(
        s, 429,
        "answered from the local denial cache, not the failure policy"
    );
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() > 3000);
    assert_eq!(
        send(&layer, usage_service(0), req("sk-other")).await.0,
        503,
        "other keys need redis"
    );
}

#[tokio::test]
async fn token_charges_settle_in_redis() {
    let redis = start_redis();
    let rule = Rule::new("tpm", ApiKey::default()).tokens(Limit::per_hour(10_000));
    let layer = limiter(&redis, rule, OnStoreError::FailClosed);
    let chat = || {
        let body = json!({"model": "m", "max_tokens": 2000, "messages": [{"role": "user", "content": "hi"}]});
        let mut r = req("sk-tok");
        *r.body_mut() = Full::new(Bytes::from(body.to_string()));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    };
    let (s, h, _) = send(&layer, usage_service(30), chat()).await;
    assert_eq!(s, 200);
    let charged = 10_000
        - h["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap();
    assert!(charged >= 2000);
    // The settlement is written in the background; the next admission sees it once it lands.
    let mut seen = 0;
    for _ in 0..100 {
        let (_, h, _) = send(&layer, usage_service(30), chat()).await;
        let remaining: u64 = h["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        seen += 1;
        // After n requests settled at 30 each, plus the newest one's estimate:
        if remaining == 10_000 - 30 * seen - charged {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("token charges never settled to the real usage");
}

/// Two limiters on a real 3-primary Redis Cluster with a replica each: callers whose keys hash to every node's slots
/// each get exactly their limit, however the two limiters share their requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_limiters_on_a_redis_cluster_admit_exactly_the_limit_on_every_node() {
    use moat_core::store::RedisConnection;
    use std::sync::Arc;
    let cluster =
        moat_testkit::redis::RedisCluster::start_with(3, 1, &[]).unwrap_or_else(|e| panic!("{e}"));
    let urls = cluster.urls();
    let limiter = || {
        let conn = Arc::new(RedisConnection::open_cluster(&urls).unwrap());
        let store = RedisStore::with_connection(conn)
            .with_on_error(OnStoreError::FailClosed)
            .with_timeout(Duration::from_secs(2));
        // Two request limits and a token rate: one script touches several keys, which a
        // cluster refuses (CROSSSLOT) unless they share a slot.
        let rule = Rule::new("per-key", ApiKey::default())
            .limit(Limit::per_hour(3))
            .limit(Limit::per_minute(100))
            .tokens("1000000/minute".parse().unwrap());
        RateLimitLayer::new(rule).with_redis(store)
    };
    let (a, b) = (limiter(), limiter());
    let inner = usage_service(10);
    // 30 callers: their keys' slots land on all three primaries.
    for caller in 0..30 {
        let key = format!("sk-cluster-{caller}");
        let mut allowed = 0;
        for i in 0..6 {
            let layer = if i % 2 == 0 { &a } else { &b };
            let (status, _, body) = send(layer, inner.clone(), req(&key)).await;
            assert!(
                status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS,
                "{status} {body}: a cluster error (MOVED) would fail closed with 503"
            );
            allowed += usize::from(status == StatusCode::OK);
        }
        assert_eq!(allowed, 3, "caller {caller}");
    }
}

/// A limiter over `conn` with one generous rule: every request is decided by Redis (or by the
/// fail-closed policy when Redis cannot answer).
fn generous(conn: std::sync::Arc<moat_core::store::RedisConnection>) -> RateLimitLayer {
    let store = RedisStore::with_connection(conn)
        .with_on_error(OnStoreError::FailClosed)
        .with_timeout(Duration::from_millis(500));
    // Per day, so a caller's state outlives the test (it expires once fully reset).
    RateLimitLayer::new(Rule::new("generous", ApiKey::default()).limit(Limit::per_day(10_000)))
        .with_redis(store)
}

/// Every key stored on the cluster's running nodes, with the slot Redis computes for it.
fn keys_and_slots(
    cluster: &moat_testkit::redis::RedisCluster,
    password: &str,
) -> std::collections::HashMap<String, u16> {
    let mut found = std::collections::HashMap::new();
    for node in cluster.nodes().iter().filter(|n| n.is_running()) {
        let url = format!("redis://:{password}@127.0.0.1:{}", node.port());
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
        for key in keys {
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&key)
                .query(&mut conn)
                .unwrap();
            found.insert(key, slot);
        }
    }
    found
}

/// A Redis Cluster of three primaries with a replica each, behind a password. Callers are
/// placed by where their key landed; then one primary is killed. Its callers get the
/// fail-closed policy (503) while no node serves their slots, every other caller is decided
/// as before, and once the replica is promoted the same limiter decides for everyone again,
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_primary_affects_only_its_callers_until_its_replica_takes_over() {
    use moat_core::store::RedisConnection;
    use std::sync::Arc;
    const PASSWORD: &str = "cluster-secret";
    let mut cluster = moat_testkit::redis::RedisCluster::start_with(
        3,
        1,
        // Without `cluster-require-full-coverage no`, Redis itself refuses every key while any
        // slot is unserved; with it, only the dead primary's slots are.
        &[
            "--requirepass",
            PASSWORD,
            "--masterauth",
            PASSWORD,
            "--cluster-require-full-coverage",
            "no",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let urls: Vec<String> = cluster
        .urls()
        .iter()
        .map(|u| u.replace("redis://", &format!("redis://:{PASSWORD}@")))
        .collect();
    let layer = generous(Arc::new(RedisConnection::open_cluster(&urls).unwrap()));
    let inner = usage_service(0);

    // Where each caller's state lives: the primary serving the slot of the key its first
    // request stored.
    let mut placed: Vec<(String, usize)> = Vec::new();
    let mut before = keys_and_slots(&cluster, PASSWORD);
    for caller in 0..24 {
        let key = format!("sk-failover-{caller}");
        let (status, _, body) = send(&layer, inner.clone(), req(&key)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let after = keys_and_slots(&cluster, PASSWORD);
        let (stored, slot) = after
            .iter()
            .find(|(k, _)| !before.contains_key(*k))
            .expect("the caller's state is stored");
        assert!(
            stored.contains('{') && stored.ends_with('}'),
            "hash-tagged: {stored}"
        );
        placed.push((
            key,
            cluster
                .primary_of(*slot)
                .expect("a primary serves the slot"),
        ));
        before = after;
    }
    let victim = placed[0].1;
    let (affected, unaffected): (Vec<_>, Vec<_>) =
        placed.iter().partition(|(_, node)| *node == victim);
    assert!(
        !unaffected.is_empty(),
        "24 callers all on one primary: {placed:?}"
    );

    cluster.stop(victim);
    // No replica is promoted before the node timeout (2 s): the dead primary's callers fail
    // closed, the others do not notice.
    let (status, _, body) = send(&layer, inner.clone(), req(&affected[0].0)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    for (key, node) in &unaffected {
        let (status, _, body) = send(&layer, inner.clone(), req(key)).await;
        assert_eq!(status, StatusCode::OK, "caller on node {node}: {body}");
    }

    // The replica is promoted; the same limiter follows the new topology. Meanwhile (the
    // cluster marks the primary failed after 2 s) the other callers are still decided.
    let mut resumed = false;
    for round in 0..150 {
        let (status, _, _) = send(&layer, inner.clone(), req(&affected[0].0)).await;
        if status == StatusCode::OK {
            resumed = true;
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (key, _) = unaffected[round % unaffected.len()];
        let (status, _, body) = send(&layer, inner.clone(), req(key)).await;
        assert_eq!(status, StatusCode::OK, "during the failover: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(resumed, "decisions never resumed after the failover");
    cluster.wait_until_ok().unwrap();
    for (key, _) in &placed {
        let (status, _, body) = send(&layer, inner.clone(), req(key)).await;
        assert_eq!(status, StatusCode::OK, "{key}: {body}");
    }
}

/// A primary with a replica behind a password, found through three sentinels. Killing the
/// primary fails requests closed until Sentinel promotes the replica, then the same
/// connection asks the sentinels again and decides on the new primary. Meanwhile a burst of
/// requests does not make a burst of reconnections: the sentinels answer a handful of
/// commands, not one per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_is_followed_without_a_reconnection_stampede() {
    use moat_core::store::RedisConnection;
    use moat_testkit::redis::RedisSentinel;
    use std::sync::Arc;
    const PASSWORD: &str = "sentinel-secret";
    let mut set = RedisSentinel::start(
        1,
        &["--requirepass", PASSWORD, "--masterauth", PASSWORD],
        Some(PASSWORD),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let conn = RedisConnection::open_sentinel(
        RedisSentinel::MASTER,
        &set.sentinel_urls(),
        &format!("redis://:{PASSWORD}@primary/0"),
    )
    .unwrap();
    let layer = generous(Arc::new(conn));
    let inner = usage_service(0);
    let (status, _, body) = send(&layer, inner.clone(), req("sk-sentinel")).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let old = set.primary_port().unwrap();
    set.stop_server(old);
    // Commands the sentinels have answered (each reconnection asks them for the primary).
    let commands = || -> u64 {
        set.sentinel_urls()
            .iter()
            .map(|url| {
                let mut c = redis::Client::open(url.as_str())
                    .unwrap()
                    .get_connection()
                    .unwrap();
                let info: String = redis::cmd("INFO").arg("stats").query(&mut c).unwrap();
                info.lines()
                    .find_map(|l| l.strip_prefix("total_commands_processed:"))
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap()
            })
            .sum()
    };
    let seen_before = commands();
    let burst: Vec<_> = (0..200)
        .map(|_| {
            let (layer, inner) = (layer.clone(), inner.clone());
            tokio::spawn(async move { send(&layer, inner, req("sk-sentinel")).await.0 })
        })
        .collect();
    for task in burst {
        // Right after the kill no replica is promoted yet (down after 1 s): all fail closed.
        assert_eq!(task.await.unwrap(), StatusCode::SERVICE_UNAVAILABLE);
    }
    // Our own INFO commands, the sentinels' pings to each other, and a few reconnection
    // attempts; 200 requests reconnecting each would be hundreds.
    let asked = commands() - seen_before;
    assert!(
        asked < 60,
        "the sentinels answered {asked} commands during 200 requests"
    );

    let mut resumed = false;
    for _ in 0..300 {
        let (status, _, _) = send(&layer, inner.clone(), req("sk-sentinel")).await;
        if status == StatusCode::OK {
            resumed = true;
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(resumed, "decisions never resumed after Sentinel's failover");
    assert_ne!(set.primary_port(), Some(old), "a replica was promoted");
}

/// TLS with a private certificate authority and an ACL user: decided with the authority's
/// certificate and the user's password; refused (fail closed) without the certificate, or
/// with a wrong password, so neither check is skipped. Then a whole cluster, and Sentinel with
/// the primary it names, over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_authority_and_an_acl_user() {
    use moat_core::store::{RedisConnection, RedisTopology};
    use moat_testkit::redis::TlsFiles;
    use std::sync::Arc;
    let tls = TlsFiles::generate().unwrap_or_else(|e| panic!("{e}"));
    let redis = RedisServer::start_tls(
        &tls,
        &[
            "--user", "moat", "on", ">s3cret", "~*", "&*", "+@all", "--user", "default", "off",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ca = std::fs::read(&tls.ca).unwrap();
    let url = redis
        .tls_url()
        .unwrap()
        .replace("rediss://", "rediss://moat:s3cret@");
    let inner = usage_service(0);

    let trusted = RedisConnection::connect(&RedisTopology::Node(url.clone()), Some(&ca)).unwrap();
    let (status, _, body) = send(&generous(Arc::new(trusted)), inner.clone(), req("sk-tls")).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let untrusted = RedisConnection::open(&url).unwrap();
    let (status, _, _) = send(&generous(Arc::new(untrusted)), inner.clone(), req("sk-tls")).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a certificate no one vouches for"
    );

    let wrong = url.replace("s3cret", "guess");
    let wrong = RedisConnection::connect(&RedisTopology::Node(wrong), Some(&ca)).unwrap();
    let (status, _, _) = send(&generous(Arc::new(wrong)), inner.clone(), req("sk-tls")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "a wrong password");

    // A cluster over TLS, same user: callers on every node are decided.
    let cluster = moat_testkit::redis::RedisCluster::start_tls(
        3,
        0,
        &tls,
        &["--user", "moat", "on", ">s3cret", "~*", "&*", "+@all"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let nodes: Vec<String> = cluster
        .tls_urls()
        .iter()
        .map(|u| u.replace("rediss://", "rediss://moat:s3cret@"))
        .collect();
    let layer = generous(Arc::new(
        RedisConnection::connect(&RedisTopology::Cluster(nodes), Some(&ca)).unwrap(),
    ));
    for caller in 0..30 {
        let (status, _, body) = send(&layer, inner.clone(), req(&format!("sk-tls-{caller}"))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    // Sentinel over TLS: the sentinels and the primary they name, both by TLS, the primary
    // behind a password.
    let sentinel = moat_testkit::redis::RedisSentinel::start_tls(
        1,
        &tls,
        &["--requirepass", "pw", "--masterauth", "pw"],
        Some("pw"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let topology = RedisTopology::Sentinel {
        master: moat_testkit::redis::RedisSentinel::MASTER.to_owned(),
        nodes: sentinel.sentinel_tls_urls(),
        primary: "rediss://:pw@primary/0".to_owned(),
    };
    let layer = generous(Arc::new(
        RedisConnection::connect(&topology, Some(&ca)).unwrap(),
    ));
    let (status, _, body) = send(&layer, inner.clone(), req("sk-tls-sentinel")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
