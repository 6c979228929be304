//! A mock LLM upstream.
//!
//! It answers like OpenAI and Anthropic, with an echo model: the reply is the text of the last
//! user message, so a test can make "the model" say anything. Usage is counted consistently:
//! [`count_tokens`] tokens per text (one per 4 bytes, rounded up), prompt tokens over every text
//! in the request, completion tokens over the reply.
//!
//! Streams send each delta of [`MockConfig::chunk_chars`] characters as its own frame. With
//! `stream_options.include_usage`, OpenAI chat and completions streams end with the usage chunk.
//!
//! # Fault injection, by request header
//!
//! | header | effect |
//! |---|---|
//! | `x-mock-status: 429` | answer with this status and a provider-shaped error |
//! | `x-mock-retry-after: 3` | with `x-mock-status`, send `retry-after` |
//! | `x-mock-delay-ms: 200` | wait before answering |
//! | `x-mock-ttft-ms: 200` | wait before the first streamed frame |
//! | `x-mock-chunk-delay-ms: 5` | wait between streamed frames |
//! | `x-mock-cut-after: 3` | drop the connection after this many streamed frames |
//! | `x-mock-stream-error: text` | stream only an error event (OpenAI's shape) with this message |
//! | `x-mock-reply: text` | reply with this text instead of the echo |
//! | `x-mock-chunk-chars: 1` | characters per streamed delta for this request |
//! | `x-mock-split-bytes: 7` | also cut the streamed bytes into frames of this many bytes |
//! | `x-mock-tool-call: name` | reply with a call to tool `name`, the reply text as its `input` argument |
//!
//! # Prompt Shields
//!
//! `POST /contentsafety/text:shieldPrompt` answers like Azure AI Content Safety's Prompt Shields
//! (`{"userPromptAnalysis": {"attackDetected": ...}, "documentsAnalysis": [...]}`), finding an
//! attack in each text that contains `[[attack]]`; the fault headers apply to it too.
//!
//! # Moderations
//!
//! `POST /v1/moderations` answers like OpenAI's moderation API (`{"results": [...]}`, one per
//! input, every category named), flagging a category in each input that contains `[[category]]`
//! (e.g. `[[hate]]`, `[[self-harm/intent]]`) with score 0.99; the fault headers apply to it too.
//!
//! # Request log
//!
//! `GET /_mock/requests` returns what the mock received (method, path, headers, body as JSON when
//! it parses); `DELETE /_mock/requests` clears it. [`MockUpstream::requests`] reads it in-process.
//! It keeps the last [`MAX_RECORDED`] requests.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

/// How many requests the log keeps.
pub const MAX_RECORDED: usize = 1000;

/// The largest request body the mock reads.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Settings of the mock.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MockConfig {
    /// Characters per streamed text delta (default 3).
    pub chunk_chars: usize,
    /// Delay between streamed frames (default none).
    pub chunk_delay: Duration,
    /// Whether the `x-mock-*` fault headers apply (default yes). A mock that ignores them
    /// stands for a healthy second provider behind one that a request tells to fail.
    pub faults: bool,
}

impl MockConfig {
    /// This mock ignores the `x-mock-*` fault headers: a healthy backup.
    pub fn without_faults(mut self) -> Self {
        self.faults = false;
        self
    }
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            chunk_chars: 3,
            chunk_delay: Duration::ZERO,
            faults: true,
        }
    }
}

impl MockConfig {
    /// Characters per streamed text delta.
    #[must_use]
    pub fn with_chunk_chars(mut self, chars: usize) -> Self {
        self.chunk_chars = chars.max(1);
        self
    }

    /// Delay between streamed frames.
    #[must_use]
    pub fn with_chunk_delay(mut self, delay: Duration) -> Self {
        self.chunk_delay = delay;
        self
    }
}

/// One request the mock received.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct RecordedRequest {
    /// The method.
    pub method: String,
    /// The path and query.
    pub path: String,
    /// The HTTP version it came in, e.g. `HTTP/1.1`.
    #[serde(default)]
    pub version: String,
    /// Headers, names lowercased; repeated headers joined with `, `.
    pub headers: serde_json::Map<String, Value>,
    /// The body as JSON, or as a string when it is not JSON.
    pub body: Value,
    /// The body exactly as received (in-process only): what a lenient JSON reading of `body`
    /// would hide, such as a key given twice, is here.
    #[serde(skip)]
    pub raw: Bytes,
}

impl RecordedRequest {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .and_then(Value::as_str)
    }
}

#[derive(Debug, Default)]
struct Shared {
    config: MockConfig,
    log: Mutex<VecDeque<RecordedRequest>>,
}

/// The mock's routes, to serve yourself or call in-process with `tower::ServiceExt::oneshot`.
#[derive(Debug, Clone)]
pub struct Mock {
    shared: Arc<Shared>,
}

impl Default for Mock {
    fn default() -> Self {
        Self::new(MockConfig::default())
    }
}

impl Mock {
    /// A mock with these settings.
    pub fn new(config: MockConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                log: Mutex::default(),
            }),
        }
    }

    /// The axum router serving every mock endpoint.
    pub fn router(&self) -> Router {
        let api = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/responses", post(responses))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/messages", post(messages))
            .route("/v1/models", get(models))
            .route("/contentsafety/text:shieldPrompt", post(shield_prompt))
            .route("/v1/moderations", post(moderations))
            .route_layer(axum::middleware::from_fn_with_state(
                self.shared.clone(),
                record,
            ));
        Router::new()
            .merge(api)
            .route("/_mock/requests", get(list_requests).delete(clear_requests))
            .with_state(self.shared.clone())
    }

    /// What the mock received, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock_log().iter().cloned().collect()
    }

    /// Forgets what the mock received.
    pub fn clear(&self) {
        self.shared.lock_log().clear();
    }
}

impl Shared {
    fn lock_log(&self) -> std::sync::MutexGuard<'_, VecDeque<RecordedRequest>> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, parts: &http::request::Parts, path: String, body: &Bytes) {
        let (method, headers) = (&parts.method, &parts.headers);
        let mut map = serde_json::Map::new();
        for name in headers.keys() {
            let joined = headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(", ");
            map.insert(name.as_str().to_owned(), Value::String(joined));
        }
        let raw = body.clone();
        let body = serde_json::from_slice(body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
        let mut log = self.lock_log();
        if log.len() == MAX_RECORDED {
            log.pop_front();
        }
        log.push_back(RecordedRequest {
            method: method.to_string(),
            path,
            version: format!("{:?}", parts.version),
            headers: map,
            body,
            raw,
        });
    }
}

/// A mock upstream listening on a loopback port, stopped on drop.
#[derive(Debug)]
pub struct MockUpstream {
    mock: Mock,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl MockUpstream {
    /// Starts the mock with default settings on `127.0.0.1` and a free port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(
            MockConfig::default(),
            "127.0.0.1:0".parse().expect("valid address"),
        )
        .await
    }

    /// Starts the mock with these settings on this address.
    pub async fn start_with(config: MockConfig, addr: SocketAddr) -> std::io::Result<Self> {
        let mock = Mock::new(config);
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let router = mock.router();
        // Streamed frames leave at once, as from a real provider (Nagle's algorithm would hold
        // small frames until the client's delayed ACK, 40 ms later).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Self {
            mock,
            addr,
            shutdown: Some(tx),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, without `/v1`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the mock received, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.mock.requests()
    }

    /// Forgets what the mock received.
    pub fn clear(&self) {
        self.mock.clear();
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The mock's token count of a text: one token per 4 bytes, rounded up.
pub fn count_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

/// Per-request fault and reply settings read from `x-mock-*` headers.
#[derive(Debug, Clone, Default)]
struct Faults {
    status: Option<StatusCode>,
    retry_after: Option<String>,
    delay: Duration,
    ttft: Duration,
    chunk_delay: Duration,
    cut_after: Option<usize>,
    stream_error: Option<String>,
    reply: Option<String>,
    chunk_chars: usize,
    split_bytes: Option<usize>,
    tool_call: Option<String>,
}

impl Faults {
    fn read(headers: &HeaderMap, config: &MockConfig) -> Self {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let num = |name: &str| text(name).and_then(|v| v.trim().parse::<u64>().ok());
        let ms = |name: &str| num(name).map(Duration::from_millis).unwrap_or_default();
        Self {
            status: num("x-mock-status")
                .and_then(|s| u16::try_from(s).ok())
                .and_then(|s| StatusCode::from_u16(s).ok()),
            retry_after: text("x-mock-retry-after"),
            delay: ms("x-mock-delay-ms"),
            ttft: ms("x-mock-ttft-ms"),
            chunk_delay: num("x-mock-chunk-delay-ms")
                .map(Duration::from_millis)
                .unwrap_or(config.chunk_delay),
            cut_after: num("x-mock-cut-after").and_then(|n| usize::try_from(n).ok()),
            stream_error: text("x-mock-stream-error"),
            reply: text("x-mock-reply"),
            chunk_chars: num("x-mock-chunk-chars")
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(config.chunk_chars)
                .max(1),
            split_bytes: num("x-mock-split-bytes")
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0),
            tool_call: text("x-mock-tool-call"),
        }
    }
}

/// Everything a handler needs: the parsed body, the faults and the reply text.
struct Call {
    body: Value,
    faults: Faults,
    model: String,
}

enum Api {
    OpenAi,
    Anthropic,
}

/// Records every API request, then hands it on with its body intact.
async fn record(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(bytes) => bytes,
        Err(e) => return error(&Api::OpenAi, StatusCode::PAYLOAD_TOO_LARGE, &e.to_string()),
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), ToString::to_string);
    shared.record(&parts, path, &bytes);
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

async fn read_call(shared: &Shared, request: Request, api: Api) -> Result<Call, Response> {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|e| error(&api, StatusCode::PAYLOAD_TOO_LARGE, &e.to_string()))?;
    let faults = if shared.config.faults {
        Faults::read(&parts.headers, &shared.config)
    } else {
        Faults::read(&HeaderMap::new(), &shared.config)
    };
    if !faults.delay.is_zero() {
        tokio::time::sleep(faults.delay).await;
    }
    if let Some(status) = faults.status {
        let mut response = error(&api, status, "injected by x-mock-status");
        if let Some(retry) = faults
            .retry_after
            .as_deref()
            .and_then(|r| HeaderValue::from_str(r).ok())
        {
            response.headers_mut().insert("retry-after", retry);
        }
        return Err(response);
    }
    let body: Value = serde_json::from_slice(&bytes)
        .map_err(|e| error(&api, StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")))?;
    if !body.is_object() {
        return Err(error(
            &api,
            StatusCode::BAD_REQUEST,
            "body must be a JSON object",
        ));
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_owned();
    Ok(Call {
        body,
        faults,
        model,
    })
}

fn error(api: &Api, status: StatusCode, message: &str) -> Response {
    let body = match api {
        Api::OpenAi => {
            json!({"error": {"message": message, "type": error_type(status), "param": null, "code": null}})
        }
        Api::Anthropic => {
            json!({"type": "error", "error": {"type": error_type(status), "message": message}})
        }
    };
    (status, Json(body)).into_response()
}

fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

/// The text of a message `content`: a string, or the text parts joined.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// Every string in the request that the model would read, for counting prompt tokens.
fn prompt_tokens(body: &Value) -> u64 {
    fn walk(v: &Value, total: &mut u64) {
        match v {
            Value::String(s) => *total += count_tokens(s),
            Value::Array(items) => items.iter().for_each(|i| walk(i, total)),
            Value::Object(map) => map.values().for_each(|i| walk(i, total)),
            _ => {}
        }
    }
    let mut total = 0;
    for key in [
        "messages",
        "system",
        "instructions",
        "input",
        "prompt",
        "tools",
    ] {
        if let Some(v) = body.get(key) {
            walk(v, &mut total);
        }
    }
    total.max(1)
}

fn last_user_text(messages: Option<&Value>) -> String {
    messages
        .and_then(Value::as_array)
        .and_then(|m| {
            m.iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str).unwrap_or("user") == "user")
        })
        .and_then(|m| m.get("content"))
        .map(content_text)
        .unwrap_or_default()
}

fn first_text(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .first()
            .map(|i| first_text(Some(i)))
            .unwrap_or_default(),
        _ => String::new(),
    }
}

fn reply_text(call: &Call, echo: String) -> String {
    call.faults.reply.clone().unwrap_or(echo)
}

/// The reply as tool-call arguments: the reply itself when it is a JSON object, else
/// `{"input": reply}`.
fn tool_arguments(reply: &str) -> String {
    match serde_json::from_str::<Value>(reply) {
        Ok(v @ Value::Object(_)) => v.to_string(),
        _ => json!({ "input": reply }).to_string(),
    }
}

fn chunks(text: &str, chars: usize) -> Vec<String> {
    let chars_vec: Vec<char> = text.chars().collect();
    chars_vec
        .chunks(chars)
        .map(|c| c.iter().collect())
        .collect()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn sse(event: Option<&str>, data: &Value) -> Bytes {
    let mut out = String::new();
    if let Some(event) = event {
        out.push_str("event: ");
        out.push_str(event);
        out.push('\n');
    }
    out.push_str("data: ");
    out.push_str(&data.to_string());
    out.push_str("\n\n");
    Bytes::from(out)
}

/// Streams `frames` with the request's timing and cut faults.
fn stream(frames: Vec<Bytes>, faults: Faults) -> Response {
    let frames = match &faults.stream_error {
        Some(message) => {
            let error = json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
            vec![Bytes::from(format!("data: {error}\n\n"))]
        }
        None => frames,
    };
    let frames = match faults.split_bytes {
        Some(n) => {
            let all: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
            all.chunks(n).map(Bytes::copy_from_slice).collect()
        }
        None => frames,
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        if !faults.ttft.is_zero() {
            tokio::time::sleep(faults.ttft).await;
        }
        for (i, frame) in frames.into_iter().enumerate() {
            if faults.cut_after == Some(i) {
                // Let the server write what was sent before the cut, or the client would see
                // the connection drop with none of it.
                while tx.capacity() < tx.max_capacity() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = tx
                    .send(Err(std::io::Error::other("x-mock-cut-after")))
                    .await;
                return;
            }
            if i > 0 && !faults.chunk_delay.is_zero() {
                tokio::time::sleep(faults.chunk_delay).await;
            }
            if tx.send(Ok(frame)).await.is_err() {
                return;
            }
        }
    });
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .expect("static headers are valid")
}

fn openai_usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}})
}

async fn chat(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let call = match read_call(&shared, request, Api::OpenAi).await {
        Ok(call) => call,
        Err(response) => return response,
    };
    let reply = reply_text(&call, last_user_text(call.body.get("messages")));
    let prompt = prompt_tokens(&call.body);
    let completion = count_tokens(&reply);
    let id = format!("chatcmpl-mock{}", now_secs());
    let created = now_secs();
    let tool = call.faults.tool_call.clone();
    let streaming = call
        .body
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !streaming {
        let message = match &tool {
            Some(name) => json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_mock", "type": "function", "function": {"name": name, "arguments": tool_arguments(&reply)}}]}),
            None => json!({"role": "assistant", "content": reply, "refusal": null}),
        };
        let finish = if tool.is_some() { "tool_calls" } else { "stop" };
        return Json(json!({"id": id, "object": "chat.completion", "created": created, "model": call.model,
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
            "usage": openai_usage(prompt, completion), "system_fingerprint": "fp_mock"}))
        .into_response();
    }
    let include_usage = call
        .body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let chunk = |choices: Value| {
        let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": call.model,
            "system_fingerprint": "fp_mock", "choices": choices});
        if include_usage {
            c["usage"] = Value::Null;
        }
        sse(None, &c)
    };
    let mut frames = vec![chunk(
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
    )];
    match &tool {
        Some(name) => {
            frames.push(chunk(json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_mock", "type": "function",
                "function": {"name": name, "arguments": ""}}]}, "logprobs": null, "finish_reason": null}])));
            for piece in chunks(&tool_arguments(&reply), call.faults.chunk_chars) {
                frames.push(chunk(json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]},
                    "logprobs": null, "finish_reason": null}])));
            }
        }
        None => {
            for piece in chunks(&reply, call.faults.chunk_chars) {
                frames.push(chunk(json!([{"index": 0, "delta": {"content": piece}, "logprobs": null, "finish_reason": null}])));
            }
        }
    }
    let finish = if tool.is_some() { "tool_calls" } else { "stop" };
    frames.push(chunk(
        json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish}]),
    ));
    if include_usage {
        frames.push(sse(None, &json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": call.model,
            "system_fingerprint": "fp_mock", "choices": [], "usage": openai_usage(prompt, completion)})));
    }
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    stream(frames, call.faults)
}

async fn completions(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let call = match read_call(&shared, request, Api::OpenAi).await {
        Ok(call) => call,
        Err(response) => return response,
    };
    let reply = reply_text(&call, first_text(call.body.get("prompt")));
    let (prompt, completion) = (prompt_tokens(&call.body), count_tokens(&reply));
    let id = format!("cmpl-mock{}", now_secs());
    let created = now_secs();
    if !call
        .body
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        return Json(
            json!({"id": id, "object": "text_completion", "created": created, "model": call.model,
            "choices": [{"index": 0, "text": reply, "logprobs": null, "finish_reason": "stop"}],
            "usage": openai_usage(prompt, completion)}),
        )
        .into_response();
    }
    let include_usage = call
        .body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let chunk = |text: &str, finish: Value| {
        sse(
            None,
            &json!({"id": id, "object": "text_completion", "created": created, "model": call.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}]}),
        )
    };
    let mut frames: Vec<Bytes> = chunks(&reply, call.faults.chunk_chars)
        .iter()
        .map(|p| chunk(p, Value::Null))
        .collect();
    frames.push(chunk("", json!("stop")));
    if include_usage {
        frames.push(sse(
            None,
            &json!({"id": id, "object": "text_completion", "created": created, "model": call.model,
            "choices": [], "usage": openai_usage(prompt, completion)}),
        ));
    }
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    stream(frames, call.faults)
}

async fn responses(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let call = match read_call(&shared, request, Api::OpenAi).await {
        Ok(call) => call,
        Err(response) => return response,
    };
    let echo = match call.body.get("input") {
        Some(Value::String(s)) => s.clone(),
        other => last_user_text(other),
    };
    let reply = reply_text(&call, echo);
    let (prompt, completion) = (prompt_tokens(&call.body), count_tokens(&reply));
    let id = format!("resp_mock{}", now_secs());
    let created = now_secs();
    let usage = json!({"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
        "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}});
    let item = |text: &str, status: &str| {
        json!({"type": "message", "id": "msg_mock", "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]})
    };
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": id, "object": "response", "created_at": created,
        "status": status, "model": call.model, "output": output, "usage": usage, "error": null, "incomplete_details": null,
        "instructions": call.body.get("instructions").cloned().unwrap_or(Value::Null), "metadata": {},
        "parallel_tool_calls": true, "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0})
    };
    if !call
        .body
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        return Json(response(
            "completed",
            json!([item(&reply, "completed")]),
            usage,
        ))
        .into_response();
    }
    let mut seq = 0u64;
    let mut event = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        sse(Some(kind), &data)
    };
    let mut frames = vec![
        event(
            "response.created",
            json!({"response": response("in_progress", json!([]), Value::Null)}),
        ),
        event(
            "response.output_item.added",
            json!({"output_index": 0, "item": {"type": "message", "id": "msg_mock", "status": "in_progress", "role": "assistant", "content": []}}),
        ),
        event(
            "response.content_part.added",
            json!({"item_id": "msg_mock", "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
        ),
    ];
    for piece in chunks(&reply, call.faults.chunk_chars) {
        frames.push(event(
            "response.output_text.delta",
            json!({"item_id": "msg_mock", "output_index": 0, "content_index": 0, "delta": piece}),
        ));
    }
    frames.push(event(
        "response.output_text.done",
        json!({"item_id": "msg_mock", "output_index": 0, "content_index": 0, "text": reply}),
    ));
    frames.push(event("response.content_part.done", json!({"item_id": "msg_mock", "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": reply, "annotations": []}})));
    frames.push(event(
        "response.output_item.done",
        json!({"output_index": 0, "item": item(&reply, "completed")}),
    ));
    frames.push(event(
        "response.completed",
        json!({"response": response("completed", json!([item(&reply, "completed")]), usage)}),
    ));
    stream(frames, call.faults)
}

async fn embeddings(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let call = match read_call(&shared, request, Api::OpenAi).await {
        Ok(call) => call,
        Err(response) => return response,
    };
    let inputs: Vec<String> = match call.body.get("input") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => return error(&Api::OpenAi, StatusCode::BAD_REQUEST, "input is required"),
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| json!({"object": "embedding", "index": i, "embedding": embed(text)}))
        .collect();
    let tokens: u64 = inputs.iter().map(|t| count_tokens(t)).sum();
    Json(json!({"object": "list", "data": data, "model": call.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
        .into_response()
}

/// A deterministic 8-dimensional unit vector from the text's bytes.
fn embed(text: &str) -> Vec<f32> {
    let mut v = [0f32; 8];
    for (i, b) in text.bytes().enumerate() {
        v[i % 8] += f32::from(b) / 255.0;
    }
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.iter().map(|x| x / norm).collect()
}

async fn shield_prompt(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let call = match read_call(&shared, request, Api::OpenAi).await {
        Ok(call) => call,
        Err(response) => return response,
    };
    let attack = |v: &Value| v.as_str().is_some_and(|t| t.contains("[[attack]]"));
    let documents: Vec<Value> = call
        .body
        .get("documents")
        .and_then(Value::as_array)
        .map(|docs| {
            docs.iter()
                .map(|d| json!({"attackDetected": attack(d)}))
                .collect()
        })
        .unwrap_or_default();
    let user = call.body.get("userPrompt").is_some_and(attack);
    Json(json!({"userPromptAnalysis": {"attackDetected": user}, "documentsAnalysis": documents}))
        .into_response()
}

/// OpenAI's moderation categories, in its order.
const MODERATION_CATEGORIES: [&str; 13] = [
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
];

async fn moderations(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let call = match read_call(&shared, request, Api::OpenAi).await {
        Ok(call) => call,
        Err(response) => return response,
    };
    let inputs: Vec<String> = match call.body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().unwrap_or_default().to_owned())
            .collect(),
        _ => Vec::new(),
    };
    let results: Vec<Value> = inputs
        .iter()
        .map(|text| {
            let mut categories = serde_json::Map::new();
            let mut scores = serde_json::Map::new();
            for name in MODERATION_CATEGORIES {
                let hit = text.contains(&format!("[[{name}]]"));
                categories.insert(name.into(), json!(hit));
                scores.insert(name.into(), json!(if hit { 0.99 } else { 0.001 }));
            }
            let flagged = categories.values().any(|v| v == &json!(true));
            json!({"flagged": flagged, "categories": categories, "category_scores": scores})
        })
        .collect();
    let model = call
        .body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("omni-moderation-latest");
    Json(json!({"id": "modr-mock", "model": model, "results": results})).into_response()
}

async fn models() -> Response {
    let created = now_secs();
    let data: Vec<Value> = [
        "mock-model",
        "gpt-4o-mini",
        "gpt-4o",
        "text-embedding-3-small",
        "claude-haiku-4-5",
    ]
    .iter()
    .map(|id| json!({"id": id, "object": "model", "created": created, "owned_by": "moat-mock"}))
    .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn messages(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let call = match read_call(&shared, request, Api::Anthropic).await {
        Ok(call) => call,
        Err(response) => return response,
    };
    let reply = reply_text(&call, last_user_text(call.body.get("messages")));
    let (prompt, completion) = (prompt_tokens(&call.body), count_tokens(&reply));
    let id = format!("msg_mock{}", now_secs());
    let tool = call.faults.tool_call.clone();
    let block = match &tool {
        Some(name) => json!({"type": "tool_use", "id": "toolu_mock", "name": name,
            "input": serde_json::from_str::<Value>(&tool_arguments(&reply)).unwrap_or(Value::Null)}),
        None => json!({"type": "text", "text": reply}),
    };
    let stop = if tool.is_some() {
        "tool_use"
    } else {
        "end_turn"
    };
    if !call
        .body
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        return Json(json!({"id": id, "type": "message", "role": "assistant", "model": call.model, "content": [block],
            "stop_reason": stop, "stop_sequence": null,
            "usage": {"input_tokens": prompt, "output_tokens": completion, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}))
        .into_response();
    }
    let event = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        sse(Some(kind), &data)
    };
    let mut frames = vec![event(
        "message_start",
        json!({"message": {"id": id, "type": "message", "role": "assistant", "model": call.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": prompt, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}),
    )];
    match &tool {
        Some(name) => {
            frames.push(event("content_block_start", json!({"index": 0, "content_block": {"type": "tool_use", "id": "toolu_mock", "name": name, "input": {}}})));
            for piece in chunks(&tool_arguments(&reply), call.faults.chunk_chars) {
                frames.push(event("content_block_delta", json!({"index": 0, "delta": {"type": "input_json_delta", "partial_json": piece}})));
            }
        }
        None => {
            frames.push(event(
                "content_block_start",
                json!({"index": 0, "content_block": {"type": "text", "text": ""}}),
            ));
            frames.push(event("ping", json!({})));
            for piece in chunks(&reply, call.faults.chunk_chars) {
                frames.push(event(
                    "content_block_delta",
                    json!({"index": 0, "delta": {"type": "text_delta", "text": piece}}),
                ));
            }
        }
    }
    frames.push(event("content_block_stop", json!({"index": 0})));
    frames.push(event("message_delta", json!({"delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": completion}})));
    frames.push(event("message_stop", json!({})));
    stream(frames, call.faults)
}

async fn list_requests(State(shared): State<Arc<Shared>>) -> Json<Vec<RecordedRequest>> {
    Json(shared.lock_log().iter().cloned().collect())
}

async fn clear_requests(State(shared): State<Arc<Shared>>) -> Result<StatusCode, Infallible> {
    shared.lock_log().clear();
    Ok(StatusCode::NO_CONTENT)
}
