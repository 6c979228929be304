//! QuotaLayer through tower, on a driven clock.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use moat_core::body::RequestBody;
use moat_core::clock::ManualClock;
use moat_core::identity::{ApiKey, Global, PeerAddr};
use moat_quota::{Budget, BudgetAlert, PerToken, Period, Price, PriceTable, QuotaLayer, Usd};
use serde_json::{json, Value};
use tower::{Service, ServiceBuilder, ServiceExt};

type Seen = Arc<Mutex<Vec<Value>>>;

/// An upstream that records request bodies and answers with usage: prompt 10, completion =
/// the request's max_tokens (the worst case), streamed when asked.
fn upstream(
    seen: Seen,
) -> impl Service<
    Request<RequestBody<Full<Bytes>>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |req: Request<RequestBody<Full<Bytes>>>| {
        let seen = seen.clone();
        async move {
            let body: Value =
                serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes())
                    .unwrap();
            seen.lock().unwrap().push(body.clone());
            let completion = body["max_tokens"].as_u64().unwrap_or(50);
            let usage = json!({"prompt_tokens": 10, "completion_tokens": completion, "total_tokens": 10 + completion});
            if body["stream"] == json!(true) {
                let mut sse = String::from(
                    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hello\"}}]}\n\n",
                );
                if body.pointer("/stream_options/include_usage") == Some(&json!(true)) {
                    sse.push_str(&format!(
                        "data: {}\n\n",
                        json!({"choices": [], "usage": usage})
                    ));
                }
                sse.push_str("data: [DONE]\n\n");
                return Ok(Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Full::new(Bytes::from(sse)))
                    .unwrap());
            }
            let reply = json!({"choices": [{"message": {"content": "hello"}}], "usage": usage});
            Ok(Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(reply.to_string())))
                .unwrap())
        }
    })
}

fn chat(key: &str, body: Value) -> Request<Full<Bytes>> {
    let mut r = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    r.extensions_mut()
        .insert(PeerAddr("192.0.2.1:1".parse().unwrap()));
    r
}

fn ask(max_tokens: u64) -> Value {
    json!({"model": "gpt-4o", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_settle_past_the_budget() {
    let seen = Seen::default();
    let layer = QuotaLayer::new(Budget::new("b", Global, Period::Day).tokens(10_000));
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(seen.clone()));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let res = svc.oneshot(chat("sk-1", ask(400))).await.unwrap();
                let status = res.status();
                res.into_body().collect().await.unwrap();
                status
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        let s = t.await.unwrap();
        assert!(s == StatusCode::OK || s == StatusCode::TOO_MANY_REQUESTS);
        admitted += u64::from(s == StatusCode::OK);
    }
    let usage = handle.usage(&chat("sk-1", json!({}))).await;
    assert_eq!(usage[0].reserved.tokens, 0, "every reservation settled");
    assert!(
        usage[0].used.tokens <= 10_000,
        "never past the budget: {}",
        usage[0].used.tokens
    );
    assert_eq!(usage[0].used.tokens, admitted * 410);
    assert!(
        admitted >= 20,
        "each request reserves ~400 of 10,000: {admitted}"
    );
}

#[tokio::test]
async fn refusal_is_insufficient_quota_naming_the_budget_and_reset() {
    let clock = ManualClock::new();
    let layer =
        QuotaLayer::new(Budget::new("daily-tokens", ApiKey::default(), Period::Day).tokens(1000))
            .with_clock(Arc::new(clock.clone()));
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(Seen::default()));
    let ok = svc
        .ready()
        .await
        .unwrap()
        .call(chat("sk-a", ask(600)))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-moat-quota-budget"], "daily-tokens");
    assert_eq!(ok.headers()["x-moat-quota-reset"], "2026-01-02T00:00:00Z");
    ok.into_body().collect().await.unwrap();
    let refused = svc
        .ready()
        .await
        .unwrap()
        .call(chat("sk-a", ask(600)))
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-should-retry"], "false");
    let v: Value =
        serde_json::from_slice(&refused.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["type"], "insufficient_quota");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("daily-tokens") && message.contains("2026-01-02T00:00:00Z"),
        "{message}"
    );
    // Another key has its own budget; the next day this one starts over.
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call(chat("sk-b", ask(600)))
            .await
            .unwrap()
            .status(),
        200
    );
    clock.advance(Duration::from_secs(86_400));
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call(chat("sk-a", ask(600)))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn streams_get_usage_injected_counted_and_stripped() {
    let seen = Seen::default();
    let layer = QuotaLayer::new(Budget::new("b", Global, Period::Day).tokens(100_000));
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(seen.clone()));
    let mut body = ask(30);
    body["stream"] = json!(true);
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(chat("sk-1", body))
        .await
        .unwrap();
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(
        !text.contains("\"usage\""),
        "the client did not ask for the usage chunk: {text}"
    );
    assert!(text.contains("hello") && text.ends_with("data: [DONE]\n\n"));
    assert_eq!(
        seen.lock().unwrap()[0]["stream_options"]["include_usage"],
        true,
        "the upstream was asked for usage"
    );
    assert_eq!(
        handle.usage(&chat("sk-1", json!({}))).await[0].used.tokens,
        40,
        "settled from the streamed usage"
    );
    // A client that asked for usage keeps it.
    let mut body = ask(30);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(chat("sk-1", body))
        .await
        .unwrap();
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.contains("\"usage\""));
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_is_charged() {
    let layer = QuotaLayer::new(Budget::new("b", Global, Period::Day).tokens(100_000));
    let handle = layer.handle();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, Infallible>>(4);
    let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let streaming = tower::service_fn(move |_req: Request<RequestBody<Full<Bytes>>>| {
        let rx = rx.clone();
        async move {
            let rx = rx.lock().await.take().unwrap();
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|x| (x, rx))
            });
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(StreamBody::new(stream))
                    .unwrap(),
            )
        }
    });
    let mut svc = ServiceBuilder::new().layer(layer).service(streaming);
    let mut body = ask(500);
    body["stream"] = json!(true);
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(chat("sk-1", body))
        .await
        .unwrap();
    let during = handle.usage(&chat("sk-1", json!({}))).await;
    assert!(during[0].reserved.tokens >= 500, "reserved while streaming");
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"12345678\"}}]}\n\n",
    ))))
    .await
    .unwrap();
    let mut body = Box::pin(res.into_body());
    body.frame().await.unwrap().unwrap();
    drop(body); // the client goes away
    let after = handle.usage(&chat("sk-1", json!({}))).await;
    assert_eq!(after[0].reserved.tokens, 0);
    let prompt = moat_core::tokens::estimate_input(
        &moat_core::llm::LlmRequest::parse(
            Bytes::from(ask(500).to_string()),
            "/v1/chat/completions",
        )
        .unwrap(),
    )
    .tokens;
    assert_eq!(
        after[0].used.tokens,
        prompt + 2,
        "the prompt and the 8 bytes streamed (2 tokens)"
    );
}

#[tokio::test]
async fn spend_budgets_use_prices_and_unknown_models_are_refused() {
    let prices = PriceTable::new().with_model(
        "gpt-4o",
        Price::new(PerToken::from_nanos(2500), PerToken::from_nanos(10_000)),
    );
    let layer = QuotaLayer::new(
        Budget::new("spend", Global, Period::Month).usd("0.01".parse::<Usd>().unwrap()),
    )
    .with_prices(prices);
    let handle = layer.handle();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(Seen::default()));
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(chat("sk-1", ask(100)))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    // 10 prompt tokens at $2.50/M and 100 completion at $10/M: $0.001025.
    assert_eq!(
        handle.usage(&chat("sk-1", json!({}))).await[0].used.usd,
        Usd::from_micros(1025)
    );
    let mut other = ask(10);
    other["model"] = json!("mystery-model");
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(chat("sk-1", other))
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let v: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["code"], "model_not_priced");
}

#[tokio::test]
async fn alerts_fire_once_per_threshold_and_caps_are_injected() {
    let alerts: Arc<Mutex<Vec<BudgetAlert>>> = Arc::default();
    let sink = alerts.clone();
    let seen = Seen::default();
    let layer = QuotaLayer::new(Budget::new("b", ApiKey::default(), Period::Day).tokens(1000))
        .with_alerts(move |a: &BudgetAlert| sink.lock().unwrap().push(a.clone()))
        .with_completion_reserve(90)
        .with_max_tokens_cap(true);
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(seen.clone()));
    for _ in 0..10 {
        let no_cap = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(chat("sk-1", no_cap))
            .await
            .unwrap();
        if res.status() == 200 {
            res.into_body().collect().await.unwrap();
        }
    }
    assert_eq!(
        seen.lock().unwrap()[0]["max_tokens"],
        90,
        "the reserve was written into the request"
    );
    let alerts = alerts.lock().unwrap();
    let percents: Vec<u64> = alerts.iter().map(|a| a.percent).collect();
    assert_eq!(percents, vec![50, 80, 100], "each once");
    assert!(alerts[0].key.starts_with("api_key:") && !alerts[0].key.contains("sk-1"));
}

#[tokio::test]
async fn non_llm_requests_pass_untouched() {
    let layer = QuotaLayer::new(Budget::new("b", Global, Period::Day).tokens(1));
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(
            |_req: Request<RequestBody<Full<Bytes>>>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"models"))))
            },
        ));
    let get = Request::get("/v1/models").body(Full::default()).unwrap();
    let res = svc.ready().await.unwrap().call(get).await.unwrap();
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "models"
    );
}

#[tokio::test]
async fn handles_and_rebuilt_layers_share_each_budgets_state_by_name() {
    let seen = Seen::default();
    let layer = QuotaLayer::new(Budget::new("daily", ApiKey::default(), Period::Day).tokens(1000));
    let handle = layer.handle();
    // Builder calls after the handle was taken: the same budgets.
    let layer = layer.with_completion_reserve(10).with_headers(false);
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(upstream(seen.clone()));
    let response = svc.oneshot(chat("sk-1", ask(40))).await.unwrap();
    response.into_body().collect().await.unwrap();
    let probe = chat("sk-1", ask(1));
    let usage = handle.usage(&probe).await;
    assert_eq!(
        usage[0].used.tokens,
        10 + 40,
        "the old handle sees the new layer's charge"
    );

    // A reload: a new layer with the same budget name takes over its usage.
    let reloaded = QuotaLayer::new(Budget::new("daily", ApiKey::default(), Period::Day).tokens(60))
        .budget(Budget::new("new", ApiKey::default(), Period::Day).tokens(1000))
        .with_state_from(&layer);
    let svc = ServiceBuilder::new()
        .layer(reloaded.clone())
        .service(upstream(seen));
    let refused = svc.oneshot(chat("sk-1", ask(40))).await.unwrap();
    assert_eq!(
        refused.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "50 used + 40 > 60"
    );
    let usage = reloaded.handle().usage(&chat("sk-1", ask(1))).await;
    assert_eq!(
        usage
            .iter()
            .find(|b| b.budget == "daily")
            .unwrap()
            .used
            .tokens,
        50
    );
    // Two budgets of one name are refused: the name keys the state.
    assert!(
        QuotaLayer::new(Budget::new("daily", Global, Period::Day).tokens(1))
            .try_budget(Budget::new("daily", Global, Period::Day).tokens(2))
            .is_err()
    );
}
