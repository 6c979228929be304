//! Counting a prompt's tokens before the call.
//!
//! With the `tiktoken` feature, OpenAI models are counted exactly with their own encoding
//! (`o200k_base` for GPT-4o, GPT-4.1, GPT-4.5, GPT-5, o1, o3, o4 and gpt-oss; `cl100k_base` for
//! GPT-4, GPT-3.5 and the embedding models), by [toktok](https://docs.rs/toktok-rs): its counts
//! are tiktoken's (checked against tiktoken-rs on a varied corpus, code and CJK included, in this
//! module's tests) at about 13x tiktoken-rs's speed (docs/PERFORMANCE.md). Any other model, or
//! without the feature, gets a safe upper bound: one token per byte of text (byte-level BPEs
//! never emit a token for less than a byte). Each text segment adds 4 tokens for role and
//! framing, and each request 3 for the reply's priming, as OpenAI's chat format does.
//!
//! A request's count is made once: [`SharedLlmRequest::input_tokens`](crate::request::SharedLlmRequest::input_tokens)
//! keeps it for every layer.
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

/// An OpenAI encoding moat counts exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Encoding {
    /// GPT-4o and later.
    O200kBase,
    /// GPT-4, GPT-3.5, embeddings.
    Cl100kBase,
}

impl Encoding {
    /// The encoding of an OpenAI model (fine-tunes and dated snapshots included), if it is one
    /// of these two.
    pub fn for_model(model: &str) -> Option<Self> {
        let model = model
            .strip_prefix("ft:")
            .map_or(model, |rest| rest.split(':').next().unwrap_or(rest));
        let o200k = [
            "o1",
            "o3",
            "o4",
            "gpt-5",
            "gpt-4.1",
            "gpt-4.5",
            "gpt-4o",
            "chatgpt-4o",
            "codex-mini",
            "gpt-oss",
        ];
        let cl100k = [
            "gpt-4",
            "gpt-3.5",
            "gpt-35-turbo",
            "text-embedding-3-",
            "text-embedding-ada-002",
            "davinci-002",
            "babbage-002",
        ];
        // A family name, alone or followed by a variant (`gpt-4o-mini`, `o3-2025-04-16`).
        let family = |name: &str| {
            model.strip_prefix(name).is_some_and(|rest| {
                rest.is_empty() || name.ends_with('-') || rest.starts_with(['-', '.'])
            })
        };
        if o200k.iter().any(|n| family(n)) {
            Some(Self::O200kBase)
        } else if cl100k.iter().any(|n| family(n)) {
            Some(Self::Cl100kBase)
        } else {
            None
        }
    }

    /// Tokens of `text`, as tiktoken's `encode_ordinary` counts them (special-token text is
    /// ordinary text).
    #[cfg(feature = "tiktoken")]
    pub fn count(self, text: &str) -> u64 {
        self.tokenizer().count(text.as_bytes()) as u64
    }

    /// Loads the encoding's tables now (about half a second for `o200k_base`), so the first
    /// request that counts does not pay for it. Layers counting exactly call this when they are
    /// built into a service.
    #[cfg(feature = "tiktoken")]
    pub fn preload(self) {
        let _ = self.tokenizer();
    }

    #[cfg(feature = "tiktoken")]
    fn tokenizer(self) -> &'static toktok::Tokenizer {
        use std::sync::LazyLock;
        static O200K: LazyLock<toktok::Tokenizer> = LazyLock::new(|| {
            toktok::Tokenizer::builtin("o200k_base").expect("toktok bundles o200k_base")
        });
        static CL100K: LazyLock<toktok::Tokenizer> = LazyLock::new(|| {
            toktok::Tokenizer::builtin("cl100k_base").expect("toktok bundles cl100k_base")
        });
        match self {
            Self::O200kBase => &O200K,
            Self::Cl100kBase => &CL100K,
        }
    }
}

/// Loads every encoding's tables now (about 0.6 s in all, once per process) instead of on the
/// first request that counts: layers that count exactly call it when they build their service.
/// Without the `tiktoken` feature there is nothing to load.
pub fn preload() {
    #[cfg(feature = "tiktoken")]
    for encoding in [Encoding::O200kBase, Encoding::Cl100kBase] {
        encoding.preload();
    }
}

/// Counts one text for `model`: exactly for OpenAI models with the `tiktoken` feature, else an
/// upper bound (its length in bytes).
pub fn count(model: Option<&str>, text: &str) -> Estimate {
    #[cfg(feature = "tiktoken")]
    if let Some(encoding) = model.and_then(Encoding::for_model) {
        return Estimate {
            tokens: encoding.count(text),
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

    #[test]
    fn models_map_to_their_encodings() {
        for (model, encoding) in [
            ("gpt-4o", Some(Encoding::O200kBase)),
            ("gpt-4o-mini-2024-07-18", Some(Encoding::O200kBase)),
            ("o3", Some(Encoding::O200kBase)),
            ("o4-mini", Some(Encoding::O200kBase)),
            ("gpt-5.1-codex", Some(Encoding::O200kBase)),
            ("gpt-4.1-nano", Some(Encoding::O200kBase)),
            ("ft:gpt-4o-mini:acme:x:123", Some(Encoding::O200kBase)),
            ("gpt-4", Some(Encoding::Cl100kBase)),
            ("gpt-4-turbo", Some(Encoding::Cl100kBase)),
            ("gpt-3.5-turbo-0125", Some(Encoding::Cl100kBase)),
            ("text-embedding-3-small", Some(Encoding::Cl100kBase)),
            ("gpt-40", None),
            ("o3x", None),
            ("claude-haiku-4-5", None),
            ("llama-3", None),
        ] {
            assert_eq!(Encoding::for_model(model), encoding, "{model}");
        }
    }

    /// toktok's counts are tiktoken's: checked against tiktoken-rs (a port of tiktoken's core)
    /// on every text of a varied corpus, special-token text included.
    #[cfg(feature = "tiktoken")]
    #[test]
    fn counts_are_tiktokens_on_a_varied_corpus() {
        let o200k = tiktoken_rs::o200k_base().unwrap();
        let cl100k = tiktoken_rs::cl100k_base().unwrap();
        let mut corpus = moat_testkit::corpus::token_corpus();
        corpus.push((
            "specials".into(),
            "<|endoftext|> <|im_start|>system<|im_end|> <|fim_prefix|>".into(),
        ));
        for (name, text) in &corpus {
            assert_eq!(
                Encoding::O200kBase.count(text),
                o200k.encode_ordinary(text).len() as u64,
                "o200k_base on {name}"
            );
            assert_eq!(
                Encoding::Cl100kBase.count(text),
                cl100k.encode_ordinary(text).len() as u64,
                "cl100k_base on {name}"
            );
        }
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
