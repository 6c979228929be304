//! Counting a prompt's tokens before the call.
//!
//! With the `tiktoken` feature, OpenAI models (`gpt-4o`, `gpt-4`, `o3`, `gpt-3.5-turbo`, ...) are
//! counted exactly with their own encoding. Any other model, or without the feature, gets a safe
//! upper bound: one token per byte of text (byte-level BPEs never emit a token for less than a
//! byte). Each text segment adds 4 tokens for role and framing, and each request 3 for the
//! reply's priming, as OpenAI's chat format does.
//!
//! ```
//! use moat_core::llm::LlmRequest;
//! use moat_core::tokens::estimate_input;
//!
//! let body = br#"{"model":"some-local-model","messages":[{"role":"user","content":"hello"}]}"#;
//! let request = LlmRequest::parse(body.to_vec().into(), "/v1/chat/completions").unwrap();
//! let estimate = estimate_input(&request);
//! assert!(!estimate.exact);
//! assert_eq!(estimate.tokens, 5 + 4 + 3, "an upper bound: one per byte, plus framing");
//! ```

use crate::llm::LlmRequest;

/// Tokens of framing per text segment.
pub const PER_SEGMENT: u64 = 4;
/// Tokens of priming per request.
pub const PER_REQUEST: u64 = 3;

/// A prompt's token count before the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Prompt tokens.
    pub tokens: u64,
    /// Counted with the model's own tokenizer (`true`), or a byte-length upper bound.
    pub exact: bool,
}

/// Counts one text for `model`: exactly for OpenAI models with the `tiktoken` feature, else an
/// upper bound (its length in bytes).
pub fn count(model: Option<&str>, text: &str) -> Estimate {
    // Look the tokenizer up as an `Option`: `bpe_for_model` builds an error (and may capture a
    // backtrace) for every model it does not know.
    #[cfg(feature = "tiktoken")]
    if let Some(bpe) = model
        .and_then(tiktoken_rs::tokenizer::get_tokenizer)
        .and_then(|t| tiktoken_rs::bpe_for_tokenizer(t).ok())
    {
        return Estimate {
            tokens: bpe.encode_ordinary(text).len() as u64,
            exact: true,
        };
    }
    let _ = model;
    Estimate {
        tokens: text.len() as u64,
        exact: false,
    }
}

/// The prompt tokens of a request: every text segment the model reads (not metadata or
/// attachment names; unknown text included), plus framing.
pub fn estimate_input(request: &LlmRequest) -> Estimate {
    estimate(request, request.model())
}

/// The byte-length upper bound of a request's prompt tokens, without a tokenizer: far cheaper
/// than exact counting (see docs/PERFORMANCE.md), and never an underestimate.
pub fn estimate_input_upper_bound(request: &LlmRequest) -> Estimate {
    estimate(request, None)
}

fn estimate(request: &LlmRequest, model: Option<&str>) -> Estimate {
    let mut total = PER_REQUEST;
    let mut exact = true;
    let mut segments = 0;
    for (_, text) in request.texts().filter(|(s, _)| s.source.is_prompt()) {
        segments += 1;
        let counted = count(model, text);
        total += counted.tokens + PER_SEGMENT;
        exact &= counted.exact;
    }
    Estimate {
        tokens: total,
        exact: exact && segments > 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(model: &str, text: &str) -> LlmRequest {
        let body =
            serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]});
        LlmRequest::parse(
            serde_json::to_vec(&body).unwrap().into(),
            "/v1/chat/completions",
        )
        .unwrap()
    }

    #[test]
    fn unknown_models_get_a_byte_upper_bound() {
        let e = estimate_input(&chat("claude-haiku-4-5", "héllo wörld"));
        assert!(!e.exact);
        assert_eq!(
            e.tokens,
            "héllo wörld".len() as u64 + PER_SEGMENT + PER_REQUEST
        );
    }

    #[test]
    fn the_upper_bound_ignores_the_model() {
        let e = estimate_input_upper_bound(&chat("gpt-4o", "Hello world"));
        assert_eq!((e.tokens, e.exact), (11 + PER_SEGMENT + PER_REQUEST, false));
    }

    #[cfg(feature = "tiktoken")]
    #[test]
    fn openai_models_are_counted_exactly() {
        let e = estimate_input(&chat("gpt-4o", "Hello world, how are you today?"));
        assert!(e.exact);
        // o200k_base: "Hello"," world",","," how"," are"," you"," today","?" = 8 tokens.
        assert_eq!(e.tokens, 8 + PER_SEGMENT + PER_REQUEST);
        assert_eq!(count(Some("gpt-4"), "Hello world").tokens, 2);
        assert!(count(Some("gpt-4o-mini"), &"word ".repeat(1000)).tokens <= 1001);
    }
}
