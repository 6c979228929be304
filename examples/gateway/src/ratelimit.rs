//! `[ratelimit]` and `[[ratelimit.rules]]`: the crate's specs, plus where state lives.

use std::time::Duration;

use moat::core::store::OnStoreError;
use moat::ratelimit::spec::{HeaderStyle, RuleSpec, SpikeSpec};
use moat::ratelimit::{RateLimitLayer, RedisStore};
use serde::Deserialize;
use toml::Spanned;

use crate::config::{ConfigError, StoreKind};
use crate::context::Context;

/// `[ratelimit]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// The rules; a request must pass every rule that applies to it.
    #[serde(default)]
    pub rules: Vec<Spanned<RuleSpec>>,
    /// `memory` (default) or `redis`.
    #[serde(default)]
    pub store: StoreKind,
    /// With `store = "redis"` (else the top-level `redis_url`).
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
    pub spike: Option<SpikeSpec>,
}

impl RateLimitConfig {
    /// The layer, or `None` without rules.
    pub(crate) fn layer(
        &self,
        ctx: &Context<'_>,
        span: std::ops::Range<usize>,
    ) -> Result<Option<RateLimitLayer>, ConfigError> {
        let mut layer: Option<RateLimitLayer> = None;
        for spec in &self.rules {
            let rule = spec.get_ref().rule(&ctx.resolver);
            let built = match layer {
                None => RateLimitLayer::try_new(rule),
                Some(layer) => layer.try_rule(rule),
            };
            layer =
                Some(built.map_err(|e| ctx.error(spec.span(), format!("ratelimit.rules: {e}")))?);
        }
        let Some(mut layer) = layer else {
            return Ok(None);
        };
        layer = layer
            .with_caller_resolver(ctx.resolver.clone())
            .with_clock(ctx.clock.clone())
            .with_body_limit(ctx.max_body_bytes)
            .with_headers(self.headers.into());
        if let Some(max) = self.max_keys {
            layer = layer.with_max_keys(max);
        }
        if let Some(reserve) = self.completion_reserve {
            layer = layer.with_completion_reserve(reserve);
        }
        if let Some(spike) = &self.spike {
            layer = layer.with_spike_guard(spike.guard());
        }
        if self.store == StoreKind::Redis {
            let url = self
                .redis_url
                .as_ref()
                .map(|u| (u.get_ref().as_str(), u.span()));
            let conn = ctx.redis(url, "ratelimit", span)?;
            let mut store = RedisStore::with_connection(conn).with_on_error(self.on_store_error);
            if let Some(ms) = self.redis_timeout_ms {
                store = store.with_timeout(Duration::from_millis(ms));
            }
            layer = layer.with_redis(store);
        }
        Ok(Some(layer))
    }
}
