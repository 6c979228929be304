//! Test helpers for moat.
//!
//! - [`mock`]: a mock LLM upstream speaking OpenAI (`/v1/chat/completions`, `/v1/completions`,
//!   `/v1/responses`, `/v1/embeddings`, `/v1/models`) and Anthropic (`/v1/messages`), streaming
//!   and not. It echoes the last user message, streams in small chunks, injects faults on request
//!   headers, and records what it received. Also a binary: `mock-llm --listen ADDR`.
//! - [`redis`]: starts a private `redis-server` for a test and stops it on drop.
//! - [`corpus`]: varied text for token counting tests and benchmarks.
//!
//! ```no_run
//! # #[tokio::main] async fn main() {
//! use moat_testkit::mock::MockUpstream;
//!
//! let upstream = MockUpstream::start().await.unwrap();
//! println!("mock LLM at {}", upstream.url());
//! // ... send requests through the layer under test ...
//! let seen = upstream.requests();
//! # let _ = seen;
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod corpus;
pub mod mock;
pub mod redis;
