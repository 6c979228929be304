//! [`RedactLayer`]: placeholders out, originals back.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use moat_core::body::{read_llm_request, LlmBody, RequestBody, ResponseBody, DEFAULT_BODY_LIMIT};
use moat_core::decision::{Decision, Decisions, Outcome};
use moat_core::reject::Protocol;
use moat_core::sse::{SseDecoder, SseEvent};
use moat_core::usage::BodyFormat;
use pin_project_lite::pin_project;
use serde_json::Value;
use tower_layer::Layer;
use tower_service::Service;

use crate::redactor::{Redactor, StreamRestorer, Vault};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The largest JSON reply restored whole (8 MiB); larger replies pass through unrestored.
const MAX_JSON: usize = 8 * 1024 * 1024;

/// Redacts prompts and restores replies. Clones share one [`Redactor`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RedactLayer {
    redactor: Arc<Redactor>,
    restore: bool,
    body_limit: usize,
}

impl RedactLayer {
    /// Redacts with `redactor` and restores replies.
    pub fn new(redactor: Redactor) -> Self {
        Self {
            redactor: Arc::new(redactor),
            restore: true,
            body_limit: DEFAULT_BODY_LIMIT,
        }
    }

    /// Whether placeholders in replies are replaced by the originals (default yes).
    pub fn with_restore(mut self, restore: bool) -> Self {
        self.restore = restore;
        self
    }

    /// The largest request body read (default 4 MiB; 413 past it).
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }
}

impl<S> Layer<S> for RedactLayer {
    type Service = Redact<S>;

    fn layer(&self, inner: S) -> Redact<S> {
        Redact {
            inner,
            layer: self.clone(),
        }
    }
}

/// A service whose prompts are redacted and replies restored.
#[derive(Debug, Clone)]
pub struct Redact<S> {
    inner: S,
    layer: RedactLayer,
}

impl<S> Redact<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The response future of [`Redact`].
pub type ResponseFuture<B, E> =
    moat_core::future::BoxResponseFuture<Result<Response<RestoreBody<B>>, E>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Redact<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<RestoreBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        let future = async move {
            let protocol = Protocol::of(&req);
            let (req, vault) = match read_llm_request(req, layer.body_limit).await {
                Ok(LlmBody::Parsed { request, llm }) => {
                    let mut vault = Vault::new();
                    let spans = llm.with(|r| {
                        let mut spans = 0;
                        for i in 0..r.segment_count() {
                            let Some(text) = r.text(i) else { continue };
                            let redacted = layer.redactor.redact_str(text, &mut vault);
                            if redacted.count > 0 {
                                spans += redacted.count;
                                let text = redacted.text.into_owned();
                                r.set_text(i, text);
                            }
                        }
                        spans
                    });
                    if spans > 0 {
                        tracing::debug!(target: "moat::redact", spans, "redacted");
                        Decisions::record(
                            request.extensions(),
                            Decision::new(
                                "redact",
                                Outcome::Rewritten {
                                    spans: u32::try_from(spans).unwrap_or(u32::MAX),
                                },
                            ),
                        );
                    }
                    (request, vault)
                }
                Ok(LlmBody::Unparsed(request)) => (request, Vault::new()),
                Err(rejection) => {
                    let response = rejection
                        .with_layer("redact")
                        .into_response::<ResBody>(protocol);
                    return Ok(response.map(RestoreBody::rejection));
                }
            };
            let response = inner.call(req).await?;
            if vault.is_empty() || !layer.restore {
                return Ok(response.map(RestoreBody::passthrough));
            }
            let (mut parts, body) = response.into_parts();
            let restore = Restore {
                redactor: layer.redactor.clone(),
                vault: Arc::new(vault),
            };
            let body = match BodyFormat::of(&parts.headers) {
                BodyFormat::Json => {
                    parts.headers.remove(http::header::CONTENT_LENGTH);
                    RestoreBody::json(body, restore)
                }
                BodyFormat::Sse => {
                    parts.headers.remove(http::header::CONTENT_LENGTH);
                    RestoreBody::sse(body, restore)
                }
                BodyFormat::Other => RestoreBody::passthrough(body),
            };
            Ok(Response::from_parts(parts, body))
        };
        ResponseFuture::new(future)
    }
}

#[derive(Clone)]
struct Restore {
    redactor: Arc<Redactor>,
    vault: Arc<Vault>,
}

/// Streamed text, per choice (or content block) and kind.
#[derive(Default)]
struct Streams {
    /// (choice or block, is tool arguments) → restorer.
    open: HashMap<(u64, bool), StreamRestorer>,
}

impl Restore {
    fn push(&self, streams: &mut Streams, key: (u64, bool), text: &str) -> String {
        let r = streams.open.entry(key).or_insert_with(|| {
            if key.1 {
                StreamRestorer::json()
            } else {
                StreamRestorer::new()
            }
        });
        r.push(text, &self.vault)
    }

    fn flush(&self, streams: &mut Streams, key: (u64, bool)) -> String {
        streams
            .open
            .remove(&key)
            .map(|mut r| r.finish(&self.vault))
            .unwrap_or_default()
    }

    /// Rewrites one streamed event: restores its text deltas, flushing what a choice or block
    /// held when it finishes. Returns the bytes to send.
    fn event(&self, streams: &mut Streams, event: &SseEvent) -> Bytes {
        let Some(mut json) = event.json() else {
            if event.is_done() {
                let mut out = self.held(streams);
                out.extend_from_slice(event.raw());
                return out.freeze();
            }
            return event.raw().clone();
        };
        let mut changed = false;
        // OpenAI chat and completions chunks.
        if let Some(Value::Array(choices)) = json.get_mut("choices") {
            for choice in choices.iter_mut() {
                let i = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
                let finishing = choice.get("finish_reason").is_some_and(|f| !f.is_null());
                if let Some(delta) = choice.get_mut("delta").and_then(Value::as_object_mut) {
                    if let Some(Value::String(text)) = delta.get_mut("content") {
                        *text = self.push(streams, (i, false), text);
                        changed = true;
                    }
                    if let Some(Value::Array(calls)) = delta.get_mut("tool_calls") {
                        for call in calls.iter_mut() {
                            let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                            if let Some(Value::String(args)) =
                                call.pointer_mut("/function/arguments")
                            {
                                *args = self.push(streams, ((i << 16) | index, true), args);
                                changed = true;
                            }
                        }
                    }
                    if finishing {
                        let held = self.flush(streams, (i, false));
                        if !held.is_empty() {
                            let content = delta
                                .entry("content")
                                .or_insert(Value::String(String::new()));
                            if let Value::String(text) = content {
                                text.insert_str(0, &held);
                            }
                            changed = true;
                        }
                    }
                }
            }
        }
        // Anthropic content blocks.
        match json.get("type").and_then(Value::as_str) {
            Some("content_block_delta") => {
                let i = json.get("index").and_then(Value::as_u64).unwrap_or(0);
                if let Some(Value::String(text)) = json.pointer_mut("/delta/text") {
                    *text = self.push(streams, (i, false), text);
                    changed = true;
                } else if let Some(Value::String(text)) = json.pointer_mut("/delta/partial_json") {
                    *text = self.push(streams, (i, true), text);
                    changed = true;
                }
            }
            Some("content_block_stop") => {
                let i = json.get("index").and_then(Value::as_u64).unwrap_or(0);
                let (text, args) = (
                    self.flush(streams, (i, false)),
                    self.flush(streams, (i, true)),
                );
                let mut out = BytesMut::new();
                for (held, delta) in [(text, "text_delta"), (args, "input_json_delta")] {
                    if !held.is_empty() {
                        let field = if delta == "text_delta" {
                            "text"
                        } else {
                            "partial_json"
                        };
                        let data = serde_json::json!({"type": "content_block_delta", "index": i, "delta": {"type": delta, field: held}});
                        out.extend_from_slice(
                            SseEvent::new(Some("content_block_delta"), &data.to_string()).raw(),
                        );
                    }
                }
                out.extend_from_slice(event.raw());
                return out.freeze();
            }
            _ => {}
        }
        if !changed {
            return event.raw().clone();
        }
        SseEvent::new(event.event(), &json.to_string())
            .raw()
            .clone()
    }

    /// Before `[DONE]` (or at the end), anything still held goes out as last chunks.
    fn held(&self, streams: &mut Streams) -> BytesMut {
        let mut out = BytesMut::new();
        let mut keys: Vec<(u64, bool)> = streams.open.keys().copied().collect();
        keys.sort_unstable();
        for key in keys {
            let held = self.flush(streams, key);
            if held.is_empty() {
                continue;
            }
            let data = if key.1 {
                serde_json::json!({"choices": [{"index": key.0 >> 16, "delta": {"tool_calls": [{"index": key.0 & 0xffff, "function": {"arguments": held}}]}}]})
            } else {
                serde_json::json!({"choices": [{"index": key.0, "delta": {"content": held}}]})
            };
            out.extend_from_slice(SseEvent::new(None, &data.to_string()).raw());
        }
        out
    }
}

pin_project! {
    /// The response body of [`Redact`]: passed through, or with placeholders restored.
    pub struct RestoreBody<B> {
        #[pin]
        inner: Option<ResponseBody<B>>,
        kind: Kind,
    }
}

enum Kind {
    Passthrough,
    Json {
        buf: Vec<u8>,
        restore: Restore,
        overflow: bool,
    },
    Sse {
        decoder: Box<SseDecoder>,
        streams: Streams,
        restore: Restore,
        done: bool,
    },
}

impl<B> std::fmt::Debug for RestoreBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RestoreBody { .. }")
    }
}

impl<B> RestoreBody<B> {
    fn new(body: ResponseBody<B>, kind: Kind) -> Self {
        Self {
            inner: Some(body),
            kind,
        }
    }

    fn passthrough(body: B) -> Self {
        Self::new(ResponseBody::inner(body), Kind::Passthrough)
    }

    /// A rejection of the layer's own, passed through as is.
    fn rejection(body: ResponseBody<B>) -> Self {
        Self::new(body, Kind::Passthrough)
    }

    fn json(body: B, restore: Restore) -> Self {
        let kind = Kind::Json {
            buf: Vec::new(),
            restore,
            overflow: false,
        };
        Self::new(ResponseBody::inner(body), kind)
    }

    fn sse(body: B, restore: Restore) -> Self {
        let kind = Kind::Sse {
            decoder: Box::default(),
            streams: Streams::default(),
            restore,
            done: false,
        };
        Self::new(ResponseBody::inner(body), kind)
    }
}

impl<B> Body for RestoreBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        loop {
            let Some(inner) = this.inner.as_mut().as_pin_mut() else {
                return Poll::Ready(None);
            };
            let polled = std::task::ready!(inner.poll_frame(cx));
            match (&mut *this.kind, polled) {
                (Kind::Passthrough, polled) => return Poll::Ready(polled),
                (_, Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                (Kind::Json { buf, overflow, .. }, Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if *overflow => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(data) if buf.len() + data.len() > MAX_JSON => {
                        // Too large to restore: send what was held and the rest as it comes.
                        *overflow = true;
                        let mut all = std::mem::take(buf);
                        all.extend_from_slice(&data);
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(all)))));
                    }
                    Ok(data) => buf.extend_from_slice(&data),
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                (
                    Kind::Json {
                        buf,
                        restore,
                        overflow,
                    },
                    None,
                ) => {
                    this.inner.set(None);
                    if *overflow || buf.is_empty() {
                        return Poll::Ready(None);
                    }
                    let bytes = std::mem::take(buf);
                    let restored =
                        serde_json::from_slice::<Value>(&bytes)
                            .ok()
                            .and_then(|mut doc| {
                                (restore.redactor.restore_json(&mut doc, &restore.vault) > 0)
                                    .then(|| Bytes::from(doc.to_string()))
                            });
                    let out = restored.unwrap_or_else(|| Bytes::from(bytes));
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                (
                    Kind::Sse {
                        decoder,
                        streams,
                        restore,
                        ..
                    },
                    Some(Ok(frame)),
                ) => match frame.into_data() {
                    Ok(data) => {
                        let Ok(events) = decoder.decode(&data) else {
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        };
                        let mut out = BytesMut::new();
                        for event in &events {
                            out.extend_from_slice(&restore.event(streams, event));
                        }
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                (
                    Kind::Sse {
                        decoder,
                        streams,
                        restore,
                        done,
                    },
                    None,
                ) => {
                    this.inner.set(None);
                    if *done {
                        return Poll::Ready(None);
                    }
                    *done = true;
                    let mut out = BytesMut::new();
                    for event in decoder.finish() {
                        out.extend_from_slice(&restore.event(streams, &event));
                    }
                    // Anything still held (a stream without [DONE]) goes out last.
                    out.extend_from_slice(&restore.held(streams));
                    return Poll::Ready((!out.is_empty()).then(|| Ok(Frame::data(out.freeze()))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough => self.inner.as_ref().is_none_or(Body::is_end_stream),
            _ => self.inner.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.kind, &self.inner) {
            (Kind::Passthrough, Some(inner)) => inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}
