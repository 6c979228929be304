//! A circuit breaker, a fallback ladder and a retry policy for Tower services that call LLM
//! providers.
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use moat_breaker::{Breaker, BreakerConfig, CircuitBreakerLayer, State};
//! use std::convert::Infallible;
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let breaker = Breaker::builder("openai")
//!     .config(
//!         BreakerConfig::default()
//!             .with_minimum_calls(2)
//!             .with_window(moat_breaker::Window::Count(2))
//!             .with_jitter(0.0),
//!     )
//!     .build()
//!     .unwrap();
//! let upstream = service_fn(|_req: Request<Full<Bytes>>| async {
//!     let mut response = Response::new(Full::new(Bytes::from("overloaded")));
//!     *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
//!     Ok::<_, Infallible>(response)
//! });
//! let service = CircuitBreakerLayer::new(breaker.clone()).layer(upstream);
//!
//! for _ in 0..2 {
//!     let response = service.clone().oneshot(Request::new(Full::default())).await.unwrap();
//!     assert_eq!(response.status(), 503);
//!     drop(response); // the outcome is recorded when the body ends or is dropped
//! }
//! assert_eq!(breaker.state(), State::Open);
//! // Open: refused at once, without calling the upstream.
//! let refused = service.oneshot(Request::new(Full::default())).await.unwrap();
//! assert_eq!(refused.headers()["retry-after"], "30");
//! # }
//! ```
//!
//! # What it does
//!
//! - [`Breaker`]: closed, open, half-open, and the operator states (disabled, forced open,
//!   metrics only, reset) through a cloneable handle. Count or time windows that really slide,
//!   a minimum number of calls, failure-rate and slow-call-rate thresholds, a
//!   consecutive-failure trip. Half-open admits exactly the configured trial calls, also
//!   under concurrency; a trial dropped without a result gives its slot back; a maximum wait
//!   keeps half-open from getting stuck. Open periods grow with jitter, and last at least as
//!   long as the failing upstream's `retry-after`. The closed path takes no lock.
//! - [`CircuitBreakerLayer`]: the breaker around a service. Refusals are responses (503 with
//!   `retry-after`, or gRPC `UNAVAILABLE`), never `poll_ready` errors. Outcomes are counted
//!   when the response body ends; what counts is decided by a [`Classify`]
//!   ([`LlmClassifier`] by default: 5xx and 529 fail, a 429 leaves the upstream alone until
//!   its `retry-after` without counting against its health, 401/403 are the key's, other 4xx
//!   the client's). A streamed reply is held until its first event: an error event, a stream
//!   that breaks or stalls before it (`first_token_timeout`) is a failure decided before any
//!   header reaches the client. A client that goes away is not counted.
//! - [`Breakers`]: a breaker per key (model, deployment, API key) in a bounded map that never
//!   evicts an open or half-open breaker.
//! - [`Fallback`]: a ladder of targets, each behind its own breaker: when one is open or fails
//!   before its first byte, the request goes to the next, down to a static response or a 503.
//!   `x-moat-fallback` names the target that served.
//! - [`RetryPolicy`]: a [`tower::retry::Policy`] with jittered exponential backoff that
//!   honours `retry-after`, a retry budget, and retries only what is safe: never after the
//!   first streamed byte.
//! - Events to subscribers ([`BreakerBuilder::on_event`]), decisions through moat-core's
//!   [`Decisions`](moat_core::decision::Decisions) (for the audit log), and metrics
//!   (`moat_breaker_*`, see the `metrics` facade).
//!
//! # Customisation
//!
//! ```
//! use moat_breaker::{Breaker, BreakerConfig, CircuitBreakerLayer, Verdict, Window};
//! use std::time::Duration;
//!
//! let breaker = Breaker::builder("anthropic")
//!     .config(
//!         BreakerConfig::default()
//!             .with_window(Window::Time(Duration::from_secs(30)))
//!             .with_failure_rate(0.25)
//!             .with_slow_call(Duration::from_secs(20))
//!             .with_slow_call_rate(0.8)
//!             .with_first_token_timeout(Duration::from_secs(15))
//!             .with_open_for(Duration::from_secs(5)),
//!     )
//!     .on_event(|event| tracing::warn!(?event, "breaker"))
//!     .build()
//!     .unwrap();
//! // Count 404s as failures too (a misrouted deployment).
//! let layer = CircuitBreakerLayer::new(breaker.clone()).with_classifier(|status: http::StatusCode, _: &http::HeaderMap| {
//!     match status.as_u16() {
//!         404 | 500..=599 => Verdict::Failure,
//!         429 => Verdict::RateLimited,
//!         400..=499 => Verdict::Ignored,
//!         _ => Verdict::Success,
//!     }
//! });
//! // Operators: force it open during maintenance, then back.
//! breaker.force_open();
//! breaker.reset();
//! # let _ = layer;
//! ```
//!
//! # With axum
//!
//! Put the layer around the client that calls the provider, or around the handler that does:
//!
//! ```
//! use axum::{routing::post, Router};
//! use moat_breaker::{Breaker, CircuitBreakerLayer};
//!
//! async fn chat() -> &'static str { "..." }
//!
//! let app: Router = Router::new()
//!     .route("/v1/chat/completions", post(chat))
//!     .layer(CircuitBreakerLayer::new(Breaker::new("chat")));
//! ```
//!
//! # With tonic
//!
//! Refusals of gRPC requests (`content-type: application/grpc`) are trailers-only
//! `UNAVAILABLE` (or `RESOURCE_EXHAUSTED` for a rate-limited upstream), so a tonic client sees
//! a proper status:
//!
//! ```ignore
//! tonic::transport::Server::builder()
//!     .layer(CircuitBreakerLayer::new(Breaker::new("inference")))
//!     .add_service(InferenceServer::new(service))
//!     .serve(addr)
//!     .await?;
//! ```

#![forbid(unsafe_code)]

mod breaker;
mod classify;
mod config;
mod fallback;
mod keyed;
mod metrics;
mod retry;
mod service;
mod sync;
mod window;

pub use breaker::{
    Breaker, BreakerBuilder, BreakerEvent, CallOutcome, OwnedPermit, Permit, Refusal, Snapshot,
    State,
};
pub use classify::{retry_after, Classify, LlmClassifier, Verdict};
pub use config::{
    BreakerConfig, ConfigError, Window, MAX_COUNT_WINDOW, MAX_HALF_OPEN_CALLS, MAX_TIME_WINDOW,
};
pub use fallback::{Fallback, FALLBACK_HEADER};
pub use keyed::{Breakers, BreakersBuilder};
pub use retry::{retryable, Backoff, RetryPolicy};
pub use service::{
    CircuitBreaker, CircuitBreakerLayer, Reason, ResponseBody, ResponseFuture, Unavailable,
};
