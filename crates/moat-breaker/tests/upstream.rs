//! The breaker and the fallback in front of real mock upstreams, over real sockets, through
//! a real HTTP client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use moat_breaker::{
    Backoff, Breaker, BreakerConfig, CircuitBreaker, CircuitBreakerLayer, Fallback, Reason, State,
    Unavailable, Window,
};
use moat_core::body::RequestBody;
use moat_core::clock::ManualClock;
use moat_testkit::mock::{MockConfig, MockUpstream};
use tower::{Layer, ServiceExt};

type Body = RequestBody<Full<Bytes>>;
type HttpClient = Client<HttpConnector, Body>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn breaker(name: &str, config: BreakerConfig) -> (Breaker, ManualClock) {
    let clock = ManualClock::new();
    let breaker = Breaker::builder(name)
        .config(config.with_jitter(0.0))
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    (breaker, clock)
}

fn guarded(breaker: &Breaker) -> CircuitBreaker<HttpClient> {
    CircuitBreakerLayer::new(breaker.clone()).layer(client())
}

fn chat(addr: SocketAddr, stream: bool, faults: &[(&str, &str)]) -> Request<Body> {
    plain_chat(addr, stream, faults).map(RequestBody::original)
}

/// A chat request as a client sends it, to a ladder (which buffers it for each target).
fn plain_chat(addr: SocketAddr, stream: bool, faults: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"gpt-4o-mini","stream":{stream},"messages":[{{"role":"user","content":"hello there"}}]}}"#
    );
    let mut request = Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    for (name, value) in faults {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    request
}

/// Reads a whole response, as a client that stays to the end.
async fn read<B: http_body::Body>(response: Response<B>) -> (StatusCode, Result<Bytes, B::Error>) {
    let status = response.status();
    (
        status,
        response.into_body().collect().await.map(|c| c.to_bytes()),
    )
}

#[tokio::test]
async fn the_classification_table_against_the_mock() {
    let mock = MockUpstream::start().await.unwrap();
    // status header -> (failures, calls) counted after the call
    for (status, counted, failures) in [
        (None, 1, 0),
        (Some("500"), 1, 1),
        (Some("502"), 1, 1),
        (Some("503"), 1, 1),
        (Some("529"), 1, 1),
        (Some("400"), 0, 0),
        (Some("404"), 0, 0),
        (Some("401"), 0, 0),
        (Some("403"), 0, 0),
        (Some("429"), 0, 0),
    ] {
        let (b, _) = breaker("table", BreakerConfig::default());
        let faults: Vec<(&str, &str)> = status.map(|s| ("x-mock-status", s)).into_iter().collect();
        let response = guarded(&b)
            .oneshot(chat(mock.addr(), false, &faults))
            .await
            .unwrap();
        let expected_unavailable = match status {
            Some("500" | "502" | "503" | "529") => Some(Reason::Failed),
            Some("401" | "403") => Some(Reason::KeyRejected),
            Some("429") => Some(Reason::RateLimited),
            _ => None,
        };
        assert_eq!(
            response.extensions().get::<Unavailable>().map(|u| u.reason),
            expected_unavailable,
            "{status:?}"
        );
        let (_, body) = read(response).await;
        body.unwrap();
        let snapshot = b.snapshot();
        assert_eq!(
            (snapshot.calls, snapshot.failures),
            (counted, failures),
            "{status:?}"
        );
        assert_eq!(b.state(), State::Closed);
    }
}

#[tokio::test]
async fn a_connection_refused_is_a_failure_and_errors_pass_through() {
    let addr = {
        let mock = MockUpstream::start().await.unwrap();
        mock.addr()
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (b, _) = breaker("gone", BreakerConfig::default());
    let result = guarded(&b).oneshot(chat(addr, false, &[])).await;
    assert!(result.is_err(), "the client's error is the service's error");
    assert_eq!(b.snapshot().failures, 1);
}

#[tokio::test]
async fn a_429_leaves_the_upstream_alone_until_its_retry_after() {
    let mock = MockUpstream::start().await.unwrap();
    let (b, clock) = breaker("limited", BreakerConfig::default());
    let faults = [("x-mock-status", "429"), ("x-mock-retry-after", "2")];
    let (status, _) = read(
        guarded(&b)
            .oneshot(chat(mock.addr(), false, &faults))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 429);
    let refused = guarded(&b)
        .oneshot(chat(mock.addr(), false, &[]))
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "2");
    assert_eq!(refused.headers()["retry-after-ms"], "2000");
    assert_eq!(
        refused.extensions().get::<Unavailable>().unwrap().reason,
        Reason::RateLimited
    );
    assert_eq!(
        mock.requests().len(),
        1,
        "the refused call never reached the upstream"
    );
    assert_eq!(b.state(), State::Closed, "a 429 is not ill health");
    clock.advance(Duration::from_secs(2));
    let (status, _) = read(
        guarded(&b)
            .oneshot(chat(mock.addr(), false, &[]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test]
async fn a_stream_whose_first_event_is_an_error_fails_before_the_headers() {
    let mock = MockUpstream::start().await.unwrap();
    let (b, _) = breaker("stream", BreakerConfig::default());
    let response = guarded(&b)
        .oneshot(chat(
            mock.addr(),
            true,
            &[("x-mock-stream-error", "overloaded")],
        ))
        .await
        .unwrap();
    assert_eq!(
        response.extensions().get::<Unavailable>().unwrap().reason,
        Reason::Failed,
        "a fallback could still take over"
    );
    let (_, body) = read(response).await;
    assert!(
        String::from_utf8_lossy(&body.unwrap()).contains("overloaded"),
        "the event is passed on whole"
    );
    assert_eq!(b.snapshot().failures, 1);
}

#[tokio::test]
async fn a_stream_that_stalls_before_its_first_token_is_answered_504() {
    let mock = MockUpstream::start().await.unwrap();
    let (b, _) = breaker(
        "stall",
        BreakerConfig::default().with_first_token_timeout(Duration::from_millis(100)),
    );
    let response = guarded(&b)
        .oneshot(chat(mock.addr(), true, &[("x-mock-ttft-ms", "5000")]))
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    assert_eq!(
        response.extensions().get::<Unavailable>().unwrap().reason,
        Reason::Stalled
    );
    let snapshot = b.snapshot();
    assert_eq!((snapshot.failures, snapshot.slow_calls), (1, 1));
}

#[tokio::test]
async fn streams_count_when_they_end_and_a_client_that_leaves_is_not_counted() {
    let mock = MockUpstream::start().await.unwrap();
    let (b, _) = breaker("ends", BreakerConfig::default());

    // Whole: a success, and every byte arrives (the held first event included).
    let response = guarded(&b)
        .oneshot(chat(mock.addr(), true, &[]))
        .await
        .unwrap();
    assert_eq!(b.snapshot().calls, 0, "not before the body ends");
    let (_, body) = read(response).await;
    let text = String::from_utf8(body.unwrap().to_vec()).unwrap();
    assert!(
        text.starts_with("data: ") && text.trim_end().ends_with("data: [DONE]"),
        "{text}"
    );
    assert_eq!((b.snapshot().calls, b.snapshot().failures), (1, 0));

    // Cut midway: a failure when the body ends.
    let response = guarded(&b)
        .oneshot(chat(mock.addr(), true, &[("x-mock-cut-after", "2")]))
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the head went out before the cut");
    let (_, body) = read(response).await;
    assert!(body.is_err());
    assert_eq!((b.snapshot().calls, b.snapshot().failures), (2, 1));

    // The client leaves after the first frame: not counted.
    let response = guarded(&b)
        .oneshot(chat(mock.addr(), true, &[("x-mock-chunk-delay-ms", "50")]))
        .await
        .unwrap();
    let mut body = response.into_body();
    let _ = body.frame().await;
    drop(body);
    assert_eq!(b.snapshot().calls, 2);
}

#[tokio::test]
async fn fallback_to_a_second_upstream_streamed_and_not() {
    let backup = MockUpstream::start().await.unwrap();
    let dead = {
        let mock = MockUpstream::start().await.unwrap();
        mock.addr()
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (primary_breaker, _) = breaker("primary", BreakerConfig::default());
    let (backup_breaker, _) = breaker("backup", BreakerConfig::default());
    // Each target is its own client aimed at its own upstream: the request's URI is rewritten.
    let aim = |addr: SocketAddr, b: &Breaker| {
        let service = guarded(b);
        tower::util::MapRequest::new(service, move |mut req: Request<Body>| {
            let path = req.uri().path_and_query().unwrap().clone();
            *req.uri_mut() = format!("http://{addr}{path}").parse().unwrap();
            req
        })
    };
    let ladder = Fallback::new()
        .target("primary", aim(dead, &primary_breaker))
        .target("backup", aim(backup.addr(), &backup_breaker));
    for stream in [false, true] {
        let response = ladder
            .clone()
            .oneshot(plain_chat(dead, stream, &[]))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-moat-fallback"], "backup");
        let (_, body) = read(response).await;
        let text = String::from_utf8(body.unwrap().to_vec()).unwrap();
        assert!(
            text.contains("\"hel"),
            "the backup echoed the prompt: {text}"
        );
    }
    assert_eq!(backup.requests().len(), 2);
    assert_eq!(primary_breaker.snapshot().failures, 2);
}

/// Binds a mock again on `addr`, which its earlier incarnation may still hold for a moment.
async fn restart(addr: SocketAddr) -> MockUpstream {
    for _ in 0..100 {
        if let Ok(mock) = MockUpstream::start_with(MockConfig::default(), addr).await {
            return mock;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("could not listen on {addr} again");
}

#[tokio::test]
async fn an_upstream_killed_and_brought_back() {
    let primary = MockUpstream::start().await.unwrap();
    let primary_addr = primary.addr();
    let backup = MockUpstream::start().await.unwrap();
    let (primary_breaker, clock) = breaker(
        "primary",
        BreakerConfig::default()
            .with_minimum_calls(2)
            .with_window(Window::Count(4))
            .with_open_for(Duration::from_secs(10))
            .with_half_open_calls(1),
    );
    let (backup_breaker, _) = breaker("backup", BreakerConfig::default());
    let aim = |addr: SocketAddr, b: &Breaker| {
        // A fresh client per target: no pooled connection outlives the killed upstream.
        let service = CircuitBreakerLayer::new(b.clone()).layer(client());
        tower::util::MapRequest::new(service, move |mut req: Request<Body>| {
            let path = req.uri().path_and_query().unwrap().clone();
            *req.uri_mut() = format!("http://{addr}{path}").parse().unwrap();
            req
        })
    };
    let ladder = Fallback::new()
        .target("primary", aim(primary_addr, &primary_breaker))
        .target("backup", aim(backup.addr(), &backup_breaker))
        .with_retries(0, Backoff::default());
    let served_by = |response: &Response<_>| {
        response
            .headers()
            .get("x-moat-fallback")
            .map_or("primary".to_owned(), |v| v.to_str().unwrap().to_owned())
    };

    let response = ladder
        .clone()
        .oneshot(plain_chat(primary_addr, false, &[]))
        .await
        .unwrap();
    assert_eq!(served_by(&response), "primary");
    drop(read(response).await);

    drop(primary);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        let response = ladder
            .clone()
            .oneshot(plain_chat(primary_addr, false, &[]))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), "backup");
        drop(read(response).await);
    }
    assert_eq!(
        primary_breaker.state(),
        State::Open,
        "the dead upstream tripped its breaker"
    );
    let before = backup.requests().len();

    let primary = restart(primary_addr).await;
    // Still open: the revived upstream is not called yet.
    let response = ladder
        .clone()
        .oneshot(plain_chat(primary_addr, false, &[]))
        .await
        .unwrap();
    assert_eq!(served_by(&response), "backup");
    drop(read(response).await);
    assert!(primary.requests().is_empty());

    clock.advance(Duration::from_secs(10));
    let response = ladder
        .clone()
        .oneshot(plain_chat(primary_addr, false, &[]))
        .await
        .unwrap();
    assert_eq!(
        served_by(&response),
        "primary",
        "the trial call went to the primary"
    );
    drop(read(response).await);
    assert_eq!(primary_breaker.state(), State::Closed);
    assert_eq!(primary.requests().len(), 1);
    assert_eq!(backup.requests().len(), before + 1);
}
