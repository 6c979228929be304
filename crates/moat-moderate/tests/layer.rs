//! The layer end to end: replies streamed and whole, in every wire format, blocked, masked and
//! passed; prompts refused; every split of a stream sends the same.

use std::convert::Infallible;

use bytes::Bytes;
use futures_util::stream;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use moat_core::decision::{Decisions, Outcome};
use moat_core::sse::{SseDecoder, SseEvent};
use moat_moderate::{
    check_text, Action, Category, Classifier, Lexicon, ModerateLayer, Policy, StreamMode,
};
use proptest::prelude::*;
use serde_json::{json, Value};
use tower::{service_fn, Layer, ServiceExt};

fn lexicon() -> Lexicon {
    let mut lexicon = Lexicon::new();
    lexicon
        .add_text(
            "harassment 2 idiot\nharassment 2 fuck~\nharassment/threatening 3 i will kill you\n\
             sexual 1 nude",
        )
        .unwrap();
    lexicon
}

fn policy(action: Action) -> Policy {
    Policy::new()
        .classifier(
            Classifier::new()
                .lexicon(lexicon())
                .model(None, Category::Harassment),
        )
        .action(action)
}

struct Reply {
    status: StatusCode,
    body: Bytes,
    decisions: Vec<moat_core::decision::Decision>,
}

/// Sends a request to `path` whose upstream answers `chunks` (SSE when `sse`).
async fn send(
    layer: &ModerateLayer,
    path: &str,
    prompt: &str,
    chunks: Vec<Bytes>,
    sse: bool,
) -> Reply {
    let upstream = service_fn(move |_req: Request<_>| {
        let chunks = chunks.clone();
        async move {
            let body = StreamBody::new(stream::iter(
                chunks
                    .into_iter()
                    .map(|c| Ok::<_, Infallible>(http_body::Frame::data(c))),
            ));
            let content_type = if sse {
                "text/event-stream"
            } else {
                "application/json"
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", content_type)
                    .body(body)
                    .unwrap(),
            )
        }
    });
    let decisions = Decisions::new();
    let body =
        json!({"model": "m", "stream": sse, "messages": [{"role": "user", "content": prompt}]});
    let mut request = Request::post(path)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    request.extensions_mut().insert(decisions.clone());
    let response = layer.layer(upstream).oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        body,
        decisions: decisions.take(),
    }
}

fn sse(events: &[(Option<&str>, Value)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in events {
        out.extend_from_slice(SseEvent::new(*name, &data.to_string()).raw());
    }
    out
}

fn chat_stream(deltas: &[&str]) -> Vec<u8> {
    let mut events: Vec<(Option<&str>, Value)> = deltas
        .iter()
        .map(|d| (None, json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": 0, "delta": {"content": d}, "finish_reason": null}]})))
        .collect();
    events.push((None, json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})));
    let mut out = sse(&events);
    out.extend_from_slice(b"data: [DONE]\n\n");
    out
}

fn decode(body: &[u8]) -> Vec<SseEvent> {
    let mut decoder = SseDecoder::new();
    let mut events = decoder.decode(body).unwrap();
    events.extend(decoder.finish());
    events
}

/// The text of a chat stream, and its last finish reason.
fn chat_text(body: &[u8]) -> (String, Option<String>, bool) {
    let events = decode(body);
    let mut text = String::new();
    let mut finish = None;
    for e in &events {
        let Some(doc) = e.json() else { continue };
        for choice in doc["choices"].as_array().into_iter().flatten() {
            if let Some(t) = choice["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if let Some(t) = choice["text"].as_str() {
                text.push_str(t);
            }
            if let Some(r) = choice["finish_reason"].as_str() {
                finish = Some(r.to_owned());
            }
        }
    }
    let done_last = events.last().is_some_and(SseEvent::is_done);
    (text, finish, done_last)
}

#[tokio::test]
async fn a_blocked_chat_stream_ends_with_content_filter_and_done() {
    let layer = ModerateLayer::new(policy(Action::Block));
    let stream = chat_stream(&["Hello", " you", " id", "iot", ", and", " more."]);
    let reply = send(
        &layer,
        "/v1/chat/completions",
        "hi",
        vec![Bytes::from(stream)],
        true,
    )
    .await;
    assert_eq!(reply.status, 200);
    let (text, finish, done_last) = chat_text(&reply.body);
    assert_eq!(text, "Hello you ");
    assert_eq!(finish.as_deref(), Some("content_filter"));
    assert!(done_last, "the stream ends with [DONE]");
    let last_chunk = decode(&reply.body)
        .into_iter()
        .rev()
        .nth(1)
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        last_chunk["id"], "c1",
        "the closing chunk is the stream's own"
    );
    assert!(!String::from_utf8_lossy(&reply.body).contains("more"));
    let decision = &reply.decisions[0];
    assert_eq!(decision.layer, "moderate");
    assert!(
        matches!(&decision.outcome, Outcome::Rejected { code, .. } if code == "content_filter")
    );
}

#[tokio::test]
async fn a_clean_stream_passes_byte_for_byte() {
    let layer = ModerateLayer::new(policy(Action::Block));
    let stream = chat_stream(&[
        "The",
        " marble",
        " statue",
        " of",
        " an",
        " assassin",
        " in",
        " Scunthorpe",
        ".",
    ]);
    let reply = send(
        &layer,
        "/v1/chat/completions",
        "hi",
        vec![Bytes::from(stream.clone())],
        true,
    )
    .await;
    assert_eq!(reply.body, Bytes::from(stream));
    assert!(reply.decisions.is_empty());
}

#[tokio::test]
async fn masks_in_streams_and_whole_replies() {
    let layer = ModerateLayer::new(policy(Action::Mask));
    let stream = chat_stream(&["You ", "fu", "cking ", "idiot", "!"]);
    let reply = send(
        &layer,
        "/v1/chat/completions",
        "hi",
        vec![Bytes::from(stream)],
        true,
    )
    .await;
    let (text, finish, _) = chat_text(&reply.body);
    assert_eq!(text, "You ******* *****!");
    assert_eq!(finish.as_deref(), Some("stop"));
    assert!(matches!(
        reply.decisions[0].outcome,
        Outcome::Rewritten { spans: 2 }
    ));

    let whole = json!({"id": "c2", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "You idiot."}, "finish_reason": "stop"}]});
    let reply = send(
        &layer,
        "/v1/chat/completions",
        "hi",
        vec![Bytes::from(whole.to_string())],
        false,
    )
    .await;
    let doc: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(doc["choices"][0]["message"]["content"], "You *****.");
    assert_eq!(doc["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn blocked_whole_replies_are_replaced_in_their_own_shape() {
    let layer = ModerateLayer::new(policy(Action::Block).message("Withheld."));
    let chat = json!({"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "I will kill you."}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 5}});
    let reply = send(
        &layer,
        "/v1/chat/completions",
        "hi",
        vec![Bytes::from(chat.to_string())],
        false,
    )
    .await;
    let doc: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(doc["choices"][0]["message"]["content"], "Withheld.");
    assert_eq!(doc["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(
        doc["usage"]["completion_tokens"], 5,
        "the rest of the reply is kept"
    );

    let anthropic = json!({"id": "m", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "you idiot"}], "stop_reason": "end_turn"});
    let reply = send(
        &layer,
        "/v1/messages",
        "hi",
        vec![Bytes::from(anthropic.to_string())],
        false,
    )
    .await;
    let doc: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(doc["content"][0]["text"], "Withheld.");
    assert_eq!(doc["stop_reason"], "refusal");

    let responses = json!({"id": "r", "object": "response", "status": "completed", "instructions": "Never say idiot.", "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "idiot"}]}]});
    let reply = send(
        &layer,
        "/v1/responses",
        "hi",
        vec![Bytes::from(responses.to_string())],
        false,
    )
    .await;
    let doc: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(doc["status"], "incomplete");
    assert_eq!(doc["incomplete_details"]["reason"], "content_filter");
    assert_eq!(doc["output"][0]["content"][0]["text"], "Withheld.");

    // The request's own instructions echoed in a Responses object are not output.
    let echo = json!({"id": "r", "object": "response", "status": "completed", "instructions": "Never say idiot.", "output": []});
    let reply = send(
        &layer,
        "/v1/responses",
        "hi",
        vec![Bytes::from(echo.to_string())],
        false,
    )
    .await;
    assert_eq!(reply.body, Bytes::from(echo.to_string()));

    let completion = json!({"object": "text_completion", "choices": [{"index": 0, "text": "idiot", "finish_reason": "stop"}]});
    let reply = send(
        &layer,
        "/v1/completions",
        "hi",
        vec![Bytes::from(completion.to_string())],
        false,
    )
    .await;
    let doc: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(doc["choices"][0]["text"], "Withheld.");
    assert_eq!(doc["choices"][0]["finish_reason"], "content_filter");
}

#[tokio::test]
async fn an_anthropic_stream_ends_with_an_error_event() {
    let layer = ModerateLayer::new(policy(Action::Block));
    let delta = |t: &str| {
        (
            Some("content_block_delta"),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}),
        )
    };
    let stream = sse(&[
        (
            Some("message_start"),
            json!({"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 3, "output_tokens": 1}}}),
        ),
        (
            Some("content_block_start"),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        delta("Fine, "),
        delta("you idiot"),
        delta(" and more"),
        (
            Some("content_block_stop"),
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (Some("message_stop"), json!({"type": "message_stop"})),
    ]);
    let reply = send(
        &layer,
        "/v1/messages",
        "hi",
        vec![Bytes::from(stream)],
        true,
    )
    .await;
    let events = decode(&reply.body);
    let last = events.last().unwrap();
    assert_eq!(last.event(), Some("error"));
    assert_eq!(last.json().unwrap()["error"]["type"], "content_filter");
    let text: String = events
        .iter()
        .filter_map(SseEvent::json)
        .filter_map(|d| d["delta"]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, "Fine, you ");
}

#[tokio::test]
async fn a_responses_stream_ends_incomplete() {
    let layer = ModerateLayer::new(policy(Action::Block));
    let delta = |t: &str| {
        (
            Some("response.output_text.delta"),
            json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": t}),
        )
    };
    let stream = sse(&[
        (
            Some("response.created"),
            json!({"type": "response.created", "response": {"id": "resp_1", "object": "response", "status": "in_progress", "model": "m", "output": []}}),
        ),
        delta("Well "),
        delta("idiot "),
        delta("rest"),
        (
            Some("response.output_text.done"),
            json!({"type": "response.output_text.done", "output_index": 0, "content_index": 0, "text": "Well idiot rest"}),
        ),
    ]);
    let reply = send(
        &layer,
        "/v1/responses",
        "hi",
        vec![Bytes::from(stream)],
        true,
    )
    .await;
    let events = decode(&reply.body);
    let last = events.last().unwrap();
    assert_eq!(last.event(), Some("response.incomplete"));
    let response = &last.json().unwrap()["response"];
    assert_eq!(response["id"], "resp_1");
    assert_eq!(response["status"], "incomplete");
    assert_eq!(response["incomplete_details"]["reason"], "content_filter");
    assert!(!String::from_utf8_lossy(&reply.body).contains("rest"));
}

#[tokio::test]
async fn tool_call_arguments_are_output_too() {
    let layer = ModerateLayer::new(policy(Action::Mask));
    let call = |args: &str| {
        (
            None,
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": args}}]}}]}),
        )
    };
    let mut stream = sse(&[call("{\"text\": \"you id"), call("iot\"}")]);
    stream.extend_from_slice(b"data: [DONE]\n\n");
    let reply = send(
        &layer,
        "/v1/chat/completions",
        "hi",
        vec![Bytes::from(stream)],
        true,
    )
    .await;
    let args: String = decode(&reply.body)
        .iter()
        .filter_map(SseEvent::json)
        .filter_map(|d| {
            d["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    let args: Value = serde_json::from_str(&args).unwrap();
    assert_eq!(args["text"], "you *****");
}

#[tokio::test]
async fn flagged_prompts_are_refused_when_input_is_moderated() {
    let layer = ModerateLayer::new(policy(Action::Block)).with_input(true);
    let ok = json!({"choices": [{"index": 0, "message": {"content": "fine"}}]}).to_string();
    let reply = send(
        &layer,
        "/v1/chat/completions",
        "you idiot",
        vec![Bytes::from(ok.clone())],
        false,
    )
    .await;
    assert_eq!(reply.status, 400);
    let doc: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(doc["error"]["code"], "content_filter");
    assert!(doc["error"]["message"]
        .as_str()
        .unwrap()
        .contains("harassment"));
    assert!(
        !doc.to_string().contains("idiot"),
        "the prompt is not echoed"
    );
    let reply = send(
        &layer,
        "/v1/chat/completions",
        "a kind question",
        vec![Bytes::from(ok)],
        false,
    )
    .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn shadow_and_flag_change_nothing_but_are_recorded() {
    for action in [Action::Shadow, Action::Flag] {
        let layer = ModerateLayer::new(policy(action));
        let stream = chat_stream(&["you ", "idiot"]);
        let reply = send(
            &layer,
            "/v1/chat/completions",
            "hi",
            vec![Bytes::from(stream.clone())],
            true,
        )
        .await;
        assert_eq!(chat_text(&reply.body).0, "you idiot");
        assert_eq!(reply.decisions.len(), 1, "{action:?}");
    }
}

const REPLY: &str =
    "Sure, here it is. You are a fucking idiot and I will kill you — nude café 日本語 end.";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// However the reply is cut into deltas, and the stream into network chunks, the client
    /// gets the text the whole reply gets, and nothing after a block.
    #[test]
    fn every_split_of_a_stream_sends_the_same(
        deltas in proptest::collection::vec(1..REPLY.len(), 0..10),
        chunks in proptest::collection::vec(1..400usize, 0..10),
        action in prop_oneof![Just(Action::Block), Just(Action::Mask)],
        mode in prop_oneof![Just(StreamMode::HoldBack), Just(StreamMode::Buffered)],
    ) {
        let policy = policy(action).stream_mode(mode);
        let (expected, scan) = check_text(REPLY, &policy);
        let mut cuts: Vec<usize> = deltas.into_iter().filter(|&c| REPLY.is_char_boundary(c)).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut pieces = Vec::new();
        let mut from = 0;
        for cut in cuts.into_iter().chain([REPLY.len()]) {
            pieces.push(&REPLY[from..cut]);
            from = cut;
        }
        let stream = chat_stream(&pieces);
        let mut network = Vec::new();
        let mut at = 0;
        let mut sizes: Vec<usize> = chunks;
        sizes.sort_unstable();
        for size in sizes.into_iter().filter(|&s| s < stream.len()) {
            if size > at {
                network.push(Bytes::copy_from_slice(&stream[at..size]));
                at = size;
            }
        }
        network.push(Bytes::copy_from_slice(&stream[at..]));
        let layer = ModerateLayer::new(policy);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let reply = runtime.block_on(send(&layer, "/v1/chat/completions", "hi", network, true));
        let (text, finish, done_last) = chat_text(&reply.body);
        prop_assert_eq!(text, expected);
        prop_assert!(done_last);
        let want = if scan.is_blocked() { "content_filter" } else { "stop" };
        prop_assert_eq!(finish.as_deref(), Some(want));
    }
}

/// A moderation endpoint in a tower service: flags `hate` in any input holding "[[hate]]",
/// fails on "[[fail]]", and counts the inputs it was asked about.
fn moderations_client(
    asked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |req: Request<Full<Bytes>>| {
        let asked = asked.clone();
        async move {
            assert_eq!(req.headers()["authorization"], "Bearer k");
            let body: Value =
                serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes())
                    .unwrap();
            assert_eq!(body["model"], "omni-moderation-latest");
            let inputs = body["input"].as_array().unwrap();
            asked.fetch_add(inputs.len(), std::sync::atomic::Ordering::SeqCst);
            if inputs
                .iter()
                .any(|i| i.as_str().unwrap().contains("[[fail]]"))
            {
                return Ok(Response::builder()
                    .status(500)
                    .body(Full::new(Bytes::new()))
                    .unwrap());
            }
            let results: Vec<Value> = inputs
                .iter()
                .map(|i| {
                    let hate = i.as_str().unwrap().contains("[[hate]]");
                    json!({"flagged": hate, "categories": {"hate": hate}, "category_scores": {"hate": if hate { 0.97 } else { 0.01 }}})
                })
                .collect();
            Ok(Response::new(Full::new(Bytes::from(
                json!({"results": results}).to_string(),
            ))))
        }
    })
}

fn external(
    asked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    on_error: moat_moderate::OnError,
) -> moat_moderate::External {
    let uri: http::Uri = "http://moderator.test/v1/moderations".parse().unwrap();
    let moderations = moat_moderate::OpenAiModerations::new(moderations_client(asked), uri)
        .key(http::HeaderValue::from_static("Bearer k"))
        .model("omni-moderation-latest");
    moat_moderate::External::new(moderations).on_error(on_error)
}

#[tokio::test]
async fn an_external_moderator_judges_whole_replies_and_buffered_streams_before_they_are_sent() {
    let asked = std::sync::Arc::default();
    let layer =
        ModerateLayer::new(policy(Action::Block).stream_mode(StreamMode::Buffered)).with_external(
            external(std::sync::Arc::clone(&asked), moat_moderate::OnError::Open),
        );
    let whole = |text: &str| {
        json!({"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
            .to_string()
    };
    let reply = send(
        &layer,
        "/v1/chat/completions",
        "hi",
        vec![Bytes::from(whole("calm [[hate]] text"))],
        false,
    )
    .await;
    let doc: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(doc["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(
        doc["choices"][0]["message"]["content"],
        moat_moderate::DEFAULT_MESSAGE
    );
    assert!(reply
        .decisions
        .iter()
        .any(|d| d.rule.as_deref() == Some("external_output")));

    let reply = send(
        &layer,
        "/v1/chat/completions",
        "hi",
        vec![Bytes::from(whole("calm text"))],
        false,
    )
    .await;
    let doc: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(doc["choices"][0]["message"]["content"], "calm text");
    // Asked again: answered from the verdict cache.
    let before = asked.load(std::sync::atomic::Ordering::SeqCst);
    send(
        &layer,
        "/v1/chat/completions",
        "hi",
        vec![Bytes::from(whole("calm text"))],
        false,
    )
    .await;
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), before);

    // A buffered stream: nothing of it is sent, only its ending.
    let stream = chat_stream(&["calm ", "[[hate]]", " text"]);
    let reply = send(
        &layer,
        "/v1/chat/completions",
        "hi",
        vec![Bytes::from(stream)],
        true,
    )
    .await;
    let (text, finish, done_last) = chat_text(&reply.body);
    assert_eq!(text, "");
    assert_eq!(finish.as_deref(), Some("content_filter"));
    assert!(done_last);
}

#[tokio::test]
async fn an_external_moderator_that_fails_fails_open_or_closed() {
    let whole = json!({"choices": [{"index": 0, "message": {"content": "[[fail]] text"}, "finish_reason": "stop"}]}).to_string();
    let open = ModerateLayer::new(policy(Action::Block)).with_external(external(
        std::sync::Arc::default(),
        moat_moderate::OnError::Open,
    ));
    let reply = send(
        &open,
        "/v1/chat/completions",
        "hi",
        vec![Bytes::from(whole.clone())],
        false,
    )
    .await;
    assert!(String::from_utf8_lossy(&reply.body).contains("[[fail]] text"));
    let closed = ModerateLayer::new(policy(Action::Block)).with_external(external(
        std::sync::Arc::default(),
        moat_moderate::OnError::Closed,
    ));
    let reply = send(
        &closed,
        "/v1/chat/completions",
        "hi",
        vec![Bytes::from(whole)],
        false,
    )
    .await;
    let doc: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(doc["choices"][0]["finish_reason"], "content_filter");

    // Prompts: flagged ones refused with 400, unjudged ones with 503 when closed.
    let input = ModerateLayer::new(policy(Action::Block))
        .with_input(true)
        .with_external(external(
            std::sync::Arc::default(),
            moat_moderate::OnError::Closed,
        ));
    let ok = json!({"choices": [{"index": 0, "message": {"content": "fine"}}]}).to_string();
    let reply = send(
        &input,
        "/v1/chat/completions",
        "some [[hate]]",
        vec![Bytes::from(ok.clone())],
        false,
    )
    .await;
    assert_eq!(reply.status, 400);
    let reply = send(
        &input,
        "/v1/chat/completions",
        "[[fail]]",
        vec![Bytes::from(ok)],
        false,
    )
    .await;
    assert_eq!(reply.status, 503);
    let doc: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(doc["error"]["code"], "moderation_unavailable");
}

#[tokio::test]
async fn an_external_moderator_judges_a_flowing_stream_in_windows() {
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let layer = ModerateLayer::new(policy(Action::Block)).with_external(external(
        std::sync::Arc::clone(&asked),
        moat_moderate::OnError::Open,
    ));
    let frames = |stream: Vec<u8>| -> Vec<Bytes> {
        stream.chunks(200).map(Bytes::copy_from_slice).collect()
    };
    // Clean: it flows, every window is asked about, and it ends as it came.
    let clean: Vec<String> = (0..300).map(|i| format!("word{i} ")).collect();
    let pieces: Vec<&str> = clean.iter().map(String::as_str).collect();
    let reply = send(
        &layer,
        "/v1/chat/completions",
        "hi",
        frames(chat_stream(&pieces)),
        true,
    )
    .await;
    let (text, finish, done_last) = chat_text(&reply.body);
    assert_eq!(text, clean.concat());
    assert_eq!(finish.as_deref(), Some("stop"));
    assert!(done_last);
    let windows = asked.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        windows >= 2,
        "asked in windows of {} characters: {windows}",
        moat_moderate::STREAM_WINDOW_CHARS
    );

    // Flagged in its first window: cut at a frame after the verdict, in OpenAI's ending.
    let mut flagged = vec!["Some [[hate]] here. ".to_owned()];
    flagged.extend((0..300).map(|i| format!("more{i} ")));
    let pieces: Vec<&str> = flagged.iter().map(String::as_str).collect();
    let reply = send(
        &layer,
        "/v1/chat/completions",
        "hi",
        frames(chat_stream(&pieces)),
        true,
    )
    .await;
    let (text, finish, done_last) = chat_text(&reply.body);
    assert_eq!(finish.as_deref(), Some("content_filter"));
    assert!(done_last);
    assert!(flagged.concat().starts_with(&text));
    assert!(text.len() < flagged.concat().len(), "cut before its end");
    assert!(reply
        .decisions
        .iter()
        .any(|d| d.rule.as_deref() == Some("external_output")));

    // Flagged in its last window: the end is held until the verdict, and withheld.
    let short = ["A short [[hate]] reply."];
    let reply = send(
        &layer,
        "/v1/chat/completions",
        "hi",
        frames(chat_stream(&short)),
        true,
    )
    .await;
    let (_, finish, done_last) = chat_text(&reply.body);
    assert_eq!(finish.as_deref(), Some("content_filter"));
    assert!(done_last);
    assert!(!String::from_utf8_lossy(&reply.body).contains("\"stop\""));
}

#[tokio::test]
async fn a_scope_limits_moderation_to_its_routes_and_models() {
    use moat_core::identity::Global;
    use moat_core::kit::Scope;
    let harmful = || vec![Bytes::from(chat_stream(&["you ", "idiot"]))];
    let moderated = |body: &Bytes| chat_text(body).1.as_deref() == Some("content_filter");
    let scoped = |scope: Scope| ModerateLayer::new(policy(Action::Block)).with_scope(scope);

    let layer = scoped(Scope::new("moderate", Global).model("m"));
    let reply = send(&layer, "/v1/chat/completions", "hi", harmful(), true).await;
    assert!(moderated(&reply.body), "the request's model is in scope");

    let layer = scoped(Scope::new("moderate", Global).model("gpt-4o*"));
    let reply = send(&layer, "/v1/chat/completions", "hi", harmful(), true).await;
    assert!(!moderated(&reply.body), "another model passes untouched");
    assert_eq!(chat_text(&reply.body).0, "you idiot");

    let layer = scoped(Scope::new("moderate", Global).route("/v1/messages"));
    let reply = send(&layer, "/v1/chat/completions", "hi", harmful(), true).await;
    assert!(!moderated(&reply.body), "another route passes untouched");
}

#[tokio::test]
async fn scoped_policies_moderate_their_routes_and_models_and_the_default_the_rest() {
    use moat_core::identity::Global;
    use moat_core::kit::Scope;
    let harmful = || vec![Bytes::from(chat_stream(&["you ", "idiot"]))];
    let chat = "/v1/chat/completions";

    // By model (the body is read to choose): the first scope that admits the request.
    let layer = ModerateLayer::new(policy(Action::Block))
        .with_policy_for(
            Scope::new("gpt", Global).model("gpt-4o*"),
            policy(Action::Flag),
        )
        .with_policy_for(Scope::new("m", Global).model("m"), policy(Action::Mask))
        .with_policy_for(
            Scope::new("all-m", Global).model("m*"),
            policy(Action::Flag),
        );
    let reply = send(&layer, chat, "hi", harmful(), true).await;
    let (text, finish, _) = chat_text(&reply.body);
    assert_eq!(text, "you *****", "model m's policy masks");
    assert_eq!(finish.as_deref(), Some("stop"));

    // By route: another route's policy leaves this one to the default.
    let layer = ModerateLayer::new(policy(Action::Block)).with_policy_for(
        Scope::new("legacy", Global).route("/v1/completions"),
        policy(Action::Flag),
    );
    let reply = send(&layer, chat, "hi", harmful(), true).await;
    assert_eq!(chat_text(&reply.body).1.as_deref(), Some("content_filter"));

    let layer = ModerateLayer::new(policy(Action::Flag)).with_policy_for(
        Scope::new("chat", Global).route(chat),
        policy(Action::Block),
    );
    let reply = send(&layer, chat, "hi", harmful(), true).await;
    assert_eq!(
        chat_text(&reply.body).1.as_deref(),
        Some("content_filter"),
        "the route's policy blocks where the default only flags"
    );
    assert!(matches!(
        reply.decisions[0].outcome,
        Outcome::Rejected { .. }
    ));
}
