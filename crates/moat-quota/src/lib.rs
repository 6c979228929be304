//! Token and spend budgets for Tower services in front of LLM APIs: reserved before the call,
//! settled from real usage.
//!
//! Peers count usage after the call in fixed windows, so concurrent requests overrun budgets and
//! streamed responses go uncounted. [`QuotaLayer`] reserves before the call instead: the prompt's
//! tokens (exact for OpenAI models with tiktoken, an upper bound otherwise) plus the completion
//! reserve (`max_tokens`, `max_completion_tokens`, `max_output_tokens`, or a default), priced from
//! a [`PriceTable`]. A request must fit every [`Budget`] that applies, per API key, tenant, model or
//! globally, or none is charged. When the response body ends (JSON or streamed, completed, failed
//! or dropped), the reservation is replaced by the real `usage`.
//!
//! ```
//! use moat_core::identity::ApiKey;
//! use moat_quota::{Budget, Period, QuotaLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//! # use bytes::Bytes; use http_body_util::Full;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let quota = QuotaLayer::new(Budget::new("daily-tokens", ApiKey::default(), Period::Day).tokens(1000));
//! let service = ServiceBuilder::new().layer(quota).service_fn(|_req: http::Request<_>| async {
//!     let body = r#"{"choices":[],"usage":{"prompt_tokens":20,"completion_tokens":10,"total_tokens":30}}"#;
//!     Ok::<_, std::convert::Infallible>(
//!         http::Response::builder().header("content-type", "application/json").body(Full::new(Bytes::from(body))).unwrap(),
//!     )
//! });
//! let chat = r#"{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
//! let req = http::Request::post("/v1/chat/completions")
//!     .header("authorization", "Bearer sk-1")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from(chat)))
//!     .unwrap();
//! let res = service.oneshot(req).await.unwrap();
//! assert_eq!(res.headers()["x-moat-quota-budget"], "daily-tokens");
//! # }
//! ```
//!
//! # The bound on overrun
//!
//! Admission never lets reservations plus usage pass a cap. A response can still use more than
//! its reservation only when the completion reserve is smaller than what the model generates (no
//! `max_tokens` in the request and [`QuotaLayer::with_max_tokens_cap`] off), or a non-OpenAI model's
//! prompt is over its byte-length bound (impossible for byte-level BPEs). So with the cap on, usage
//! never passes a budget; with it off, the overrun is at most the sum, over requests in flight at
//! once, of what each generated beyond the reserve.
//!
//! # Streams
//!
//! For OpenAI chat and completions streams, `stream_options.include_usage` is turned on when the
//! client did not ask for it, and the extra usage chunk is removed before it reaches that client.
//! A stream cut short (client gone, upstream failure) is charged the prompt and what was streamed.
//! Reservations of requests that never settle expire ([`QuotaLayer::with_reservation_ttl`]).
//!
//! # Refusals
//!
//! 429 with error type `insufficient_quota`, `x-should-retry: false`, and a message that names the
//! budget and when it resets. A spend budget on a model without a price is a 400
//! (`model_not_priced`) unless the table's [`UnknownModel`] policy prices or frees it.
//!
//! # Observability
//!
//! Counters `moat_quota_{reserved,settled,denied,shadow_denied,alerts}_total{budget}`, the gauge
//! `moat_quota_used_percent{budget}`, `tracing` under `moat::quota`, [`AlertSink`] for thresholds
//! (50/80/100% by default, once per period), and a [`Decision`](moat_core::Decision) per request.

#![forbid(unsafe_code)]

mod alert;
mod budget;
mod money;
mod period;
#[cfg(feature = "redis")]
mod redis;
mod service;
#[cfg(feature = "serde")]
pub mod spec;
mod store;

pub use alert::{AlertSink, BudgetAlert, TracingAlerts};
pub use budget::{Amounts, Budget, Limits};
pub use moat_core::decision::Mode;
pub use money::{ParseUsdError, PerToken, Price, PriceTable, PriceTableError, UnknownModel, Usd};
pub use period::{ParsePeriodError, Period};
#[cfg(feature = "redis")]
pub use redis::{OnStoreError, RedisStore};
pub use service::{BudgetUsage, Quota, QuotaHandle, QuotaLayer, ResponseBody, ResponseFuture};
