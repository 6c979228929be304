//! Retries and the ladder's last resorts, with upstreams written as functions.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use moat_breaker::{
    Backoff, Breaker, BreakerConfig, CircuitBreakerLayer, Fallback, RetryPolicy, State,
};
use moat_core::body::RequestBody;
use moat_core::clock::ManualClock;
use tower::retry::RetryLayer;
use tower::{service_fn, Layer, ServiceExt};

/// An upstream that answers `statuses` in turn (the last one from then on), counting calls.
fn scripted<B: Send + 'static>(
    statuses: &'static [u16],
) -> (
    impl tower::Service<
            Request<B>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + Sync,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let service = service_fn(move |_req: Request<B>| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let status = statuses[n.min(statuses.len() - 1)];
        async move {
            let mut response = Response::new(Full::new(Bytes::from(format!("answer {n}"))));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            if status == 429 {
                response
                    .headers_mut()
                    .insert("retry-after-ms", HeaderValue::from_static("10"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    (service, calls)
}

fn breaker(name: &str) -> Breaker {
    Breaker::builder(name)
        .config(BreakerConfig::default())
        .clock(Arc::new(ManualClock::new()))
        .build()
        .unwrap()
}

fn fast() -> Backoff {
    Backoff::new(Duration::from_millis(1), Duration::from_millis(50))
}

#[tokio::test]
async fn a_target_is_retried_before_the_ladder_moves_on() {
    let (flaky, flaky_calls) = scripted::<RequestBody<Full<Bytes>>>(&[503, 200]);
    let (backup, backup_calls) = scripted::<RequestBody<Full<Bytes>>>(&[200]);
    let primary = breaker("primary");
    let ladder = Fallback::new()
        .target(
            "primary",
            CircuitBreakerLayer::new(primary.clone()).layer(flaky),
        )
        .target(
            "backup",
            CircuitBreakerLayer::new(breaker("backup")).layer(backup),
        )
        .with_retries(1, fast());
    let response = ladder
        .oneshot(Request::new(Full::new(Bytes::from("{}"))))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers().get("x-moat-fallback").is_none(),
        "the primary served on its retry"
    );
    assert_eq!(
        (
            flaky_calls.load(Ordering::SeqCst),
            backup_calls.load(Ordering::SeqCst)
        ),
        (2, 0)
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "answer 1");
    assert_eq!(
        (primary.snapshot().calls, primary.snapshot().failures),
        (2, 1)
    );
}

#[tokio::test]
async fn the_ladder_ends_in_a_static_response_or_the_last_answer() {
    let (down, _) = scripted::<RequestBody<Full<Bytes>>>(&[503]);
    let ladder = Fallback::new().target(
        "only",
        CircuitBreakerLayer::new(breaker("only")).layer(down.clone()),
    );
    let response = ladder
        .oneshot(Request::new(Full::new(Bytes::from("{}"))))
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        503,
        "the upstream's own answer says most"
    );

    let ladder = Fallback::new()
        .target(
            "only",
            CircuitBreakerLayer::new(breaker("only")).layer(down),
        )
        .with_last_resort(
            StatusCode::OK,
            HeaderValue::from_static("application/json"),
            Bytes::from_static(br#"{"choices":[{"message":{"content":"busy, try later"}}]}"#),
        );
    let response = ladder
        .oneshot(Request::new(Full::new(Bytes::from("{}"))))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-moat-fallback"], "static");
}

#[tokio::test]
async fn every_breaker_open_is_a_503_with_the_soonest_retry_after() {
    let (up, calls) = scripted::<RequestBody<Full<Bytes>>>(&[200]);
    let a = breaker("a");
    let b = breaker("b");
    a.force_open();
    b.rate_limited(Duration::from_secs(7));
    let ladder = Fallback::new()
        .target("a", CircuitBreakerLayer::new(a).layer(up.clone()))
        .target("b", CircuitBreakerLayer::new(b).layer(up));
    let response = ladder
        .oneshot(Request::new(Full::new(Bytes::from("{}"))))
        .await
        .unwrap();
    assert_eq!(response.status(), 429, "the last target's refusal");
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "no upstream was called");
}

#[tokio::test]
async fn the_retry_policy_honours_retry_after_and_its_attempts() {
    let (limited, calls) = scripted::<Full<Bytes>>(&[429, 429, 200]);
    let service = RetryLayer::new(RetryPolicy::new(2).with_backoff(fast())).layer(limited.clone());
    let response = service
        .oneshot(Request::new(Full::new(Bytes::new())))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    let (limited, calls) = scripted::<Full<Bytes>>(&[429]);
    let service = RetryLayer::new(RetryPolicy::new(2).with_backoff(fast())).layer(limited);
    let response = service
        .oneshot(Request::new(Full::new(Bytes::new())))
        .await
        .unwrap();
    assert_eq!(response.status(), 429, "out of attempts");
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    let (bad, calls) = scripted::<Full<Bytes>>(&[400]);
    let service = RetryLayer::new(RetryPolicy::new(2).with_backoff(fast())).layer(bad);
    let response = service
        .oneshot(Request::new(Full::new(Bytes::new())))
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a client error is not retried"
    );
}

#[tokio::test]
async fn a_body_read_to_its_length_counts_though_not_polled_to_its_end() {
    let (up, _) = scripted::<Full<Bytes>>(&[200]);
    let b = breaker("length");
    let response = CircuitBreakerLayer::new(b.clone())
        .layer(up)
        .oneshot(Request::new(Full::new(Bytes::new())))
        .await
        .unwrap();
    let mut body = response.into_body();
    // What a server does with a body of known length: read until it says it is done.
    while !body.is_end_stream() {
        body.frame().await.unwrap().unwrap();
    }
    drop(body);
    assert_eq!(b.snapshot().calls, 1);
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test]
async fn a_refused_grpc_call_is_unavailable_and_the_decision_is_recorded() {
    use moat_core::decision::{Decisions, Outcome};
    let (up, calls) = scripted::<Full<Bytes>>(&[200]);
    let b = breaker("grpc");
    b.force_open();
    let decisions = Decisions::new();
    let mut request = Request::builder()
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    request.extensions_mut().insert(decisions.clone());
    let response = CircuitBreakerLayer::new(b)
        .layer(up)
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "trailers-only");
    assert_eq!(response.headers()["grpc-status"], "14", "UNAVAILABLE");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let recorded = decisions.take();
    assert_eq!(recorded[0].layer, "breaker");
    assert_eq!(recorded[0].rule.as_deref(), Some("grpc"));
    assert!(
        matches!(&recorded[0].outcome, Outcome::Rejected { status: 503, code } if code == "circuit_open")
    );
}

#[tokio::test]
async fn keyed_breakers_trip_one_deployment_only() {
    use http::HeaderName;
    use moat_breaker::{Breakers, Window};
    use moat_core::identity::HeaderKey;
    let up = service_fn(|req: Request<Full<Bytes>>| {
        let bad = req.headers()["x-deployment"] == "bad";
        async move {
            let mut response = Response::new(Full::new(Bytes::new()));
            if bad {
                *response.status_mut() = StatusCode::BAD_GATEWAY;
            }
            Ok::<_, Infallible>(response)
        }
    });
    let breakers = Breakers::builder(
        "deployments",
        HeaderKey::new(HeaderName::from_static("x-deployment")),
    )
    .config(
        BreakerConfig::default()
            .with_minimum_calls(2)
            .with_window(Window::Count(2)),
    )
    .clock(Arc::new(ManualClock::new()))
    .build()
    .unwrap();
    let service = CircuitBreakerLayer::keyed(breakers.clone()).layer(up);
    let call = |deployment: &'static str| {
        let service = service.clone();
        async move {
            let request = Request::builder()
                .header("x-deployment", deployment)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let response = service.oneshot(request).await.unwrap();
            let status = response.status();
            drop(response.into_body().collect().await);
            status
        }
    };
    assert_eq!(call("bad").await, 502);
    assert_eq!(call("bad").await, 502);
    assert_eq!(call("bad").await, 503, "its breaker is open");
    assert_eq!(call("good").await, 200, "the other deployment is untouched");
    assert_eq!(breakers.len(), 2);
}

#[tokio::test]
async fn a_grpc_failure_in_the_trailers_counts() {
    use http_body::Frame;
    use http_body_util::StreamBody;
    let up = service_fn(|_req: Request<Full<Bytes>>| async {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("14"));
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
            Ok(Frame::trailers(trailers)),
        ];
        let mut response = Response::new(StreamBody::new(futures_util::stream::iter(frames)));
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        Ok::<_, Infallible>(response)
    });
    let b = breaker("grpc-trailers");
    let response = CircuitBreakerLayer::new(b.clone())
        .layer(up)
        .oneshot(Request::new(Full::new(Bytes::new())))
        .await
        .unwrap();
    let collected = response.into_body().collect().await.unwrap();
    assert!(collected.trailers().is_some(), "trailers pass through");
    assert_eq!((b.snapshot().calls, b.snapshot().failures), (1, 1));
}

#[tokio::test]
async fn retries_stop_when_the_budget_is_spent() {
    use tower::retry::budget::TpsBudget;
    // No reserve and no share of requests to spend on retries: nothing may be retried.
    let budget = TpsBudget::new(Duration::from_secs(10), 0, 0.0);
    let (down, calls) = scripted::<Full<Bytes>>(&[503]);
    let service =
        RetryLayer::new(RetryPolicy::new(3).with_backoff(fast()).with_budget(budget)).layer(down);
    let response = service
        .oneshot(Request::new(Full::new(Bytes::new())))
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the budget allowed no retry"
    );
}

/// The last possible attempt takes the request's head instead of a copy: every attempt before
/// it, on every target, must still see the whole head, and the fallback is still recorded.
#[tokio::test]
async fn every_attempt_sees_the_request_head_and_the_fallback_is_recorded() {
    use moat_core::decision::Decisions;
    #[derive(Clone)]
    struct Marker;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let upstream = |name: &'static str, statuses: &'static [u16]| {
        let seen = seen.clone();
        let calls = Arc::new(AtomicUsize::new(0));
        service_fn(move |req: Request<RequestBody<Full<Bytes>>>| {
            seen.lock().unwrap().push((
                name,
                req.headers().get("x-trace").cloned(),
                req.extensions().get::<Marker>().is_some(),
            ));
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let status = statuses[n.min(statuses.len() - 1)];
            async move {
                let mut response = Response::new(Full::new(Bytes::from(name)));
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                Ok::<_, Infallible>(response)
            }
        })
    };
    let ladder = Fallback::new()
        .target(
            "primary",
            CircuitBreakerLayer::new(breaker("primary")).layer(upstream("primary", &[503])),
        )
        .target(
            "backup",
            CircuitBreakerLayer::new(breaker("backup")).layer(upstream("backup", &[503, 200])),
        )
        .with_retries(1, fast());
    let decisions = Decisions::new();
    let mut request = Request::new(Full::new(Bytes::from("{}")));
    request
        .headers_mut()
        .insert("x-trace", HeaderValue::from_static("t-1"));
    request.extensions_mut().insert(Marker);
    request.extensions_mut().insert(decisions.clone());
    let response = ladder.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-moat-fallback"], "backup");
    let trace = Some(HeaderValue::from_static("t-1"));
    assert_eq!(
        *seen.lock().unwrap(),
        [
            ("primary", trace.clone(), true),
            ("primary", trace.clone(), true),
            ("backup", trace.clone(), true),
            ("backup", trace, true),
        ]
    );
    // Each attempt's breaker records through the handle in the extensions, then the fallback.
    let recorded: Vec<_> = decisions
        .snapshot()
        .into_iter()
        .map(|d| (d.layer, d.rule.unwrap_or_default().into_owned()))
        .collect();
    let names = ["primary", "primary", "backup", "backup"];
    let mut expected: Vec<_> = names.map(|n| ("breaker", n.to_owned())).into();
    expected.push(("fallback", "backup".to_owned()));
    assert_eq!(recorded, expected);
}
