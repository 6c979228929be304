//! What the gateway tells operators, over real sockets: `/metrics`, `/readyz`, request ids and
//! the per-request log line. Its own test binary: it installs the process's metrics recorder
//! and log subscriber.

use std::io::Write;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use moat_gateway::config::Config;
use moat_testkit::mock::MockUpstream;
use moat_testkit::redis::RedisServer;
use tokio::sync::oneshot;

/// Log lines written so far, shared with the subscriber.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

async fn start(config: &str) -> (String, oneshot::Sender<()>) {
    let resolved = Config::resolve(config, |name| {
        (name == "PROVIDER_KEY").then(|| "sk-provider-secret".to_owned())
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let app = moat_gateway::app(&resolved);
    let limits = resolved.server;
    tokio::spawn(async move {
        moat_gateway::serve(listener, app, limits, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (url, tx)
}

async fn call(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, http::HeaderMap, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut builder = http::Request::builder()
        .method(method)
        .uri(format!("{url}{path}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let response = client
        .request(
            builder
                .body(Full::new(Bytes::from(body.to_owned())))
                .unwrap(),
        )
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_readiness_request_ids_and_one_log_line_per_request() {
    // Before any layer is built, as the binary does.
    let handle = moat_gateway::observe::install_metrics();
    assert!(handle.is_some());
    let lines = Lines::default();
    let sink = lines.clone();
    tracing_subscriber::fmt()
        .with_env_filter("moat::gateway::request=info")
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .init();

    let mut redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let mock = MockUpstream::start().await.unwrap();
    let config = format!(
        "[upstream]\nbase_url = \"{}/v1\"\napi_key_env = \"PROVIDER_KEY\"\n[[keys]]\nid = \"alice\"\nkey = \"sk-moat-alice\"\ntenant = \"acme\"\n[breaker]\nminimum_calls = 10\n[ratelimit]\nstore = \"redis\"\nredis_url = \"{}\"\n[[ratelimit.rules]]\nname = \"per-key\"\nkey = \"api_key\"\nlimits = [\"100/minute\"]\ntokens = [\"1000000/minute\"]\n",
        mock.url(),
        redis.url()
    );
    let (url, _stop) = start(&config).await;
    let alice = ("authorization", "Bearer sk-moat-alice");

    // A request id is made up, returned and sent upstream; a sane one from the client is kept.
    let (status, headers, _) = call(&url, "POST", "/v1/chat/completions", &[alice], CHAT).await;
    assert_eq!(status, 200);
    let made = headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(made.len(), 32);
    let (_, headers, _) = call(
        &url,
        "POST",
        "/v1/chat/completions",
        &[alice, ("x-request-id", "client-chosen-42")],
        CHAT,
    )
    .await;
    assert_eq!(headers["x-request-id"], "client-chosen-42");
    let sent: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| {
            r.headers["x-request-id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(sent, [made.clone(), "client-chosen-42".to_owned()]);
    let (status, headers, _) = call(
        &url,
        "POST",
        "/v1/chat/completions",
        &[alice, ("x-request-id", "has space")],
        CHAT,
    )
    .await;
    assert_eq!(status, 200);
    assert_ne!(
        headers["x-request-id"], "has space",
        "an insane id is replaced"
    );

    // /metrics: the layers' metrics, in Prometheus' text format.
    let (status, headers, text) = call(&url, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert!(
        text.contains("moat_breaker_state{breaker=\"upstream\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("moat_breaker_calls_total{breaker=\"upstream\",outcome=\"success\"}"),
        "{text}"
    );
    assert!(text.contains("moat_ratelimit_"), "{text}");
    assert!(!text.contains("sk-moat-alice") && !text.contains("hello"));

    // /readyz: ready while Redis answers, not once it stops.
    let (status, _, body) = call(&url, "GET", "/readyz", &[], "").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ready"}"#));
    redis.stop();
    let (status, _, body) = call(&url, "GET", "/readyz", &[], "").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("not_ready") && body.contains("redis[0]"),
        "{body}"
    );
    let (status, _, _) = call(&url, "GET", "/healthz", &[], "").await;
    assert_eq!(status, 200, "the process itself is healthy");

    // One line per request, with who and what, never the key or the prompt.
    let log = lines.text();
    let line = log
        .lines()
        .find(|l| l.contains("client-chosen-42"))
        .unwrap_or_else(|| panic!("no log line for the request: {log}"));
    for field in [
        "method=POST",
        "path=\"/v1/chat/completions\"",
        "status=200",
        "latency_ms=",
        "key=\"alice\"",
        "tenant=\"acme\"",
        "model=\"gpt-4o-mini\"",
        "fingerprint=",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    assert!(
        log.contains("path=\"/metrics\""),
        "every request has its line"
    );
    assert!(
        !log.contains("sk-moat-alice") && !log.contains("hello"),
        "{log}"
    );
}
