//! Tower middleware that protects AI (LLM) APIs.
//!
//! `moat` is the umbrella crate: it re-exports [`moat_core`], the shared vocabulary every layer is
//! built on, and gains one feature per protection layer as the layers land.
//!
//! ```
//! use moat::core::identity::{ApiKey, KeyExtractor};
//!
//! let req = http::Request::builder().header("x-api-key", "sk-123").body(()).unwrap();
//! let key = ApiKey::default().extract_from(&req).unwrap();
//! assert!(key.to_string().starts_with("api_key:"));
//! ```

#![forbid(unsafe_code)]

pub use moat_core as core;
pub use moat_core::{
    Caller, Decision, Decisions, Key, KeyExtractor, Rejection, RequestBody, ResponseBody,
};
