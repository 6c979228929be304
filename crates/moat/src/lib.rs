//! Tower middleware that protects AI (LLM) APIs.
//!
//! `moat` is the umbrella crate: it re-exports [`moat_core`] as [`core`], the shared vocabulary
//! every layer is built on, and each protection layer behind its feature:
//!
//! | feature | module | what |
//! |---|---|---|
//! | `audit` | `moat::audit` | a tamper-evident, hash-chained record of every request and decision ([`moat_audit`]) |
//! | `ratelimit` | `moat::ratelimit` | keyed request, token and concurrency limits ([`moat_ratelimit`]) |
//! | `quota` | `moat::quota` | token and spend budgets, reserved and settled ([`moat_quota`]) |
//! | `breaker` | `moat::breaker` | circuit breaker, fallback ladder and retry policy for upstream calls ([`moat_breaker`]) |
//! | `sanitize` | `moat::sanitize` | prompt-injection and jailbreak screening, hidden text, role spoofing, caps ([`moat_sanitize`]) |
//! | `moderate` | `moat::moderate` | the model's output checked before the client sees it, streams included ([`moat_moderate`]) |
//! | `redact` | `moat::redact` | PII and secrets replaced before the prompt leaves, restored in replies ([`moat_redact`]) |
//! | `cache` | `moat::cache` | identical requests answered once, streamed or not, scoped by tenant ([`moat_cache`]) |
//! | `redis` | | limiter state in Redis |
//! | `full` | | every layer, `redis` and `serde` |
//! | `serde` | | configuration types deserialize with serde |
//! | `axum`, `tonic` | | read the peer address from axum's or tonic's connection info |
//!
//! # The recommended stack
//!
//! Outermost first (requests flow down, responses back up), and why in that order:
//!
//! | layer | why here |
//! |---|---|
//! | [`audit`](moat_audit) | outermost, so it records every decision, the refusals of the layers inside it included |
//! | [`ratelimit`](moat_ratelimit) | cheap and before any body is read: a flood is refused for the price of a lookup |
//! | [`quota`](moat_quota) | reserves the estimated tokens and spend before the call; settles from the reply's real usage |
//! | [`sanitize`](moat_sanitize) | screens the raw prompt (before redaction changes it) and refuses an attack before anything is spent on it upstream |
//! | [`redact`](moat_redact) | replaces PII and secrets before the prompt leaves; restores them in the reply |
//! | [`moderate`](moat_moderate) | checks the model's output before the client sees it, streams word by word; it sees placeholders, never the user's raw PII |
//! | [`cache`](moat_cache) | answers identical requests once; keys and stored replies hold placeholders; a hit costs no budget |
//! | [`breaker`](moat_breaker) | innermost, around the provider: fails fast, falls back, retries what is safe |
//!
//! With [`ServiceBuilderExt`] (in the [`prelude`]) the stack reads top to bottom in that order:
//!
//! ```
//! # #[cfg(all(feature = "audit", feature = "ratelimit", feature = "quota", feature = "sanitize", feature = "redact", feature = "moderate", feature = "cache", feature = "breaker"))] {
//! use moat::prelude::*;
//! use moat::audit::TracingSink;
//! use moat::core::identity::ApiKey;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! # use bytes::Bytes; use http_body_util::Full; use std::convert::Infallible;
//!
//! // Records go to `tracing` here; a `FileSink` chains them into a file.
//! let log = AuditLog::builder("moat-audit/example").sink(TracingSink).start().unwrap();
//! let guarded = ServiceBuilder::new()
//!     .moat_audit(AuditLayer::new(log))
//!     .moat_rate_limit(RateLimitLayer::new(
//!         Rule::new("per-key", ApiKey::default()).limit(Limit::per_second(10)),
//!     ))
//!     .moat_quota(QuotaLayer::new(
//!         Budget::new("daily", ApiKey::default(), Period::Day).tokens(200_000),
//!     ))
//!     .moat_sanitize(SanitizeLayer::new(Policy::new()))
//!     .moat_redact(RedactLayer::new(Redactor::new(&Entity::ALL)))
//!     .moat_moderate(ModerateLayer::default())
//!     .moat_cache(CacheLayer::new(MemoryStore::new(256 << 20)))
//!     .moat_circuit_breaker(Breaker::new("provider"))
//!     .service(service_fn(|_req: http::Request<_>| async {
//!         // Your handler, or the client that calls the provider.
//!         Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("{}"))))
//!     }));
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let request = http::Request::post("/v1/chat/completions")
//!     .header("authorization", "Bearer sk-user-1")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#)))
//!     .unwrap();
//! let response = guarded.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 200);
//! # });
//! # }
//! ```
//!
//! # Building on moat-core
//!
//! ```
//! use moat::core::identity::{ApiKey, KeyExtractor};
//!
//! let req = http::Request::builder().header("x-api-key", "sk-123").body(()).unwrap();
//! let key = ApiKey::default().extract_from(&req).unwrap();
//! assert!(key.to_string().starts_with("api_key:"));
//! ```

#![forbid(unsafe_code)]

mod builder;

pub use builder::ServiceBuilderExt;

/// What most users of moat import: the [`ServiceBuilderExt`] methods and each enabled layer's
/// main types.
pub mod prelude {
    pub use crate::ServiceBuilderExt;
    #[cfg(feature = "audit")]
    pub use moat_audit::{AuditLayer, AuditLog, FileSink};
    #[cfg(feature = "breaker")]
    pub use moat_breaker::{Breaker, BreakerConfig, CircuitBreakerLayer, Fallback, Window};
    #[cfg(feature = "cache")]
    pub use moat_cache::{CacheLayer, MemoryStore};
    pub use moat_core::decision::Mode;
    #[cfg(feature = "moderate")]
    pub use moat_moderate::ModerateLayer;
    #[cfg(feature = "quota")]
    pub use moat_quota::{Budget, Period, QuotaLayer};
    #[cfg(feature = "ratelimit")]
    pub use moat_ratelimit::{Limit, RateLimitLayer, Rule};
    #[cfg(feature = "redact")]
    pub use moat_redact::{Entity, RedactLayer, Redactor};
    #[cfg(feature = "sanitize")]
    pub use moat_sanitize::{Action, Policy, SanitizeLayer};
}

#[cfg(feature = "audit")]
pub use moat_audit as audit;
#[cfg(feature = "breaker")]
pub use moat_breaker as breaker;
#[cfg(feature = "cache")]
pub use moat_cache as cache;
pub use moat_core as core;
pub use moat_core::{
    Caller, Decision, Decisions, Key, KeyExtractor, Rejection, RequestBody, ResponseBody,
};
#[cfg(feature = "moderate")]
pub use moat_moderate as moderate;
#[cfg(feature = "quota")]
pub use moat_quota as quota;
#[cfg(feature = "ratelimit")]
pub use moat_ratelimit as ratelimit;
#[cfg(feature = "redact")]
pub use moat_redact as redact;
#[cfg(feature = "sanitize")]
pub use moat_sanitize as sanitize;
