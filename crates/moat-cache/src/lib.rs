//! An exact-match response cache for LLM APIs: identical requests answered once, streamed or
//! not, scoped so nobody reads another tenant's answers.
//!
//! ```
//! use moat_cache::{CacheLayer, MemoryStore};
//! use tower::{service_fn, Layer, ServiceExt};
//! # use bytes::Bytes; use http_body_util::{BodyExt, Full}; use std::convert::Infallible;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let cache = CacheLayer::new(MemoryStore::new(64 << 20));
//! let provider = service_fn(|_req: http::Request<_>| async {
//!     let reply = r#"{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Paris"},"finish_reason":"stop"}]}"#;
//!     let mut response = http::Response::new(Full::new(Bytes::from(reply)));
//!     response.headers_mut().insert("content-type", "application/json".parse().unwrap());
//!     Ok::<_, Infallible>(response)
//! });
//! let service = cache.layer(provider);
//! let ask = || {
//!     let body = r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"Capital of France?"}]}"#;
//!     http::Request::post("/v1/chat/completions")
//!         .header("x-api-key", "sk-someone")
//!         .body(Full::new(Bytes::from(body)))
//!         .unwrap()
//! };
//! let first = service.clone().oneshot(ask()).await.unwrap();
//! assert_eq!(first.headers()["x-moat-cache"], "miss");
//! first.into_body().collect().await.unwrap(); // stored once the reply has ended whole
//! let second = service.oneshot(ask()).await.unwrap();
//! assert_eq!(second.headers()["x-moat-cache"], "hit");
//! # });
//! ```
//!
//! # What is cached
//!
//! - **The key** ([`CacheKey`]) is a SHA-256 of what decides the answer: the request's JSON in
//!   canonical form (member order does not matter) without `stream`, `stream_options`, `user`,
//!   `metadata`, `store` and `service_tier`; the API it went to; and the caller's
//!   [`CacheScope`] (tenant by default), so nobody is given another tenant's answers.
//! - **Only deterministic requests** by default: `temperature` 0, or a `seed` with no
//!   temperature; embeddings always; any request on the routes opted in with
//!   [`CacheLayer::with_route`].
//! - **Only whole, successful replies**: status 200, a JSON reply read whole or a stream that
//!   reached its end marker (`[DONE]`, `message_stop`, `response.completed`), no error event,
//!   no `content_filter` or refusal, at most `max_entry_bytes`. A stream cut short, an error or
//!   a moderated reply is never stored.
//! - **Streamed or not**: a reply is stored in the form it came and replayed in the form asked
//!   for, for every API that streams: OpenAI chat (`chat.completion` and its
//!   `chat.completion.chunk` events, usage when asked, then `[DONE]`), legacy completions, the
//!   Responses API (its `response.*` events) and Anthropic messages (text and tool-use blocks).
//!   The official SDKs read the replayed form as the provider's (`scripts/e2e_sdk.py`).
//! - **Once per key in flight**: concurrent identical misses wait for the first one's reply
//!   (streams included) instead of each calling the provider.
//! - **Headers**: `x-moat-cache: hit | miss | bypass` on every response, `age` on hits; a
//!   request with `x-moat-cache: bypass` or `cache-control: no-store` is neither served nor
//!   stored, `cache-control: no-cache` is not served but its reply is stored.
//! - **Budgets and rates**: a hit is marked as the cache's ([`UsageReport::from_cache`]):
//!   moat's quota and token rates charge it nothing, and the audit log records it (a `cache`
//!   decision, `hit`, `miss` or `bypass`).
//!
//! [`UsageReport::from_cache`]: moat_core::usage::UsageReport::from_cache
//!
//! # Stores
//!
//! [`MemoryStore`] keeps replies in this process, bounded by bytes. With the `redis` feature,
//! [`RedisStore`] (through [`CacheLayer::with_redis`]) shares them between gateways: keys are
//! the hashes above, bodies deflated, every call under a timeout, and a Redis that fails or is
//! slow is a miss (the provider answers), never an error. The memory store stays in front.
//!
//! # Where it goes
//!
//! Innermost, inside redaction: keys and stored replies hold placeholders, never the users'
//! personal data, and the layers outside (budgets, restore, moderation) see a hit as they see
//! a reply. In axum, `Router::layer(cache)` added before (so inside) the other moat layers.

#![forbid(unsafe_code)]

mod entry;
mod key;
#[cfg(feature = "redis")]
mod redis_store;
mod service;
#[cfg(feature = "serde")]
pub mod spec;
mod store;

pub use key::{CacheKey, CacheScope};
#[cfg(feature = "redis")]
pub use redis_store::RedisStore;
pub use service::{CacheLayer, CacheService, ResponseBody, ResponseFuture, X_MOAT_CACHE};
pub use store::MemoryStore;
