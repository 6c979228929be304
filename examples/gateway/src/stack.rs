//! The gateway's protections, built once in the recommended order around an upstream service.
//!
//! Outermost first (requests flow down, responses back up):
//!
//! ```text
//! authenticate   401 for unknown keys; the Caller every layer below agrees on
//! ratelimit      cheap, before any body is read
//! quota          reserves estimated tokens and spend; settles from the reply's usage
//! sanitize       screens the prompt as the client sent it; refuses attacks before they cost
//! redact         PII and secrets replaced before the prompt leaves, restored in the reply
//! moderate       the model's output checked before the client sees it (placeholders, not PII)
//! cache          identical requests answered once (keys and replies hold placeholders)
//! upstream       a tower Service: the provider client, or a breaker and fallback around it
//! ```
//!
//! The upstream takes axum requests and answers `http` responses with any `Bytes` body, never
//! an error (`Error = Infallible`: a failure is an error response, as [`Upstream`]'s 502 and
//! 504), and is `Clone + Send + Sync`; a breaker that errors is wrapped to answer instead.
//!
//! [`Upstream`]: crate::Upstream
//!
//! Stages are composed statically: a stage a configuration leaves out passes requests straight
//! on, so there is no box per stage. Layers that must see what authentication refuses (audit)
//! go outside it: the gateway puts `[audit]` around its whole router.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http_body_util::Either;
use moat::quota::QuotaLayer;
use moat::ratelimit::RateLimitLayer;
use moat::redact::RedactLayer;
use moat::sanitize::SanitizeLayer;
use pin_project_lite::pin_project;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, Service};

use crate::auth::AuthenticateLayer;
use crate::config::Resolved;

/// A service the gateway routes to: axum requests in, axum responses out, never an error (a
/// failure is an error response).
pub type GatewayService = BoxCloneSyncService<Request, Response, Infallible>;

/// The layers of a resolved configuration, in order; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Stack {
    authenticate: AuthenticateLayer,
    ratelimit: Option<RateLimitLayer>,
    quota: Option<QuotaLayer>,
    sanitize: Option<SanitizeLayer>,
    redact: Option<RedactLayer>,
    moderate: Option<moat::moderate::ModerateLayer>,
    cache: Option<moat::cache::CacheLayer>,
}

impl Stack {
    /// The stack a configuration describes.
    pub fn new(resolved: &Resolved) -> Self {
        Self {
            authenticate: AuthenticateLayer::new(&resolved.keys, resolved.resolver.clone()),
            ratelimit: resolved.ratelimit.clone(),
            quota: resolved.quota.clone(),
            sanitize: resolved.sanitize.clone(),
            redact: resolved.redact.clone(),
            moderate: resolved.moderate.clone(),
            cache: resolved.cache.clone(),
        }
    }

    /// The names of the stages in use, outermost first (`authenticate` … `upstream`).
    pub fn stages(&self) -> Vec<&'static str> {
        let optional = [
            ("ratelimit", self.ratelimit.is_some()),
            ("quota", self.quota.is_some()),
            ("sanitize", self.sanitize.is_some()),
            ("redact", self.redact.is_some()),
            ("moderate", self.moderate.is_some()),
            ("cache", self.cache.is_some()),
        ];
        std::iter::once("authenticate")
            .chain(
                optional
                    .into_iter()
                    .filter(|(_, on)| *on)
                    .map(|(name, _)| name),
            )
            .chain(std::iter::once("upstream"))
            .collect()
    }

    /// `upstream` behind every stage. The stages are composed statically (a stage that is not
    /// configured passes requests straight on), so a request allocates no box per stage: its
    /// body is boxed once before the upstream, its response once for axum.
    pub fn around<S, B>(&self, upstream: S) -> GatewayService
    where
        S: Service<Request, Response = http::Response<B>, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let service = stage(self.cache.as_ref(), AnyBody(upstream));
        let service = stage(self.moderate.as_ref(), service);
        let service = stage(self.redact.as_ref(), service);
        let service = stage(self.sanitize.as_ref(), service);
        let service = stage(self.quota.as_ref(), service);
        let service = stage(self.ratelimit.as_ref(), service);
        BoxCloneSyncService::new(self.authenticate.layer(service))
    }

    /// `service` behind authentication only: the gateway's own endpoints, which no rate or
    /// budget applies to.
    pub fn authenticated<S, B>(&self, service: S) -> GatewayService
    where
        S: Service<Request, Response = http::Response<B>, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        BoxCloneSyncService::new(self.authenticate.layer(service))
    }
}

/// `inner` behind `layer` when there is one.
fn stage<L: Layer<S>, S>(layer: Option<&L>, inner: S) -> Stage<L::Service, S> {
    match layer {
        Some(layer) => Stage::On(layer.layer(inner)),
        None => Stage::Off(inner),
    }
}

/// A configured layer's service, or the service inside it when the layer is not configured.
#[derive(Debug, Clone)]
enum Stage<On, Off> {
    On(On),
    Off(Off),
}

impl<On, Off, B, OnBody, OffBody> Service<http::Request<B>> for Stage<On, Off>
where
    On: Service<http::Request<B>, Response = http::Response<OnBody>, Error = Infallible>,
    Off: Service<http::Request<B>, Response = http::Response<OffBody>, Error = Infallible>,
{
    type Response = http::Response<Either<OnBody, OffBody>>;
    type Error = Infallible;
    type Future = StageFuture<On::Future, Off::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self {
            Stage::On(service) => service.poll_ready(cx),
            Stage::Off(service) => service.poll_ready(cx),
        }
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self {
            Stage::On(service) => StageFuture::On {
                future: service.call(request),
            },
            Stage::Off(service) => StageFuture::Off {
                future: service.call(request),
            },
        }
    }
}

pin_project! {
    /// The response future of a [`Stage`].
    #[project = StageProj]
    enum StageFuture<On, Off> {
        On { #[pin] future: On },
        Off { #[pin] future: Off },
    }
}

impl<On, Off, OnBody, OffBody> Future for StageFuture<On, Off>
where
    On: Future<Output = Result<http::Response<OnBody>, Infallible>>,
    Off: Future<Output = Result<http::Response<OffBody>, Infallible>>,
{
    type Output = Result<http::Response<Either<OnBody, OffBody>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            StageProj::On { future } => future
                .poll(cx)
                .map(|result| result.map(|response| response.map(Either::Left))),
            StageProj::Off { future } => future
                .poll(cx)
                .map(|result| result.map(|response| response.map(Either::Right))),
        }
    }
}

/// The upstream, taking whatever body the stage outside it hands on (boxed into axum's).
#[derive(Debug, Clone)]
struct AnyBody<S>(S);

impl<S, B> Service<http::Request<B>> for AnyBody<S>
where
    S: Service<Request>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> S::Future {
        self.0.call(request.map(Body::new))
    }
}
