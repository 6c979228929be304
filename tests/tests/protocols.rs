//! moat-core's rejections, identities and usage watching, on real axum and tonic servers over
//! real sockets, read by real clients.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use moat::core::body::ResponseBody;
use moat::core::identity::{KeyExtractor, PeerIp};
use moat::core::reject::{Protocol, Rejection};
use moat::core::response::{Hook, Hooks, Interest, ViewBody};
use moat::core::usage::{BodyOutcome, UsageReport};
use moat_testkit::mock::MockUpstream;
use tower::{Layer, Service};

/// A minimal layer in the moat shape: rejects requests carrying `x-block` with a 429, and tags
/// every other response with the caller's peer-IP key.
#[derive(Debug, Clone, Copy)]
struct GuardLayer;

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard { inner }
    }
}

#[derive(Debug, Clone)]
struct Guard<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Guard<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let key = PeerIp
            .extract_from(&req)
            .map_or_else(|e| e.to_string(), |k| k.to_string());
        if req.headers().contains_key("x-block") {
            let rejection = Rejection::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "blocked by test",
            )
            .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            let response = rejection.into_response(Protocol::of(&req));
            return Box::pin(async move { Ok(response) });
        }
        let future = self.inner.call(req);
        Box::pin(async move {
            let mut response = future.await?.map(ResponseBody::inner);
            response
                .headers_mut()
                .insert("x-moat-key", HeaderValue::from_str(&key).unwrap());
            Ok(response)
        })
    }
}

async fn axum_server(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    url
}

fn http_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

#[tokio::test]
async fn axum_router_layer_rejects_in_openai_shape_and_sees_connect_info() {
    let router = axum::Router::new()
        .route(
            "/v1/chat/completions",
            axum::routing::post(|| async { "handled" }),
        )
        .layer(GuardLayer);
    let url = axum_server(router).await;
    let client = http_client();

    let ok = client
        .request(
            Request::post(format!("{url}/v1/chat/completions"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.headers()["x-moat-key"],
        "ip:127.0.0.1",
        "the peer address from axum's ConnectInfo"
    );
    assert_eq!(
        ok.into_body().collect().await.unwrap().to_bytes(),
        "handled"
    );

    let blocked = client
        .request(
            Request::post(format!("{url}/v1/chat/completions"))
                .header("x-block", "1")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(blocked.status(), 429);
    assert_eq!(blocked.headers()["retry-after"], "1");
    let body: serde_json::Value =
        serde_json::from_slice(&blocked.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_exceeded");
    assert_eq!(body["error"]["message"], "blocked by test");
}

#[tokio::test]
async fn tonic_server_layer_rejects_with_a_grpc_status_a_real_client_reads() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(GuardLayer)
            .add_service(health)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);

    let ok = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        ok.metadata().get("x-moat-key").unwrap(),
        "ip:127.0.0.1",
        "the peer address from tonic's TcpConnectInfo"
    );

    let mut blocked = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    blocked
        .metadata_mut()
        .insert("x-block", "1".parse().unwrap());
    let status = client.check(blocked).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(status.message(), "blocked by test");
}

/// Sends the report of the response it watches.
struct Report(tokio::sync::mpsc::UnboundedSender<UsageReport>);

impl Hook for Report {
    fn interest(&self) -> Interest {
        Interest::OBSERVE
    }

    fn on_end(self: Box<Self>, report: &UsageReport) {
        let _ = self.0.send(report.clone());
    }
}

/// A handler that proxies to the mock upstream and watches the streamed response for usage.
async fn watched_proxy(
    upstream: String,
    reports: tokio::sync::mpsc::UnboundedSender<UsageReport>,
    request: axum::extract::Request,
) -> Result<Response<ViewBody<hyper::body::Incoming>>, Infallible> {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let mut outgoing = Request::post(format!("{upstream}/v1/chat/completions"))
        .body(Full::new(bytes))
        .unwrap();
    *outgoing.headers_mut() = parts.headers;
    let response = http_client().request(outgoing).await.unwrap();
    let hooks = Hooks::default();
    hooks.attach(Report(reports));
    Ok(hooks.view(response))
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_is_reported_interrupted_with_what_it_got() {
    let mock = MockUpstream::start().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let upstream = mock.url();
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |req| watched_proxy(upstream.clone(), tx.clone(), req)),
    );
    let url = axum_server(router).await;
    let chat = |stream: bool| {
        serde_json::json!({"model": "m", "stream": stream, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "a reply that takes a while to stream to the end"}]})
        .to_string()
    };

    // A complete stream reports its usage once.
    let done = http_client()
        .request(
            Request::post(format!("{url}/v1/chat/completions"))
                .body(Full::from(chat(true)))
                .unwrap(),
        )
        .await
        .unwrap();
    done.into_body().collect().await.unwrap();
    let report = rx.recv().await.unwrap();
    assert_eq!(report.outcome, BodyOutcome::Completed);
    assert_eq!(
        report.usage.unwrap().output_tokens,
        moat_testkit::mock::count_tokens("a reply that takes a while to stream to the end")
    );

    // The client reads a few frames, then goes away while the upstream is still streaming.
    let request = Request::post(format!("{url}/v1/chat/completions"))
        .header("x-mock-chunk-delay-ms", "20")
        .body(Full::from(chat(true)))
        .unwrap();
    let response = http_client().request(request).await.unwrap();
    let mut body = response.into_body();
    let mut got = 0;
    while got < 3 {
        if body.frame().await.unwrap().unwrap().is_data() {
            got += 1;
        }
    }
    drop(body);
    let report = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("reported")
        .unwrap();
    assert_eq!(report.outcome, BodyOutcome::Interrupted);
    assert_eq!(report.usage, None, "the usage chunk never came");
    assert!(
        report.streamed_text_bytes > 0,
        "what was streamed is known: {report:?}"
    );
    assert!(rx.try_recv().is_err(), "reported exactly once");
}

mod ratelimit {
    use super::*;
    use moat::core::identity::PeerIp;
    use moat::ratelimit::{Limit, RateLimitLayer, Rule};

    #[tokio::test]
    async fn rate_limit_layer_on_an_axum_router() {
        let layer = RateLimitLayer::new(Rule::new("per-ip", PeerIp).limit(Limit::per_minute(2)));
        let router = axum::Router::new()
            .route(
                "/v1/chat/completions",
                axum::routing::post(|| async { "handled" }),
            )
            .layer(layer);
        let url = axum_server(router).await;
        let client = http_client();
        let send = || {
            client.request(
                Request::post(format!("{url}/v1/chat/completions"))
                    .body(Full::default())
                    .unwrap(),
            )
        };
        let first = send().await.unwrap();
        assert_eq!(first.status(), 200);
        assert_eq!(first.headers()["x-ratelimit-remaining-requests"], "1");
        assert_eq!(send().await.unwrap().status(), 200);
        let third = send().await.unwrap();
        assert_eq!(third.status(), 429);
        assert!(third.headers().contains_key("retry-after"));
        let body: serde_json::Value =
            serde_json::from_slice(&third.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    }

    #[tokio::test]
    async fn rate_limit_layer_on_a_tonic_server() {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;

        let (_reporter, health) = tonic_health::server::health_reporter();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let layer = RateLimitLayer::new(Rule::new("per-peer", PeerIp).limit(Limit::per_minute(1)));
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .layer(layer)
                .add_service(health)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        let status = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("per-peer"),
            "{}",
            status.message()
        );
    }
}

mod breaker {
    use moat::breaker::{Breaker, CircuitBreakerLayer};

    /// A breaker on a tonic server: the call goes through while closed; forced open, a real
    /// tonic client reads UNAVAILABLE; reset, calls go through again.
    #[tokio::test]
    async fn circuit_breaker_on_a_tonic_server() {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;

        let (_reporter, health) = tonic_health::server::health_reporter();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let breaker = Breaker::new("inference");
        let layer = CircuitBreakerLayer::new(breaker.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .layer(layer)
                .add_service(health)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        let check = || HealthCheckRequest {
            service: String::new(),
        };
        client.check(check()).await.unwrap();
        breaker.force_open();
        let status = client.check(check()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains("inference"),
            "{}",
            status.message()
        );
        breaker.reset();
        client.check(check()).await.unwrap();
        // The window starts empty on reset: the call since, a success.
        let snapshot = breaker.snapshot();
        assert_eq!((snapshot.calls, snapshot.failures), (1, 0), "{snapshot:?}");
        // A service's own UNAVAILABLE, in the trailers, is a failure.
        let status = client
            .check(HealthCheckRequest {
                service: "not-served".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(breaker.snapshot().failures, 0, "NOT_FOUND is the client's");
    }
}

mod stack {
    use super::*;
    use moat::core::identity::ApiKey;
    use moat::quota::{Budget, Period, QuotaLayer};
    use moat::ratelimit::{Limit, RateLimitLayer, Rule};

    /// The README's axum example: rate limits outside, budgets inside, over a real socket.
    #[tokio::test]
    async fn rate_limits_and_budgets_on_one_axum_router() {
        let limits = RateLimitLayer::new(
            Rule::new("per-key", ApiKey::default()).limit(Limit::per_minute(3)),
        );
        let quota = QuotaLayer::new(
            Budget::new("daily-tokens", ApiKey::default(), Period::Day).tokens(200_000),
        );
        let router = axum::Router::new()
            .route(
                "/v1/chat/completions",
                axum::routing::post(|| async {
                    (
                        [(http::header::CONTENT_TYPE, "application/json")],
                        r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}"#,
                    )
                }),
            )
            .layer(quota)
            .layer(limits);
        let url = axum_server(router).await;
        let body =
            r#"{"model":"gpt-4o","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
        let send = || {
            http_client().request(
                Request::post(format!("{url}/v1/chat/completions"))
                    .header("authorization", "Bearer sk-stack")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                    .unwrap(),
            )
        };
        for expected_left in ["2", "1", "0"] {
            let res = send().await.unwrap();
            assert_eq!(res.status(), 200);
            assert_eq!(
                res.headers()["x-ratelimit-remaining-requests"],
                expected_left
            );
            assert_eq!(res.headers()["x-moat-quota-budget"], "daily-tokens");
            res.into_body().collect().await.unwrap();
        }
        let limited = send().await.unwrap();
        assert_eq!(
            limited.status(),
            429,
            "the rate limit answers before the budget is touched"
        );
        assert!(limited.headers().get("x-moat-quota-budget").is_none());
    }

    /// The README's axum example with redaction inside: the handler (the model's side) sees only
    /// placeholders, the client gets its values back.
    #[tokio::test]
    async fn redaction_on_an_axum_router() {
        use moat::redact::{Entity, RedactLayer, Redactor};

        let router = axum::Router::new()
            .route(
                "/v1/chat/completions",
                axum::routing::post(|body: axum::Json<serde_json::Value>| async move {
                    let prompt = body.0["messages"][0]["content"].as_str().unwrap_or_default().to_owned();
                    assert_eq!(prompt, "call me at [PHONE_1] or [EMAIL_1]");
                    axum::Json(serde_json::json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": format!("Noted: {prompt}")}}]}))
                }),
            )
            .layer(RedactLayer::new(Redactor::new(&Entity::ALL)));
        let url = axum_server(router).await;
        let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"call me at +44 20 7946 0958 or jane@example.com"}]}"#;
        let res = http_client()
            .request(
                Request::post(format!("{url}/v1/chat/completions"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let reply: serde_json::Value =
            serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(
            reply["choices"][0]["message"]["content"],
            "Noted: call me at +44 20 7946 0958 or jane@example.com"
        );
    }
}

mod moderate {
    use super::*;
    use moat::moderate::ModerateLayer;

    /// An axum handler that streams a reply it should not: the client of the real server gets
    /// the text before the offending words, then OpenAI's content-filter ending.
    #[tokio::test]
    async fn moderate_layer_on_an_axum_router_cuts_a_stream() {
        let router = axum::Router::new()
            .route(
                "/v1/chat/completions",
                axum::routing::post(|| async {
                    let mut body = String::new();
                    for word in ["Sure", ",", " you", " worthless", " fucking", " idiot", "."] {
                        let chunk = serde_json::json!({"choices": [{"index": 0, "delta": {"content": word}}]});
                        body.push_str(&format!("data: {chunk}\n\n"));
                    }
                    body.push_str("data: [DONE]\n\n");
                    ([("content-type", "text/event-stream")], body)
                }),
            )
            .layer(ModerateLayer::default());
        let url = axum_server(router).await;
        let response = http_client()
            .request(
                Request::post(format!("{url}/v1/chat/completions"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(
                        b"{\"model\":\"m\",\"stream\":true,\"messages\":[]}",
                    )))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.contains("\"finish_reason\":\"content_filter\""),
            "{text}"
        );
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert!(
            !text.contains("fucking") && !text.contains("idiot"),
            "{text}"
        );
    }

    /// On a tonic server it passes gRPC calls through untouched.
    #[tokio::test]
    async fn moderate_layer_on_a_tonic_server_passes_grpc() {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;

        let (_reporter, health) = tonic_health::server::health_reporter();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(ModerateLayer::default())
                .add_service(health)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let reply = HealthClient::new(channel)
            .check(tonic::Request::new(HealthCheckRequest {
                service: String::new(),
            }))
            .await
            .unwrap();
        assert_eq!(reply.into_inner().status, 1, "SERVING");
    }
}
