//! The layer: one record per request, finished when its response ends.

use std::fmt;
use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use moat_core::body::ResponseBody as CoreBody;
use moat_core::decision::Decisions;
use moat_core::identity::{presented_api_key, CallerResolver};
use moat_core::reject::{Protocol, Rejected, Rejection};
use moat_core::response::{Hook, Hooks, Interest, ViewBody};
use moat_core::usage::UsageReport;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::event::{Capture, Ending, RequestEvent};
use crate::policy::{Level, Policy};
use crate::writer::{Admission, AuditLog};

/// Bodies are logged up to this many bytes by default (the SHA-256 covers all of them).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// Records every request it sees in an [`AuditLog`]: put it outermost, so it sees what the
/// layers inside it (authentication included) decided and refused.
#[derive(Clone, Debug)]
#[must_use]
pub struct AuditLayer {
    config: Arc<Config>,
}

#[derive(Debug)]
struct Config {
    log: AuditLog,
    policy: Policy,
    resolver: CallerResolver,
    max_body_bytes: usize,
}

impl AuditLayer {
    /// Records to `log`, every request at the metadata level.
    pub fn new(log: AuditLog) -> Self {
        Self {
            config: Arc::new(Config {
                log,
                policy: Policy::default(),
                resolver: CallerResolver::default(),
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            }),
        }
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::get_mut(&mut self.config).expect("configured before it is cloned")
    }

    /// Chooses each request's level by `policy`.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.config_mut().policy = policy;
        self
    }

    /// Identifies callers (key fingerprint, client IP) as the other layers do: give every
    /// layer of a stack the same resolver.
    pub fn with_caller_resolver(mut self, resolver: CallerResolver) -> Self {
        self.config_mut().resolver = resolver;
        self
    }

    /// Logs at most this many bytes of each body (default 64 KiB).
    pub fn with_max_body_bytes(mut self, bytes: usize) -> Self {
        self.config_mut().max_body_bytes = bytes;
        self
    }

    /// The log it records to.
    pub fn log(&self) -> &AuditLog {
        &self.config.log
    }
}

impl<S> Layer<S> for AuditLayer {
    type Service = Audit<S>;

    fn layer(&self, inner: S) -> Audit<S> {
        Audit {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The [`AuditLayer`]'s service.
#[derive(Clone, Debug)]
pub struct Audit<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Audit<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Audit<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let config = &self.config;
        let most = config.policy.most_for(req.uri().path());
        if most == Level::None {
            // Never recorded (health probes): not held or refused by the log's queue either.
            let req = req.map(|body| RequestBody {
                inner: body,
                capture: None,
            });
            return ResponseFuture {
                state: State::Calling {
                    future: self.inner.call(req),
                },
                pending: None,
                hooks: None,
            };
        }
        let admission = config.log.admit();
        if admission == Admission::Refuse {
            let rejection = Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "The audit log is behind; the request was not accepted. Please try again shortly.",
            )
            .with_code("audit_unavailable")
            .with_header(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            )
            .with_layer("audit");
            return ResponseFuture {
                state: State::Refused {
                    rejection: Some((rejection, Protocol::of(&req))),
                },
                pending: None,
                hooks: None,
            };
        }

        let start = Instant::now();
        let decisions = match req.extensions().get::<Decisions>() {
            Some(d) => d.clone(),
            None => {
                let d = Decisions::new();
                req.extensions_mut().insert(d.clone());
                d
            }
        };
        let capture = most >= Level::Request;
        // Who called is what the layers inside find out (authentication knows the tenant);
        // the key is fingerprinted on the writer thread only if none of them did.
        let event = Box::new(RequestEvent {
            time: jiff::Timestamp::now(),
            request_id: req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .filter(|v| v.len() <= 128)
                .map(str::to_owned),
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            grpc: Protocol::of(&req) == Protocol::Grpc,
            caller: None,
            client_ip: config.resolver.client_ip().client_ip(&req),
            presented_key: presented_api_key(req.headers()).map(str::to_owned),
            fingerprinter: None,
            model: None,
            upstream: None,
            status: 0,
            ending: Ending::Abandoned,
            rejected: None,
            duration: Default::default(),
            first_byte: None,
            usage: None,
            decisions: Vec::new(),
            level: Level::Metadata,
            request_body: None,
            response_body: None,
        });
        let request_capture =
            capture.then(|| Arc::new(Mutex::new(Capture::new(config.max_body_bytes))));
        let pending = Arc::new(Pending {
            log: config.log.clone(),
            config: config.clone(),
            draft: Mutex::new(Draft {
                event: Some(event),
                start,
                finished: None,
                decisions,
                request_capture: request_capture.clone(),
                capture_response: most >= Level::RequestResponse,
            }),
        });
        let hooks = Hooks::of(req.extensions_mut());
        hooks.attach(UsageWatch(pending.clone()));
        let req = req.map(|body| RequestBody {
            inner: body,
            capture: request_capture,
        });

        let clone = self.inner.clone();
        let inner = mem::replace(&mut self.inner, clone);
        let state = match admission {
            Admission::Wait => State::Waiting {
                room: Box::pin(config.log.clone().room()),
                inner: Some(inner),
                request: Some(req),
            },
            _ => {
                let mut inner = inner;
                State::Calling {
                    future: inner.call(req),
                }
            }
        };
        ResponseFuture {
            state,
            pending: Some(pending),
            hooks: Some(hooks),
        }
    }
}

/// One request's record while it is made: written when the last of the response future, its
/// body and the usage hook lets go of it.
struct Pending {
    log: AuditLog,
    config: Arc<Config>,
    draft: Mutex<Draft>,
}

struct Draft {
    /// Taken when the record is written.
    event: Option<Box<RequestEvent>>,
    start: Instant,
    finished: Option<Instant>,
    decisions: Decisions,
    request_capture: Option<Arc<Mutex<Capture>>>,
    capture_response: bool,
}

impl Pending {
    fn with(&self, f: impl FnOnce(&mut Draft)) {
        f(&mut self.draft.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Changes the event (a no-op once it is written).
    fn event(&self, f: impl FnOnce(&mut RequestEvent)) {
        self.with(|d| {
            if let Some(event) = d.event.as_deref_mut() {
                f(event);
            }
        });
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let draft = self.draft.get_mut().unwrap_or_else(PoisonError::into_inner);
        let Some(mut event) = draft.event.take() else {
            return;
        };
        let facts = draft.decisions.facts();
        event.caller = facts.caller;
        if event.caller.as_ref().is_none_or(|c| c.api_key.is_none())
            && event.presented_key.is_some()
        {
            event.fingerprinter = Some(self.config.resolver.fingerprinter().clone());
        }
        event.model = facts.model;
        event.upstream = facts.upstream;
        event.decisions = draft.decisions.take();
        if event.rejected.is_some() {
            event.ending = Ending::Rejected;
        }
        event.duration = draft.finished.unwrap_or_else(Instant::now) - draft.start;
        let tenant = event.caller.as_ref().and_then(|c| c.tenant.as_deref());
        event.level = self
            .config
            .policy
            .level(&event.path, tenant, event.model.as_deref());
        if event.level == Level::None {
            return;
        }
        event.request_body = match &draft.request_capture {
            Some(c) if event.level >= Level::Request => {
                Some(c.lock().unwrap_or_else(PoisonError::into_inner).clone())
            }
            _ => None,
        };
        if event.level < Level::RequestResponse {
            event.response_body = None;
        }
        if event.level < Level::Request && event.fingerprinter.is_none() {
            // Only needed to fingerprint it or to scrub bodies.
            event.presented_key = None;
        }
        self.log.record(event);
    }
}

/// Reads the response's usage through the shared response view.
struct UsageWatch(Arc<Pending>);

impl Hook for UsageWatch {
    fn interest(&self) -> Interest {
        Interest::OBSERVE
    }

    fn on_end(self: Box<Self>, report: &UsageReport) {
        self.0.event(|e| e.usage = report.usage);
    }
}

pin_project! {
    /// The request body [`Audit`] hands on: the caller's, copied as it is read when the
    /// request may be logged with its body.
    pub struct RequestBody<B> {
        #[pin]
        inner: B,
        capture: Option<Arc<Mutex<Capture>>>,
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBody")
            .field("capturing", &self.capture.is_some())
            .finish_non_exhaustive()
    }
}

impl<B: Body<Data = Bytes>> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(capture) = this.capture {
            let mut capture = capture.lock().unwrap_or_else(PoisonError::into_inner);
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        capture.push(data);
                    }
                }
                None => capture.complete = true,
                Some(Err(_)) => {}
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// The response future of [`Audit`].
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<RequestBody<B>>>,
    {
        #[pin]
        state: State<S, B>,
        pending: Option<Arc<Pending>>,
        hooks: Option<Hooks>,
    }
}

type Room = Pin<Box<dyn Future<Output = ()> + Send>>;

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<RequestBody<B>>>,
    {
        Waiting { room: Room, inner: Option<S>, request: Option<Request<RequestBody<B>>> },
        Calling { #[pin] future: S::Future },
        Refused { rejection: Option<(Rejection, Protocol)> },
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<RequestBody<B>>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture { .. }")
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let result = match this.state.as_mut().project() {
                StateProj::Waiting {
                    room,
                    inner,
                    request,
                } => {
                    ready!(room.as_mut().poll(cx));
                    let (Some(mut inner), Some(request)) = (inner.take(), request.take()) else {
                        unreachable!("taken once, when the wait ends");
                    };
                    let future = inner.call(request);
                    this.state.set(State::Calling { future });
                    continue;
                }
                StateProj::Refused { rejection } => {
                    let (rejection, protocol) = rejection.take().expect("polled after completion");
                    let response = rejection.into_response(protocol);
                    return Poll::Ready(Ok(response.map(|body| ResponseBody {
                        inner: ViewBody::plain(body),
                        watch: None,
                    })));
                }
                StateProj::Calling { future } => ready!(future.poll(cx)),
            };
            let pending = this.pending.take();
            let hooks = this.hooks.take();
            return Poll::Ready(match result {
                Ok(response) => {
                    if let Some(p) = &pending {
                        let rejected = response.extensions().get::<Rejected>().cloned();
                        let status = response.status().as_u16();
                        p.event(|e| {
                            e.status = status;
                            e.rejected = rejected;
                        });
                    }
                    let response = response.map(CoreBody::inner);
                    let response = match &hooks {
                        Some(hooks) => hooks.view(response),
                        None => response.map(ViewBody::plain),
                    };
                    Ok(response.map(|inner| {
                        let mut watch = pending.map(BodyWatch::new);
                        // An empty body is never polled: it has ended already.
                        if inner.is_end_stream() {
                            if let Some(mut w) = watch.take() {
                                w.end(Ending::Completed);
                            }
                        }
                        ResponseBody { inner, watch }
                    }))
                }
                Err(error) => {
                    if let Some(hooks) = hooks {
                        hooks.fail();
                    }
                    if let Some(p) = &pending {
                        p.with(|d| {
                            d.finished = Some(Instant::now());
                            if let Some(e) = d.event.as_deref_mut() {
                                e.ending = Ending::Failed;
                            }
                        });
                    }
                    Err(error)
                }
            });
        }
    }
}

/// Watches a response body for its first byte, its end, and (when the level asks) what it
/// says.
struct BodyWatch {
    pending: Arc<Pending>,
    first_byte: bool,
    capture: Option<Capture>,
}

impl BodyWatch {
    fn new(pending: Arc<Pending>) -> Self {
        let mut capture = None;
        pending.with(|d| {
            if d.capture_response {
                capture = Some(Capture::new(pending.config.max_body_bytes));
            }
        });
        Self {
            pending,
            first_byte: false,
            capture,
        }
    }

    fn end(&mut self, ending: Ending) {
        let capture = self.capture.take().map(|mut c| {
            c.complete = ending == Ending::Completed;
            c
        });
        self.pending.with(|d| {
            if d.finished.is_none() {
                d.finished = Some(Instant::now());
                if let Some(e) = d.event.as_deref_mut() {
                    e.ending = ending;
                    e.response_body = capture;
                }
            }
        });
    }
}

impl Drop for BodyWatch {
    fn drop(&mut self) {
        self.end(Ending::Abandoned);
    }
}

pin_project! {
    /// The response body of [`Audit`]: the inner service's, watched for its end (when the
    /// request's record is written).
    pub struct ResponseBody<B> {
        #[pin]
        inner: ViewBody<CoreBody<B>>,
        watch: Option<BodyWatch>,
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<B: Body<Data = Bytes>> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(watch) = this.watch.as_mut() {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        if !watch.first_byte && !data.is_empty() {
                            watch.first_byte = true;
                            watch.pending.with(|d| {
                                let elapsed = d.start.elapsed();
                                if let Some(e) = d.event.as_deref_mut() {
                                    e.first_byte = Some(elapsed);
                                }
                            });
                        }
                        if let Some(capture) = watch.capture.as_mut() {
                            capture.push(data);
                        }
                    }
                }
                None => {
                    watch.end(Ending::Completed);
                    *this.watch = None;
                }
                Some(Err(_)) => {
                    watch.end(Ending::Failed);
                    *this.watch = None;
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
