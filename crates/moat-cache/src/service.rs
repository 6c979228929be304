//! [`CacheLayer`]: identical requests answered once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AGE, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body::Body;
use moat_core::body::{RequestBody, ResponseBody as CoreBody, DEFAULT_BODY_LIMIT};
use moat_core::clock::{self, SharedClock};
use moat_core::decision::{Decision, Decisions, Outcome};
use moat_core::identity::CallerResolver;
use moat_core::kit::route_matches;
use moat_core::llm::WireFormat;
use moat_core::reject::Protocol;
use moat_core::request::{read_llm_request, LlmBody};
use moat_core::response::{Hook, Hooks, Interest, JsonReply, StreamEvent};
use moat_core::usage::{BodyOutcome, UsageReport};
use serde_json::Value;
use tokio::sync::watch;
use tower_layer::Layer;
use tower_service::Service;

use crate::entry::Entry;
use crate::key::{deterministic, CacheKey, CacheScope};
use crate::store::MemoryStore;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The header that says what the cache did (`hit`, `miss`, `bypass`), and that a client sets
/// to `bypass` to skip it.
pub static X_MOAT_CACHE: HeaderName = HeaderName::from_static("x-moat-cache");

/// The requests waiting for a reply being made: each key's leader holds the sender.
type InFlight = Arc<Mutex<HashMap<CacheKey, watch::Receiver<bool>>>>;

/// Caches replies in a [`MemoryStore`]. Clones share the store and the requests in flight.
#[derive(Debug, Clone)]
#[must_use]
pub struct CacheLayer {
    store: MemoryStore,
    #[cfg(feature = "redis")]
    redis: Option<crate::redis_store::RedisStore>,
    in_flight: InFlight,
    ttl: Duration,
    max_entry_bytes: usize,
    scope: CacheScope,
    only_deterministic: bool,
    routes: Vec<String>,
    clock: SharedClock,
    resolver: CallerResolver,
    body_limit: usize,
    coalesce_wait: Duration,
}

impl CacheLayer {
    /// Caches in `store` for an hour, entries up to 1 MiB, scoped by tenant, deterministic
    /// requests only.
    pub fn new(store: MemoryStore) -> Self {
        Self {
            store,
            #[cfg(feature = "redis")]
            redis: None,
            in_flight: InFlight::default(),
            ttl: Duration::from_secs(3600),
            max_entry_bytes: 1 << 20,
            scope: CacheScope::Tenant,
            only_deterministic: true,
            routes: Vec::new(),
            clock: clock::system(),
            resolver: CallerResolver::default(),
            body_limit: DEFAULT_BODY_LIMIT,
            coalesce_wait: Duration::from_secs(30),
        }
    }

    /// The store.
    pub fn store(&self) -> &MemoryStore {
        &self.store
    }

    /// Also keeps replies in Redis, for every gateway that shares it (feature `redis`); the
    /// memory store stays in front of it.
    #[cfg(feature = "redis")]
    pub fn with_redis(mut self, redis: crate::redis_store::RedisStore) -> Self {
        self.redis = Some(redis);
        self
    }

    /// How long a reply is served.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The largest reply stored (a larger one is passed on and not kept).
    pub fn with_max_entry_bytes(mut self, bytes: usize) -> Self {
        self.max_entry_bytes = bytes;
        self
    }

    /// Whose replies a caller may be given (default: its tenant's).
    pub fn with_scope(mut self, scope: CacheScope) -> Self {
        self.scope = scope;
        self
    }

    /// Whether only deterministic requests are cached (default yes): `temperature` 0, or a
    /// `seed` without a temperature; embeddings always.
    pub fn with_only_deterministic(mut self, only: bool) -> Self {
        self.only_deterministic = only;
        self
    }

    /// Caches every request on routes matching `route` (e.g. `/v1/embeddings`, `/v1/chat/*`),
    /// deterministic or not.
    pub fn with_route(mut self, route: impl Into<String>) -> Self {
        self.routes.push(route.into());
        self
    }

    /// How long an identical request waits for the reply a request in flight is making before
    /// it calls the upstream itself (default 30 s: a follower of a long stream does not wait for
    /// all of it).
    pub fn with_coalesce_wait(mut self, wait: Duration) -> Self {
        self.coalesce_wait = wait;
        self
    }

    /// The clock entries age by.
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// How callers are identified, for the scope (share the stack's resolver).
    pub fn with_caller_resolver(mut self, resolver: CallerResolver) -> Self {
        self.resolver = resolver;
        self
    }

    /// The largest request body read (default 4 MiB; 413 past it).
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Takes over `previous`'s stored replies and requests in flight when its store has the
    /// same size (a reload that keeps the cache's size keeps what it holds; keys and entries
    /// are the same whatever else changed, since a reply is only served to a request that
    /// hashes the same).
    pub fn with_state_from(mut self, previous: &CacheLayer) -> Self {
        if previous.store.max_bytes() == self.store.max_bytes() {
            self.store = previous.store.clone();
            self.in_flight = previous.in_flight.clone();
        }
        self
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = CacheService<S>;

    fn layer(&self, inner: S) -> CacheService<S> {
        CacheService {
            inner,
            layer: Arc::new(self.clone()),
        }
    }
}

/// A service whose identical requests are answered once.
#[derive(Debug, Clone)]
pub struct CacheService<S> {
    inner: S,
    // Shared: a service is cloned for every request (and with every layer around it).
    layer: Arc<CacheLayer>,
}

impl<S> CacheService<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

moat_core::layer_response_body! {
    /// The response body of [`CacheService`]: the inner service's, or a stored reply.
}

moat_core::layer_response_future! {
    /// The response future of [`CacheService`].
}

/// What the request's headers allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Allowed {
    read: bool,
    write: bool,
}

fn allowed(headers: &HeaderMap) -> Allowed {
    let bypass = headers
        .get(&X_MOAT_CACHE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"bypass"));
    let directives: Vec<String> = headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .collect();
    let has = |name: &str| directives.iter().any(|d| d == name);
    Allowed {
        read: !bypass && !has("no-cache") && !has("no-store"),
        write: !bypass && !has("no-store"),
    }
}

fn labelled<B>(mut response: Response<B>, what: &'static str) -> Response<B> {
    response
        .headers_mut()
        .insert(X_MOAT_CACHE.clone(), HeaderValue::from_static(what));
    response
}

fn record(extensions: &http::Extensions, what: &'static str) {
    metrics::counter!("moat_cache_requests_total", "result" => what).increment(1);
    Decisions::record(
        extensions,
        Decision::new("cache", Outcome::Allowed).with_rule(what),
    );
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CacheService<S>
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
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = Arc::clone(&self.layer);
        let future = async move {
            let protocol = Protocol::of(&req);
            let allowed = allowed(req.headers());
            // Requests the cache does not answer leave the block and are passed on after it
            // (bypassed: labelled so): awaited inside a `match` arm, the matched value would
            // be held in the future.
            let (passed, bypassed) = 'cached: {
                let (mut req, llm) = match read_llm_request(req, layer.body_limit).await {
                    Ok(LlmBody::Parsed { request, llm }) => (request, llm),
                    Ok(LlmBody::Unparsed(request)) => break 'cached (request, false),
                    Err(rejection) => {
                        let response = rejection.with_layer("cache").into_response(protocol);
                        return Ok(response.map(ResponseBody::plain));
                    }
                };
                let caller = layer.resolver.resolve(&mut req);
                let path = req.uri().path().to_owned();
                let plan = llm.with(|r| {
                    let cacheable = r.format() != WireFormat::Unknown
                        && (layer.routes.iter().any(|route| route_matches(route, &path))
                            || !layer.only_deterministic
                            || deterministic(r));
                    let scope = layer.scope.of(&caller)?;
                    cacheable.then(|| {
                        (
                            CacheKey::of(r, &scope),
                            r.stream(),
                            r.include_usage(),
                            r.format(),
                        )
                    })
                });
                let Some((key, sse, include_usage, format)) =
                    plan.filter(|_| allowed.read || allowed.write)
                else {
                    record(req.extensions(), "bypass");
                    break 'cached (req, true);
                };

                // A reply in the store, or one a request in flight is making.
                let mut leader = None;
                if allowed.read {
                    if let Some(hit) = layer.lookup(&key, sse, include_usage).await {
                        return Ok(layer.replay(&mut req, hit));
                    }
                    let waiting = {
                        let mut in_flight = layer
                            .in_flight
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        match in_flight.get(&key) {
                            Some(rx) => Some(rx.clone()),
                            None if allowed.write => {
                                let (tx, rx) = watch::channel(false);
                                in_flight.insert(key, rx);
                                leader = Some(Leader {
                                    key,
                                    in_flight: layer.in_flight.clone(),
                                    done: tx,
                                });
                                None
                            }
                            None => None,
                        }
                    };
                    if let Some(mut rx) = waiting {
                        // The leader's reply, once it ended (stored or not), or the upstream after
                        // the longest wait.
                        let _ =
                            tokio::time::timeout(layer.coalesce_wait, rx.wait_for(|done| *done))
                                .await;
                        if let Some(hit) = layer.lookup(&key, sse, include_usage).await {
                            return Ok(layer.replay(&mut req, hit));
                        }
                    }
                }

                record(req.extensions(), "miss");
                let hooks = allowed.write.then(|| {
                    let hooks = Hooks::of(req.extensions_mut());
                    hooks.attach(Capture {
                        key,
                        format,
                        store: layer.store.clone(),
                        #[cfg(feature = "redis")]
                        redis: layer.redis.clone(),
                        #[cfg(feature = "redis")]
                        ttl: layer.ttl,
                        clock: layer.clock.clone(),
                        max: layer.max_entry_bytes,
                        body: Vec::new(),
                        sse: false,
                        complete: false,
                        spoiled: false,
                        _leader: leader,
                    });
                    hooks
                });
                let response = Hooks::serve(hooks, inner.call(req)).await?;
                return Ok(labelled(response.map(ResponseBody::new), "miss"));
            };
            let response = inner.call(passed).await?.map(ResponseBody::passed);
            Ok(if bypassed {
                labelled(response, "bypass")
            } else {
                response
            })
        };
        ResponseFuture::new(future)
    }
}

/// A stored reply found for a request, in the form it asked for.
struct Hit {
    body: Bytes,
    sse: bool,
    age: Duration,
}

impl CacheLayer {
    /// The reply stored under `key` in the form asked for: from memory, else from Redis (then
    /// kept in memory too). A store that fails is a miss.
    async fn lookup(&self, key: &CacheKey, sse: bool, include_usage: bool) -> Option<Hit> {
        let now = self.clock.now();
        if let Some(entry) = self.store.get(key, now, self.ttl) {
            return Some(Hit {
                body: entry.body_as(sse, include_usage)?,
                sse,
                age: now.saturating_sub(entry.stored),
            });
        }
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            // Boxed: the Redis read's state would otherwise make every request's future
            // (memory-only ones included) larger.
            return Box::pin(self.lookup_in_redis(redis, key, sse, include_usage, now)).await;
        }
        None
    }

    /// [`lookup`](Self::lookup)'s second place: Redis, keeping what it finds in memory too.
    #[cfg(feature = "redis")]
    async fn lookup_in_redis(
        &self,
        redis: &crate::redis_store::RedisStore,
        key: &CacheKey,
        sse: bool,
        include_usage: bool,
        now: Duration,
    ) -> Option<Hit> {
        match redis.get(key).await {
            Ok(Some((mut entry, age))) if age < self.ttl => {
                entry.stored = now.saturating_sub(age);
                let body = entry.body_as(sse, include_usage);
                self.store.insert(*key, entry);
                body.map(|body| Hit { body, sse, age })
            }
            Ok(_) => None,
            Err(error) => {
                metrics::counter!("moat_cache_store_errors_total").increment(1);
                tracing::warn!(target: "moat::cache", %error, "redis lookup failed: served by the upstream");
                None
            }
        }
    }

    /// The stored reply as this request's response, through the hooks of the layers outside
    /// (marked as the cache's, so budgets and token rates charge nothing).
    fn replay<ReqBody, ResBody: Body<Data = Bytes>>(
        &self,
        req: &mut Request<ReqBody>,
        hit: Hit,
    ) -> Response<ResponseBody<ResBody>> {
        record(req.extensions(), "hit");
        let content_type = if hit.sse {
            "text/event-stream"
        } else {
            "application/json"
        };
        let mut response = Response::new(CoreBody::full(hit.body));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(AGE, HeaderValue::from(hit.age.as_secs()));
        let response = labelled(response, "hit");
        let hooks = Hooks::of(req.extensions_mut());
        hooks.mark_from_cache();
        hooks.view(response).map(ResponseBody::new)
    }
}

/// The first of identical concurrent misses: when its reply ends (stored or not), the others
/// stop waiting.
struct Leader {
    key: CacheKey,
    in_flight: InFlight,
    done: watch::Sender<bool>,
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
        self.done.send_replace(true);
    }
}

/// Keeps a copy of a reply as it passes, and stores it if it ends whole and well.
struct Capture {
    key: CacheKey,
    format: WireFormat,
    store: MemoryStore,
    #[cfg(feature = "redis")]
    redis: Option<crate::redis_store::RedisStore>,
    #[cfg(feature = "redis")]
    ttl: Duration,
    clock: SharedClock,
    max: usize,
    body: Vec<u8>,
    sse: bool,
    /// The reply reached its end marker (or, for JSON, was read whole).
    complete: bool,
    /// An error, a filtered reply, or more than `max` bytes: never stored.
    spoiled: bool,
    _leader: Option<Leader>,
}

impl Capture {
    fn keep(&mut self, bytes: &[u8]) {
        if self.body.len() + bytes.len() > self.max {
            self.spoiled = true;
            self.body = Vec::new();
        } else if !self.spoiled {
            self.body.extend_from_slice(bytes);
        }
    }
}

/// A finish or stop reason that means the reply was cut or filtered.
fn filtered(reason: &str) -> bool {
    matches!(reason, "content_filter" | "refusal")
}

impl Hook for Capture {
    fn interest(&self) -> Interest {
        Interest::OBSERVE
    }

    fn on_event(&mut self, event: &mut StreamEvent<'_>) {
        self.sse = true;
        let view = event.view();
        if view.error().is_some() || view.finish_reasons().any(|(_, r)| filtered(r)) {
            self.spoiled = true;
        }
        if event.is_done() || matches!(view.kind(), Some("message_stop" | "response.completed")) {
            self.complete = true;
        }
        let raw = event.sse().raw().clone();
        self.keep(&raw);
    }

    fn on_json(&mut self, reply: &mut JsonReply<'_>) {
        let bytes = reply.bytes().to_vec();
        let spoiled = reply.value().is_none_or(|v| {
            v.get("error").is_some_and(|e| !e.is_null())
                || v.pointer("/choices")
                    .and_then(Value::as_array)
                    .is_some_and(|choices| {
                        choices.iter().any(|c| {
                            c.get("finish_reason")
                                .and_then(Value::as_str)
                                .is_some_and(filtered)
                        })
                    })
                || v.get("stop_reason")
                    .and_then(Value::as_str)
                    .is_some_and(filtered)
        });
        self.spoiled |= spoiled;
        self.complete = true;
        self.keep(&bytes);
    }

    fn on_end(self: Box<Self>, report: &UsageReport) {
        let whole = report.outcome == BodyOutcome::Completed
            && report.status == 200
            && !report.from_cache
            && self.complete
            && !self.spoiled;
        if whole {
            let entry = Entry {
                body: Bytes::from(self.body),
                sse: self.sse,
                format: self.format,
                stored: self.clock.now(),
            };
            #[cfg(feature = "redis")]
            if let (Some(redis), Ok(runtime)) =
                (self.redis.clone(), tokio::runtime::Handle::try_current())
            {
                let (key, entry, ttl) = (self.key, entry.clone(), self.ttl);
                runtime.spawn(async move {
                    if let Err(error) = redis.insert(&key, &entry, ttl).await {
                        metrics::counter!("moat_cache_store_errors_total").increment(1);
                        tracing::warn!(target: "moat::cache", %error, "could not store a reply in redis");
                    }
                });
            }
            self.store.insert(self.key, entry);
            metrics::counter!("moat_cache_stored_total").increment(1);
        }
        // `_leader` drops here, after the store: whoever waited finds the reply.
    }
}
