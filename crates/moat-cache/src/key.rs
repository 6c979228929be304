//! What decides an answer, hashed: the cache key.
//!
//! The request's JSON without the members that do not change the answer (`stream`,
//! `stream_options`, `user`, `metadata`, `store`, `service_tier`), in canonical form (RFC 8785:
//! the order of JSON members does not matter), with the API it was sent to and the scope it
//! belongs to, through SHA-256. Two requests that differ in anything else (model, messages,
//! tools, sampling parameters, response format) have different keys.

use moat_core::canonical;
use moat_core::identity::Caller;
use moat_core::llm::{LlmRequest, WireFormat};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Members that do not change what the model answers.
const IGNORED: &[&str] = &[
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
    "service_tier",
];

/// Whose answers a caller may be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum CacheScope {
    /// Callers of one tenant share answers; a caller without a tenant is scoped by its API
    /// key, and one without either by its IP.
    #[default]
    Tenant,
    /// Callers share answers only with the same API key (else the same IP).
    ApiKey,
    /// Everyone shares answers (a single-tenant deployment).
    Global,
}

impl CacheScope {
    /// The scope's name for `caller`, or `None` when there is nothing to scope by (no tenant,
    /// key or IP: such a request is not cached).
    pub(crate) fn of(self, caller: &Caller) -> Option<String> {
        let key = || caller.api_key.map(|k| format!("key:{k}"));
        let ip = || caller.ip.map(|ip| format!("ip:{ip}"));
        match self {
            Self::Global => Some("global".to_owned()),
            Self::Tenant => caller
                .tenant
                .as_deref()
                .map(|t| format!("tenant:{t}"))
                .or_else(key)
                .or_else(ip),
            Self::ApiKey => key().or_else(ip),
        }
    }
}

/// A cache key: 32 bytes of SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub(crate) [u8; 32]);

impl CacheKey {
    /// The key of `request` in `scope`.
    pub fn of(request: &LlmRequest, scope: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(format_name(request.format()).as_bytes());
        hasher.update([0]);
        hasher.update(scope.as_bytes());
        hasher.update([0]);
        hasher.update(canonical::to_vec_without(request.json(), IGNORED));
        Self(hasher.finalize().into())
    }

    /// Its hex form, for logs and shared stores.
    pub fn hex(&self) -> String {
        moat_core::hex::Hex(&self.0).to_string()
    }
}

pub(crate) fn format_name(format: WireFormat) -> &'static str {
    match format {
        WireFormat::ChatCompletions => "chat",
        WireFormat::Completions => "completions",
        WireFormat::Responses => "responses",
        WireFormat::Embeddings => "embeddings",
        WireFormat::AnthropicMessages => "anthropic",
        _ => "other",
    }
}

/// Whether a request is deterministic enough to cache: embeddings always; otherwise a
/// `temperature` of 0, or a `seed` with no temperature (or 0).
pub(crate) fn deterministic(request: &LlmRequest) -> bool {
    if request.format() == WireFormat::Embeddings {
        return true;
    }
    let json = request.json();
    match json.get("temperature").map(Value::as_f64) {
        Some(Some(t)) => t == 0.0,
        Some(None) => false,
        None => json.get("seed").is_some_and(|s| !s.is_null()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn parse(body: Value) -> LlmRequest {
        LlmRequest::parse(Bytes::from(body.to_string()), "/v1/chat/completions").unwrap()
    }

    #[test]
    fn member_order_stream_and_user_do_not_change_the_key_anything_else_does() {
        let a = parse(
            serde_json::json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}),
        );
        let b = parse(
            serde_json::json!({"messages": [{"content": "hi", "role": "user"}], "stream": true, "user": "u1", "temperature": 0, "model": "m"}),
        );
        assert_eq!(CacheKey::of(&a, "t"), CacheKey::of(&b, "t"));
        assert_ne!(
            CacheKey::of(&a, "t"),
            CacheKey::of(&a, "u"),
            "scopes never share"
        );
        for other in [
            serde_json::json!({"model": "m2", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}),
            serde_json::json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi!"}]}),
            serde_json::json!({"model": "m", "temperature": 0, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
            serde_json::json!({"model": "m", "temperature": 0, "tools": [], "messages": [{"role": "user", "content": "hi"}]}),
        ] {
            assert_ne!(CacheKey::of(&a, "t"), CacheKey::of(&parse(other), "t"));
        }
    }

    #[test]
    fn only_deterministic_requests_qualify() {
        let with = |extra: Value| {
            let mut body = serde_json::json!({"model": "m", "messages": []});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            deterministic(&parse(body))
        };
        assert!(with(serde_json::json!({"temperature": 0})));
        assert!(with(serde_json::json!({"temperature": 0.0, "seed": 1})));
        assert!(with(serde_json::json!({"seed": 7})));
        assert!(!with(serde_json::json!({})));
        assert!(!with(serde_json::json!({"temperature": 0.7, "seed": 7})));
        let embeddings = LlmRequest::parse(
            Bytes::from(r#"{"model":"e","input":"x"}"#),
            "/v1/embeddings",
        )
        .unwrap();
        assert!(deterministic(&embeddings));
    }
}
