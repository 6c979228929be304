//! RedactLayer in front of the real mock upstream, over a real socket.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use moat_core::body::RequestBody;
use moat_core::identity::Caller;
use moat_core::response::{DeltaKind, EventView};
use moat_core::sse::SseDecoder;
use moat_redact::{Entity, RedactLayer, Redactor, Sessions};
use moat_testkit::mock::MockUpstream;
use serde_json::{json, Value};
use tower::{BoxError, ServiceBuilder, ServiceExt};

const SECRET_TEXT: &str =
    "Write to jane.doe@example.com, card 4111 1111 1111 1111, from 203.0.113.9.";

/// Forwards to the mock upstream with a real HTTP client.
async fn forward(
    base: String,
    req: Request<RequestBody<Full<Bytes>>>,
) -> Result<Response<hyper::body::Incoming>, BoxError> {
    let (mut parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|e| format!("{e:?}"))?
        .to_bytes();
    parts.uri = format!("{base}{}", parts.uri.path()).parse()?;
    parts.headers.remove(http::header::CONTENT_LENGTH);
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    Ok(client
        .request(Request::from_parts(parts, Full::new(bytes)))
        .await?)
}

async fn send(
    mock: &MockUpstream,
    path: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> (http::HeaderMap, Bytes) {
    let layer = RedactLayer::new(Redactor::new(&Entity::ALL));
    let (status, headers, body) = send_through(layer, mock, path, body, headers).await;
    assert_eq!(status, 200);
    (headers, body)
}

/// Sends through `layer`; an `x-tenant` header becomes the request's [`Caller`] tenant, as an
/// authenticating layer in front would set it.
async fn send_through(
    layer: RedactLayer,
    mock: &MockUpstream,
    path: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> (http::StatusCode, http::HeaderMap, Bytes) {
    let base = mock.url();
    let svc = ServiceBuilder::new()
        .map_request(|mut req: Request<Full<Bytes>>| {
            let tenant = req
                .headers()
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if let Some(tenant) = tenant {
                req.extensions_mut()
                    .insert(Caller::new().with_tenant(tenant));
            }
            req
        })
        .layer(layer)
        .service_fn(move |req| forward(base.clone(), req));
    let mut builder = Request::post(path).header("content-type", "application/json");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let res = svc
        .oneshot(
            builder
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap(),
        )
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

fn assert_upstream_saw_no_raw_values(mock: &MockUpstream) {
    let seen = serde_json::to_string(&mock.requests()).unwrap();
    for raw in ["jane.doe@example.com", "4111 1111 1111 1111", "203.0.113.9"] {
        assert!(!seen.contains(raw), "the upstream saw {raw}: {seen}");
    }
    assert!(seen.contains("[EMAIL_1]") && seen.contains("[CARD_1]") && seen.contains("[IP_1]"));
}

fn streamed_text(bytes: &[u8]) -> (String, String) {
    let mut decoder = SseDecoder::new();
    let mut events = decoder.decode(bytes).unwrap();
    events.extend(decoder.finish());
    let (mut content, mut args) = (String::new(), String::new());
    for data in events.iter().filter_map(|e| e.data()) {
        for d in EventView::read(data).deltas() {
            match d.kind {
                DeltaKind::Content => content.push_str(&d.text),
                _ => args.push_str(&d.text),
            }
        }
    }
    (content, args)
}

#[tokio::test]
async fn chat_json_replies_get_the_originals_back() {
    let mock = MockUpstream::start().await.unwrap();
    let (_, body) = send(
        &mock,
        "/v1/chat/completions",
        json!({"model": "m", "messages": [{"role": "user", "content": SECRET_TEXT}]}),
        &[],
    )
    .await;
    assert_upstream_saw_no_raw_values(&mock);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], SECRET_TEXT);
}

#[tokio::test]
async fn streamed_replies_split_anywhere_are_restored() {
    let mock = MockUpstream::start().await.unwrap();
    for headers in [
        vec![],
        vec![("x-mock-chunk-chars", "1")],
        vec![("x-mock-split-bytes", "7")],
    ] {
        mock.clear();
        let body = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": SECRET_TEXT}]});
        let (_, bytes) = send(&mock, "/v1/chat/completions", body, &headers).await;
        assert_upstream_saw_no_raw_values(&mock);
        assert_eq!(streamed_text(&bytes).0, SECRET_TEXT, "{headers:?}");
        assert!(bytes.ends_with(b"data: [DONE]\n\n"));
    }
}

#[tokio::test]
async fn tool_call_arguments_are_restored_as_valid_json() {
    let mock = MockUpstream::start().await.unwrap();
    let tricky = "Mail \"Jane\" at jane.doe@example.com";
    let body = json!({"model": "m", "messages": [{"role": "user", "content": tricky}]});
    let (_, bytes) = send(
        &mock,
        "/v1/chat/completions",
        body.clone(),
        &[("x-mock-tool-call", "send")],
    )
    .await;
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    let args: Value = serde_json::from_str(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(args["input"], tricky);
    let mut streaming = body;
    streaming["stream"] = json!(true);
    let (_, bytes) = send(
        &mock,
        "/v1/chat/completions",
        streaming,
        &[("x-mock-tool-call", "send"), ("x-mock-chunk-chars", "2")],
    )
    .await;
    let args: Value =
        serde_json::from_str(&streamed_text(&bytes).1).expect("streamed arguments are valid JSON");
    assert_eq!(args["input"], tricky);
}

/// Sends `body` to `path` as JSON and streamed (2-character deltas): the upstream sees only
/// placeholders, and the reply at `pointer` (and the streamed text) is the original.
async fn both_ways(mock: &MockUpstream, path: &str, body: Value, pointer: &str) {
    let (_, bytes) = send(mock, path, body.clone(), &[]).await;
    assert_upstream_saw_no_raw_values(mock);
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v.pointer(pointer).unwrap(), SECRET_TEXT, "{path}");
    let mut streaming = body;
    streaming["stream"] = json!(true);
    let (_, bytes) = send(mock, path, streaming, &[("x-mock-chunk-chars", "2")]).await;
    assert_eq!(streamed_text(&bytes).0, SECRET_TEXT, "{path} streamed");
}

#[tokio::test]
async fn anthropic_messages_both_ways() {
    let mock = MockUpstream::start().await.unwrap();
    let body = json!({"model": "claude", "max_tokens": 100, "system": "be brief", "messages": [{"role": "user", "content": [{"type": "text", "text": SECRET_TEXT}]}]});
    both_ways(&mock, "/v1/messages", body, "/content/0/text").await;
}

#[tokio::test]
async fn requests_without_personal_data_pass_unchanged() {
    let mock = MockUpstream::start().await.unwrap();
    let raw = r#"{ "model" : "m", "messages": [ {"role":"user","content":"nothing to hide"} ] }"#;
    let base = mock.url();
    let svc = ServiceBuilder::new()
        .layer(RedactLayer::new(Redactor::new(&Entity::ALL)))
        .service_fn(move |req| forward(base.clone(), req));
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(raw.as_bytes())))
        .unwrap();
    svc.oneshot(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(
        mock.requests()[0].body,
        serde_json::from_str::<Value>(raw).unwrap()
    );
}

#[tokio::test]
async fn malformed_json_is_a_400_that_never_reaches_the_upstream() {
    let mock = MockUpstream::start().await.unwrap();
    let base = mock.url();
    let svc = ServiceBuilder::new()
        .layer(RedactLayer::new(Redactor::new(&Entity::ALL)))
        .service_fn(move |req| forward(base.clone(), req));
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"messages\": [")))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 400);
    let v: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(mock.requests().is_empty());
}

#[tokio::test]
async fn responses_api_json_and_streams_are_restored() {
    let mock = MockUpstream::start().await.unwrap();
    let body = json!({"model": "m", "input": SECRET_TEXT});
    let (_, bytes) = send(&mock, "/v1/responses", body.clone(), &[]).await;
    assert_upstream_saw_no_raw_values(&mock);
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["output"][0]["content"][0]["text"], SECRET_TEXT);
    let mut streaming = body;
    streaming["stream"] = json!(true);
    for chunk in ["1", "3"] {
        let (_, bytes) = send(
            &mock,
            "/v1/responses",
            streaming.clone(),
            &[("x-mock-chunk-chars", chunk)],
        )
        .await;
        assert_eq!(streamed_text(&bytes).0, SECRET_TEXT);
        // The events that carry the whole text say the same.
        let mut decoder = SseDecoder::new();
        let events = decoder.decode(&bytes).unwrap();
        let done = events
            .iter()
            .filter_map(|e| e.json())
            .find(|v| v["type"] == "response.output_text.done")
            .unwrap();
        assert_eq!(done["text"], SECRET_TEXT);
        let completed = events
            .iter()
            .filter_map(|e| e.json())
            .find(|v| v["type"] == "response.completed")
            .unwrap();
        assert_eq!(
            completed["response"]["output"][0]["content"][0]["text"],
            SECRET_TEXT
        );
    }
}

#[tokio::test]
async fn reply_side_scrubs_what_the_prompt_did_not_hold() {
    let mock = MockUpstream::start().await.unwrap();
    let reply = "Hi [EMAIL_1]! Also reach bob@evil.example or +1 202 555 0143.";
    let expected = "Hi jane.doe@example.com! Also reach [EMAIL] or [PHONE].";
    let layer = || RedactLayer::new(Redactor::new(&Entity::ALL)).with_reply_side(true);
    let body = json!({"model": "m", "messages": [{"role": "user", "content": SECRET_TEXT}]});
    let (_, _, bytes) = send_through(
        layer(),
        &mock,
        "/v1/chat/completions",
        body.clone(),
        &[("x-mock-reply", reply)],
    )
    .await;
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], expected);
    let mut streaming = body;
    streaming["stream"] = json!(true);
    for chunk in ["1", "4"] {
        let (_, _, bytes) = send_through(
            layer(),
            &mock,
            "/v1/chat/completions",
            streaming.clone(),
            &[("x-mock-reply", reply), ("x-mock-chunk-chars", chunk)],
        )
        .await;
        assert_eq!(streamed_text(&bytes).0, expected, "chunks of {chunk}");
    }
    // Without reply-side redaction the model's own values pass.
    let (_, _, bytes) = send_through(
        RedactLayer::new(Redactor::new(&Entity::ALL)),
        &mock,
        "/v1/chat/completions",
        json!({"model": "m", "messages": [{"role": "user", "content": SECRET_TEXT}]}),
        &[("x-mock-reply", reply)],
    )
    .await;
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("bob@evil.example"));
}

#[tokio::test]
async fn sessions_keep_placeholders_across_turns_and_never_cross_tenants() {
    let mock = MockUpstream::start().await.unwrap();
    let layer = RedactLayer::new(Redactor::new(&Entity::ALL)).with_sessions(Sessions::new());
    let turn = |tenant: &'static str, text: &str| {
        let layer = layer.clone();
        let mock = &mock;
        let body = json!({"model": "m", "messages": [{"role": "user", "content": text}]});
        async move {
            let (status, _, bytes) = send_through(
                layer,
                mock,
                "/v1/chat/completions",
                body,
                &[("x-tenant", tenant), ("x-moat-conversation", "conv-1")],
            )
            .await;
            assert_eq!(status, 200);
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let last_seen = |mock: &MockUpstream| {
        mock.requests().last().unwrap().body["messages"][0]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        turn("acme", "I am jane@example.com").await,
        "I am jane@example.com"
    );
    assert_eq!(last_seen(&mock), "I am [EMAIL_1]");
    assert_eq!(
        turn("acme", "cc john@example.com and jane@example.com").await,
        "cc john@example.com and jane@example.com"
    );
    assert_eq!(last_seen(&mock), "cc [EMAIL_2] and [EMAIL_1]");
    // Another tenant with the same conversation id starts from nothing...
    assert_eq!(
        turn("globex", "I am zoe@example.com").await,
        "I am zoe@example.com"
    );
    assert_eq!(last_seen(&mock), "I am [EMAIL_1]");
    // ...and cannot read acme's values through a placeholder it guesses.
    let (_, _, bytes) = send_through(
        layer.clone(),
        &mock,
        "/v1/chat/completions",
        json!({"model": "m", "messages": [{"role": "user", "content": "who is it"}]}),
        &[
            ("x-tenant", "globex"),
            ("x-moat-conversation", "conv-1"),
            ("x-mock-reply", "It is [EMAIL_2]."),
        ],
    )
    .await;
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "It is [EMAIL_2].");
    // A conversation id that is not a short visible string is refused before the upstream.
    let before = mock.requests().len();
    let long = "x".repeat(200);
    let (status, _, _) = send_through(
        layer,
        &mock,
        "/v1/chat/completions",
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        &[("x-tenant", "acme"), ("x-moat-conversation", long.as_str())],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(mock.requests().len(), before);
}

#[tokio::test]
async fn shadow_mode_counts_and_records_but_sends_the_prompt_unchanged() {
    use moat_core::decision::{Decisions, Mode};

    let mock = MockUpstream::start().await.unwrap();
    let base = mock.url();
    let decisions = Decisions::new();
    let recorded = decisions.clone();
    let svc = ServiceBuilder::new()
        .map_request(move |mut req: Request<Full<Bytes>>| {
            req.extensions_mut().insert(recorded.clone());
            req
        })
        .layer(
            RedactLayer::new(Redactor::new(&Entity::ALL))
                .with_mode(Mode::Shadow)
                .with_reply_side(true),
        )
        .service_fn(move |req| forward(base.clone(), req));
    let body = json!({"model": "m", "messages": [{"role": "user", "content": SECRET_TEXT}]});
    let res = svc
        .oneshot(
            Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap(),
        )
        .await
        .unwrap();
    let v: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], SECRET_TEXT);
    let seen = serde_json::to_string(&mock.requests()).unwrap();
    assert!(
        seen.contains("jane.doe@example.com"),
        "shadow sends the prompt as it is"
    );
    let all = decisions.take();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].layer, "redact");
    assert_eq!(
        all[0].detail.as_deref(),
        Some("shadow: 3 values would be redacted")
    );
}

#[tokio::test]
async fn legacy_completions_json_and_streams_are_restored() {
    let mock = MockUpstream::start().await.unwrap();
    let body = json!({"model": "m", "prompt": SECRET_TEXT});
    both_ways(&mock, "/v1/completions", body, "/choices/0/text").await;
}

#[tokio::test]
async fn a_reply_too_large_to_scrub_is_cut_off_not_passed() {
    // 9 MiB of JSON with a new email at the end: over the 8 MiB the layer buffers.
    let big = format!(
        "{{\"choices\":[{{\"message\":{{\"content\":\"{} bob@evil.example\"}}}}]}}",
        "a".repeat(9 << 20)
    );
    let upstream = move |_req: Request<RequestBody<Full<Bytes>>>| {
        let big = big.clone();
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(big)))
                    .unwrap(),
            )
        }
    };
    for reply_side in [true, false] {
        let svc = ServiceBuilder::new()
            .layer(RedactLayer::new(Redactor::new(&Entity::ALL)).with_reply_side(reply_side))
            .service_fn(upstream.clone());
        let body = json!({"model": "m", "messages": [{"role": "user", "content": SECRET_TEXT}]});
        let res = svc
            .oneshot(
                Request::post("/v1/chat/completions")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .unwrap(),
            )
            .await
            .unwrap();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let leaked = bytes.windows(16).any(|w| w == b"bob@evil.example");
        if reply_side {
            assert!(
                !leaked && bytes.len() < 9 << 20,
                "cut off, not passed unscrubbed"
            );
        } else {
            assert!(leaked && bytes.len() > 9 << 20, "passed through whole");
        }
    }
}

#[tokio::test]
async fn a_scope_limits_redaction_to_its_routes_and_models() {
    use moat_core::kit::Scope;
    let mock = MockUpstream::start().await.unwrap();
    let body = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "Mail jane.doe@example.com"}]});
    let scoped = |models: &[&str]| {
        let models: Vec<String> = models.iter().map(|s| s.to_string()).collect();
        RedactLayer::new(Redactor::new(&Entity::ALL))
            .with_scope(Scope::filter("redact", &[], &models, &[]).unwrap())
    };
    let sent = |i: usize| mock.requests()[i].body.to_string();
    send_through(
        scoped(&["gpt-4o*"]),
        &mock,
        "/v1/chat/completions",
        body("gpt-4o-mini"),
        &[],
    )
    .await;
    assert!(
        !sent(0).contains("jane.doe@example.com"),
        "in scope: redacted"
    );
    send_through(
        scoped(&["gpt-4o*"]),
        &mock,
        "/v1/chat/completions",
        body("claude-haiku-4-5"),
        &[],
    )
    .await;
    assert!(
        sent(1).contains("jane.doe@example.com"),
        "another model passes untouched"
    );
    let other_route = RedactLayer::new(Redactor::new(&Entity::ALL))
        .with_scope(Scope::filter("redact", &["/v1/messages".into()], &[], &[]).unwrap());
    send_through(
        other_route,
        &mock,
        "/v1/chat/completions",
        body("gpt-4o-mini"),
        &[],
    )
    .await;
    assert!(
        sent(2).contains("jane.doe@example.com"),
        "another route passes untouched"
    );
}

#[tokio::test]
async fn scoped_redactors_serve_their_models_and_the_default_the_rest() {
    use moat_core::identity::Global;
    use moat_core::kit::Scope;
    let mock = MockUpstream::start().await.unwrap();
    let body = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "Mail jane.doe@example.com or call +1 415 555 0132"}]});
    // A provider under a data agreement may see emails, never phone numbers.
    let layer = || {
        RedactLayer::new(Redactor::new(&Entity::ALL)).with_policy_for(
            Scope::new("trusted", Global).model("claude-*"),
            Redactor::new(&[Entity::Phone]),
        )
    };
    let sent = |i: usize| mock.requests()[i].body.to_string();
    let (status, _, _) = send_through(
        layer(),
        &mock,
        "/v1/chat/completions",
        body("claude-haiku-4-5"),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert!(sent(0).contains("jane.doe@example.com"), "{}", sent(0));
    assert!(!sent(0).contains("555 0132"), "{}", sent(0));
    send_through(layer(), &mock, "/v1/chat/completions", body("gpt-4o"), &[]).await;
    assert!(!sent(1).contains("jane.doe@example.com"), "{}", sent(1));
    assert!(!sent(1).contains("555 0132"), "{}", sent(1));
}
