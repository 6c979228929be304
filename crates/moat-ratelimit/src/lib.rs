//! Keyed request, token and concurrency limits for Tower services in front of LLM APIs.
//!
//! [`RateLimitLayer`] applies [`Rule`]s: each keyed by any
//! [`KeyExtractor`](moat_core::KeyExtractor) (API key fingerprint, client IP behind trusted
//! proxies, tenant, model, header, global, or a pair), with any number of request rates
//! ([`Limit`]s, all of which a request must fit), token rates settled from the real `usage`, and
//! a cap on requests in flight. Rules can be restricted to routes, methods, models and caller
//! tiers, and run in shadow mode.
//!
//! ```
//! use moat_core::identity::ApiKey;
//! use moat_ratelimit::{Limit, RateLimitLayer, Rule};
//! use tower::{ServiceBuilder, ServiceExt};
//! # use bytes::Bytes; use http_body_util::Full;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let layer = RateLimitLayer::new(
//!     Rule::new("per-key", ApiKey::default())
//!         .limit(Limit::per_second(10))
//!         .limit("600/minute".parse().unwrap()),
//! );
//! let service = ServiceBuilder::new().layer(layer).service_fn(|_req: http::Request<_>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
//! });
//! let req = http::Request::builder().header("authorization", "Bearer sk-1").body(Full::<Bytes>::default()).unwrap();
//! let res = service.oneshot(req).await.unwrap();
//! assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "9");
//! # }
//! ```
//!
//! # Semantics
//!
//! - Limits are GCRA (see [`Limit`]): capacity comes back continuously, never in window jumps.
//! - Every rule that applies must admit a request, and a denial leaves no rule charged.
//! - A request without what a rule keys by (no API key, say) is keyed by its client IP instead.
//! - Token rates charge an estimate on admission (the prompt counted by
//!   [`moat_core::tokens::estimate_input`] plus `max_tokens`, or the completion reserve) and settle from the response's `usage` when its body ends: a refund
//!   when it used less, debt when it used more. A stream cut short is charged the prompt and
//!   what was streamed. A request that needs more tokens than a limit's burst is refused at
//!   once with `x-should-retry: false`.
//! - In-flight slots are released when the response body ends (or is dropped), not when the
//!   handler returns.
//!
//! # Responses
//!
//! Admitted responses carry OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`
//! (optionally the IETF `RateLimit-Policy` and `RateLimit`; see [`Headers`]). A denial is a 429 with
//! `retry-after` (whole seconds, rounded up, never 0), `retry-after-ms` and OpenAI's error body,
//! type `rate_limit_exceeded`; a gRPC request gets `RESOURCE_EXHAUSTED`.
//!
//! # axum and tonic
//!
//! ```ignore
//! let app = axum::Router::new().route("/v1/chat/completions", post(chat)).layer(layer.clone());
//! tonic::transport::Server::builder().layer(layer).add_service(svc);
//! ```
//!
//! # Observability
//!
//! Counters `moat_ratelimit_{allowed,denied,shadow_denied,near_limit}_total{rule}` (near limit:
//! an admission that left less than 20% of a limit), `tracing` events under `moat::ratelimit`, and
//! a [`Decision`](moat_core::Decision) per rule when an audit handle is present.

#![forbid(unsafe_code)]

mod headers;
mod keyed;
mod limit;
mod limiter;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod rule;
mod service;
#[cfg(feature = "serde")]
pub mod spec;
mod spike;

pub use headers::Headers;
pub use keyed::{Denied, KeyedLimiter};
pub use limit::{Limit, ParseLimitError};

pub use moat_core::decision::Mode;
#[cfg(feature = "redis")]
pub use redis::{OnStoreError, RedisStore};
pub use rule::Rule;
pub use service::{ConfigError, RateLimit, RateLimitLayer, ResponseBody, ResponseFuture};
pub use spike::{Quarantine, SpikeAlert, SpikeAlerts, SpikeGuard};
