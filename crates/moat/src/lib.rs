//! Tower middleware that protects AI (LLM) APIs.
//!
//! `moat` is the umbrella crate: it re-exports [`moat_core`] as [`core`], the shared vocabulary
//! every layer is built on, and each protection layer behind its feature:
//!
//! | feature | module | what |
//! |---|---|---|
//! | `ratelimit` | `moat::ratelimit` | keyed request, token and concurrency limits ([`moat_ratelimit`]) |
//! | `quota` | `moat::quota` | token and spend budgets, reserved and settled ([`moat_quota`]) |
//! | `breaker` | `moat::breaker` | circuit breaker, fallback ladder and retry policy for upstream calls ([`moat_breaker`]) |
//! | `redact` | `moat::redact` | PII and secrets replaced before the prompt leaves, restored in replies ([`moat_redact`]) |
//! | `redis` | | limiter state in Redis |
//! | `serde` | | configuration types deserialize with serde |
//! | `axum`, `tonic` | | read the peer address from axum's or tonic's connection info |
//!
//! ```
//! use moat::core::identity::{ApiKey, KeyExtractor};
//!
//! let req = http::Request::builder().header("x-api-key", "sk-123").body(()).unwrap();
//! let key = ApiKey::default().extract_from(&req).unwrap();
//! assert!(key.to_string().starts_with("api_key:"));
//! ```

#![forbid(unsafe_code)]

#[cfg(feature = "breaker")]
pub use moat_breaker as breaker;
pub use moat_core as core;
pub use moat_core::{
    Caller, Decision, Decisions, Key, KeyExtractor, Rejection, RequestBody, ResponseBody,
};
#[cfg(feature = "quota")]
pub use moat_quota as quota;
#[cfg(feature = "ratelimit")]
pub use moat_ratelimit as ratelimit;
#[cfg(feature = "redact")]
pub use moat_redact as redact;
