//! What a configuration file says of rate limits, deserialized with serde (feature `serde`):
//! the specs the gateway reads from TOML, and anyone else from any format serde reads.
//!
//! ```
//! use moat_core::identity::CallerResolver;
//! use moat_ratelimit::spec::RuleSpec;
//!
//! let spec: RuleSpec = serde_json::from_value(serde_json::json!({
//!     "name": "per-key", "key": "api_key", "limits": ["5/minute"], "tokens": ["20000/minute"],
//!     "tiers": ["free"], "methods": ["POST"], "routes": ["/v1/*"]
//! }))
//! .unwrap();
//! let rule = spec.rule(&CallerResolver::default());
//! assert_eq!(rule.name(), "per-key");
//! ```

use std::sync::Arc;
use std::time::Duration;

use moat_core::decision::Mode;
use moat_core::identity::CallerResolver;
use moat_core::kit::{HttpMethod, KeySpec, ScopeSpec};
use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::headers::Headers;
use crate::limit::Limit;
use crate::rule::Rule;
use crate::spike::{Quarantine, SpikeGuard};

/// One rule (`[[ratelimit.rules]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RuleSpec {
    /// Names the rule in headers, metrics, logs and state.
    pub name: String,
    /// Whose requests: `api_key`, `ip`, `tenant`, `global`, `model` or `header:NAME`.
    pub key: KeySpec,
    /// Request rates, e.g. `["10/second", "600/minute"]`.
    #[serde(default)]
    pub limits: Vec<Limit>,
    /// Token rates, e.g. `["20000/minute"]`.
    #[serde(default)]
    pub tokens: Vec<Limit>,
    /// Requests in flight per key.
    pub max_in_flight: Option<u32>,
    /// Only callers of these tiers.
    #[serde(default)]
    pub tiers: Vec<String>,
    /// Only these paths (`/prefix/*` for a subtree).
    #[serde(default)]
    pub routes: Vec<String>,
    /// Only these methods, e.g. `["POST"]`.
    #[serde(default)]
    pub methods: Vec<HttpMethod>,
    /// Only these models (`prefix*` for a family).
    #[serde(default)]
    pub models: Vec<String>,
    /// `enforce` (default) or `shadow`.
    #[serde(default)]
    pub mode: Mode,
}

impl RuleSpec {
    /// The rule, keyed as `resolver` identifies callers. Whether it is usable (it has limits,
    /// not too many) is for [`RateLimitLayer::try_new`](crate::RateLimitLayer::try_new) to say.
    pub fn rule(&self, resolver: &CallerResolver) -> Rule {
        let scope = ScopeSpec {
            name: &self.name,
            key: &self.key,
            routes: &self.routes,
            methods: &self.methods,
            models: &self.models,
            tiers: &self.tiers,
            mode: self.mode,
        }
        .scope(resolver);
        let mut rule = Rule::in_scope(scope);
        for limit in &self.limits {
            rule = rule.limit(*limit);
        }
        for limit in &self.tokens {
            rule = rule.tokens(*limit);
        }
        if let Some(max) = self.max_in_flight {
            rule = rule.max_in_flight(max);
        }
        rule
    }
}

/// Which rate-limit headers responses carry: `openai` (default), `ietf`, `both` or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum HeaderStyle {
    /// OpenAI's `x-ratelimit-*`.
    #[default]
    Openai,
    /// The IETF `RateLimit-Policy` and `RateLimit`.
    Ietf,
    /// Both.
    Both,
    /// None (denials still carry `retry-after`).
    None,
}

impl From<HeaderStyle> for Headers {
    fn from(style: HeaderStyle) -> Self {
        match style {
            HeaderStyle::Openai => Headers::OPENAI,
            HeaderStyle::Ietf => Headers::IETF,
            HeaderStyle::Both => Headers::BOTH,
            HeaderStyle::None => Headers::NONE,
        }
    }
}

/// The spike guard (`[ratelimit.spike]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SpikeSpec {
    /// Fire when the 1-minute rate is this many times the baseline (default 20).
    pub factor: Option<f64>,
    /// Requests per second below which nothing fires (default 1).
    pub min_rate: Option<f64>,
    /// Seconds of history a key needs first (default 3600).
    pub warmup_secs: Option<u64>,
    /// Seconds of quarantine and of quiet between alerts (default 900).
    pub cooldown_secs: Option<u64>,
    /// `reject` or `tier:NAME`; without it, alerts only.
    #[serde(default, deserialize_with = "quarantine")]
    pub quarantine: Option<Quarantine>,
}

impl SpikeSpec {
    /// The guard.
    pub fn guard(&self) -> SpikeGuard {
        let mut guard = SpikeGuard::new();
        if let Some(f) = self.factor {
            guard = guard.with_factor(f);
        }
        if let Some(r) = self.min_rate {
            guard = guard.with_min_rate(r);
        }
        if let Some(s) = self.warmup_secs {
            guard = guard.with_warmup(Duration::from_secs(s));
        }
        if let Some(s) = self.cooldown_secs {
            guard = guard.with_cooldown(Duration::from_secs(s));
        }
        if let Some(q) = &self.quarantine {
            guard = guard.with_quarantine(q.clone());
        }
        guard
    }

    /// The tier quarantined keys are demoted to, if that is the quarantine.
    pub fn quarantine_tier(&self) -> Option<&str> {
        match &self.quarantine {
            Some(Quarantine::Tier(tier)) => Some(tier),
            _ => None,
        }
    }
}

fn quarantine<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Quarantine>, D::Error> {
    let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
    match (&*text, text.strip_prefix("tier:")) {
        ("reject", _) => Ok(Some(Quarantine::Reject)),
        (_, Some(tier)) if !tier.is_empty() => Ok(Some(Quarantine::Tier(Arc::from(tier)))),
        _ => Err(de::Error::custom(format!(
            "`{text}` is not `reject` or `tier:NAME`"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn specs_read_what_files_say_and_refuse_the_rest() {
        let spec: RuleSpec = serde_json::from_value(json!({"name": "r", "key": "header:x-user",
            "limits": ["1/second"], "max_in_flight": 2, "mode": "shadow"}))
        .unwrap();
        let rule = spec.rule(&CallerResolver::default());
        assert_eq!(rule.scope().mode(), Mode::Shadow);
        assert_eq!(rule.max_in_flight, Some(2));
        for bad in [
            json!({"name": "r", "key": "user", "limits": ["1/second"]}),
            json!({"name": "r", "key": "ip", "limits": ["5/fortnight"]}),
            json!({"name": "r", "key": "ip", "methods": ["P OST"]}),
            json!({"name": "r", "key": "ip", "typo": 1}),
        ] {
            assert!(
                serde_json::from_value::<RuleSpec>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        let spike: SpikeSpec =
            serde_json::from_value(json!({"quarantine": "tier:restricted", "factor": 10.0}))
                .unwrap();
        assert_eq!(spike.quarantine_tier(), Some("restricted"));
        assert!(serde_json::from_value::<SpikeSpec>(json!({"quarantine": "ban"})).is_err());
        assert_eq!(Headers::from(HeaderStyle::None), Headers::NONE);
    }
}
