//! moat's layers around the HTTP client that calls the provider, so a batch job cannot
//! overspend its budget or keep hammering a provider that is failing.
//!
//! `cargo run -p client-side` starts moat's mock provider on loopback, wraps a hyper-util client
//! in a token budget and a circuit breaker, and runs two batches: the first stops when its
//! budget is spent (refused locally, without a call to the provider); the second meets a
//! provider answering 503 and stops calling it once the breaker opens. It exits 0 when both
//! held (CI runs it).

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use moat::core::identity::Global;
use moat::core::RequestBody;
use moat::prelude::*;
use moat_testkit::mock::MockUpstream;
use tower::{Service, ServiceBuilder, ServiceExt};

/// A chat request to the provider at `base`, with fault headers for the mock.
fn chat(base: &str, faults: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "Summarise this record in one line."}],
    });
    let mut request = Request::post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid request");
    for (name, value) in faults {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).expect("valid name"),
            value.parse().expect("valid value"),
        );
    }
    request
}

/// Sends `request` and reads the whole answer.
async fn send<S, B>(client: &mut S, request: Request<Full<Bytes>>) -> u16
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let response = client
        .ready()
        .await
        .expect("ready")
        .call(request)
        .await
        .expect("an answer");
    let status = response.status().as_u16();
    response.into_body().collect().await.expect("a whole body");
    status
}

#[tokio::main]
async fn main() {
    let provider = MockUpstream::start().await.expect("the mock provider");
    let base = provider.url();
    let http = Client::builder(TokioExecutor::new()).build_http::<RequestBody<Full<Bytes>>>();

    // Batch one: a budget of 400 tokens for the whole job. Each call reserves its prompt and
    // max_tokens before it goes out and settles to the real usage after.
    let budget = Budget::new("batch-job", Global, Period::Day).tokens(400);
    let mut client = ServiceBuilder::new()
        .moat_quota(QuotaLayer::new(budget))
        .moat_circuit_breaker(Breaker::new("provider"))
        .service(http.clone());
    let mut sent = 0;
    let mut refused = None;
    for i in 0..20 {
        match send(&mut client, chat(&base, &[])).await {
            200 => sent += 1,
            status => {
                refused = Some((i, status));
                break;
            }
        }
    }
    let (at, status) = refused.expect("the budget ran out");
    println!(
        "batch one: {sent} calls went out, call {} refused locally with {status}",
        at + 1
    );
    assert_eq!(status, 429);
    assert_eq!(
        provider.requests().len(),
        sent,
        "the refused call never reached the provider"
    );

    // Batch two: the provider fails. After 10 calls, half or more failed, the breaker opens and
    // the job stops calling it (503 with retry-after, locally).
    provider.clear();
    let breaker = Breaker::builder("failing-provider")
        .config(BreakerConfig::default().with_minimum_calls(10))
        .build()
        .expect("a valid configuration");
    let mut client = ServiceBuilder::new()
        .moat_circuit_breaker(breaker.clone())
        .service(tower::util::MapRequest::new(
            http,
            |r: Request<Full<Bytes>>| r.map(RequestBody::original),
        ));
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(send(&mut client, chat(&base, &[("x-mock-status", "503")])).await);
    }
    let reached = provider.requests().len();
    println!(
        "batch two: {reached} of 30 calls reached the failing provider; the breaker is {}",
        breaker.state()
    );
    assert_eq!(reached, 10, "the breaker opened after its minimum of calls");
    assert_eq!(breaker.state(), moat::breaker::State::Open);
    assert!(statuses.iter().all(|s| *s == 503));
    println!("client-side: the job neither overspent nor kept hammering the provider");
}
