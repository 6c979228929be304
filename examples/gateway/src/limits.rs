//! `[ratelimit]`, `[[ratelimit.rules]]` and `[identity]`: from TOML to a `RateLimitLayer`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use moat::core::identity::{
    ApiKey, CallerResolver, ClientIp, Fingerprinter, Global, HeaderKey, KeyExtractor, Model,
    RequestHead, Tenant,
};
use moat::core::Key;
use moat::ratelimit::{
    Headers, Limit, Mode, OnStoreError, Quarantine, RateLimitLayer, RedisStore, Rule, SpikeGuard,
};
use serde::Deserialize;
use toml::Spanned;

/// `[identity]`: how callers are told apart.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Proxies in front of the gateway whose `X-Forwarded-For` entries are trusted.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// The environment variable with the secret API keys are fingerprinted under. Set it when
    /// several gateways share Redis, so they agree on keys.
    pub fingerprint_secret_env: Option<String>,
}

/// Where limiter state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In this process.
    #[default]
    Memory,
    /// In Redis, shared by every gateway pointed at it.
    Redis,
}

/// Which rate-limit headers responses carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// `[ratelimit]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// The rules; a request must pass every rule that applies to it.
    #[serde(default)]
    pub rules: Vec<Spanned<RuleConfig>>,
    /// `memory` (default) or `redis`.
    #[serde(default)]
    pub store: StoreKind,
    /// With `store = "redis"`.
    pub redis_url: Option<Spanned<String>>,
    /// `fail_closed` (default), `fail_open` or `local`.
    #[serde(default)]
    pub on_store_error: OnStoreError,
    /// Milliseconds to wait for Redis.
    pub redis_timeout_ms: Option<u64>,
    /// `openai` (default), `ietf`, `both` or `none`.
    #[serde(default)]
    pub headers: HeaderStyle,
    /// Keys kept in memory per rule.
    pub max_keys: Option<usize>,
    /// Tokens reserved for a completion when a request sets no `max_tokens`.
    pub completion_reserve: Option<u64>,
    /// Spike detection per caller.
    pub spike: Option<SpikeConfig>,
}

/// `[ratelimit.spike]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpikeConfig {
    /// Fire when the 1-minute rate is this many times the baseline (default 20).
    pub factor: Option<f64>,
    /// Requests per second below which nothing fires (default 1).
    pub min_rate: Option<f64>,
    /// Seconds of history a key needs first (default 3600).
    pub warmup_secs: Option<u64>,
    /// Seconds of quarantine and of quiet between alerts (default 900).
    pub cooldown_secs: Option<u64>,
    /// `reject` or `tier:NAME`; without it, alerts only.
    pub quarantine: Option<String>,
}

/// One `[[ratelimit.rules]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Names the rule in headers, metrics and logs.
    pub name: String,
    /// `api_key`, `ip`, `tenant`, `global`, `model` or `header:NAME`.
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
    pub methods: Vec<String>,
    /// Only these models (`prefix*` for a family).
    #[serde(default)]
    pub models: Vec<String>,
    /// `enforce` (default) or `shadow`.
    #[serde(default)]
    pub mode: Mode,
}

/// What a rule keys by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    /// The API key's fingerprint.
    ApiKey,
    /// The client IP (behind `identity.trusted_proxies`).
    Ip,
    /// The caller's tenant.
    Tenant,
    /// Everyone together.
    Global,
    /// The requested model.
    Model,
    /// A header's value.
    Header(http::HeaderName),
}

impl<'de> Deserialize<'de> for KeySpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Ok(match s.as_str() {
            "api_key" => Self::ApiKey,
            "ip" => Self::Ip,
            "tenant" => Self::Tenant,
            "global" => Self::Global,
            "model" => Self::Model,
            other => match other.strip_prefix("header:") {
                Some(name) => Self::Header(http::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
                    serde::de::Error::custom(format!("`{name}` is not a valid header name"))
                })?),
                None => {
                    return Err(serde::de::Error::custom(format!(
                        "unknown key `{other}`: expected api_key, ip, tenant, global, model or header:NAME"
                    )))
                }
            },
        })
    }
}

/// A configured key extractor.
#[derive(Debug, Clone)]
enum Extractor {
    ApiKey(ApiKey),
    Ip(ClientIp),
    Tenant(Tenant),
    Global,
    Model(Model),
    Header(HeaderKey),
}

impl KeyExtractor for Extractor {
    fn extract(&self, req: &RequestHead<'_>) -> Result<Key, moat::core::identity::KeyError> {
        match self {
            Self::ApiKey(k) => k.extract(req),
            Self::Ip(k) => k.extract(req),
            Self::Tenant(k) => k.extract(req),
            Self::Global => Global.extract(req),
            Self::Model(k) => k.extract(req),
            Self::Header(k) => k.extract(req),
        }
    }

    fn needs_body(&self) -> bool {
        matches!(self, Self::Model(_))
    }
}

/// A problem in `[ratelimit]` or `[identity]`, with the byte span to turn into a line.
#[derive(Debug)]
pub struct LimitsError {
    /// What is wrong, naming the key.
    pub message: String,
    /// Where, when known.
    pub span: Option<std::ops::Range<usize>>,
}

impl fmt::Display for LimitsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The caller resolver for `[identity]`, reading the fingerprint secret through `env`.
pub fn resolver(
    identity: &IdentityConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(CallerResolver, Fingerprinter), LimitsError> {
    let fingerprinter = match &identity.fingerprint_secret_env {
        Some(name) => {
            let secret = env(name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| LimitsError {
                    message: format!(
                        "identity.fingerprint_secret_env: environment variable {name} is not set"
                    ),
                    span: None,
                })?;
            Fingerprinter::new(secret.as_bytes())
        }
        None => Fingerprinter::default(),
    };
    let client_ip = ClientIp::new(identity.trusted_proxies.iter().copied());
    Ok((
        CallerResolver::new(fingerprinter.clone(), client_ip),
        fingerprinter,
    ))
}

/// The rate-limit layer for `[ratelimit]`, or `None` when it has no rules.
pub fn layer(
    config: &RateLimitConfig,
    identity: &IdentityConfig,
    resolver: CallerResolver,
    fingerprinter: &Fingerprinter,
) -> Result<Option<RateLimitLayer>, LimitsError> {
    let mut layer: Option<RateLimitLayer> = None;
    for spanned in &config.rules {
        let rc = spanned.get_ref();
        let err = |message: String| LimitsError {
            message: format!("ratelimit.rules (name = {:?}): {message}", rc.name),
            span: Some(spanned.span()),
        };
        let extractor = match &rc.key {
            KeySpec::ApiKey => Extractor::ApiKey(ApiKey::new(fingerprinter.clone())),
            KeySpec::Ip => Extractor::Ip(ClientIp::new(identity.trusted_proxies.iter().copied())),
            KeySpec::Tenant => Extractor::Tenant(Tenant::default()),
            KeySpec::Global => Extractor::Global,
            KeySpec::Model => Extractor::Model(Model::default()),
            KeySpec::Header(name) => Extractor::Header(HeaderKey::new(name.clone())),
        };
        let mut rule = Rule::new(rc.name.as_str(), extractor).with_mode(rc.mode);
        for limit in &rc.limits {
            rule = rule.limit(*limit);
        }
        for limit in &rc.tokens {
            rule = rule.tokens(*limit);
        }
        if let Some(max) = rc.max_in_flight {
            rule = rule.max_in_flight(max);
        }
        for tier in &rc.tiers {
            rule = rule.tier(tier.as_str());
        }
        for route in &rc.routes {
            rule = rule.route(route.as_str());
        }
        for method in &rc.methods {
            let method = http::Method::from_bytes(method.as_bytes())
                .map_err(|_| err(format!("`{method}` is not an HTTP method")))?;
            rule = rule.method(method);
        }
        for model in &rc.models {
            rule = rule.model(model.as_str());
        }
        layer = Some(
            match layer {
                None => RateLimitLayer::try_new(rule),
                Some(layer) => layer.try_rule(rule),
            }
            .map_err(|e| err(e.to_string()))?,
        );
    }
    let Some(mut layer) = layer else {
        return Ok(None);
    };
    layer = layer
        .with_caller_resolver(resolver)
        .with_headers(match config.headers {
            HeaderStyle::Openai => Headers::OPENAI,
            HeaderStyle::Ietf => Headers::IETF,
            HeaderStyle::Both => Headers::BOTH,
            HeaderStyle::None => Headers::NONE,
        });
    if let Some(max) = config.max_keys {
        layer = layer.with_max_keys(max);
    }
    if let Some(reserve) = config.completion_reserve {
        layer = layer.with_completion_reserve(reserve);
    }
    if let Some(spike) = &config.spike {
        let mut guard = SpikeGuard::new();
        if let Some(f) = spike.factor {
            guard = guard.with_factor(f);
        }
        if let Some(r) = spike.min_rate {
            guard = guard.with_min_rate(r);
        }
        if let Some(s) = spike.warmup_secs {
            guard = guard.with_warmup(Duration::from_secs(s));
        }
        if let Some(s) = spike.cooldown_secs {
            guard = guard.with_cooldown(Duration::from_secs(s));
        }
        match spike.quarantine.as_deref() {
            None => {}
            Some("reject") => guard = guard.with_quarantine(Quarantine::Reject),
            Some(q) => match q.strip_prefix("tier:") {
                Some(tier) => guard = guard.with_quarantine(Quarantine::Tier(Arc::from(tier))),
                None => {
                    return Err(LimitsError {
                        message: format!(
                            "ratelimit.spike.quarantine: `{q}` is not `reject` or `tier:NAME`"
                        ),
                        span: None,
                    })
                }
            },
        }
        layer = layer.with_spike_guard(guard);
    }
    if config.store == StoreKind::Redis {
        let url = config.redis_url.as_ref().ok_or_else(|| LimitsError {
            message: "ratelimit.redis_url is required with store = \"redis\"".to_owned(),
            span: None,
        })?;
        let mut store = RedisStore::open(url.get_ref())
            .map_err(|e| LimitsError {
                message: format!("ratelimit.redis_url: {e}"),
                span: Some(url.span()),
            })?
            .with_on_error(config.on_store_error);
        if let Some(ms) = config.redis_timeout_ms {
            store = store.with_timeout(Duration::from_millis(ms));
        }
        layer = layer.with_redis(store);
    }
    Ok(Some(layer))
}
