//! RateLimitLayer through tower, on a driven clock.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use moat_core::body::RequestBody;
use moat_core::clock::ManualClock;
use moat_core::decision::{Decisions, Outcome};
use moat_core::identity::{ApiKey, CallerResolver, ClientIp, Fingerprinter, Global, PeerAddr};
use moat_core::Caller;
use moat_ratelimit::{Headers, Limit, RateLimitLayer, Rule};
use serde_json::{json, Value};
use tower::{Service, ServiceBuilder, ServiceExt};

type Inner = tower::util::BoxCloneService<
    Request<RequestBody<Full<Bytes>>>,
    Response<Full<Bytes>>,
    Infallible,
>;

fn ok_service() -> Inner {
    tower::util::BoxCloneService::new(tower::service_fn(
        |_req: Request<RequestBody<Full<Bytes>>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        },
    ))
}

/// Answers with OpenAI usage: `prompt` and `completion` tokens.
fn usage_service(prompt: u64, completion: u64) -> Inner {
    tower::util::BoxCloneService::new(tower::service_fn(
        move |req: Request<RequestBody<Full<Bytes>>>| async move {
            // Read the body the layer hands on: it must be the client's JSON.
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let _: Value =
                serde_json::from_slice(&body).expect("the inner service gets valid JSON");
            let reply = json!({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}});
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

fn chat(key: &str, text: &str, max_tokens: u64) -> Request<Full<Bytes>> {
    let body = json!({"model": "gpt-4o-mini", "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]});
    let mut r = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    r.extensions_mut()
        .insert(PeerAddr("203.0.113.1:5000".parse().unwrap()));
    r
}

fn layer(rule: Rule, clock: &ManualClock) -> RateLimitLayer {
    RateLimitLayer::new(rule).with_clock(Arc::new(clock.clone()))
}

async fn status<S>(svc: &mut S, r: Request<Full<Bytes>>) -> (StatusCode, http::HeaderMap, Bytes)
where
    S: Service<
        Request<Full<Bytes>>,
        Response = Response<moat_ratelimit::ResponseBody<Full<Bytes>>>,
        Error = Infallible,
    >,
{
    let res = svc.ready().await.unwrap().call(r).await.unwrap();
    let (parts, body) = res.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_on_one_key_admit_exactly_the_limit() {
    let clock = ManualClock::new();
    let svc = ServiceBuilder::new()
        .layer(layer(
            Rule::new("per-key", ApiKey::default()).limit(Limit::per_minute(10)),
            &clock,
        ))
        .service(ok_service());
    let run = |n: usize| {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let svc = svc.clone();
                tokio::spawn(async move { svc.oneshot(req("sk-hot")).await.unwrap().status() })
            })
            .collect();
        async move {
            let mut ok = 0;
            for t in tasks {
                if t.await.unwrap() == StatusCode::OK {
                    ok += 1;
                }
            }
            ok
        }
    };
    assert_eq!(
        run(200).await,
        10,
        "exactly the burst, however the tasks interleave"
    );
    assert_eq!(run(50).await, 0, "no time has passed");
    clock.advance(Duration::from_secs(6));
    assert_eq!(
        run(50).await,
        1,
        "one emission interval brings back exactly one"
    );
    clock.advance(Duration::from_secs(60));
    assert_eq!(run(50).await, 10);
}

#[tokio::test]
async fn denial_is_a_429_with_retry_after_and_openai_body() {
    let clock = ManualClock::new();
    let mut svc = ServiceBuilder::new()
        .layer(layer(
            Rule::new("per-key", ApiKey::default()).limit(Limit::per_minute(2)),
            &clock,
        ))
        .service(ok_service());
    let (s, h, _) = status(&mut svc, req("sk-a")).await;
    assert_eq!(s, 200);
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "1");
    assert_eq!(h["x-ratelimit-reset-requests"], "30s");
    status(&mut svc, req("sk-a")).await;
    clock.advance(Duration::from_millis(10_500));
    let (s, h, body) = status(&mut svc, req("sk-a")).await;
    assert_eq!(s, 429);
    assert_eq!(h["retry-after"], "20", "19.5 s rounded up");
    assert_eq!(h["retry-after-ms"], "19500");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_exceeded");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("per-key") && message.contains("2/minute") && message.contains("19.5s"),
        "{message}"
    );
    assert!(!message.contains("sk-a"), "never the key");
    // Other keys are unaffected.
    assert_eq!(status(&mut svc, req("sk-b")).await.0, 200);
}

#[tokio::test]
async fn tiers_get_their_own_limits_on_the_same_route() {
    let clock = ManualClock::new();
    let layer = layer(
        Rule::new("free", ApiKey::default())
            .limit(Limit::per_minute(1))
            .tier("free"),
        &clock,
    )
    .rule(
        Rule::new("paid", ApiKey::default())
            .limit(Limit::per_minute(100))
            .tier("paid"),
    );
    let mut svc = ServiceBuilder::new().layer(layer).service(ok_service());
    let with_tier = |key: &str, tier: &str| {
        let mut r = req(key);
        r.extensions_mut()
            .insert(Caller::new().with_tier(tier.to_owned()));
        r
    };
    assert_eq!(status(&mut svc, with_tier("sk-f", "free")).await.0, 200);
    assert_eq!(status(&mut svc, with_tier("sk-f", "free")).await.0, 429);
    for _ in 0..50 {
        assert_eq!(status(&mut svc, with_tier("sk-p", "paid")).await.0, 200);
    }
}

#[tokio::test]
async fn a_denial_by_one_rule_leaves_the_others_uncharged() {
    let clock = ManualClock::new();
    let layer = layer(
        Rule::new("per-key", ApiKey::default()).limit(Limit::per_minute(3)),
        &clock,
    )
    .rule(Rule::new("global", Global).limit(Limit::per_minute(100)))
    .rule(Rule::new("burst", ApiKey::default()).limit(Limit::per_second(1)));
    let mut svc = ServiceBuilder::new().layer(layer).service(ok_service());
    assert_eq!(status(&mut svc, req("sk-1")).await.0, 200);
    // Denied by "burst": "per-key" and "global" must not count it.
    for _ in 0..5 {
        assert_eq!(status(&mut svc, req("sk-1")).await.0, 429);
    }
    clock.advance(Duration::from_secs(1));
    let (s, h, _) = status(&mut svc, req("sk-1")).await;
    assert_eq!(s, 200);
    assert_eq!(
        h["x-ratelimit-remaining-requests"], "0",
        "the tightest: burst has 0 left"
    );
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        status(&mut svc, req("sk-1")).await.0,
        200,
        "per-key still had its third request"
    );
}

#[tokio::test]
async fn token_rates_charge_an_estimate_and_settle_from_usage() {
    let clock = ManualClock::new();
    let rule = Rule::new("tpm", ApiKey::default()).tokens(Limit::per_minute(1000));
    let mut svc = ServiceBuilder::new()
        .layer(layer(rule.clone(), &clock))
        .service(usage_service(10, 20));
    // Estimate: prompt (~4 + 11/3) + max_tokens 500; actual usage 30.
    let (s, h, _) = status(&mut svc, chat("sk-t", "hello there", 500)).await;
    assert_eq!(s, 200);
    let charged: u64 = 1000
        - h["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap();
    assert!(
        charged >= 500,
        "the estimate includes max_tokens: {charged}"
    );
    // The body has ended: the next response shows only the real 30 used (plus its own charge).
    let (_, h, _) = status(&mut svc, chat("sk-t", "hello there", 500)).await;
    assert_eq!(
        h["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap(),
        1000 - 30 - charged
    );

    // A request over the whole burst is refused outright.
    let (s, h, body) = status(&mut svc, chat("sk-t", "x", 5000)).await;
    assert_eq!(s, 429);
    assert_eq!(h["x-should-retry"], "false");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");

    // Debt: a response that used more than estimated pushes the next request out.
    let mut greedy = ServiceBuilder::new()
        .layer(layer(rule, &clock))
        .service(usage_service(400, 500));
    assert_eq!(status(&mut greedy, chat("sk-g", "hi", 10)).await.0, 200);
    let (s, h, _) = status(&mut greedy, chat("sk-g", "hi", 50)).await;
    assert_eq!(s, 200);
    let left: u64 = h["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        left < 100 - 50,
        "900 of 1000 spent by the first, ~55 charged now: {left}"
    );
    assert_eq!(status(&mut greedy, chat("sk-g", "hi", 200)).await.0, 429);
}

#[tokio::test]
async fn in_flight_slots_free_when_the_body_ends_not_when_the_handler_returns() {
    let clock = ManualClock::new();
    let (tx, rx) = tokio::sync::mpsc::channel::<
        tokio::sync::mpsc::Receiver<Result<http_body::Frame<Bytes>, Infallible>>,
    >(4);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let streaming = tower::service_fn(move |_req: Request<RequestBody<Full<Bytes>>>| {
        let rx = rx.clone();
        async move {
            let frames = rx.lock().await.recv().await.unwrap();
            let stream = futures_util::stream::unfold(frames, |mut f| async move {
                f.recv().await.map(|x| (x, f))
            });
            Ok::<_, Infallible>(Response::new(StreamBody::new(stream)))
        }
    });
    let rule = Rule::new("conc", ApiKey::default()).max_in_flight(1);
    let mut svc = ServiceBuilder::new()
        .layer(layer(rule, &clock))
        .service(streaming);
    let (body_tx, body_rx) = tokio::sync::mpsc::channel(4);
    tx.send(body_rx).await.unwrap();
    let first = svc.ready().await.unwrap().call(req("sk-c")).await.unwrap();
    assert_eq!(
        first.status(),
        200,
        "the handler has returned, the body is still streaming"
    );
    let second = svc.ready().await.unwrap().call(req("sk-c")).await.unwrap();
    assert_eq!(second.status(), 429);
    let v: Value =
        serde_json::from_slice(&second.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["code"], "concurrency_limit_exceeded");
    body_tx
        .send(Ok(http_body::Frame::data(Bytes::from_static(b"x"))))
        .await
        .unwrap();
    drop(body_tx);
    assert_eq!(first.into_body().collect().await.unwrap().to_bytes(), "x");
    let (body_tx, body_rx) = tokio::sync::mpsc::channel(4);
    tx.send(body_rx).await.unwrap();
    let third = svc.ready().await.unwrap().call(req("sk-c")).await.unwrap();
    assert_eq!(third.status(), 200, "released at the end of the first body");
    // A body dropped early (client gone) releases too.
    drop(third);
    drop(body_tx);
    let (_body_tx, body_rx) = tokio::sync::mpsc::channel(4);
    tx.send(body_rx).await.unwrap();
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call(req("sk-c"))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn shadow_rules_record_but_never_deny() {
    let clock = ManualClock::new();
    let mut svc = ServiceBuilder::new()
        .layer(
            layer(
                Rule::new("trial", ApiKey::default())
                    .limit(Limit::per_minute(1))
                    .shadow(),
                &clock,
            )
            .with_headers(Headers::NONE),
        )
        .service(ok_service());
    let decisions = Decisions::new();
    for _ in 0..3 {
        let mut r = req("sk-s");
        r.extensions_mut().insert(decisions.clone());
        let (s, h, _) = status(&mut svc, r).await;
        assert_eq!(s, 200);
        assert!(h.get("x-ratelimit-remaining-requests").is_none());
    }
    let all = decisions.take();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].outcome, Outcome::Allowed);
    assert!(
        matches!(&all[2].outcome, Outcome::ShadowRejected { code } if code == "rate_limit_exceeded")
    );
    assert_eq!(all[2].rule.as_deref(), Some("trial"));
}

#[tokio::test]
async fn a_spoofed_forwarded_for_does_not_escape_the_limit() {
    let clock = ManualClock::new();
    let resolver = CallerResolver::new(
        Fingerprinter::default(),
        ClientIp::new(["10.0.0.0/8".parse().unwrap()]),
    );
    let rule = Rule::new("per-ip", ClientIp::new(["10.0.0.0/8".parse().unwrap()]))
        .limit(Limit::per_minute(2));
    let mut svc = ServiceBuilder::new()
        .layer(layer(rule, &clock).with_caller_resolver(resolver))
        .service(ok_service());
    let from = |spoof: &str| {
        let mut r = Request::get("/")
            .header("x-forwarded-for", format!("{spoof}, 198.51.100.7"))
            .body(Full::default())
            .unwrap();
        r.extensions_mut()
            .insert(PeerAddr("10.0.0.2:1".parse().unwrap()));
        r
    };
    assert_eq!(status(&mut svc, from("1.1.1.1")).await.0, 200);
    assert_eq!(status(&mut svc, from("2.2.2.2")).await.0, 200);
    assert_eq!(
        status(&mut svc, from("3.3.3.3")).await.0,
        429,
        "a fresh spoofed entry is not a fresh key"
    );
}

#[tokio::test]
async fn requests_without_the_rule_key_fall_back_to_the_client_ip() {
    let clock = ManualClock::new();
    let mut svc = ServiceBuilder::new()
        .layer(layer(
            Rule::new("per-key", ApiKey::default()).limit(Limit::per_minute(1)),
            &clock,
        ))
        .service(ok_service());
    let keyless = || {
        let mut r = Request::get("/").body(Full::default()).unwrap();
        r.extensions_mut()
            .insert(PeerAddr("192.0.2.9:1".parse().unwrap()));
        r
    };
    assert_eq!(status(&mut svc, keyless()).await.0, 200);
    assert_eq!(status(&mut svc, keyless()).await.0, 429);
}

#[tokio::test]
async fn grpc_requests_get_resource_exhausted() {
    let clock = ManualClock::new();
    let mut svc = ServiceBuilder::new()
        .layer(layer(
            Rule::new("g", Global).limit(Limit::per_minute(1)),
            &clock,
        ))
        .service(ok_service());
    let grpc = || {
        Request::post("/pkg.Svc/Call")
            .header("content-type", "application/grpc")
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(status(&mut svc, grpc()).await.0, 200);
    let (s, h, body) = status(&mut svc, grpc()).await;
    assert_eq!(s, 200, "gRPC statuses travel in trailers-only responses");
    assert_eq!(h["grpc-status"], "8");
    assert!(h.contains_key("retry-after"));
    assert!(body.is_empty());
}

#[tokio::test]
async fn the_key_cap_refuses_new_keys_while_every_held_key_is_live() {
    let clock = ManualClock::new();
    let layer = layer(
        Rule::new("per-key", ApiKey::default()).limit(Limit::per_minute(5)),
        &clock,
    )
    .with_max_keys(64);
    let mut svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(ok_service());
    let mut full = 0;
    for i in 0..2000 {
        let (s, _, body) = status(&mut svc, req(&format!("sk-{i}"))).await;
        if s == 429 {
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"]["code"], "rate_limiter_full");
            full += 1;
        }
    }
    assert!(full > 0, "some keys were refused");
    assert!(
        layer.keys_held("per-key") <= 64,
        "never past the cap: {}",
        layer.keys_held("per-key")
    );
    // Once the held keys have fully reset they make room.
    clock.advance(Duration::from_secs(61));
    assert_eq!(status(&mut svc, req("sk-new")).await.0, 200);
}

#[tokio::test]
async fn malformed_json_is_a_400_when_a_rule_reads_the_body() {
    let clock = ManualClock::new();
    let mut svc = ServiceBuilder::new()
        .layer(layer(
            Rule::new("tpm", ApiKey::default()).tokens(Limit::per_minute(1000)),
            &clock,
        ))
        .service(ok_service());
    let mut r = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"messages\": [")))
        .unwrap();
    r.extensions_mut()
        .insert(PeerAddr("192.0.2.9:1".parse().unwrap()));
    let (s, _, body) = status(&mut svc, r).await;
    assert_eq!(s, 400);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
}

#[tokio::test]
async fn a_spiking_key_is_moved_to_the_quarantine_tier() {
    use moat_ratelimit::{Quarantine, SpikeGuard};
    let clock = ManualClock::new();
    let guard = SpikeGuard::new()
        .with_warmup(Duration::from_secs(3600))
        .with_quarantine(Quarantine::Tier("restricted".into()))
        .with_cooldown(Duration::from_secs(600));
    let layer = layer(
        Rule::new("normal", ApiKey::default()).limit(Limit::per_second(100)),
        &clock,
    )
    .rule(
        Rule::new("restricted", ApiKey::default())
            .limit(Limit::per_hour(1))
            .tier("restricted"),
    )
    .with_spike_guard(guard);
    let mut svc = ServiceBuilder::new().layer(layer).service(ok_service());
    // Two days of a request every 15 minutes.
    for _ in 0..192 {
        clock.advance(Duration::from_secs(900));
        assert_eq!(status(&mut svc, req("sk-leaked")).await.0, 200);
    }
    // The key leaks: several requests a second. Soon only the restricted tier's 1/hour applies.
    let mut refused = 0;
    for _ in 0..300 {
        clock.advance(Duration::from_millis(200));
        if status(&mut svc, req("sk-leaked")).await.0 == 429 {
            refused += 1;
        }
    }
    assert!(
        refused > 200,
        "quarantined to the restricted tier: {refused} of 300 refused"
    );
    // Another key with the same history is untouched.
    assert_eq!(status(&mut svc, req("sk-other")).await.0, 200);
}

#[tokio::test]
async fn builder_calls_and_rebuilt_layers_keep_each_rules_state_by_name() {
    let clock = ManualClock::new();
    let first = layer(
        Rule::new("per-key", ApiKey::default()).limit(Limit::per_minute(3)),
        &clock,
    );
    let mut a = ServiceBuilder::new()
        .layer(first.clone())
        .service(ok_service());
    assert_eq!(status(&mut a, req("sk-1")).await.0, 200);
    // More builder calls after a service was made: the same counters.
    let reconfigured = first.clone().with_headers(Headers::IETF);
    let mut b = ServiceBuilder::new()
        .layer(reconfigured)
        .service(ok_service());
    assert_eq!(status(&mut b, req("sk-1")).await.0, 200);
    assert_eq!(status(&mut a, req("sk-1")).await.0, 200);
    assert_eq!(
        status(&mut b, req("sk-1")).await.0,
        429,
        "one limit, three requests"
    );
    // A reload: a new layer from a new configuration takes over the rules it keeps, by name.
    let reloaded = layer(
        Rule::new("other", ApiKey::default()).limit(Limit::per_minute(100)),
        &clock,
    )
    .rule(Rule::new("per-key", ApiKey::default()).limit(Limit::per_minute(3)))
    .with_state_from(&first);
    let mut c = ServiceBuilder::new().layer(reloaded).service(ok_service());
    assert_eq!(
        status(&mut c, req("sk-1")).await.0,
        429,
        "per-key is still spent"
    );
    assert_eq!(status(&mut c, req("sk-2")).await.0, 200);
    // A rule whose limits changed shape starts over.
    let reshaped = layer(
        Rule::new("per-key", ApiKey::default())
            .limit(Limit::per_minute(3))
            .limit(Limit::per_hour(100)),
        &clock,
    )
    .with_state_from(&first);
    let mut d = ServiceBuilder::new().layer(reshaped).service(ok_service());
    assert_eq!(status(&mut d, req("sk-1")).await.0, 200);
}
