//! The gateway's protections, built once in the recommended order around an upstream service.
//!
//! Outermost first (requests flow down, responses back up):
//!
//! ```text
//! authenticate   401 for unknown keys; the Caller every layer below agrees on
//! ratelimit      cheap, before any body is read
//! quota          reserves estimated tokens and spend; settles from the reply's usage
//! redact         PII and secrets replaced before the prompt leaves, restored in the reply
//! upstream       a tower Service: the provider client, or a breaker and fallback around it
//! ```
//!
//! The upstream takes axum requests and answers `http` responses with any `Bytes` body, never
//! an error (`Error = Infallible`: a failure is an error response, as [`Upstream`]'s 502 and
//! 504), and is `Clone + Send + Sync`; a breaker that errors is wrapped to answer instead.
//!
//! [`Upstream`]: crate::Upstream
//!
//! Each stage is boxed on its own, so a configuration turns stages on and off without a type
//! per combination; a stage costs one boxed future per request. Layers that must see what
//! authentication refuses (audit) go outside it.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use moat::quota::QuotaLayer;
use moat::ratelimit::RateLimitLayer;
use moat::redact::RedactLayer;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, Service, ServiceExt};

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
    redact: Option<RedactLayer>,
}

impl Stack {
    /// The stack a configuration describes.
    pub fn new(resolved: &Resolved) -> Self {
        Self {
            authenticate: AuthenticateLayer::new(&resolved.keys, resolved.resolver.clone()),
            ratelimit: resolved.ratelimit.clone(),
            quota: resolved.quota.clone(),
            redact: resolved.redact.clone(),
        }
    }

    /// The names of the stages in use, outermost first (`authenticate` … `upstream`).
    pub fn stages(&self) -> Vec<&'static str> {
        let optional = [
            ("ratelimit", self.ratelimit.is_some()),
            ("quota", self.quota.is_some()),
            ("redact", self.redact.is_some()),
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

    /// `upstream` behind every stage.
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
        let mut service = boxed(upstream);
        if let Some(redact) = &self.redact {
            service = boxed(redact.layer(accepting_any_body(service)));
        }
        if let Some(quota) = &self.quota {
            service = boxed(quota.layer(accepting_any_body(service)));
        }
        if let Some(ratelimit) = &self.ratelimit {
            service = boxed(ratelimit.layer(accepting_any_body(service)));
        }
        self.authenticated(service)
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
        boxed(self.authenticate.layer(boxed(service)))
    }
}

/// One stage, boxed: its response body becomes axum's.
fn boxed<S, B>(service: S) -> GatewayService
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
    BoxCloneSyncService::new(service.map_response(|response| response.map(Body::new)))
}

/// `service`, taking whatever body the layer outside it hands on.
fn accepting_any_body<B>(
    service: GatewayService,
) -> impl Service<http::Request<B>, Response = Response, Error = Infallible, Future: Send>
       + Clone
       + Send
       + Sync
       + 'static
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    service.map_request(|request: http::Request<B>| request.map(Body::new))
}
