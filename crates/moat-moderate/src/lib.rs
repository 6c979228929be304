//! Output moderation for LLM replies, streamed ones included: a Tower layer that checks every
//! byte of the model's output before the client sees it, in microseconds per chunk.
#![forbid(unsafe_code)]

mod category;
mod external;
mod hook;
mod lexicon;
mod model;
mod policy;
mod scan;
mod service;
#[cfg(feature = "serde")]
pub mod spec;
mod words;

pub use category::{Category, ModerationResult, Scores, UnknownCategory};
pub use external::{
    read_results, External, ModerateFuture, Moderator, OpenAiModerations, WINDOW_CHARS,
};
pub use lexicon::{Hit, Lexicon, LexiconError, Severity};
pub use moat_core::kit::OnError;
pub use model::{Model, ModelError};
pub use policy::{Action, Classifier, Policy, StreamMode, DEFAULT_MESSAGE, DEFAULT_THRESHOLD};
pub use scan::{check_text, Flag, Scan, MAX_BUFFERED, MAX_HOLD};
pub use service::{Moderate, ModerateLayer, ResponseBody, ResponseFuture};
pub use words::{fold, words, Word};
