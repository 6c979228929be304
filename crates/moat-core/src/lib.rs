//! The shared vocabulary of moat's Tower middleware.
//!
//! Every moat layer builds on these modules, so that all of them agree on who is calling, what
//! the request says, how a refusal looks, and what happened:
//!
//! - [`identity`]: who is calling: [`KeyExtractor`](identity::KeyExtractor)s and the
//!   [`Caller`](identity::Caller) stored in the request extensions.
//! - [`json`]: strict JSON, refusing what parsers read differently (duplicate keys).
//! - [`canonical`]: canonical JSON (RFC 8785), one byte form per value, for what is hashed.
//! - [`llm`]: a view over OpenAI and Anthropic request bodies: text segments with role and
//!   provenance, editable in place; what it does not know is reported, never skipped.
//! - [`request`]: the request read and parsed once per request and shared by every layer, and
//!   the policy for which bodies reach the parser (fail closed on LLM routes).
//! - [`sse`]: an incremental Server-Sent Events decoder.
//! - [`response`]: the reply read once per request for every layer: streamed events as typed,
//!   borrowed views (text deltas, usage, errors), hooks that observe or rewrite them.
//! - [`tokens`]: prompt token counts before the call (tiktoken for OpenAI models, feature
//!   `tiktoken`).
//! - [`usage`]: token usage in every provider's shape, and how a response ended.
//! - [`body`]: capped buffering with typed errors (413, 408, 400), and the bodies layers hand on.
//! - [`reject`]: [`Rejection`](reject::Rejection), rendered as an OpenAI-style JSON error or a
//!   gRPC status.
//! - [`decision`]: the [`Decisions`](decision::Decisions) each layer appends to, for the audit log.
//! - [`clock`]: injectable time.
//! - [`kit`]: what every layer's configuration shares: a [`Scope`](kit::Scope) per rule, budget
//!   or policy, the common [`LayerOptions`](kit::LayerOptions), and states kept by name.
//! - [`text`]: character folding text scanners share (invisible characters, lookalikes,
//!   leetspeak).
//! - [`store`]: the failure policy of shared stores, and (feature `redis`) their Redis connection.
//!
//! # Example
//!
//! A minimal guard written on moat-core: reject chat requests that mention a banned word, with an
//! OpenAI-shaped error.
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use moat_core::body::ResponseBody;
//! use moat_core::request::{read_llm_request, LlmBody};
//! use moat_core::reject::{Protocol, Rejection};
//!
//! async fn guard(req: Request<Full<Bytes>>) -> Response<ResponseBody<Full<Bytes>>> {
//!     let protocol = Protocol::of(&req);
//!     let LlmBody::Parsed { llm, .. } = (match read_llm_request(req, 1 << 20).await {
//!         Ok(parsed) => parsed,
//!         Err(rejection) => return rejection.into_response(protocol),
//!     }) else {
//!         return Response::new(ResponseBody::empty());
//!     };
//!     if llm.with(|r| r.texts().any(|(_, t)| t.contains("forbidden"))) {
//!         return Rejection::new(StatusCode::BAD_REQUEST, "invalid_request_error", "prompt refused")
//!             .into_response(protocol);
//!     }
//!     Response::new(ResponseBody::full(Bytes::from_static(b"ok")))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let body = r#"{"model":"m","messages":[{"role":"user","content":"say forbidden"}]}"#;
//! let req = Request::post("/v1/chat/completions").body(Full::new(Bytes::from(body))).unwrap();
//! let res = guard(req).await;
//! assert_eq!(res.status(), StatusCode::BAD_REQUEST);
//! let bytes = res.into_body().collect().await.unwrap().to_bytes();
//! assert!(std::str::from_utf8(&bytes).unwrap().contains("prompt refused"));
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod body;
pub mod canonical;
pub mod clock;
pub mod decision;
pub mod hex;
pub mod identity;
pub mod json;
pub mod kit;
mod lenient;
pub mod llm;
pub mod reject;
pub mod request;
pub mod response;
pub mod sse;
pub mod store;
pub mod text;
pub mod tokens;
pub mod usage;

mod macros;

/// What the layer macros expand to; not public API.
#[doc(hidden)]
pub mod __private {
    pub use bytes::Bytes;
    pub use http::{Method, Response};
    pub use http_body::{Body, Frame, SizeHint};
    pub use pin_project_lite::pin_project;
}

pub use body::{RequestBody, ResponseBody};
pub use decision::{Decision, Decisions, Mode};
pub use identity::{Caller, Key, KeyExtractor};
pub use reject::Rejection;
