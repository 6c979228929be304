//! The gateway under bad input, as an attacker or a broken client would send it, over real
//! sockets in front of the mock upstream. Each case checks what the upstream received (the mock
//! records the exact bytes), the status and body the client got, and that the gateway still
//! serves a normal request afterwards.
//!
//! Deadlines are set short here (fractions of a second), so the cases that wait on them are
//! quick; no assertion is about how long anything took.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use moat_gateway::config::Config;
use moat_testkit::mock::MockUpstream;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

const KEY: &str = "sk-moat-alice";
const SERVER: &str = "header_read_timeout_secs = 0.5
body_idle_timeout_secs = 0.3
body_read_timeout_secs = 1
shutdown_grace_secs = 0.5
max_connections = 16";
const EMAIL: &str = "jane.doe@example.com";
const CARD: &str = "4111 1111 1111 1111";

struct Gateway {
    addr: SocketAddr,
    mock: MockUpstream,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Gateway {
    async fn start(extra: &str) -> Self {
        Self::start_with(extra, "", SERVER).await
    }

    /// A gateway with keys, a token rate, a budget and redaction of everything; `extra` is added
    /// at the top level, `upstream_extra` inside `[upstream]`, `server` is `[server]`.
    async fn start_with(extra: &str, upstream_extra: &str, server: &str) -> Self {
        let mock = MockUpstream::start().await.unwrap();
        let source = format!(
            r#"{extra}
[server]
{server}

[upstream]
base_url = "{}/v1"
api_key_env = "PROVIDER_KEY"
idle_timeout_secs = 0.5
{upstream_extra}

[[keys]]
id = "alice"
key = "{KEY}"
tier = "free"

[[ratelimit.rules]]
name = "per-key"
key = "api_key"
limits = ["1000/minute"]
tokens = ["100000000000000/minute"]

[[quota.budgets]]
name = "daily"
per = "api_key"
period = "day"
tokens = 200000
"#,
            mock.url()
        );
        let source = if source.contains("[redact]") {
            source
        } else {
            format!("{source}\n[redact]\nentities = [\"all\"]\n")
        };
        let resolved = Config::resolve(&source, |name| {
            (name == "PROVIDER_KEY").then(|| "sk-provider".to_owned())
        })
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let app = moat_gateway::app(&resolved);
        let limits = resolved.server;
        let done = tokio::spawn(async move {
            moat_gateway::serve(listener, app, limits, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            mock,
            stop: Some(tx),
            done,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends a request with exactly these headers (plus the key) and body.
    async fn send(&self, path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut builder =
            http::Request::post(self.url(path)).header("authorization", format!("Bearer {KEY}"));
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let response = client
            .request(builder.body(Full::new(body.into())).unwrap())
            .await
            .unwrap();
        Reply::read(response).await
    }

    async fn chat(&self, content_type: Option<&str>, body: &Value) -> Reply {
        let headers: Vec<(&str, &str)> = content_type
            .map(|ct| ("content-type", ct))
            .into_iter()
            .collect();
        self.send("/v1/chat/completions", &headers, body.to_string())
            .await
    }

    /// A normal request still gets a normal answer.
    async fn assert_serving(&self) {
        let reply = self
            .chat(Some("application/json"), &chat("still there?"))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(
            reply.json()["choices"][0]["message"]["content"],
            "still there?"
        );
    }

    async fn used_tokens(&self) -> u64 {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let request = http::Request::get(self.url("/v1/moat/usage"))
            .header("authorization", format!("Bearer {KEY}"))
            .body(Full::default())
            .unwrap();
        let reply = Reply::read(client.request(request).await.unwrap()).await;
        let budget = &reply.json()["budgets"][0];
        budget["used"]["tokens"].as_u64().unwrap() + budget["reserved"]["tokens"].as_u64().unwrap()
    }

    /// What the upstream received since the last call.
    fn received(&self) -> Vec<moat_testkit::mock::RecordedRequest> {
        let seen = self.mock.requests();
        self.mock.clear();
        seen
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        // Liveness, not timing: serve must return at all (within the test harness's patience).
        tokio::time::timeout(Duration::from_secs(20), self.done)
            .await
            .expect("the gateway stops after its grace period")
            .unwrap();
    }
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: Result<Bytes, String>,
}

impl Reply {
    async fn read(response: http::Response<hyper::body::Incoming>) -> Self {
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| e.to_string());
        Self {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    fn text(&self) -> String {
        match &self.body {
            Ok(b) => String::from_utf8_lossy(b).into_owned(),
            Err(e) => format!("<body failed: {e}>"),
        }
    }

    fn json(&self) -> Value {
        serde_json::from_slice(self.body.as_ref().unwrap())
            .unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }

    /// An OpenAI-shaped error with this status and code.
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(self.headers["content-type"], "application/json");
        let json = self.json();
        assert_eq!(json["error"]["code"], code, "{json}");
        assert!(!json["error"]["message"].as_str().unwrap().is_empty());
    }
}

fn chat(text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})
}

fn pii() -> String {
    format!("Mail me at {EMAIL}, card {CARD}.")
}

/// Whether raw bytes contain a needle.
fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Sends raw bytes on a new connection and reads until the server closes it (or `wait` passes).
async fn raw(addr: SocketAddr, request: &[u8], wait: Duration) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut out)).await;
    out
}

/// The status and JSON body of a raw HTTP/1 response (content-length framed).
fn parse_raw(response: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {text:?}"));
    let status = head[9..12].parse().unwrap();
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, json)
}

#[tokio::test]
async fn every_content_type_is_scanned_and_charged() {
    let gw = Gateway::start("").await;
    let mut charged = gw.used_tokens().await;
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let reply = gw.chat(ct, &chat(&pii())).await;
        assert_eq!(reply.status, 200, "{ct:?}: {}", reply.text());
        // Restored for the client...
        assert_eq!(reply.json()["choices"][0]["message"]["content"], pii());
        // ...never seen by the provider, which is told it is JSON.
        let seen = gw.received();
        assert_eq!(seen.len(), 1);
        assert!(
            !contains(&seen[0].raw, EMAIL) && !contains(&seen[0].raw, "4111"),
            "{ct:?}: {:?}",
            seen[0].body
        );
        assert_eq!(seen[0].header("content-type"), Some("application/json"));
        let now = gw.used_tokens().await;
        assert!(now > charged, "{ct:?} must be charged: {charged} -> {now}");
        charged = now;
    }
    gw.assert_serving().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_held_budget_holds_whatever_the_content_type() {
    let gw = Gateway::start("").await;
    // A slow stream reserves 190,000 of the 200,000 tokens while it runs...
    let mut holding = chat("holding the budget");
    holding["stream"] = json!(true);
    holding["max_tokens"] = json!(190_000);
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::post(gw.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .header("x-mock-chunk-chars", "1")
        .header("x-mock-chunk-delay-ms", "100")
        .body(Full::new(Bytes::from(holding.to_string())))
        .unwrap();
    let stream = client.request(request).await.unwrap();
    assert_eq!(stream.status(), 200);
    gw.received();
    // ...so another request of that size does not fit, however it is labelled.
    let mut again = chat("hi");
    again["max_tokens"] = json!(190_000);
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/json"),
    ] {
        let reply = gw.chat(ct, &again).await;
        reply.assert_error(429, "insufficient_quota");
    }
    assert!(
        gw.received().is_empty(),
        "a refused request never reaches the upstream"
    );
    drop(stream);
    gw.stop().await;
}

#[tokio::test]
async fn what_is_not_json_on_an_llm_route_is_refused() {
    let gw = Gateway::start("").await;
    let reply = gw
        .send(
            "/v1/chat/completions",
            &[("content-type", "multipart/form-data; boundary=x")],
            "--x\r\n\r\nhi\r\n--x--",
        )
        .await;
    reply.assert_error(415, "unsupported_media_type");
    let reply = gw
        .send(
            "/v1/chat/completions",
            &[("content-type", "text/plain")],
            format!("email {EMAIL}"),
        )
        .await;
    reply.assert_error(415, "unsupported_media_type");
    let reply = gw
        .send(
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            Bytes::from_static(b"\x1f\x8b\x08\x00garbage"),
        )
        .await;
    reply.assert_error(415, "unsupported_media_type");
    assert!(gw.received().is_empty());
    gw.assert_serving().await;
    gw.stop().await;
}

#[tokio::test]
async fn duplicate_keys_never_reach_the_upstream() {
    let gw = Gateway::start("").await;
    for body in [
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"messages":[{{"role":"user","content":"{EMAIL}"}}]}}"#
        ),
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi","content":"{EMAIL}"}}]}}"#
        ),
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi","c\u006fntent":"{EMAIL}"}}]}}"#
        ),
    ] {
        let reply = gw
            .send(
                "/v1/chat/completions",
                &[("content-type", "application/json")],
                body.clone(),
            )
            .await;
        reply.assert_error(400, "duplicate_key");
    }
    assert!(gw.received().is_empty());
    gw.assert_serving().await;
    gw.stop().await;
}

#[tokio::test]
async fn text_the_parser_does_not_know_is_scanned_by_default() {
    let gw = Gateway::start("").await;
    let bodies = [
        json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "future_part", "note": pii()}]}]}),
        json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": format!("https://img.example.com/?owner={EMAIL}")}}]}]}),
        json!({"model": "m", "messages": pii()}),
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "metadata": {"customer": EMAIL}, "user": EMAIL}),
    ];
    for body in &bodies {
        let reply = gw.chat(Some("application/json"), body).await;
        assert!(reply.status < 500, "{}", reply.text());
        let seen = gw.received();
        assert_eq!(seen.len(), 1, "{body}");
        assert!(
            !contains(&seen[0].raw, EMAIL),
            "{body} reached the upstream as {:?}",
            seen[0].body
        );
    }
    gw.assert_serving().await;
    gw.stop().await;

    // The unknown ones (a part of a new type, messages that are a string) refused instead, with
    // `unknown = "reject"`; image URLs and metadata are known text, scanned either way.
    let strict = Gateway::start("[redact]\nentities = [\"all\"]\nunknown = \"reject\"\n").await;
    for body in [&bodies[0], &bodies[2]] {
        let reply = strict.chat(Some("application/json"), body).await;
        reply.assert_error(400, "unsupported_content");
    }
    assert!(strict.received().is_empty());
    strict.assert_serving().await;
    strict.stop().await;
}

#[tokio::test]
async fn a_max_tokens_beyond_any_budget_says_so() {
    let gw = Gateway::start("").await;
    for max in [json!(1e12), json!(1_000_000_000_000u64)] {
        let mut body = chat("hi");
        body["max_tokens"] = max;
        let reply = gw.chat(Some("application/json"), &body).await;
        reply.assert_error(429, "request_exceeds_budget");
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            message.contains("more than budget 'daily' allows in a whole day"),
            "{message}"
        );
        assert_eq!(reply.headers["x-should-retry"], "false");
    }
    assert!(gw.received().is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn keys_in_the_query_string_never_leave() {
    let gw = Gateway::start("").await;
    let reply = gw
        .send(
            &format!("/v1/chat/completions?api_key={KEY}&trace=1&key=x"),
            &[("content-type", "application/json")],
            chat("hi").to_string(),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = gw.received();
    assert_eq!(seen[0].path, "/v1/chat/completions?trace=1");
    // A key only in the URL is not accepted, and the answer says why.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::post(gw.url(&format!("/v1/chat/completions?api_key={KEY}")))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat("hi").to_string())))
        .unwrap();
    let reply = Reply::read(client.request(request).await.unwrap()).await;
    reply.assert_error(401, "missing_api_key");
    assert!(reply.text().contains("in the URL"), "{}", reply.text());
    assert!(gw.received().is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn malformed_deep_invalid_and_huge_bodies_get_clear_errors() {
    let gw = Gateway::start("max_body_bytes = 65536").await;
    let json = [("content-type", "application/json")];
    let cases: Vec<(Bytes, u16, &str)> = vec![
        (
            Bytes::from_static(b"{\"model\": \"m\", \"messages\": [}"),
            400,
            "invalid_json",
        ),
        (
            Bytes::from("[".repeat(5000) + &"]".repeat(5000)),
            400,
            "nested_too_deeply",
        ),
        (
            Bytes::from(format!(
                "{{\"messages\":[{}]}}",
                "{\"a\":".repeat(300) + "1" + &"}".repeat(300)
            )),
            400,
            "nested_too_deeply",
        ),
        (
            Bytes::from_static(
                b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}",
            ),
            400,
            "invalid_json",
        ),
        (
            Bytes::from_static(b"{\"messages\":[{\"role\":\"user\",\"content\":\"\\ud800\"}]}"),
            400,
            "invalid_json",
        ),
        (
            Bytes::from(format!(
                "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
                "a".repeat(70_000)
            )),
            413,
            "request_too_large",
        ),
        (Bytes::from_static(b"[1,2,3]"), 400, "invalid_request"),
    ];
    for (body, status, code) in cases {
        let reply = gw.send("/v1/chat/completions", &json, body).await;
        reply.assert_error(status, code);
    }
    // A declared length over the cap is refused before the body is read.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: 10000000\r\nconnection: close\r\n\r\n{{"
    );
    let (status, body) = parse_raw(&raw(gw.addr, head.as_bytes(), Duration::from_secs(5)).await);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("request_too_large"))
    );
    assert!(gw.received().is_empty());
    gw.assert_serving().await;
    gw.stop().await;
}

#[tokio::test]
async fn bodies_that_stop_or_trickle_get_408() {
    let gw = Gateway::start("").await;
    let head = |length: usize| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\nconnection: close\r\n\r\n"
        )
    };
    // Ten bytes of a hundred, then silence.
    let stops = format!("{}{{\"model\":1", head(100));
    let (status, body) = parse_raw(&raw(gw.addr, stops.as_bytes(), Duration::from_secs(10)).await);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (408, Some("request_timeout")),
        "{body}"
    );

    // A byte every 100 ms never trips the idle deadline; the total one ends it.
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(head(10_000).as_bytes()).await.unwrap();
    let trickle = async {
        loop {
            if stream.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), trickle).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    let (status, body) = parse_raw(&out);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (408, Some("request_timeout")),
        "{body}"
    );
    assert!(gw.received().is_empty());
    gw.assert_serving().await;
    gw.stop().await;
}

#[tokio::test]
async fn http_1_0_and_http_2_clients_are_served() {
    let gw = Gateway::start("").await;
    let body = chat("plain words only").to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let response = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
    let (status, json) = parse_raw(&response);
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["choices"][0]["message"]["content"], "plain words only");
    let seen = gw.received();
    assert_eq!(&seen[0].raw[..], body.as_bytes(), "the body arrives whole");
    assert_eq!(seen[0].version, "HTTP/1.1");

    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let request = http::Request::post(gw.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat(&pii()).to_string())))
        .unwrap();
    let response = h2.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let reply = Reply::read(response).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["choices"][0]["message"]["content"], pii());
    let seen = gw.received();
    assert!(!contains(&seen[0].raw, EMAIL));
    gw.stop().await;
}

#[tokio::test]
async fn requests_hyper_cannot_parse_get_json_errors() {
    let gw = Gateway::start("").await;
    let huge = format!(
        "GET /v1/models HTTP/1.1\r\nhost: x\r\nx-filler: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let (status, body) = parse_raw(&raw(gw.addr, huge.as_bytes(), Duration::from_secs(5)).await);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (431, Some("request_headers_too_large"))
    );
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\n\r\n",
    ] {
        let (status, body) = parse_raw(&raw(gw.addr, garbage, Duration::from_secs(5)).await);
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("malformed_request")),
            "{garbage:?}"
        );
    }
    // A body shorter than its declared length is followed by a "request" that is not one.
    let body = chat("hi").to_string();
    let lying = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\n{body}"
    );
    let response = raw(gw.addr, lying.as_bytes(), Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&response);
    let first = &text[..text.find("\r\n\r\n").unwrap()];
    assert!(first.starts_with("HTTP/1.1 400"), "{text}");
    // The 404 and 405 the router gives are JSON too.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    for (method, path, status, code) in [
        ("GET", "/nope", 404, "unknown_url"),
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ] {
        let request = http::Request::builder()
            .method(method)
            .uri(gw.url(path))
            .header("authorization", format!("Bearer {KEY}"))
            .body(Full::default())
            .unwrap();
        Reply::read(client.request(request).await.unwrap())
            .await
            .assert_error(status, code);
    }
    assert!(gw.received().is_empty());
    gw.assert_serving().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_half_open_connection_is_closed_after_the_head_deadline() {
    let gw = Gateway::start("").await;
    let partial = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n";
    let out = raw(gw.addr, partial, Duration::from_secs(10)).await;
    assert!(
        out.is_empty(),
        "closed without an answer: {:?}",
        String::from_utf8_lossy(&out)
    );
    gw.assert_serving().await;
    gw.stop().await;
}

#[tokio::test]
async fn at_the_connection_cap_half_open_connections_make_way() {
    // Heads may take 60 s here, so the half-open connections below are all still within their
    // deadline while the normal requests arrive: only shedding can make room for them.
    let server = "header_read_timeout_secs = 60\nmax_connections = 16\nshutdown_grace_secs = 0.5";
    let gw = Gateway::start_with("", "", server).await;
    let partial = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n";
    let mut held = Vec::new();
    for _ in 0..48 {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(partial).await.unwrap();
        held.push(stream);
    }
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(20), gw.assert_serving())
            .await
            .expect("served while three times the cap of half-open connections wait");
    }
    // The oldest of them were closed to make room.
    let mut first = held.remove(0);
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), first.read_to_end(&mut out)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the oldest half-open connection was shed"
    );
    drop(held);
    gw.stop().await;
}

#[tokio::test]
async fn stalled_and_cut_upstreams_end_and_are_charged() {
    let gw = Gateway::start_with("", "first_byte_timeout_secs = 1", SERVER).await;
    // No response head in time: 504.
    let reply = gw
        .send(
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("x-mock-delay-ms", "30000"),
            ],
            chat("hi").to_string(),
        )
        .await;
    reply.assert_error(504, "upstream_timeout");
    // A stream that stalls after its head is cut off after the idle deadline.
    let mut streamed = chat("a stalled stream");
    streamed["stream"] = json!(true);
    let reply = gw
        .send(
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("x-mock-chunk-delay-ms", "30000"),
            ],
            streamed.to_string(),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.body.is_err(),
        "the client sees the stream break: {}",
        reply.text()
    );
    // A stream the upstream cuts is charged all the same.
    let before = gw.used_tokens().await;
    let reply = gw
        .send(
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("x-mock-cut-after", "2"),
            ],
            streamed.to_string(),
        )
        .await;
    assert!(reply.body.is_err());
    // Settlement happens when the body is dropped; give the gateway a moment to see it.
    let mut after = gw.used_tokens().await;
    for _ in 0..50 {
        if after > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = gw.used_tokens().await;
    }
    assert!(after > before, "{before} -> {after}");
    gw.assert_serving().await;
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_is_not_held_by_a_slow_client_or_a_stalled_stream() {
    let gw = Gateway::start("").await;
    let mut half_open = TcpStream::connect(gw.addr).await.unwrap();
    half_open
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\n")
        .await
        .unwrap();
    // A stream whose upstream is slower than the idle deadline's cut would allow... but the
    // stop comes first.
    let mut streamed = chat("stalls");
    streamed["stream"] = json!(true);
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::post(gw.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .header("x-mock-chunk-delay-ms", "200")
        .header("x-mock-chunk-chars", "1")
        .body(Full::new(Bytes::from(streamed.to_string())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let reading = tokio::spawn(async move { response.into_body().collect().await.is_ok() });
    // The stream needs over a second; the grace period is half of one.
    gw.stop().await;
    assert!(
        !reading.await.unwrap(),
        "the stream was cut at the end of the grace period"
    );
    let mut out = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(5), half_open.read_to_end(&mut out)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the half-open connection is closed"
    );
}
