//! Output moderation for LLM replies, streamed ones included: a Tower layer that checks every
//! byte of the model's output before the client sees it, in microseconds per chunk.
#![forbid(unsafe_code)]

mod category;
mod hook;
mod lexicon;
mod model;
mod policy;
mod scan;
mod service;
mod words;

pub use category::{Category, ModerationResult, Scores, UnknownCategory};
pub use lexicon::{Hit, Lexicon, LexiconError, Severity};
pub use model::{Model, ModelError};
pub use policy::{Action, Classifier, Policy, StreamMode, DEFAULT_MESSAGE, DEFAULT_THRESHOLD};
pub use scan::{check_text, Flag, Scan, MAX_BUFFERED, MAX_HOLD};
pub use service::{Moderate, ModerateLayer, ResponseBody, ResponseFuture};
pub use words::{fold, words, Word};
