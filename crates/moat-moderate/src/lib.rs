//! Output moderation for LLM replies, streamed ones included: a Tower layer that checks every
//! byte of the model's output before the client sees it, in microseconds per chunk.
//!
//! ```
//! use moat_moderate::{ModerateLayer, Policy};
//! use tower::{service_fn, Layer, ServiceExt};
//! # use bytes::Bytes; use http_body_util::{BodyExt, Full}; use std::convert::Infallible;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let guarded = ModerateLayer::new(Policy::new()).layer(service_fn(|_req: http::Request<_>| async {
//!     // The model (or your handler) answers something it should not have.
//!     let reply = r#"{"choices":[{"index":0,"message":{"role":"assistant",
//!         "content":"Listen, you worthless idiot, I will kill you."},"finish_reason":"stop"}]}"#;
//!     Ok::<_, Infallible>(
//!         http::Response::builder()
//!             .header("content-type", "application/json")
//!             .body(Full::new(Bytes::from(reply)))
//!             .unwrap(),
//!     )
//! }));
//! let request = http::Request::post("/v1/chat/completions")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)))
//!     .unwrap();
//! let response = guarded.oneshot(request).await.unwrap();
//! let body = response.into_body().collect().await.unwrap().to_bytes();
//! let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(reply["choices"][0]["finish_reason"], "content_filter");
//! assert_eq!(reply["choices"][0]["message"]["content"], moat_moderate::DEFAULT_MESSAGE);
//! # });
//! ```
//!
//! # What it checks
//!
//! The model's output in OpenAI chat, legacy completions and Responses replies and Anthropic
//! messages, whole or streamed, tool-call arguments included (and, when asked, the prompt), in
//! OpenAI's moderation [`Category`]s, each with its threshold and [`Action`]:
//!
//! - A built-in [`Lexicon`] of words, stems and phrases with a category and a severity, matched
//!   on whole words so "Scunthorpe", "assassin" and "cocktail" never match what they contain;
//!   every word [folded](fold) first against evasion (leetspeak, Cyrillic and Greek lookalikes,
//!   NFKC, invisible characters, censoring stars, repeated letters, spaced-out letters). Your
//!   own words and word rules add to it.
//! - A small learned [`Model`]: logistic regression over hashed word unigrams and bigrams,
//!   trained by `eval/moderate/train.py` on public data and shipped as int8 weights, scored
//!   over a sliding window of words (so a long answer is judged locally, and a stream costs the
//!   same per word as a whole reply). It scores `harassment`, the catch-all for abuse: alone
//!   past a margin, and as the confirmation of a mild word of the lexicon ("stupid", "damn")
//!   in its window. Clinical, identity and violence words are left out of what it learned, so
//!   answers about anatomy, history or the news are not abuse to it.
//! - Optionally an [`External`] moderator: OpenAI's `/v1/moderations` or anything answering its
//!   shape ([`OpenAiModerations`], itself a tower `Service`), under a latency budget, failing
//!   open or closed, with a verdict cache. It judges prompts and whole replies before they are
//!   sent, and streams in windows of [`STREAM_WINDOW_CHARS`] as they flow
//!   ([`ModerateLayer::with_external`]).
//!
//! # Streams
//!
//! Replies are read once, on moat-core's shared [response path](moat_core::response): the
//! layer never decodes a stream again. Each text stream (a choice, a content block, a tool
//! call's arguments) is scanned one word at a time as it arrives ([`Scan`]): nothing is
//! scanned twice, and what the client receives does not depend on how the stream was split
//! (property-tested over every split). The [`StreamMode`]:
//!
//! - `hold_back` (default): text goes out as soon as nothing could still complete a match:
//!   only a word being written that could still become a lexicon entry, a run of spaced-out
//!   letters, or a phrase under way are held ([`MAX_HOLD`] bytes at most). A word the model
//!   flags goes out and the stream ends after it (the model decides once a word is whole).
//! - `buffered`: the whole reply first (what an external moderator needs to judge a stream
//!   before any of it is sent).
//! - `stream_first`: everything goes out as it comes; a block cuts the stream at the word that
//!   decided it, so up to that word (and a phrase under way, at most 256 bytes) may have been
//!   sent.
//!
//! # What it does
//!
//! [`Action::Block`] ends a stream cleanly in the client's protocol (OpenAI: a last chunk with
//! `finish_reason: "content_filter"` and `[DONE]`; Anthropic: an `error` event; Responses:
//! `response.incomplete`), and replaces a whole reply with the policy's message
//! (`finish_reason: "content_filter"`; Anthropic `stop_reason: "refusal"`). The upstream is
//! dropped at the block. [`Action::Mask`] stars the offending words; `Flag` and `Shadow` pass
//! and record. Every moderated reply is a decision in moat-core's
//! [`Decisions`](moat_core::decision::Decisions) for the audit log, counted in
//! `moat_moderate_flags_total{category, action}`.
//!
//! # Customisation
//!
//! ```
//! use moat_moderate::{Action, Category, Classifier, Hit, Lexicon, ModerateLayer, Policy, Severity, StreamMode};
//!
//! let mut lexicon = Lexicon::built_in();
//! lexicon.add("frak~", Hit { category: Category::Harassment, severity: Severity::Strong }).unwrap();
//! let layer = ModerateLayer::new(
//!     Policy::new()
//!         .classifier(Classifier::new().lexicon(lexicon))
//!         .threshold_for(Category::SexualMinors, 0.1)
//!         .action_for(Category::Harassment, Action::Mask)
//!         .stream_mode(StreamMode::HoldBack)
//!         .message("I can't help with that."),
//! )
//! .with_input(true) // also refuse flagged prompts (400 content_filter)
//! // Another policy for some routes, models or tiers: the first scope that admits a request
//! // chooses its policy, the default moderates the rest.
//! .with_policy_for(
//!     moat_core::kit::Scope::new("staff", moat_core::identity::Global).tier("internal"),
//!     Policy::new().action(Action::Flag),
//! );
//! # let _ = layer;
//! ```
//!
//! With the `serde` feature, [`spec::ModerateSpec`] reads the same from a configuration file
//! (the gateway's `[moderate]`, with `[[moderate.policies]]`).
//!
//! # axum and tonic
//!
//! ```
//! # async fn handler() -> &'static str { "" }
//! use axum::{routing::post, Router};
//! use moat_moderate::ModerateLayer;
//!
//! // Inside redaction (so it sees placeholders, not personal data), outside a cache.
//! let app: Router = Router::new()
//!     .route("/v1/chat/completions", post(handler))
//!     .layer(ModerateLayer::default());
//! ```
//!
//! Around a tonic server (`Server::builder().layer(ModerateLayer::default())`) it compiles and
//! passes gRPC calls through untouched: it moderates the JSON and SSE replies of LLM routes
//! (`/v1/chat/completions`, `/v1/completions`, `/v1/responses`, `/v1/messages`).
#![forbid(unsafe_code)]

mod body;
mod category;
mod external;
mod hook;
mod lexicon;
mod model;
mod output;
mod policy;
mod scan;
mod service;
#[cfg(feature = "serde")]
pub mod spec;
mod words;

pub use body::ResponseBody;
pub use category::{Category, ModerationResult, Scores, UnknownCategory};
pub use external::{
    read_results, External, ModerateFuture, Moderator, OpenAiModerations, WINDOW_CHARS,
};
pub use hook::STREAM_WINDOW_CHARS;
pub use lexicon::{Hit, Lexicon, LexiconError, Severity};
pub use moat_core::kit::OnError;
pub use model::{Model, ModelError};
pub use policy::{Action, Classifier, Policy, StreamMode, DEFAULT_MESSAGE, DEFAULT_THRESHOLD};
pub use scan::{check_text, Flag, Scan, MAX_BUFFERED, MAX_HOLD};
pub use service::{Moderate, ModerateLayer, ResponseFuture};
pub use words::{fold, words, Word};
