//! The cache end to end, against an upstream that counts its calls: what is stored, for how
//! long, for whom, and in which form it comes back.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use moat_cache::{CacheLayer, CacheScope, MemoryStore};
use moat_core::clock::ManualClock;
use moat_core::decision::Decisions;
use serde_json::{json, Value};
use tower::{service_fn, Layer, ServiceExt};

/// What the test upstream answers: a body and its content type, from the request body.
type Reply = fn(&Value) -> (&'static str, String);

fn chat_json(request: &Value) -> (&'static str, String) {
    let text = request["messages"][0]["content"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let body = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]});
    ("application/json", body.to_string())
}

struct Upstream {
    calls: Arc<AtomicUsize>,
}

impl Upstream {
    fn new() -> Self {
        Self {
            calls: Arc::default(),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Sends `body` to `path` through `layer` in front of an upstream answering `reply`; the
    /// response's `x-moat-cache` and body.
    async fn send(
        &self,
        layer: &CacheLayer,
        reply: Reply,
        path: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (String, String) {
        let calls = self.calls.clone();
        let upstream = service_fn(move |req: Request<_>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let bytes = BodyExt::collect(req.into_body()).await.unwrap().to_bytes();
                let request: Value = serde_json::from_slice(&bytes).unwrap();
                let (content_type, body) = reply(&request);
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", content_type)
                        .body(Full::new(Bytes::from(body)))
                        .unwrap(),
                )
            }
        });
        let mut request = Request::post(path);
        if !headers.iter().any(|(name, _)| *name == "x-api-key") {
            request = request.header("x-api-key", "sk-test");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        request.extensions_mut().insert(Decisions::new());
        let response = layer.layer(upstream).oneshot(request).await.unwrap();
        let label = response
            .headers()
            .get("x-moat-cache")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (label, String::from_utf8(body.to_vec()).unwrap())
    }
}

fn ask(text: &str) -> Value {
    json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": text}]})
}

fn layer() -> CacheLayer {
    CacheLayer::new(MemoryStore::new(1 << 20))
}

#[tokio::test]
async fn entries_expire_after_their_ttl() {
    let clock = Arc::new(ManualClock::new());
    let layer = layer()
        .with_ttl(Duration::from_secs(60))
        .with_clock(clock.clone());
    let upstream = Upstream::new();
    let send = || upstream.send(&layer, chat_json, "/v1/chat/completions", ask("hi"), &[]);
    assert_eq!(send().await.0, "miss");
    clock.advance(Duration::from_secs(59));
    assert_eq!(send().await.0, "hit");
    clock.advance(Duration::from_secs(1));
    assert_eq!(send().await.0, "miss", "expired at its ttl");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn large_filtered_and_failed_replies_are_not_stored() {
    let upstream = Upstream::new();
    let small = layer().with_max_entry_bytes(100);
    let long = "x".repeat(500);
    for _ in 0..2 {
        let (label, body) = upstream
            .send(&small, chat_json, "/v1/chat/completions", ask(&long), &[])
            .await;
        assert_eq!(label, "miss");
        assert!(body.contains(&long), "passed on whole");
    }
    fn filtered(_: &Value) -> (&'static str, String) {
        let body = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "content_filter"}]});
        ("application/json", body.to_string())
    }
    fn error(_: &Value) -> (&'static str, String) {
        (
            "application/json",
            json!({"error": {"message": "overloaded"}}).to_string(),
        )
    }
    let cache = layer();
    for reply in [filtered as Reply, error] {
        for _ in 0..2 {
            let (label, _) = upstream
                .send(&cache, reply, "/v1/chat/completions", ask("q"), &[])
                .await;
            assert_eq!(label, "miss");
        }
    }
    assert_eq!(upstream.calls(), 6);
}

#[tokio::test]
async fn no_cache_refreshes_and_scopes_separate_callers() {
    let upstream = Upstream::new();
    let cache = layer();
    let send = |headers: &'static [(&'static str, &'static str)]| {
        upstream.send(
            &cache,
            chat_json,
            "/v1/chat/completions",
            ask("hello"),
            headers,
        )
    };
    assert_eq!(send(&[]).await.0, "miss");
    // no-cache: not served from the cache, but its reply is stored.
    assert_eq!(send(&[("cache-control", "no-cache")]).await.0, "miss");
    assert_eq!(send(&[]).await.0, "hit");
    assert_eq!(upstream.calls(), 2);
    // Another API key (no tenant): another scope.
    assert_eq!(send(&[("x-api-key", "sk-other")]).await.0, "miss");

    // Global: one answer for everyone.
    let shared = layer().with_scope(CacheScope::Global);
    let first = upstream
        .send(&shared, chat_json, "/v1/chat/completions", ask("g"), &[])
        .await;
    let other = upstream
        .send(
            &shared,
            chat_json,
            "/v1/chat/completions",
            ask("g"),
            &[("x-api-key", "sk-other")],
        )
        .await;
    assert_eq!((first.0.as_str(), other.0.as_str()), ("miss", "hit"));
}

#[tokio::test]
async fn anthropic_streams_replay_as_json_and_embeddings_are_always_cached() {
    fn anthropic_stream(_: &Value) -> (&'static str, String) {
        let events = [
            (
                "message_start",
                json!({"type": "message_start", "message": {"id": "m1", "type": "message", "role": "assistant", "content": [], "model": "claude", "usage": {"input_tokens": 3, "output_tokens": 0}}}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Bonjour"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ];
        let body: String = events
            .iter()
            .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
            .collect();
        ("text/event-stream", body)
    }
    fn embeddings(_: &Value) -> (&'static str, String) {
        let body = json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}], "model": "e", "usage": {"prompt_tokens": 1, "total_tokens": 1}});
        ("application/json", body.to_string())
    }
    let upstream = Upstream::new();
    let cache = layer();
    let anthropic = json!({"model": "claude", "max_tokens": 10, "temperature": 0, "stream": true,
        "messages": [{"role": "user", "content": "Say hello in French"}]});
    let first = upstream
        .send(
            &cache,
            anthropic_stream,
            "/v1/messages",
            anthropic.clone(),
            &[],
        )
        .await;
    let second = upstream
        .send(
            &cache,
            anthropic_stream,
            "/v1/messages",
            anthropic.clone(),
            &[],
        )
        .await;
    assert_eq!((first.0.as_str(), second.0.as_str()), ("miss", "hit"));
    assert_eq!(first.1, second.1, "the same bytes");
    // Asked as JSON: the stream replayed as the message it carried.
    let mut whole = anthropic;
    whole["stream"] = json!(false);
    let (label, body) = upstream
        .send(&cache, anthropic_stream, "/v1/messages", whole, &[])
        .await;
    assert_eq!(label, "hit");
    let message: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(message["content"][0]["text"], "Bonjour");
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["usage"]["output_tokens"], 2);
    // Embeddings are deterministic whatever their settings.
    let input = json!({"model": "e", "input": "vector me"});
    for expected in ["miss", "hit"] {
        let (label, _) = upstream
            .send(&cache, embeddings, "/v1/embeddings", input.clone(), &[])
            .await;
        assert_eq!(label, expected);
    }
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn followers_stop_waiting_after_the_coalesce_wait() {
    // A leader whose upstream takes 3 s; followers that wait at most 20 ms call it themselves.
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream = {
        let calls = calls.clone();
        service_fn(move |req: Request<_>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let bytes = BodyExt::collect(req.into_body()).await.unwrap().to_bytes();
                let (content_type, body) = chat_json(&serde_json::from_slice(&bytes).unwrap());
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", content_type)
                        .body(Full::new(Bytes::from(body)))
                        .unwrap(),
                )
            }
        })
    };
    let service = layer()
        .with_coalesce_wait(Duration::from_millis(20))
        .layer(upstream);
    let send = || {
        let service = service.clone();
        tokio::spawn(async move {
            let request = Request::post("/v1/chat/completions")
                .header("x-api-key", "sk-test")
                .body(Full::new(Bytes::from(ask("slow").to_string())))
                .unwrap();
            let response = service.oneshot(request).await.unwrap();
            response.into_body().collect().await.unwrap();
        })
    };
    let leader = send();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let followers: Vec<_> = (0..3).map(|_| send()).collect();
    for task in followers {
        task.await.unwrap();
    }
    leader.await.unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "each follower called the upstream itself"
    );
}
