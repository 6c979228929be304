//! The response view: a reply read once per request, for every layer.
//!
//! The mirror of [`request`](crate::request). Each layer that looks at replies attaches a
//! [`Hook`] to the request's [`Hooks`] before calling its inner service; the first layer to see
//! the response (the innermost) wraps its body in one [`ViewBody`], and every other layer's
//! body passes through. The view then:
//!
//! - decodes a stream (SSE) once per chunk, and reads each event once, with a typed parser that
//!   borrows from the event ([`EventView`]: text and tool-argument deltas per choice, finish
//!   reasons, usage, errors, for OpenAI chat and completions, the Responses API and Anthropic);
//! - hands each event to the hooks in stack order (innermost first), which observe it (usage,
//!   audit) or rewrite it ([`StreamEvent::set_delta`], [`StreamEvent::remove`],
//!   [`StreamEvent::insert_before`], or the whole JSON through [`StreamEvent::edit_json`]);
//! - sends an event no hook changed as its exact bytes, and re-encodes one that was changed;
//! - parses a JSON reply once, for every hook ([`JsonReply`]);
//! - tells every hook, exactly once, how the response ended and what usage it reported
//!   ([`UsageReport`](crate::usage::UsageReport)): at its end, when it fails, when it is dropped,
//!   or, with no response at all, when the inner service failed or the request was dropped.
//!
//! When no hook rewrites, bytes pass through as they arrive and the view reads them on the side;
//! when none reads events, the body is not decoded at all, only watched for its end.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use moat_core::response::{Hook, Hooks, Interest, StreamEvent};
//! use moat_core::usage::UsageReport;
//!
//! /// Upper-cases every streamed text delta.
//! struct Shout;
//!
//! impl Hook for Shout {
//!     fn interest(&self) -> Interest {
//!         Interest::REWRITE
//!     }
//!     fn on_event(&mut self, event: &mut StreamEvent<'_>) {
//!         for i in 0..event.deltas().len() {
//!             let loud = event.deltas()[i].text.to_uppercase();
//!             event.set_delta(i, loud);
//!         }
//!     }
//!     fn on_end(self: Box<Self>, report: &UsageReport) {
//!         assert_eq!(report.usage.unwrap().output_tokens, 2);
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut request = http::Request::new(());
//! Hooks::of(request.extensions_mut()).attach(Shout);
//!
//! // ... the inner service answers ...
//! let stream = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n\
//!               data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n";
//! let response = http::Response::builder()
//!     .header("content-type", "text/event-stream")
//!     .body(Full::new(Bytes::from(stream)))
//!     .unwrap();
//!
//! let response = Hooks::of(request.extensions_mut()).view(response);
//! let bytes = response.into_body().collect().await.unwrap().to_bytes();
//! assert!(std::str::from_utf8(&bytes).unwrap().contains("\"HI\""));
//! # }
//! ```

mod event;
mod pipeline;

pub use event::{text_event, DeltaKind, EventView, StreamKey, TextDelta};
pub use pipeline::{Hook, Hooks, Interest, JsonReply, StreamEvent, ViewBody};
