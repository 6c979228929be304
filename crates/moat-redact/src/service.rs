//! [`RedactLayer`]: placeholders out, originals back.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use moat_core::body::{RequestBody, ResponseBody, DEFAULT_BODY_LIMIT};
use moat_core::decision::{Decision, Decisions, Mode, Outcome};
use moat_core::llm::UnknownPolicy;
use moat_core::reject::{Protocol, Rejection};
use moat_core::request::{read_llm_request, LlmBody};
use moat_core::sse::SseDecoder;
use moat_core::usage::BodyFormat;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::redactor::Redactor;
use crate::reply::{Rewriter, Streams};
use crate::session::{lock, Sessions, SharedVault, MAX_CONVERSATION_ID};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The largest JSON reply restored whole (8 MiB); larger replies pass through unrestored, or,
/// with reply-side redaction on, are cut off rather than passed unscrubbed.
const MAX_JSON: usize = 8 * 1024 * 1024;

/// Redacts prompts and restores replies. Clones share one [`Redactor`] and one [`Sessions`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RedactLayer {
    redactor: Arc<Redactor>,
    scrub: Option<Arc<Redactor>>,
    sessions: Option<Sessions>,
    restore: bool,
    mode: Mode,
    unknown: UnknownPolicy,
    body_limit: usize,
}

impl RedactLayer {
    /// Redacts with `redactor` and restores replies.
    pub fn new(redactor: Redactor) -> Self {
        Self {
            redactor: Arc::new(redactor),
            scrub: None,
            sessions: None,
            restore: true,
            mode: Mode::Enforce,
            unknown: UnknownPolicy::default(),
            body_limit: DEFAULT_BODY_LIMIT,
        }
    }

    /// Whether placeholders in replies are replaced by the originals (default yes).
    pub fn with_restore(mut self, restore: bool) -> Self {
        self.restore = restore;
        self
    }

    /// Whether replies are also scrubbed: personal data the model writes that was not in the
    /// prompt (it never went into the vault) is replaced by `[EMAIL]`-style labels before the
    /// client sees it, streamed replies with a bounded carry ([`MAX_CARRY`](crate::MAX_CARRY)).
    /// Default no.
    pub fn with_reply_side(mut self, scrub: bool) -> Self {
        self.scrub = scrub.then(|| Arc::new(self.redactor.redacting()));
        self
    }

    /// In [`Mode::Shadow`], values are found, counted and recorded as a decision, but the request
    /// goes out unchanged (to measure what redaction would do before turning it on).
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Keeps one vault per conversation (see [`Sessions`]) instead of one per request, so the
    /// same value gets the same placeholder in every turn.
    pub fn with_sessions(mut self, sessions: Sessions) -> Self {
        self.sessions = Some(sessions);
        self
    }

    /// What to do with text in parts of a request the parser does not know (a content part of a
    /// new type, an undocumented field): scan it like any other text (the default), refuse the
    /// request with 400, or send it unscanned. See [`UnknownPolicy`].
    pub fn with_unknown(mut self, policy: UnknownPolicy) -> Self {
        self.unknown = policy;
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
            let reject = |rejection: Rejection| {
                let response = rejection
                    .with_layer("redact")
                    .into_response::<ResBody>(protocol);
                Ok(response.map(RestoreBody::rejection))
            };
            let (req, vault) = match read_llm_request(req, layer.body_limit).await {
                Ok(LlmBody::Parsed { request, llm }) => {
                    if let Err(rejection) = llm.with(|r| layer.unknown.check(r)) {
                        return reject(rejection);
                    }
                    let vault = match &layer.sessions {
                        Some(sessions) => {
                            match sessions.vault_for(request.headers(), request.extensions()) {
                                Ok(vault) => vault,
                                Err(_) => {
                                    return reject(
                                        Rejection::bad_request(format!(
                                            "the conversation id must be 1 to {MAX_CONVERSATION_ID} visible ASCII characters"
                                        ))
                                        .with_code("invalid_conversation_id"),
                                    )
                                }
                            }
                        }
                        None => SharedVault::default(),
                    };
                    let shadow = layer.mode == Mode::Shadow;
                    let spans = llm.with(|r| {
                        let mut vault = lock(&vault);
                        let mut spans = 0;
                        for i in 0..r.segment_count() {
                            if !r.segment(i).is_some_and(|s| layer.unknown.scans(s)) {
                                continue;
                            }
                            let Some(text) = r.text(i) else { continue };
                            let found = layer.redactor.detector().find(text);
                            for f in &found {
                                metrics::counter!("moat_redact_values_total", "entity" => f.entity.name(), "mode" => if shadow { "shadow" } else { "enforce" }).increment(1);
                            }
                            spans += found.len();
                            if shadow || found.is_empty() {
                                continue;
                            }
                            let text = layer.redactor.replace(text, &found, &mut vault).text.into_owned();
                            r.set_text(i, text);
                        }
                        spans
                    });
                    if spans > 0 {
                        let spans = u32::try_from(spans).unwrap_or(u32::MAX);
                        tracing::debug!(target: "moat::redact", spans, shadow, "redacted");
                        let decision = if shadow {
                            Decision::new("redact", Outcome::Allowed)
                                .with_detail(format!("shadow: {spans} values would be redacted"))
                        } else {
                            Decision::new("redact", Outcome::Rewritten { spans })
                        };
                        Decisions::record(request.extensions(), decision);
                    }
                    (request, vault)
                }
                Ok(LlmBody::Unparsed(request)) => (request, SharedVault::default()),
                Err(rejection) => return reject(rejection),
            };
            let response = inner.call(req).await?;
            let rewriter = Rewriter {
                redactor: layer.redactor.clone(),
                scrub: layer.scrub.clone().filter(|_| layer.mode == Mode::Enforce),
                vault,
                restore: layer.restore,
            };
            if rewriter.is_noop() {
                return Ok(response.map(RestoreBody::passthrough));
            }
            let (mut parts, body) = response.into_parts();
            let body = match BodyFormat::of(&parts.headers) {
                BodyFormat::Json => {
                    parts.headers.remove(http::header::CONTENT_LENGTH);
                    RestoreBody::json(body, rewriter)
                }
                BodyFormat::Sse => {
                    parts.headers.remove(http::header::CONTENT_LENGTH);
                    RestoreBody::sse(body, rewriter)
                }
                BodyFormat::Other => RestoreBody::passthrough(body),
            };
            Ok(Response::from_parts(parts, body))
        };
        ResponseFuture::new(future)
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
        rewriter: Rewriter,
        overflow: bool,
    },
    Sse {
        decoder: Box<SseDecoder>,
        streams: Streams,
        rewriter: Rewriter,
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

    fn json(body: B, rewriter: Rewriter) -> Self {
        let kind = Kind::Json {
            buf: Vec::new(),
            rewriter,
            overflow: false,
        };
        Self::new(ResponseBody::inner(body), kind)
    }

    fn sse(body: B, rewriter: Rewriter) -> Self {
        let kind = Kind::Sse {
            decoder: Box::default(),
            streams: Streams::default(),
            rewriter,
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
                (
                    Kind::Json {
                        buf,
                        overflow,
                        rewriter,
                    },
                    Some(Ok(frame)),
                ) => match frame.into_data() {
                    Ok(data) if *overflow => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(data) if buf.len() + data.len() > MAX_JSON && rewriter.scrubs() => {
                        // Too large to scrub: end the body rather than let unscrubbed values
                        // through (the client sees a truncated reply).
                        tracing::warn!(target: "moat::redact", limit = MAX_JSON, "reply too large to scrub; ended");
                        buf.clear();
                        this.inner.set(None);
                        return Poll::Ready(None);
                    }
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
                        rewriter,
                        overflow,
                    },
                    None,
                ) => {
                    this.inner.set(None);
                    if *overflow || buf.is_empty() {
                        return Poll::Ready(None);
                    }
                    let bytes = std::mem::take(buf);
                    let out = rewriter
                        .json_reply(&bytes)
                        .unwrap_or_else(|| Bytes::from(bytes));
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                (
                    Kind::Sse {
                        decoder,
                        streams,
                        rewriter,
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
                            out.extend_from_slice(&rewriter.event(streams, event));
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
                        rewriter,
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
                        out.extend_from_slice(&rewriter.event(streams, &event));
                    }
                    // Anything still held (a stream without [DONE]) goes out last.
                    out.extend_from_slice(&rewriter.held(streams));
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
