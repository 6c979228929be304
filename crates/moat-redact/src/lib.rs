//! PII and secrets never reach the provider, and users get their values back.
//!
//! [`RedactLayer`] finds personal data and secrets in every text of an OpenAI or Anthropic
//! request (chat, completions, Responses, embeddings, messages; tool-call arguments included),
//! replaces them with `[EMAIL_1]`-style placeholders kept in a [`Vault`] of the request's own,
//! and puts the originals back in the reply: JSON (every string, correctly escaped) and streams
//! (OpenAI chat and completions, Responses, Anthropic), holding back only the longest tail that
//! could still be a placeholder, so the client sees the same bytes however the stream is split.
//!
//! ```
//! use moat_redact::{Entity, RedactLayer, Redactor};
//! use tower::{ServiceBuilder, ServiceExt};
//! # use bytes::Bytes; use http_body_util::{BodyExt, Full};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // An upstream that echoes the prompt, as a model quoting the user would.
//! let upstream = tower::service_fn(|req: http::Request<_>| async move {
//!     let body = http_body_util::BodyExt::collect(req.into_body()).await?.to_bytes();
//!     let prompt: serde_json::Value = serde_json::from_slice(&body)?;
//!     let text = prompt["messages"][0]["content"].as_str().unwrap_or_default().to_owned();
//!     assert_eq!(text, "Mail [EMAIL_1] about card [CARD_1]"); // what the provider sees
//!     let reply = serde_json::json!({"choices": [{"message": {"role": "assistant", "content": text}}]});
//!     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
//!         http::Response::builder()
//!             .header("content-type", "application/json")
//!             .body(Full::new(Bytes::from(reply.to_string())))?,
//!     )
//! });
//! let service = ServiceBuilder::new()
//!     .layer(RedactLayer::new(Redactor::new(&Entity::ALL)))
//!     .service(upstream);
//! let prompt = r#"{"model": "gpt-4o", "messages": [{"role": "user",
//!     "content": "Mail jane@example.com about card 4111 1111 1111 1111"}]}"#;
//! let req = http::Request::post("/v1/chat/completions")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from(prompt)))
//!     .unwrap();
//! let res = service.oneshot(req).await.unwrap();
//! let reply: serde_json::Value = serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
//! assert_eq!(reply["choices"][0]["message"]["content"], "Mail jane@example.com about card 4111 1111 1111 1111");
//! # }
//! ```
//!
//! # Detection
//!
//! [`Detector`] compiles every enabled pattern (see [`Entity`]: emails, phones in international
//! and national formats, cards, IBANs, SSNs, IPv4/IPv6, MACs, wallets, dates of birth, ten
//! national IDs with their checksums, provider API keys, JWTs, private keys, passwords and
//! high-entropy secrets after keywords, and opt-in names) into one byte-level automaton, so text
//! is read once at hundreds of MB/s. Matches are validated (Luhn, mod-97, Verhoeff, check
//! letters, dates) and scored like Presidio: a base score per pattern, raised by a context word
//! just before it ("SIN", "teléfono", "born"); a finding counts when it reaches its entity's
//! threshold. Allow lists (values, or domains for emails) and deny lists (terms always
//! redacted) refine it. Unicode is handled where values carry it: internationalised emails
//! match whole, full-width forms (`０９０－１２３４－５６７８`) are folded before the scan, and names
//! are matched with Unicode classes. `docs/EVALUATION.md` has recall and precision per entity on
//! Faker data in 13 locales.
//!
//! ```
//! use moat_redact::{Detector, Entity, Operator, Redactor};
//!
//! let detector = Detector::new(&Entity::ALL)
//!     .with_threshold(Entity::Phone, 0.7)
//!     .with_allow_list(["example.com", "4242 4242 4242 4242"])
//!     .with_deny_list(["Project Falcon"]);
//! let redactor = Redactor::from(detector)
//!     .with_operator_for(Entity::CreditCard, Operator::Mask)
//!     .with_operator_for(Entity::Custom, Operator::Redact);
//! # let _ = redactor;
//! ```
//!
//! # Operators
//!
//! Per entity ([`Operator`]): placeholders (`[EMAIL_1]`, restorable), redact (`[EMAIL]`), mask
//! (last four kept), keyed hash, AES-256-GCM encryption ([`Cipher`]: restorable by the layer
//! and by whoever holds the key), and realistic fakes.
//!
//! # What is scanned
//!
//! Every text segment the shared parse lists (see [`moat_core::llm`]): messages, instructions,
//! tool calls and results, tool schemas, documents, and the metadata that leaves with a request
//! (`user`, `metadata`, stop sequences, image and file URLs and names). On an LLM route a body is
//! parsed whatever its content type says, and one that does not parse, or names a key twice, is
//! refused ([`moat_core::request`]). Text in places the parser does not know is scanned too, or
//! refused, or passed, by [`RedactLayer::with_unknown`] (default: scanned).
//!
//! # Replies, sessions and other uses
//!
//! - [`RedactLayer::with_reply_side`] also scrubs personal data the model writes that was not in
//!   the prompt, streamed with a bounded carry ([`StreamRedactor`]).
//! - [`RedactLayer::with_sessions`] keeps one vault per conversation ([`Sessions`]: the caller's
//!   tenant plus an `x-moat-conversation` header, bounded and expiring), so a value keeps its
//!   placeholder across turns; tenants never share one.
//! - [`RedactLayer::with_policy_for`] redacts the requests a [`Scope`](moat_core::kit::Scope)
//!   admits (routes, models, tiers) with another [`Redactor`]: a provider under a data
//!   agreement may see emails, another none (the gateway's `[[redact.policies]]`).
//! - [`Redactor::redact_str`] and [`Redactor::redact_json`] serve other uses, such as scrubbing
//!   audit records.
//!
//! # axum and tonic
//!
//! ```ignore
//! let layer = RedactLayer::new(Redactor::new(&Entity::ALL)).with_sessions(Sessions::new());
//! // axum: in front of handlers that call a model, or of a proxy route.
//! let app = axum::Router::new().route("/v1/chat/completions", post(proxy)).layer(layer.clone());
//! // tonic: prompts inside protobuf messages are not JSON, so the layer passes them through
//! // untouched; redact in the handler with `Redactor::redact_str` instead.
//! tonic::transport::Server::builder().layer(layer).add_service(svc);
//! ```
//!
//! # Shadow mode and observability
//!
//! [`RedactLayer::with_mode`]`(Mode::Shadow)` finds and counts but sends prompts unchanged, to
//! see what redaction would do before turning it on. Every value found increments
//! `moat_redact_values_total{entity, mode}`; a request with findings records a `redact`
//! decision (`Rewritten { spans }`, or in shadow mode `Allowed` with the count in its detail).
//! Values never appear in logs or metrics, only their kinds and counts.
//!
//! # Refusals
//!
//! A body over the limit is a 413, malformed JSON a 400 (OpenAI's error shape, or a gRPC status),
//! and a conversation id that is not 1 to 128 visible characters a 400; none reaches the
//! upstream.

#![forbid(unsafe_code)]

mod cipher;
mod detect;
mod entity;
mod fake;
mod patterns;
mod redactor;
mod reply;
mod service;
mod session;
#[cfg(feature = "serde")]
pub mod spec;
mod validate;

pub use cipher::{Cipher, InvalidKey};
pub use detect::{Detector, Finding, DEFAULT_THRESHOLD};
pub use entity::{Entity, UnknownEntity};
pub use redactor::{Operator, Redacted, Redactor, StreamRestorer, Vault, MAX_VAULT_ENTRIES};
pub use reply::{StreamRedactor, MAX_CARRY};
pub use service::{Redact, RedactLayer, ResponseBody, ResponseFuture};
pub use session::{Sessions, SharedVault, CONVERSATION_HEADER, MAX_CONVERSATION_ID};
