//! [`RateLimitLayer`], [`RateLimit`] and their [`ResponseFuture`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use moat_core::body::{RequestBody, ResponseBody as CoreBody};
use moat_core::identity::RequestHead;
use moat_core::kit::LayerOptions;
use moat_core::reject::Protocol;
use moat_core::request::{read_llm_request, LlmBody};
use moat_core::response::Hooks;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::headers::{self, Headers};
use crate::limiter::{Admission, Bindings, BodyFacts, Config, Limiter, States, Verdict, MAX_CELLS};
use crate::rule::Rule;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

moat_core::layer_response_body! {
    /// The response body of [`RateLimit`]: the inner body (or a rejection), watched so token
    /// charges settle and in-flight slots free when it ends.
}

/// Applies rate-limit [`Rule`]s to a service.
///
/// Every service made from this layer and its clones shares one state; builder calls made
/// later, and layers built with [`with_state_from`](Self::with_state_from), share the state of
/// every rule they keep (by name).
#[derive(Debug, Clone)]
#[must_use]
pub struct RateLimitLayer {
    config: Config,
    states: States,
    limiter: OnceLock<Arc<Limiter>>,
}

/// Why a rate-limit configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A rule has more request and token limits than a rule can hold.
    TooManyLimits {
        /// The rule.
        rule: String,
    },
    /// A rule has no limit of any kind.
    NoLimits {
        /// The rule.
        rule: String,
    },
    /// Two rules have one name (a rule's name keys its state).
    DuplicateName {
        /// The name.
        rule: String,
    },
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::TooManyLimits { rule } => {
                write!(
                    f,
                    "rule {rule:?} has more than {MAX_CELLS} request and token limits"
                )
            }
            ConfigError::NoLimits { rule } => write!(f, "rule {rule:?} has no limits"),
            ConfigError::DuplicateName { rule } => {
                write!(f, "two rules are named {rule:?}: names must differ")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

fn check(rule: &Rule) -> Result<(), ConfigError> {
    let cells = rule.limits.len() + rule.tokens.len();
    if cells > MAX_CELLS {
        return Err(ConfigError::TooManyLimits {
            rule: rule.name().to_owned(),
        });
    }
    if cells == 0 && rule.max_in_flight.is_none() {
        return Err(ConfigError::NoLimits {
            rule: rule.name().to_owned(),
        });
    }
    Ok(())
}

impl RateLimitLayer {
    /// A layer enforcing `rule`.
    ///
    /// # Panics
    ///
    /// If the rule has no limits, or more than 8 request and token limits; use
    /// [`try_new`](Self::try_new) to get an error instead.
    pub fn new(rule: Rule) -> Self {
        Self::try_new(rule).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A layer enforcing `rule`, or why the rule is unusable.
    pub fn try_new(rule: Rule) -> Result<Self, ConfigError> {
        check(&rule)?;
        Ok(Self {
            config: Config {
                rules: vec![rule],
                options: LayerOptions::default(),
                headers: Headers::default(),
                completion_reserve: 1024,
                #[cfg(feature = "redis")]
                redis: None,
                spike: None,
            },
            states: States::default(),
            limiter: OnceLock::new(),
        })
    }

    fn map(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.config);
        self.limiter = OnceLock::new();
        self
    }

    fn options_mut(&mut self) -> &mut LayerOptions {
        self.limiter = OnceLock::new();
        &mut self.config.options
    }

    /// The limiter of this configuration, made on first use.
    fn limiter(&self) -> &Arc<Limiter> {
        self.limiter.get_or_init(|| {
            if self.config.rules.iter().any(|r| !r.tokens.is_empty()) {
                // Token rules count exactly: load the tables now, not on the first request.
                moat_core::tokens::preload();
            }
            Arc::new(Limiter::new(self.config.clone(), &self.states))
        })
    }

    /// Adds a rule; a request must pass every rule that applies to it.
    ///
    /// # Panics
    ///
    /// As [`new`](Self::new).
    pub fn rule(self, rule: Rule) -> Self {
        self.try_rule(rule).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Adds a rule, or says why it is unusable.
    pub fn try_rule(self, rule: Rule) -> Result<Self, ConfigError> {
        check(&rule)?;
        if self.config.rules.iter().any(|r| r.name() == rule.name()) {
            return Err(ConfigError::DuplicateName {
                rule: rule.name().to_owned(),
            });
        }
        Ok(self.map(|c| c.rules.push(rule)))
    }

    /// Takes over the state of `previous` (a layer built from an earlier configuration): each
    /// rule of this layer keeps counting where the rule of the same name left off, if its limits
    /// still have the same shape; rules that are gone are forgotten.
    pub fn with_state_from(mut self, previous: &RateLimitLayer) -> Self {
        self.states = previous.states.clone();
        let names: Vec<&str> = self.config.rules.iter().map(Rule::name).collect();
        self.states.retain(&names);
        self.limiter = OnceLock::new();
        self
    }

    /// Which rate-limit headers go on responses (default: OpenAI's).
    pub fn with_headers(self, headers: Headers) -> Self {
        self.map(|c| c.headers = headers)
    }

    /// Tokens reserved for the completion when a request sets no `max_tokens` (default 1024).
    pub fn with_completion_reserve(self, tokens: u64) -> Self {
        self.map(|c| c.completion_reserve = tokens)
    }

    /// Keeps limits in Redis, shared by every process using the same store and rules.
    #[cfg(feature = "redis")]
    pub fn with_redis(self, store: crate::redis::RedisStore) -> Self {
        let store = Arc::new(store);
        self.map(|c| c.redis = Some(store))
    }

    /// Watches every caller for sudden jumps over its own baseline; see [`SpikeGuard`].
    ///
    /// [`SpikeGuard`]: crate::SpikeGuard
    pub fn with_spike_guard(self, guard: crate::SpikeGuard) -> Self {
        self.map(|c| c.spike = Some(guard))
    }

    /// How many keys the rule named `rule` holds in memory now.
    pub fn keys_held(&self, rule: &str) -> usize {
        self.limiter().keys_held(rule)
    }
}

moat_core::layer_options!(RateLimitLayer);

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limiter: self.limiter().clone(),
        }
    }
}

/// A service rate-limited by a [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

impl<S> RateLimit<S> {
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

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pin_project! {
    /// The response future of [`RateLimit`].
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        // Boxed: a refusal is rare and its response large, and the future moves on every poll
        // chain.
        Denied { response: Option<Box<Response<ResponseBody<B>>>> },
        Admitted {
            #[pin]
            future: F,
            hooks: Option<Hooks>,
            bindings: Bindings,
            headers: Headers,
        },
        Deciding { future: BoxFuture<Result<Response<ResponseBody<B>>, E>> },
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture { .. }")
    }
}

/// The admitted response: rate-limit headers on it, its body under the view when this layer
/// watches it.
fn finish<B: Body<Data = Bytes>>(
    mut response: Response<B>,
    hooks: Option<&Hooks>,
    bindings: Bindings,
    which: Headers,
) -> Response<ResponseBody<B>> {
    headers::write(
        which,
        response.headers_mut(),
        bindings.requests,
        bindings.tokens,
    );
    match hooks {
        Some(hooks) => hooks
            .view(response.map(CoreBody::inner))
            .map(ResponseBody::new),
        None => response.map(ResponseBody::passed),
    }
}

fn denied<B>(response: Response<CoreBody<B>>) -> Response<ResponseBody<B>> {
    response.map(ResponseBody::plain)
}

/// Puts the admission (if any) on the request's response hooks, so it settles when the
/// response ends.
fn attach<B>(req: &mut Request<B>, admission: Option<Admission>) -> Option<Hooks> {
    admission.map(|admission| {
        let hooks = Hooks::of(req.extensions_mut());
        hooks.attach(admission);
        hooks
    })
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Denied { response } => {
                Poll::Ready(Ok(*response.take().expect("polled after completion")))
            }
            KindProj::Admitted {
                future,
                hooks,
                bindings,
                headers,
            } => match ready!(future.poll(cx)) {
                Ok(response) => Poll::Ready(Ok(finish(
                    response,
                    hooks.as_ref(),
                    std::mem::take(bindings),
                    *headers,
                ))),
                Err(e) => {
                    if let Some(hooks) = hooks {
                        hooks.fail();
                    }
                    Poll::Ready(Err(e))
                }
            },
            KindProj::Deciding { future } => future.as_mut().poll(cx),
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
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
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let limiter = &self.limiter;
        let caller = limiter.config.options.resolver.resolve(&mut req);
        let which = limiter.config.headers;
        let needs_body = limiter.needs_body_for(&RequestHead::of(&req), &caller);
        if needs_body || limiter.is_shared() {
            let limiter = limiter.clone();
            // Move the ready inner service into the future; keep a fresh clone here.
            let clone = self.inner.clone();
            let mut inner = std::mem::replace(&mut self.inner, clone);
            let future = async move {
                let protocol = Protocol::of(&req);
                let (req, facts) = if needs_body {
                    match read_llm_request(req, limiter.config.options.body_limit).await {
                        Ok(LlmBody::Parsed { request, llm }) => {
                            let input = llm.input_tokens(true).tokens;
                            let facts = llm.with(|r| BodyFacts {
                                model: r.model().map(str::to_owned),
                                input,
                                reserve: r
                                    .max_output_tokens()
                                    .unwrap_or(limiter.config.completion_reserve),
                                is_llm: r.format() != moat_core::llm::WireFormat::Unknown,
                            });
                            (request, Some(facts))
                        }
                        Ok(LlmBody::Unparsed(request)) => (request, Some(BodyFacts::default())),
                        Err(rejection) => {
                            return Ok(denied(
                                rejection.with_layer("ratelimit").into_response(protocol),
                            ))
                        }
                    }
                } else {
                    (req.map(RequestBody::original), None)
                };
                let verdict = limiter
                    .decide_async(&RequestHead::of(&req), &caller, facts.as_ref())
                    .await;
                let (admission, bindings) = match verdict {
                    Verdict::Deny(denial) => {
                        return Ok(denied(limiter.render(denial).into_response(protocol)))
                    }
                    Verdict::Allow {
                        admission,
                        bindings,
                    } => (admission, bindings),
                };
                let mut req = req;
                let hooks = attach(&mut req, admission);
                match inner.call(req).await {
                    Ok(response) => Ok(finish(response, hooks.as_ref(), bindings, which)),
                    Err(e) => {
                        if let Some(hooks) = hooks {
                            hooks.fail();
                        }
                        Err(e)
                    }
                }
            };
            return ResponseFuture {
                kind: Kind::Deciding {
                    future: Box::pin(future),
                },
            };
        }
        let kind = match limiter.decide(&RequestHead::of(&req), &caller, None) {
            Verdict::Deny(denial) => {
                let response = limiter.render(denial).into_response(Protocol::of(&req));
                Kind::Denied {
                    response: Some(Box::new(denied(response))),
                }
            }
            Verdict::Allow {
                admission,
                bindings,
            } => {
                let mut req = req.map(RequestBody::original);
                let hooks = attach(&mut req, admission);
                Kind::Admitted {
                    future: self.inner.call(req),
                    hooks,
                    bindings,
                    headers: which,
                }
            }
        };
        ResponseFuture { kind }
    }
}
