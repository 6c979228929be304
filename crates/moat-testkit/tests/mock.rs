//! The mock upstream over a real socket, read with moat-core's own SSE decoder.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use moat_core::response::EventView;
use moat_core::sse::SseDecoder;
use moat_core::usage::Usage;
use moat_testkit::mock::{count_tokens, MockConfig, MockUpstream};
use serde_json::{json, Value};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(
    upstream: &MockUpstream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> (
    http::StatusCode,
    http::HeaderMap,
    Result<Bytes, String>,
    usize,
) {
    let mut builder = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", upstream.url()))
        .header("content-type", "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let body = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    let response = client()
        .request(builder.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let (parts, mut body) = response.into_parts();
    let mut bytes = Vec::new();
    let mut frames = 0;
    let result = loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    frames += 1;
                    bytes.extend_from_slice(data);
                }
            }
            Some(Err(e)) => break Err(e.to_string()),
            None => break Ok(Bytes::from(bytes)),
        }
    };
    (parts.status, parts.headers, result, frames)
}

fn events(bytes: &[u8]) -> Vec<Value> {
    let mut decoder = SseDecoder::new();
    let mut events = decoder.decode(bytes).unwrap();
    events.extend(decoder.finish());
    assert!(events.iter().all(|e| e.is_complete()));
    events
        .iter()
        .filter(|e| !e.is_done())
        .filter_map(|e| e.json())
        .collect()
}

/// The text deltas of a streamed event.
fn deltas(event: &Value) -> Vec<String> {
    let data = event.to_string();
    EventView::read(&data)
        .deltas()
        .iter()
        .map(|d| d.text.to_string())
        .collect()
}

fn streamed_text(events: &[Value]) -> String {
    events.iter().flat_map(deltas).collect()
}

fn chat(stream: bool, text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "stream": stream, "messages": [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": text}]}]})
}

#[tokio::test]
async fn chat_echoes_the_last_user_message_with_consistent_usage() {
    let upstream = MockUpstream::start().await.unwrap();
    let (status, headers, body, _) = send(
        &upstream,
        "POST",
        "/v1/chat/completions",
        &[],
        chat(false, "echo me"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let v: Value = serde_json::from_slice(&body.unwrap()).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo me");
    let usage = Usage::find(&v).unwrap();
    assert_eq!(usage.output_tokens, count_tokens("echo me"));
    let prompt = ["be nice", "first", "ok", "echo me"]
        .iter()
        .map(|t| count_tokens(t))
        .sum::<u64>();
    assert!(usage.input_tokens >= prompt, "every text counts: {usage:?}");
}

#[tokio::test]
async fn chat_stream_in_small_chunks_with_the_usage_chunk_when_asked() {
    let upstream = MockUpstream::start().await.unwrap();
    let mut body = chat(true, "hello streaming world");
    let (_, headers, bytes, frames) =
        send(&upstream, "POST", "/v1/chat/completions", &[], body.clone()).await;
    assert_eq!(headers["content-type"], "text/event-stream");
    let bytes = bytes.unwrap();
    assert!(bytes.ends_with(b"data: [DONE]\n\n"));
    let evs = events(&bytes);
    assert_eq!(streamed_text(&evs), "hello streaming world");
    assert!(
        frames >= 8,
        "default 3-character deltas, one frame each: {frames}"
    );
    assert!(
        evs.iter().all(|e| Usage::find(e).is_none()),
        "no usage unless asked"
    );

    body["stream_options"] = json!({"include_usage": true});
    let (_, _, bytes, _) = send(
        &upstream,
        "POST",
        "/v1/chat/completions",
        &[("x-mock-chunk-chars", "1")],
        body,
    )
    .await;
    let evs = events(&bytes.unwrap());
    let last = evs.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        Usage::find(last).unwrap().output_tokens,
        count_tokens("hello streaming world")
    );
    assert_eq!(
        evs.iter().filter(|e| !deltas(e).is_empty()).count(),
        "hello streaming world".len()
    );
}

#[tokio::test]
async fn every_openai_and_anthropic_endpoint_answers_in_shape() {
    let upstream = MockUpstream::start_with(
        MockConfig::default().with_chunk_chars(2),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    // Completions.
    let (_, _, b, _) = send(
        &upstream,
        "POST",
        "/v1/completions",
        &[],
        json!({"model": "m", "prompt": "abc"}),
    )
    .await;
    assert_eq!(
        serde_json::from_slice::<Value>(&b.unwrap()).unwrap()["choices"][0]["text"],
        "abc"
    );
    let (_, _, b, _) = send(
        &upstream,
        "POST",
        "/v1/completions",
        &[],
        json!({"prompt": "abcd", "stream": true}),
    )
    .await;
    assert_eq!(streamed_text(&events(&b.unwrap())), "abcd");
    // Responses.
    let (_, _, b, _) = send(
        &upstream,
        "POST",
        "/v1/responses",
        &[],
        json!({"model": "m", "input": "resp"}),
    )
    .await;
    let v: Value = serde_json::from_slice(&b.unwrap()).unwrap();
    assert_eq!(v["output"][0]["content"][0]["text"], "resp");
    assert_eq!(Usage::find(&v).unwrap().output_tokens, 1);
    let (_, _, b, _) = send(
        &upstream,
        "POST",
        "/v1/responses",
        &[],
        json!({"input": [{"role": "user", "content": "rs"}], "stream": true}),
    )
    .await;
    let evs = events(&b.unwrap());
    assert_eq!(streamed_text(&evs), "rs");
    assert_eq!(evs.last().unwrap()["type"], "response.completed");
    assert!(Usage::find(evs.last().unwrap()).is_some());
    // Embeddings and models.
    let (_, _, b, _) = send(
        &upstream,
        "POST",
        "/v1/embeddings",
        &[],
        json!({"model": "e", "input": ["a", "b"]}),
    )
    .await;
    let v: Value = serde_json::from_slice(&b.unwrap()).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["embedding"].as_array().unwrap().len(), 8);
    let (s, _, b, _) = send(&upstream, "GET", "/v1/models", &[], Value::Null).await;
    assert_eq!(s, 200);
    assert!(
        serde_json::from_slice::<Value>(&b.unwrap()).unwrap()["data"]
            .as_array()
            .unwrap()
            .len()
            > 1
    );
    // Anthropic, both ways.
    let msg = json!({"model": "claude", "max_tokens": 10, "system": "s", "messages": [{"role": "user", "content": "anthro"}]});
    let (_, _, b, _) = send(&upstream, "POST", "/v1/messages", &[], msg.clone()).await;
    let v: Value = serde_json::from_slice(&b.unwrap()).unwrap();
    assert_eq!(v["content"][0]["text"], "anthro");
    assert_eq!(v["type"], "message");
    let mut streaming = msg;
    streaming["stream"] = json!(true);
    let (_, _, b, _) = send(&upstream, "POST", "/v1/messages", &[], streaming).await;
    let evs = events(&b.unwrap());
    assert_eq!(evs[0]["type"], "message_start");
    assert_eq!(streamed_text(&evs), "anthro");
    let mut usage = Usage::default();
    evs.iter()
        .filter_map(Usage::find)
        .for_each(|u| usage.merge(&u));
    assert_eq!(usage.output_tokens, count_tokens("anthro"));
}

#[tokio::test]
async fn faults_status_retry_after_reply_tool_call_and_split() {
    let upstream = MockUpstream::start().await.unwrap();
    let (s, h, b, _) = send(
        &upstream,
        "POST",
        "/v1/chat/completions",
        &[("x-mock-status", "429"), ("x-mock-retry-after", "7")],
        chat(false, "x"),
    )
    .await;
    assert_eq!(s, 429);
    assert_eq!(h["retry-after"], "7");
    assert_eq!(
        serde_json::from_slice::<Value>(&b.unwrap()).unwrap()["error"]["type"],
        "rate_limit_error"
    );
    let (s, _, b, _) = send(
        &upstream,
        "POST",
        "/v1/messages",
        &[("x-mock-status", "529")],
        json!({}),
    )
    .await;
    assert_eq!(s.as_u16(), 529);
    assert_eq!(
        serde_json::from_slice::<Value>(&b.unwrap()).unwrap()["error"]["type"],
        "overloaded_error"
    );

    let (_, _, b, _) = send(
        &upstream,
        "POST",
        "/v1/chat/completions",
        &[("x-mock-reply", "canned")],
        chat(false, "x"),
    )
    .await;
    assert_eq!(
        serde_json::from_slice::<Value>(&b.unwrap()).unwrap()["choices"][0]["message"]["content"],
        "canned"
    );

    let (_, _, b, _) = send(
        &upstream,
        "POST",
        "/v1/chat/completions",
        &[("x-mock-tool-call", "lookup")],
        chat(true, "{\"city\":\"Paris\"}"),
    )
    .await;
    let evs = events(&b.unwrap());
    let args: String = evs.iter().flat_map(deltas).collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap(),
        json!({"city": "Paris"})
    );

    let (_, _, b, frames) = send(
        &upstream,
        "POST",
        "/v1/chat/completions",
        &[("x-mock-split-bytes", "5")],
        chat(true, "split me"),
    )
    .await;
    let b = b.unwrap();
    assert!(
        frames >= b.len() / 5,
        "frames of 5 bytes: {frames} for {}",
        b.len()
    );
    assert_eq!(streamed_text(&events(&b)), "split me");
}

#[tokio::test]
async fn cut_after_drops_the_connection_mid_stream() {
    let upstream = MockUpstream::start().await.unwrap();
    let (s, _, b, frames) = send(
        &upstream,
        "POST",
        "/v1/chat/completions",
        &[("x-mock-cut-after", "3")],
        chat(true, "a long enough reply"),
    )
    .await;
    assert_eq!(s, 200);
    assert!(b.is_err(), "the body must fail, not end cleanly");
    assert_eq!(frames, 3);
}

#[tokio::test]
async fn request_log_over_http_and_in_process() {
    let upstream = MockUpstream::start().await.unwrap();
    let (status, ..) = send(
        &upstream,
        "POST",
        "/v1/chat/completions",
        &[("authorization", "Bearer sk-upstream")],
        chat(false, "logged"),
    )
    .await;
    assert_eq!(status, 200);
    let (_, _, b, _) = send(&upstream, "GET", "/_mock/requests", &[], Value::Null).await;
    let log: Vec<Value> = serde_json::from_slice(&b.unwrap()).unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["path"], "/v1/chat/completions");
    assert_eq!(log[0]["headers"]["authorization"], "Bearer sk-upstream");
    assert_eq!(
        log[0]["body"]["messages"][3]["content"][0]["text"],
        "logged"
    );
    assert_eq!(
        upstream.requests()[0].header("Authorization"),
        Some("Bearer sk-upstream")
    );
    let (s, _, _, _) = send(&upstream, "DELETE", "/_mock/requests", &[], Value::Null).await;
    assert_eq!(s, 204);
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn malformed_requests_get_provider_shaped_400s() {
    let upstream = MockUpstream::start().await.unwrap();
    let request = http::Request::post(format!("{}/v1/chat/completions", upstream.url()))
        .body(Full::new(Bytes::from_static(b"{not json")))
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), 400);
    let v: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
}
