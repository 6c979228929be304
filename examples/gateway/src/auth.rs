//! Authentication: virtual keys in, a [`Caller`] out.
//!
//! With `[[keys]]`, only known keys pass (401 otherwise) and the key's `Caller` (id, tenant,
//! tier, the key's fingerprint) goes into the request extensions for every layer inside; without,
//! every caller is anonymous and known by IP. Either way the caller resolver runs here, once.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::response::Response;
use http::Request;
use moat::core::decision::{Decision, Decisions, Outcome};
use moat::core::identity::{presented_api_key, CallerResolver};
use moat::core::reject::{Protocol, Rejection};
use moat::Caller;
use pin_project_lite::pin_project;
use sha2::{Digest, Sha256};
use tower::{BoxError, Layer, Service};

use crate::config::ResolvedKey;

/// Virtual keys by SHA-256, and how to describe callers.
#[derive(Debug)]
struct Keys {
    by_digest: HashMap<[u8; 32], Entry>,
    resolver: CallerResolver,
}

/// One virtual key: who it is, until when, and what it may call.
#[derive(Debug)]
struct Entry {
    caller: Caller,
    expires: Option<jiff::Timestamp>,
    routes: Vec<String>,
    models: Option<ModelScope>,
}

/// The models a request's key may use, for the stage that reads the body to check.
#[derive(Debug, Clone)]
pub(crate) struct ModelScope(pub(crate) Arc<[String]>);

/// Checks virtual keys; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct AuthenticateLayer {
    keys: Arc<Keys>,
}

impl AuthenticateLayer {
    /// Accepts `keys` (none: everyone, anonymously) and describes callers with `resolver`.
    pub fn new(keys: &[ResolvedKey], resolver: CallerResolver) -> Self {
        let by_digest = keys
            .iter()
            .map(|k| {
                let mut caller = Caller::new().with_id(k.entry.id.as_str());
                if let Some(tenant) = &k.entry.tenant {
                    caller = caller.with_tenant(tenant.as_str());
                }
                if let Some(tier) = &k.entry.tier {
                    caller = caller.with_tier(tier.as_str());
                }
                let entry = Entry {
                    caller,
                    expires: k.expires,
                    routes: k.entry.routes.clone(),
                    models: (!k.entry.models.is_empty())
                        .then(|| ModelScope(k.entry.models.clone().into())),
                };
                (k.sha256, entry)
            })
            .collect();
        Self {
            keys: Arc::new(Keys {
                by_digest,
                resolver,
            }),
        }
    }
}

impl<S> Layer<S> for AuthenticateLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            keys: self.keys.clone(),
        }
    }
}

/// The service of [`AuthenticateLayer`].
#[derive(Debug, Clone)]
pub struct Authenticate<S> {
    inner: S,
    keys: Arc<Keys>,
}

impl Keys {
    /// The caller a request's key belongs to (and the models it may use), or why it is
    /// refused.
    fn caller<B>(&self, request: &Request<B>) -> Result<(Caller, Option<ModelScope>), Rejection> {
        let Some(presented) = presented_api_key(request.headers()) else {
            let message = if crate::proxy::has_query_credential(request.uri()) {
                "An API key in the URL is not accepted (URLs end up in logs). Send it as `Authorization: Bearer KEY` or `x-api-key: KEY`."
            } else {
                "You didn't provide an API key. Send it as `Authorization: Bearer KEY` or `x-api-key: KEY`."
            };
            return Err(Rejection::unauthorized(message).with_code("missing_api_key"));
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let entry = self
            .by_digest
            .get(&digest)
            .ok_or_else(|| Rejection::unauthorized("Incorrect API key provided."))?;
        if let Some(expires) = entry.expires {
            if jiff::Timestamp::now() >= expires {
                return Err(Rejection::unauthorized(format!(
                    "This API key expired at {expires}. Ask for a new key."
                ))
                .with_code("expired_api_key"));
            }
        }
        let path = request.uri().path();
        if !entry.routes.is_empty()
            && !entry
                .routes
                .iter()
                .any(|r| moat::core::kit::route_matches(r, path))
        {
            return Err(Rejection::new(
                http::StatusCode::FORBIDDEN,
                "invalid_request_error",
                format!(
                    "This API key may not call {path}; it may call {}.",
                    entry.routes.join(", ")
                ),
            )
            .with_code("route_not_allowed"));
        }
        let caller = entry.caller.clone().with_api_key(
            self.resolver
                .fingerprinter()
                .fingerprint(presented.as_bytes()),
        );
        Ok((caller, entry.models.clone()))
    }
}

impl<S, B, ResBody> Service<Request<B>> for Authenticate<S>
where
    S: Service<Request<B>, Response = http::Response<ResBody>>,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if !self.keys.by_digest.is_empty() {
            match self.keys.caller(&request) {
                Ok((caller, models)) => {
                    request.extensions_mut().insert(caller);
                    if let Some(models) = models {
                        request.extensions_mut().insert(models);
                    }
                }
                Err(rejection) => {
                    Decisions::record(
                        request.extensions(),
                        Decision::new(
                            "authenticate",
                            Outcome::Rejected {
                                status: rejection.status().as_u16(),
                                code: rejection.code().unwrap_or_default().to_owned().into(),
                            },
                        ),
                    );
                    let response = crate::reject(rejection, Protocol::of(&request));
                    return ResponseFuture {
                        kind: Kind::Rejected {
                            response: Some(response),
                        },
                    };
                }
            }
        }
        self.keys.resolver.resolve(&mut request);
        // For the request's log line, outside this layer.
        let caller = crate::observe::logging()
            .then(|| request.extensions().get::<Caller>().cloned())
            .flatten();
        ResponseFuture {
            kind: Kind::Inner {
                future: self.inner.call(request),
                caller,
            },
        }
    }
}

pin_project! {
    /// The response future of [`Authenticate`].
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Inner { #[pin] future: F, caller: Option<Caller> },
        Rejected { response: Option<Response> },
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, E, ResBody> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            // axum's body: the one box a response gets (none if it is one already).
            KindProj::Inner { future, caller } => future.poll(cx).map(|result| {
                result.map(|response| {
                    let mut response = response.map(axum::body::Body::new);
                    if let Some(caller) = caller.take() {
                        response.extensions_mut().insert(caller);
                    }
                    response
                })
            }),
            KindProj::Rejected { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
    }
}
