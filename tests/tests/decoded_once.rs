//! The response view reads each streamed event once per request, however many layers look at
//! the reply: here rate limits (a token rate), budgets, redaction (restoring placeholders) and
//! moderation (checking every word) together. A metrics recorder counts the events the view decodes.
//!
//! Its own test binary: the recorder is global to the process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use moat::core::identity::ApiKey;
use moat::core::sse::SseDecoder;
use moat::moderate::ModerateLayer;
use moat::quota::{Budget, Period, QuotaLayer};
use moat::ratelimit::{Limit, RateLimitLayer, Rule};
use moat::redact::{Entity, RedactLayer, Redactor};
use moat_testkit::mock::MockUpstream;
use tower::{ServiceBuilder, ServiceExt};

/// Counts `moat_response_events_total`; every other metric goes nowhere.
#[derive(Debug, Default)]
struct EventCount(Arc<AtomicU64>);

impl Recorder for EventCount {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() == "moat_response_events_total" {
            Counter::from_arc(self.0.clone())
        } else {
            Counter::noop()
        }
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn events_in(bytes: &[u8]) -> usize {
    let mut decoder = SseDecoder::new();
    let mut events = decoder.decode(bytes).unwrap();
    events.extend(decoder.finish());
    events.len()
}

#[tokio::test]
async fn each_event_is_decoded_once_with_four_layers_on() {
    let decoded = Arc::new(AtomicU64::new(0));
    metrics::set_global_recorder(EventCount(decoded.clone())).unwrap();
    let mock = MockUpstream::start().await.unwrap();
    let upstream = format!("{}/v1/chat/completions", mock.url());
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let prompt = "Reply to jane.doe@example.com about the quarterly plan, please, at some length.";

    // What the upstream sends for this request (the budget asks for the usage chunk).
    let direct = serde_json::json!({"model": "gpt-4o", "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Reply to [EMAIL_1] about the quarterly plan, please, at some length."}]});
    let sent = client
        .request(
            Request::post(&upstream)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(direct.to_string())))
                .unwrap(),
        )
        .await
        .unwrap();
    let upstream_events = events_in(&sent.into_body().collect().await.unwrap().to_bytes());
    assert!(upstream_events > 20, "{upstream_events}");

    let proxy = tower::service_fn(move |req: Request<_>| {
        let (client, upstream) = (client.clone(), upstream.clone());
        async move {
            let (parts, body) = req.into_parts();
            let body = BodyExt::collect(body).await.unwrap().to_bytes();
            let mut outgoing = Request::post(upstream).body(Full::new(body)).unwrap();
            *outgoing.headers_mut() = parts.headers;
            outgoing.headers_mut().remove(http::header::CONTENT_LENGTH);
            Ok::<_, std::convert::Infallible>(client.request(outgoing).await.unwrap())
        }
    });
    let service = ServiceBuilder::new()
        .layer(RateLimitLayer::new(
            Rule::new("tokens", ApiKey::default()).tokens(Limit::per_minute(1_000_000)),
        ))
        .layer(QuotaLayer::new(
            Budget::new("daily", ApiKey::default(), Period::Day).tokens(1_000_000),
        ))
        .layer(RedactLayer::new(Redactor::new(&Entity::ALL)))
        .layer(ModerateLayer::default())
        .service(proxy);
    let body = serde_json::json!({"model": "gpt-4o", "stream": true,
        "messages": [{"role": "user", "content": prompt}]});
    let response = service
        .oneshot(
            Request::post("/v1/chat/completions")
                .header("authorization", "Bearer sk-once")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap(),
        )
        .await
        .unwrap();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("jane.doe@example.com"), "restored: {text}");
    assert!(
        !text.contains("prompt_tokens"),
        "the usage chunk the client did not ask for is gone"
    );
    assert_eq!(
        decoded.load(Ordering::Relaxed),
        upstream_events as u64,
        "each of the upstream's events was decoded once, not once per layer"
    );
}
