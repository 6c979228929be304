//! [`CircuitBreakerLayer`]: a breaker in front of a Tower service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use moat_core::body::ResponseBody as CoreBody;
use moat_core::decision::{Decision, Decisions, Outcome};
use moat_core::identity::RequestHead;
use moat_core::reject::{Protocol, Rejection};
use moat_core::response::EventView;
use moat_core::sse::SseDecoder;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::breaker::{Breaker, CallOutcome, OwnedPermit, Refusal};
use crate::classify::{retry_after, Classify, LlmClassifier, SharedClassifier, Verdict};
use crate::keyed::Breakers;

/// Why a response did not come from a working upstream, left in its extensions by a
/// [`CircuitBreaker`] when nothing of it has reached the client yet: a
/// [`Fallback`](crate::Fallback) (or a retry policy) may serve the request elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Unavailable {
    /// The breaker's name.
    pub breaker: Arc<str>,
    /// Why.
    pub reason: Reason,
    /// How long the upstream asked to be left alone, when it said.
    pub retry_after: Option<Duration>,
}

/// Why an upstream did not serve a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// Its breaker is open: it was not called.
    Open,
    /// It answered 429, or did recently: it was not called, or it refused.
    RateLimited,
    /// It refused the credentials (401, 403).
    KeyRejected,
    /// It failed: a 5xx, an error, a stream whose first event was an error or that broke
    /// before its first event.
    Failed,
    /// Its stream sent no first event within `first_token_timeout`.
    Stalled,
}

impl Reason {
    /// `open`, `rate_limited`, `key_rejected`, `failed` or `stalled`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Open => "open",
            Reason::RateLimited => "rate_limited",
            Reason::KeyRejected => "key_rejected",
            Reason::Failed => "failed",
            Reason::Stalled => "stalled",
        }
    }
}

/// Which breaker guards a request.
#[derive(Debug, Clone)]
enum Target {
    One(Breaker),
    Keyed(Breakers),
}

/// Puts a circuit breaker in front of a service: calls are refused with 503 (gRPC
/// `UNAVAILABLE`) and `retry-after` while it is open, and their outcomes counted by a
/// [`Classify`] when their bodies end.
///
/// See the [crate docs](crate) for an example.
#[derive(Debug, Clone)]
#[must_use]
pub struct CircuitBreakerLayer {
    target: Target,
    classifier: Arc<SharedClassifier>,
}

impl CircuitBreakerLayer {
    /// One breaker for every request.
    pub fn new(breaker: Breaker) -> Self {
        Self {
            target: Target::One(breaker),
            classifier: Arc::new(SharedClassifier(Box::new(LlmClassifier))),
        }
    }

    /// A breaker per key (model, API key, header ...), from `breakers`.
    pub fn keyed(breakers: Breakers) -> Self {
        Self {
            target: Target::Keyed(breakers),
            classifier: Arc::new(SharedClassifier(Box::new(LlmClassifier))),
        }
    }

    /// Counts outcomes with `classifier` instead of [`LlmClassifier`].
    pub fn with_classifier(mut self, classifier: impl Classify) -> Self {
        self.classifier = Arc::new(SharedClassifier(Box::new(classifier)));
        self
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker {
            inner,
            target: self.target.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// A service behind a circuit breaker; see [`CircuitBreakerLayer`].
#[derive(Debug, Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    target: Target,
    classifier: Arc<SharedClassifier>,
}

impl<S> CircuitBreaker<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming the breaker service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CircuitBreaker<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let keyed;
        let breaker = match &self.target {
            Target::One(breaker) => breaker,
            Target::Keyed(breakers) => {
                keyed = breakers.breaker_for(&RequestHead::of(&req));
                &keyed
            }
        };
        match breaker.try_acquire_owned() {
            Ok(permit) => {
                if Decisions::is_recording(req.extensions()) {
                    Decisions::record(
                        req.extensions(),
                        Decision::new(
                            "breaker",
                            Outcome::Breaker {
                                state: breaker.state().as_str().into(),
                            },
                        )
                        .with_rule(breaker.name().to_owned()),
                    );
                }
                ResponseFuture {
                    kind: Kind::Calling {
                        future: self.inner.call(req),
                        call: Some(Call {
                            permit,
                            classifier: self.classifier.clone(),
                        }),
                    },
                }
            }
            Err(refusal) => {
                let rejection = refused(breaker, refusal);
                if Decisions::is_recording(req.extensions()) {
                    Decisions::record(
                        req.extensions(),
                        Decision::new(
                            "breaker",
                            Outcome::Rejected {
                                status: rejection.status().as_u16(),
                                code: rejection.code().unwrap_or_default().to_owned().into(),
                            },
                        )
                        .with_rule(breaker.name().to_owned()),
                    );
                }
                let reason = match refusal {
                    Refusal::RateLimited { .. } => Reason::RateLimited,
                    _ => Reason::Open,
                };
                let response = unavailable(
                    rejection
                        .into_response(Protocol::of(&req))
                        .map(ResponseBody::plain),
                    breaker,
                    reason,
                    refusal.retry_after(),
                );
                ResponseFuture {
                    kind: Kind::Refused {
                        response: Some(Box::new(response)),
                    },
                }
            }
        }
    }
}

/// The rejection for a refused call.
fn refused(breaker: &Breaker, refusal: Refusal) -> Rejection {
    let (status, error_type, code, message) = match refusal {
        Refusal::RateLimited { .. } => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "upstream_rate_limited",
            format!(
                "the upstream {:?} is rate-limiting this gateway; try again later",
                breaker.name()
            ),
        ),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "circuit_open",
            format!(
                "the upstream {:?} is failing and is not being called; try again later",
                breaker.name()
            ),
        ),
    };
    let mut rejection = Rejection::new(status, error_type, message)
        .with_code(code)
        .with_layer("breaker");
    if let Some(after) = refusal.retry_after() {
        rejection = with_retry_after(rejection, after);
    }
    rejection
}

/// `retry-after` in whole seconds, rounded up (a client that waits that long finds the breaker
/// ready), and `retry-after-ms`, which OpenAI's SDKs read first.
pub(crate) fn with_retry_after(rejection: Rejection, after: Duration) -> Rejection {
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    let millis = u64::try_from(after.as_millis()).unwrap_or(u64::MAX).max(1);
    rejection
        .with_header(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)))
        .with_header(
            http::HeaderName::from_static("retry-after-ms"),
            HeaderValue::from(millis),
        )
}

fn unavailable<B>(
    mut response: Response<B>,
    breaker: &Breaker,
    reason: Reason,
    retry_after: Option<Duration>,
) -> Response<B> {
    response.extensions_mut().insert(Unavailable {
        breaker: breaker.shared_name().clone(),
        reason,
        retry_after,
    });
    response
}

/// What a call in flight carries until its response head is judged.
struct Call {
    permit: OwnedPermit,
    classifier: Arc<SharedClassifier>,
}

pin_project! {
    /// The response future of [`CircuitBreaker`].
    pub struct ResponseFuture<F, B> {
        #[pin]
        kind: Kind<F, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B> {
        // The rare variants are boxed, so the common one is not moved around at their size.
        Refused { response: Option<Box<Response<ResponseBody<B>>>> },
        Calling { #[pin] future: F, call: Option<Call> },
        FirstEvent { peek: Box<Peek<B>> },
    }
}

impl<F, B> std::fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture { .. }")
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut kind = self.project().kind;
        loop {
            let peek = match kind.as_mut().project() {
                KindProj::Refused { response } => {
                    return Poll::Ready(Ok(*response.take().expect("polled after completion")))
                }
                KindProj::Calling { future, call } => {
                    let result = ready!(future.poll(cx));
                    let call = call.take().expect("polled after completion");
                    match result {
                        Err(error) => {
                            call.permit.record_as(CallOutcome::Failure, false, None);
                            return Poll::Ready(Err(error));
                        }
                        Ok(response) => match judge(response, call) {
                            Judged::Done(response) => return Poll::Ready(Ok(response)),
                            Judged::Peek(peek) => peek,
                        },
                    }
                }
                KindProj::FirstEvent { peek } => return peek.poll(cx).map(Ok),
            };
            kind.set(Kind::FirstEvent { peek });
        }
    }
}

// Returned once and matched at once: never stored, so its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Judged<B> {
    Done(Response<ResponseBody<B>>),
    Peek(Box<Peek<B>>),
}

/// Judges a response head: records what it can, and wraps the body to record the rest.
fn judge<B: Body<Data = Bytes>>(response: Response<B>, call: Call) -> Judged<B> {
    let Call { permit, classifier } = call;
    let breaker = permit.breaker().clone();
    let status = response.status();
    let verdict = classifier.0.classify(status, response.headers());
    // Read only from the answers that can carry it.
    let after = match verdict {
        Verdict::Success | Verdict::Ignored => None,
        _ => retry_after(response.headers()),
    };
    let slow = permit.is_slow();
    match verdict {
        Verdict::Success if is_event_stream(&response) => {
            let (parts, body) = response.into_parts();
            let timer = breaker.config().first_token_timeout.map(|d| {
                tokio::time::sleep(d.saturating_sub(permit.elapsed().unwrap_or_default()))
            });
            Judged::Peek(Box::new(Peek {
                body: Some(Box::pin(body)),
                head: Some(parts),
                held: Vec::new(),
                held_bytes: 0,
                decoder: SseDecoder::new(),
                timer: timer.map(Box::pin),
                permit: Some(permit),
            }))
        }
        Verdict::Success | Verdict::Failure => {
            let failure = verdict == Verdict::Failure;
            let guard = Guard {
                permit: Some(permit),
                failure,
                slow,
                retry_after: after,
            };
            let response = response.map(|body| ResponseBody::watched(body, guard));
            Judged::Done(if failure {
                unavailable(response, &breaker, Reason::Failed, after)
            } else {
                response
            })
        }
        Verdict::RateLimited => {
            drop(permit);
            breaker.rate_limited(after.unwrap_or(breaker.config().rate_limited_for));
            let response = response.map(ResponseBody::inner);
            Judged::Done(unavailable(response, &breaker, Reason::RateLimited, after))
        }
        Verdict::KeyRejected => {
            drop(permit);
            let response = response.map(ResponseBody::inner);
            Judged::Done(unavailable(response, &breaker, Reason::KeyRejected, after))
        }
        Verdict::Ignored => {
            drop(permit);
            Judged::Done(response.map(ResponseBody::inner))
        }
    }
}

fn is_event_stream<B>(response: &Response<B>) -> bool {
    response.status() == StatusCode::OK
        && response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// The most a breaker holds back while it waits for a stream's first event.
const MAX_HELD: usize = 64 * 1024;

/// A streamed reply held back until its first event says whether the upstream works. The
/// body is boxed so it can move on into the response once the event is in. Event streams are
/// HTTP (gRPC is not served as `text/event-stream`), so rejections here are HTTP ones.
struct Peek<B> {
    body: Option<Pin<Box<B>>>,
    head: Option<http::response::Parts>,
    held: Vec<Bytes>,
    held_bytes: usize,
    decoder: SseDecoder,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    permit: Option<OwnedPermit>,
}

impl<B: Body<Data = Bytes>> Peek<B> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Response<ResponseBody<B>>> {
        let body = self.body.as_mut().expect("polled after completion");
        loop {
            if let Some(timer) = &mut self.timer {
                if timer.as_mut().poll(cx).is_ready() {
                    let permit = self.permit.take().expect("polled after completion");
                    let breaker = permit.breaker().clone();
                    let timeout = breaker.config().first_token_timeout.unwrap_or_default();
                    permit.record_as(CallOutcome::Failure, true, None);
                    let rejection = Rejection::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_error",
                        format!("the upstream sent no first token within {timeout:?}"),
                    )
                    .with_code("upstream_timeout")
                    .with_layer("breaker");
                    let response = rejection
                        .into_response(Protocol::Http)
                        .map(ResponseBody::plain);
                    return Poll::Ready(unavailable(response, &breaker, Reason::Stalled, None));
                }
            }
            let first = match ready!(body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let first = first_event(&mut self.decoder, &data, self.held_bytes);
                        self.held_bytes += data.len();
                        self.held.push(data);
                        first
                    }
                    // Trailers before any event: the stream is over without one.
                    Err(_) => Some(FirstEvent::Missing),
                },
                Some(Err(_)) | None => Some(FirstEvent::Missing),
            };
            let Some(first) = first else { continue };
            let permit = self.permit.take().expect("polled after completion");
            let breaker = permit.breaker().clone();
            let slow = permit.is_slow();
            if first == FirstEvent::Missing {
                permit.record_as(CallOutcome::Failure, slow, None);
                let rejection = Rejection::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    "the upstream's stream ended before its first event",
                )
                .with_code("upstream_stream_broken")
                .with_layer("breaker");
                let response = rejection
                    .into_response(Protocol::Http)
                    .map(ResponseBody::plain);
                return Poll::Ready(unavailable(response, &breaker, Reason::Failed, None));
            }
            let failure = first == FirstEvent::Error;
            let guard = Guard {
                permit: Some(permit),
                failure,
                slow,
                retry_after: None,
            };
            let body = ResponseBody {
                body: Inner::Boxed {
                    body: self.body.take().expect("polled after completion"),
                },
                prefix: concat(std::mem::take(&mut self.held)),
                guard: Some(guard),
            };
            let head = self.head.take().expect("polled after completion");
            let response = Response::from_parts(head, body);
            return Poll::Ready(if failure {
                unavailable(response, &breaker, Reason::Failed, None)
            } else {
                response
            });
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstEvent {
    Data,
    Error,
    Missing,
}

/// The first event in `data`, if one is complete (or the stream is too chatty to wait for).
fn first_event(decoder: &mut SseDecoder, data: &[u8], held: usize) -> Option<FirstEvent> {
    let events = match decoder.decode(data) {
        Ok(events) => events,
        // An event too large to decode is not an error event: let it through.
        Err(_) => return Some(FirstEvent::Data),
    };
    for event in &events {
        let is_error = event.event() == Some("error")
            || event
                .data()
                .is_some_and(|d| EventView::read(d).error().is_some());
        if is_error {
            return Some(FirstEvent::Error);
        }
        if event.data().is_some() {
            return Some(FirstEvent::Data);
        }
    }
    (held + data.len() > MAX_HELD).then_some(FirstEvent::Data)
}

fn concat(mut held: Vec<Bytes>) -> Option<Bytes> {
    match held.len() {
        0 => None,
        1 => held.pop(),
        _ => {
            let mut all = BytesMut::with_capacity(held.iter().map(Bytes::len).sum());
            for part in held {
                all.extend_from_slice(&part);
            }
            Some(all.freeze())
        }
    }
}

/// Records a call's outcome when its body ends: a success unless the head said otherwise or
/// the body broke. Dropped first (the client went away), a known failure is still recorded
/// and anything else is not counted.
struct Guard {
    permit: Option<OwnedPermit>,
    failure: bool,
    slow: bool,
    retry_after: Option<Duration>,
}

impl Guard {
    fn finish(mut self, completed: bool) {
        if let Some(permit) = self.permit.take() {
            let outcome = if self.failure || !completed {
                CallOutcome::Failure
            } else {
                CallOutcome::Success
            };
            permit.record_as(outcome, self.slow, self.retry_after);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            if self.failure {
                permit.record_as(CallOutcome::Failure, self.slow, self.retry_after);
            }
        }
    }
}

pin_project! {
    /// The response body of [`CircuitBreaker`]: the inner service's, watched to record the
    /// call's outcome when it ends, or a rejection.
    pub struct ResponseBody<B> {
        #[pin]
        body: Inner<B>,
        prefix: Option<Bytes>,
        guard: Option<Guard>,
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner<B> {
        Core { #[pin] body: CoreBody<B> },
        // A streamed reply whose first event was awaited.
        Boxed { body: Pin<Box<B>> },
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("watched", &self.guard.is_some())
            .finish()
    }
}

impl<B> ResponseBody<B> {
    fn inner(body: B) -> Self {
        Self::plain(CoreBody::inner(body))
    }

    fn plain(body: CoreBody<B>) -> Self {
        Self {
            body: Inner::Core { body },
            prefix: None,
            guard: None,
        }
    }

    fn watched(body: B, guard: Guard) -> Self {
        Self {
            body: Inner::Core {
                body: CoreBody::inner(body),
            },
            prefix: None,
            guard: Some(guard),
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        let (frame, ended) = match this.body.project() {
            InnerProj::Core { mut body } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                (frame, body.is_end_stream())
            }
            InnerProj::Boxed { body } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                (frame, body.is_end_stream())
            }
        };
        if let (Some(Ok(frame)), Some(guard)) = (&frame, this.guard.as_mut()) {
            // A gRPC reply says how it went in its trailers.
            if let Some(trailers) = frame.trailers_ref() {
                if crate::classify::grpc_verdict(trailers) == Some(Verdict::Failure) {
                    guard.failure = true;
                }
            }
        }
        match &frame {
            Some(Err(_)) => {
                if let Some(guard) = this.guard.take() {
                    guard.finish(false);
                }
            }
            // The end, or the last frame: a server that knows the length stops polling there.
            None | Some(Ok(_)) if frame.is_none() || ended => {
                if let Some(guard) = this.guard.take() {
                    guard.finish(true);
                }
            }
            _ => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        // While the outcome is unrecorded, ask to be polled to the end: a server that saw the
        // end early would drop the body, and a dropped body counts as a client that left.
        self.guard.is_none()
            && self.prefix.is_none()
            && match &self.body {
                Inner::Core { body } => body.is_end_stream(),
                Inner::Boxed { body } => body.is_end_stream(),
            }
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = match &self.body {
            Inner::Core { body } => body.size_hint(),
            Inner::Boxed { body } => body.size_hint(),
        };
        if let Some(prefix) = &self.prefix {
            let len = prefix.len() as u64;
            hint.set_lower(hint.lower() + len);
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + len);
            }
        }
        hint
    }
}
