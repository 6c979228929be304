//! Token usage: its shapes, and how a response body ended.
//!
//! [`Usage::find`] reads `usage` in every shape a provider sends: OpenAI chat and completions
//! (`prompt_tokens`, `completion_tokens`, cached and reasoning details), the Responses API
//! (`input_tokens`, `output_tokens`, `response.usage` in `response.completed`), and Anthropic
//! (`message.usage` in `message_start`, cumulative `usage` in `message_delta`, cache reads and
//! writes). [`Usage::input_tokens`] always counts every prompt token, cached or not.
//!
//! A [`UsageReport`] says what a reply reported and how its body ended; the
//! [`response`](crate::response) pipeline hands one to every layer, exactly once.
//!
//! ```
//! use moat_core::usage::Usage;
//!
//! let reply = serde_json::json!({"usage": {"prompt_tokens": 12, "completion_tokens": 5}});
//! let usage = Usage::find(&reply).unwrap();
//! assert_eq!((usage.input_tokens, usage.output_tokens, usage.total_tokens), (12, 5, 17));
//! ```

use http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::lenient::count;

/// Token counts of one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Usage {
    /// Every prompt token, including those read from or written to a cache.
    pub input_tokens: u64,
    /// Generated tokens, reasoning included.
    pub output_tokens: u64,
    /// Input plus output, as the provider reported it (or computed when it did not).
    pub total_tokens: u64,
    /// Prompt tokens served from the provider's cache.
    pub cached_input_tokens: u64,
    /// Prompt tokens written to the provider's cache (Anthropic).
    pub cache_creation_input_tokens: u64,
    /// Output tokens spent on reasoning.
    pub reasoning_tokens: u64,
}

/// A `usage` object as providers send it: every count any of them uses, each read leniently (a
/// count that is not a non-negative integer is absent).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawUsage {
    #[serde(default, deserialize_with = "count")]
    prompt_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    completion_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    total_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    output_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    cache_read_input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "crate::lenient::object")]
    prompt_tokens_details: Option<Details>,
    #[serde(default, deserialize_with = "crate::lenient::object")]
    completion_tokens_details: Option<Details>,
    #[serde(default, deserialize_with = "crate::lenient::object")]
    input_tokens_details: Option<Details>,
    #[serde(default, deserialize_with = "crate::lenient::object")]
    output_tokens_details: Option<Details>,
}

#[derive(Debug, Default, Deserialize)]
struct Details {
    #[serde(default, deserialize_with = "count")]
    cached_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    reasoning_tokens: Option<u64>,
}

fn cached(details: Option<Details>) -> u64 {
    details.and_then(|d| d.cached_tokens).unwrap_or(0)
}

fn reasoning(details: Option<Details>) -> u64 {
    details.and_then(|d| d.reasoning_tokens).unwrap_or(0)
}

impl RawUsage {
    /// The usage, `None` if it has no known count.
    pub(crate) fn into_usage(self) -> Option<Usage> {
        // OpenAI chat and completions.
        if let Some(prompt) = self.prompt_tokens {
            let output = self.completion_tokens.unwrap_or(0);
            return Some(Usage {
                input_tokens: prompt,
                output_tokens: output,
                total_tokens: self.total_tokens.unwrap_or(prompt + output),
                cached_input_tokens: cached(self.prompt_tokens_details),
                cache_creation_input_tokens: 0,
                reasoning_tokens: reasoning(self.completion_tokens_details),
            });
        }
        if self.input_tokens.is_none() && self.output_tokens.is_none() {
            return None;
        }
        let (input, output) = (
            self.input_tokens.unwrap_or(0),
            self.output_tokens.unwrap_or(0),
        );
        // Anthropic counts cache reads and writes apart from `input_tokens`.
        if self.cache_read_input_tokens.is_some() || self.cache_creation_input_tokens.is_some() {
            let cache_read = self.cache_read_input_tokens.unwrap_or(0);
            let cache_write = self.cache_creation_input_tokens.unwrap_or(0);
            let input = input + cache_read + cache_write;
            return Some(Usage {
                input_tokens: input,
                output_tokens: output,
                total_tokens: input + output,
                cached_input_tokens: cache_read,
                cache_creation_input_tokens: cache_write,
                reasoning_tokens: 0,
            });
        }
        // Responses API (and Anthropic without cache fields).
        Some(Usage {
            input_tokens: input,
            output_tokens: output,
            total_tokens: self.total_tokens.unwrap_or(input + output),
            cached_input_tokens: cached(self.input_tokens_details),
            cache_creation_input_tokens: 0,
            reasoning_tokens: reasoning(self.output_tokens_details),
        })
    }
}

impl Usage {
    /// Usage with just input and output counts.
    pub fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            input_tokens,
            output_tokens,
            total_tokens: input_tokens + output_tokens,
            ..Self::default()
        }
    }

    /// Reads a `usage` object in any provider's shape; `None` if it has no known count.
    pub fn from_object(usage: &Value) -> Option<Self> {
        if !usage.is_object() {
            return None;
        }
        RawUsage::deserialize(usage).ok()?.into_usage()
    }

    /// Finds usage in a response body or streamed event: `usage`, `response.usage`
    /// (Responses events) or `message.usage` (Anthropic `message_start`).
    pub fn find(document: &Value) -> Option<Self> {
        ["usage", "response", "message"].iter().find_map(|key| {
            let value = document.get(*key)?;
            if *key == "usage" {
                Self::from_object(value)
            } else {
                Self::from_object(value.get("usage")?)
            }
        })
    }

    /// The usage of a whole JSON reply, as [`find`](Self::find) finds it, read from its bytes
    /// without building a document (everything else is skipped). A reply the typed read refuses
    /// (a key given twice, say) is read as a document, as `find` would.
    pub fn of_reply(bytes: &[u8]) -> Option<Self> {
        #[derive(Deserialize)]
        struct Holder {
            #[serde(default, deserialize_with = "crate::lenient::object")]
            usage: Option<RawUsage>,
        }
        #[derive(Deserialize)]
        struct Reply {
            #[serde(default, deserialize_with = "crate::lenient::object")]
            usage: Option<RawUsage>,
            #[serde(default, deserialize_with = "crate::lenient::object")]
            response: Option<Holder>,
            #[serde(default, deserialize_with = "crate::lenient::object")]
            message: Option<Holder>,
        }
        // A derived struct would also read an array.
        if !bytes.trim_ascii_start().starts_with(b"{") {
            return None;
        }
        let Ok(reply) = serde_json::from_slice::<Reply>(bytes) else {
            let document = serde_json::from_slice::<Value>(bytes).ok()?;
            return Self::find(&document);
        };
        [
            reply.usage,
            reply.response.and_then(|h| h.usage),
            reply.message.and_then(|h| h.usage),
        ]
        .into_iter()
        .flatten()
        .find_map(RawUsage::into_usage)
    }

    /// Folds a later report of the same response in: streams report counts cumulatively, so each
    /// field keeps its largest value.
    pub fn merge(&mut self, later: &Usage) {
        self.input_tokens = self.input_tokens.max(later.input_tokens);
        self.output_tokens = self.output_tokens.max(later.output_tokens);
        self.cached_input_tokens = self.cached_input_tokens.max(later.cached_input_tokens);
        self.cache_creation_input_tokens = self
            .cache_creation_input_tokens
            .max(later.cache_creation_input_tokens);
        self.reasoning_tokens = self.reasoning_tokens.max(later.reasoning_tokens);
        self.total_tokens = later
            .total_tokens
            .max(self.total_tokens)
            .max(self.input_tokens + self.output_tokens);
    }
}

/// How a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BodyOutcome {
    /// Its body was read to the end.
    Completed,
    /// Its body failed.
    Errored,
    /// Its body was dropped before its end, e.g. the client disconnected.
    Interrupted,
    /// There was no response: the inner service failed.
    Failed,
    /// There was no response: the request was dropped while waiting for one.
    Abandoned,
}

/// What a response reported and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UsageReport {
    /// The usage the provider reported, if it did.
    pub usage: Option<Usage>,
    /// How it ended.
    pub outcome: BodyOutcome,
    /// The response's status; 0 when there was none.
    pub status: u16,
    /// Bytes of generated text streamed so far (SSE only): the basis for charging a stream that
    /// was cut short before its usage arrived.
    pub streamed_text_bytes: u64,
    /// Body bytes passed through.
    pub body_bytes: u64,
    /// The response was answered from a cache, not by the provider: it cost no provider tokens
    /// (whatever usage it reports is the original call's).
    pub from_cache: bool,
}

impl UsageReport {
    /// A report for a request that got no response.
    pub fn no_response(outcome: BodyOutcome) -> Self {
        Self {
            usage: None,
            outcome,
            status: 0,
            streamed_text_bytes: 0,
            body_bytes: 0,
            from_cache: false,
        }
    }
}

/// How to read a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyFormat {
    /// One JSON document.
    Json,
    /// A `text/event-stream`.
    Sse,
    /// Anything else: nothing to read, but the outcome is still reported.
    Other,
}

impl BodyFormat {
    /// The format named by a response's `content-type`.
    pub fn of(headers: &HeaderMap) -> Self {
        let Some(ct) = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        else {
            return Self::Other;
        };
        let ct = ct.trim_start();
        let starts = |prefix: &str| {
            ct.get(..prefix.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
        };
        if starts("text/event-stream") {
            Self::Sse
        } else if starts("application/json")
            || ct
                .to_ascii_lowercase()
                .split(';')
                .next()
                .is_some_and(|e| e.trim_end().ends_with("+json"))
        {
            Self::Json
        } else {
            Self::Other
        }
    }
}

/// The cap on a JSON response kept for reading: 8 MiB. Larger bodies pass through untouched
/// and report no usage.
pub const MAX_JSON_BYTES: usize = 8 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_usage_shape() {
        let chat = json!({"usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
            "prompt_tokens_details": {"cached_tokens": 64}, "completion_tokens_details": {"reasoning_tokens": 8}}});
        assert_eq!(
            Usage::find(&chat),
            Some(Usage {
                input_tokens: 100,
                output_tokens: 20,
                total_tokens: 120,
                cached_input_tokens: 64,
                cache_creation_input_tokens: 0,
                reasoning_tokens: 8
            })
        );
        let responses = json!({"type": "response.completed", "response": {"usage": {"input_tokens": 10, "output_tokens": 4,
            "total_tokens": 14, "input_tokens_details": {"cached_tokens": 2}, "output_tokens_details": {"reasoning_tokens": 1}}}});
        assert_eq!(
            Usage::find(&responses),
            Some(Usage {
                input_tokens: 10,
                output_tokens: 4,
                total_tokens: 14,
                cached_input_tokens: 2,
                cache_creation_input_tokens: 0,
                reasoning_tokens: 1
            })
        );
        let anthropic = json!({"usage": {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20}});
        assert_eq!(
            Usage::find(&anthropic),
            Some(Usage {
                input_tokens: 125,
                output_tokens: 7,
                total_tokens: 132,
                cached_input_tokens: 100,
                cache_creation_input_tokens: 20,
                reasoning_tokens: 0
            })
        );
        let start = json!({"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1}}});
        assert_eq!(Usage::find(&start).unwrap().input_tokens, 9);
        assert_eq!(Usage::find(&json!({"usage": null})), None);
        assert_eq!(Usage::find(&json!({"usage": {"foo": 1}})), None);
        // Read from bytes, without a document, every shape reads the same.
        let odd = [
            json!({"usage": {"foo": 1}, "response": {"usage": {"input_tokens": 3, "output_tokens": 1}}}),
            json!({"usage": "n/a", "message": {"usage": {"input_tokens": 2}}}),
            json!({"usage": {"prompt_tokens": 1.0, "completion_tokens": -1}}),
            json!({"choices": [{"message": {"content": "ok"}}], "usage": [1, 2]}),
            json!([1, 2, 3]),
            json!([{"prompt_tokens": 5, "completion_tokens": 3}]),
            json!({"usage": null}),
        ];
        for doc in [chat, responses, anthropic, start].iter().chain(&odd) {
            let bytes = serde_json::to_vec(doc).unwrap();
            assert_eq!(Usage::of_reply(&bytes), Usage::find(doc), "{doc}");
        }
        assert_eq!(Usage::of_reply(b"not json"), None);
        // A key given twice: the last one counts, as in a document.
        let twice = br#"{"usage": {"prompt_tokens": 1}, "usage": {"prompt_tokens": 7, "completion_tokens": 2}}"#;
        let document: Value = serde_json::from_slice(twice).unwrap();
        assert_eq!(Usage::of_reply(twice), Usage::find(&document));
        assert_eq!(Usage::of_reply(twice).unwrap().input_tokens, 7);
    }

    #[test]
    fn merge_keeps_cumulative_maxima() {
        let mut u = Usage::new(25, 1);
        u.merge(&Usage::new(0, 15));
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.total_tokens),
            (25, 15, 40)
        );
    }

    #[test]
    fn body_format_from_content_type() {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            "text/event-stream; charset=utf-8".parse().unwrap(),
        );
        assert_eq!(BodyFormat::of(&h), BodyFormat::Sse);
        h.insert("content-type", "application/json".parse().unwrap());
        assert_eq!(BodyFormat::of(&h), BodyFormat::Json);
        assert_eq!(BodyFormat::of(&HeaderMap::new()), BodyFormat::Other);
    }
}
