//! The Redis budget store against a real, private redis-server.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use moat_core::body::RequestBody;
use moat_core::identity::{Global, PeerAddr};
use moat_quota::{Budget, OnStoreError, Period, QuotaLayer, RedisStore};
use moat_testkit::redis::RedisServer;
use serde_json::{json, Value};
use tower::{ServiceBuilder, ServiceExt};

/// Answers with usage: prompt 10, completion = the request's max_tokens.
type Upstream = tower::util::BoxCloneService<
    Request<RequestBody<Full<Bytes>>>,
    Response<Full<Bytes>>,
    Infallible,
>;

fn upstream() -> Upstream {
    tower::util::BoxCloneService::new(tower::service_fn(
        |req: Request<RequestBody<Full<Bytes>>>| async move {
            let body: Value =
                serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes())
                    .unwrap();
            let completion = body["max_tokens"].as_u64().unwrap_or(50);
            let reply = json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": completion, "total_tokens": 10 + completion}});
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(reply.to_string())))
                    .unwrap(),
            )
        },
    ))
}

fn chat(max_tokens: u64) -> Request<Full<Bytes>> {
    let body = json!({"model": "gpt-4o", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]});
    let mut r = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    r.extensions_mut()
        .insert(PeerAddr("192.0.2.1:1".parse().unwrap()));
    r
}

fn layer(redis: &RedisServer, budget: Budget, policy: OnStoreError) -> QuotaLayer {
    let store = RedisStore::open(&redis.url())
        .unwrap()
        .with_on_error(policy)
        .with_timeout(Duration::from_millis(500));
    QuotaLayer::new(budget).with_redis(store)
}

async fn send(layer: &QuotaLayer, r: Request<Full<Bytes>>) -> (StatusCode, Value) {
    let res = ServiceBuilder::new()
        .layer(layer.clone())
        .service(upstream())
        .oneshot(r)
        .await
        .unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Waits until no reservation is held (settlements are written in the background).
async fn settled(layer: &QuotaLayer) -> moat_quota::BudgetUsage {
    for _ in 0..200 {
        let usage = layer.handle().usage(&chat(0)).await.remove(0);
        if usage.reserved.tokens == 0 {
            return usage;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("reservations never settled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_redis_never_settle_past_the_budget() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let budget = || Budget::new("shared", Global, Period::Day).tokens(5000);
    let a = layer(&redis, budget(), OnStoreError::FailClosed);
    let b = layer(&redis, budget(), OnStoreError::FailClosed);
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let l = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { send(&l, chat(400)).await.0 })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        let s = t.await.unwrap();
        assert!(s == 200 || s == 429, "{s}");
        admitted += u64::from(s == 200);
    }
    let usage = settled(&a).await;
    assert!(usage.used.tokens <= 5000, "{}", usage.used.tokens);
    assert_eq!(
        usage.used.tokens,
        admitted * 410,
        "both processes see one budget"
    );
    assert!(admitted >= 5);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("moat:q:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1);
    assert!(
        keys[0].starts_with("moat:q:{shared:") && keys[0].ends_with('}'),
        "{}",
        keys[0]
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        ttl > 0 && ttl <= 86_400 + 60,
        "the state expires after its period: {ttl}"
    );
}

#[tokio::test]
async fn expired_reservations_are_swept_by_the_scripts() {
    let redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let store = RedisStore::open(&redis.url()).unwrap();
    let layer = QuotaLayer::new(Budget::new("b", Global, Period::Day).tokens(1000))
        .with_redis(store)
        .with_reservation_ttl(Duration::from_secs(2));
    // A request whose response never ends holds its reservation.
    let stuck = tower::service_fn(|_req: Request<RequestBody<Full<Bytes>>>| async {
        let never = futures_util::stream::pending::<Result<http_body::Frame<Bytes>, Infallible>>();
        Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(never)))
    });
    let svc = ServiceBuilder::new().layer(layer.clone()).service(stuck);
    let held = svc.oneshot(chat(900)).await.unwrap();
    assert_eq!(held.status(), 200);
    assert_eq!(
        send(&layer, chat(900)).await.0,
        429,
        "held by the stuck request"
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        send(&layer, chat(900)).await.0,
        200,
        "its hold expired on the server"
    );
    drop(held);
}

#[tokio::test]
async fn redis_down_fails_closed_or_counts_locally_and_recovers() {
    let mut redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let closed = layer(
        &redis,
        Budget::new("c", Global, Period::Day).tokens(100_000),
        OnStoreError::FailClosed,
    );
    let local = layer(
        &redis,
        Budget::new("l", Global, Period::Day).tokens(250),
        OnStoreError::Local,
    );
    assert_eq!(send(&closed, chat(10)).await.0, 200);
    redis.stop();
    let (s, body) = send(&closed, chat(10)).await;
    assert_eq!(s, 503);
    assert_eq!(body["error"]["code"], "quota_unavailable");
    assert_eq!(send(&local, chat(100)).await.0, 200, "counted in memory");
    assert_eq!(send(&local, chat(100)).await.0, 200);
    assert_eq!(
        send(&local, chat(100)).await.0,
        429,
        "the local budget still holds"
    );
    redis.restart().unwrap();
    let mut back = false;
    for _ in 0..100 {
        if send(&closed, chat(10)).await.0 == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "budgets come back with redis");
}

/// Two processes on a real 3-primary Redis Cluster, each request charged to two budgets whose
/// keys live in different slots (per API key, and one for everyone). Reservations are made
/// one budget after the other and given back when a later one refuses, so under concurrency
/// no budget is ever settled past its limit, and a refused request leaves nothing behind:
/// each budget's use is exactly what its admitted requests used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_in_different_slots_of_a_cluster_never_overrun() {
    use moat_core::identity::ApiKey;
    use moat_core::store::RedisConnection;
    use std::sync::Arc;
    let cluster = moat_testkit::redis::RedisCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    let urls = cluster.urls();
    let process = || {
        let conn = Arc::new(RedisConnection::open_cluster(&urls).unwrap());
        let store = RedisStore::with_connection(conn)
            .with_on_error(OnStoreError::FailClosed)
            .with_timeout(Duration::from_secs(2));
        QuotaLayer::new(Budget::new("per-key", ApiKey::default(), Period::Day).tokens(3000))
            .budget(Budget::new("everyone", Global, Period::Day).tokens(7000))
            .with_redis(store)
    };
    let (a, b) = (process(), process());
    let keyed = |key: &str| {
        let mut r = chat(400);
        r.headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        r
    };
    let keys = ["sk-slot-a", "sk-slot-b", "sk-slot-c"];
    let tasks: Vec<_> = (0..90)
        .map(|i| {
            let layer = if i % 2 == 0 { a.clone() } else { b.clone() };
            let r = keyed(keys[i % keys.len()]);
            tokio::spawn(async move { (i % keys.len(), send(&layer, r).await.0) })
        })
        .collect();
    let mut admitted = [0u64; 3];
    for t in tasks {
        let (key, status) = t.await.unwrap();
        assert!(status == 200 || status == 429, "{status}");
        admitted[key] += u64::from(status == 200);
    }
    let mut everyone = 0;
    for (i, key) in keys.iter().enumerate() {
        let mut usage = Vec::new();
        for _ in 0..200 {
            usage = a.handle().usage(&keyed(key)).await;
            if usage.iter().all(|u| u.reserved.tokens == 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let per_key = &usage[0];
        assert_eq!(per_key.reserved.tokens, 0, "settled");
        assert!(
            per_key.used.tokens <= 3000,
            "{key}: {}",
            per_key.used.tokens
        );
        assert_eq!(
            per_key.used.tokens,
            admitted[i] * 410,
            "{key}: nothing held by refusals"
        );
        everyone = usage[1].used.tokens;
    }
    assert!(everyone <= 7000, "{everyone}");
    assert_eq!(everyone, admitted.iter().sum::<u64>() * 410);
    assert!(admitted.iter().sum::<u64>() >= 10, "{admitted:?}");

    // The budgets' keys really are spread: Redis puts them in more than one slot.
    let mut slots = std::collections::HashSet::new();
    for url in &urls {
        let mut conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let stored: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
        for key in stored {
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&key)
                .query(&mut conn)
                .unwrap();
            slots.insert(slot);
        }
    }
    assert_eq!(
        slots.len(),
        4,
        "three per-key budgets and one for everyone: {slots:?}"
    );
}
