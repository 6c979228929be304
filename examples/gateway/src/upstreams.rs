//! `[upstream]` or `[[upstreams]]`, `[breaker]` and `[retry]`: the providers behind the
//! gateway, each behind its own circuit breaker, tried in order.
//!
//! ```toml
//! [[upstreams]]                 # tried in order; [upstream] is the one-item case
//! name = "primary"
//! base_url = "http://127.0.0.1:9001/v1"
//! api_key_env = "PRIMARY_KEY"
//! models = ["gpt-4o*"]          # optional: which models this upstream serves
//! [[upstreams]]
//! name = "backup"
//! base_url = "http://127.0.0.1:9002/v1"
//! [breaker]
//! failure_rate = 0.5
//! minimum_calls = 10
//! window = "count:20"           # or "time:30s"
//! open_for = "10s"
//! half_open_calls = 2
//! slow_call = "30s"             # time to first token past this counts as slow
//! [retry]
//! attempts = 2                  # per upstream, before falling back
//! ```
//!
//! With one upstream and neither `[breaker]` nor `[retry]`, requests go straight to it. Else
//! each upstream gets a breaker (`[breaker]`, or the defaults) and the request goes down the
//! ladder: an upstream whose breaker is open, or that fails before the first byte of its
//! reply, hands the request to the next; `x-moat-fallback` names the one that served. Every
//! upstream of a ladder must speak the API the client speaks: an OpenAI request is not
//! translated for an Anthropic upstream.

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use moat::breaker::{
    Backoff, Breaker, BreakerConfig, CircuitBreaker, CircuitBreakerLayer, Fallback,
};
use serde::Deserialize;
use toml::Spanned;
use tower::Layer;

use crate::config::{
    Config, ConfigError, Resolved, Seconds, UpstreamConfig, UpstreamKind, UpstreamTimeouts,
};
use crate::proxy::Upstream;

/// `[retry]`: how often a failing upstream is tried again before the next.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries per upstream (default 1).
    #[serde(default = "one")]
    pub attempts: u32,
    /// The first wait, doubled for each retry, with jitter (default 200ms).
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    /// The longest wait; an upstream that asks (`retry-after`) for longer is not retried.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

fn one() -> u32 {
    1
}

fn default_backoff() -> Duration {
    Duration::from_millis(200)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(5)
}

/// One provider, checked, with its secrets read.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ResolvedUpstream {
    /// Its name, in `x-moat-fallback`, metrics and `/v1/moat/upstreams`.
    pub name: String,
    /// The base URL, including `/v1`.
    pub base_url: Uri,
    /// How the provider key is sent.
    pub kind: UpstreamKind,
    /// The provider key, if configured.
    pub api_key: Option<String>,
    /// Its deadlines.
    pub timeouts: UpstreamTimeouts,
    /// The models it serves (all when empty).
    pub models: Vec<String>,
    /// Its circuit breaker, when requests go down a ladder.
    pub breaker: Option<Breaker>,
}

/// The upstreams of a configuration, in order, and the ladder's retries when there is one.
pub(crate) fn resolve(
    config: &Config,
    source: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Vec<ResolvedUpstream>, Option<Backoff>, u32), ConfigError> {
    let at = |span: Range<usize>, message: String| ConfigError::at(source, span, message);
    let listed: Vec<(String, &Spanned<UpstreamConfig>)> =
        match (&config.upstream, &config.upstreams[..]) {
            (Some(one), []) => vec![("upstream".to_owned(), one)],
            (None, []) => {
                return Err(ConfigError {
                    message: "no upstream: add an [upstream] section, or [[upstreams]] entries"
                        .into(),
                    line: None,
                })
            }
            (Some(one), _) => {
                return Err(at(
                    one.span(),
                    "upstream: set [upstream] or [[upstreams]], not both".into(),
                ))
            }
            (None, many) => many
                .iter()
                .enumerate()
                .map(|(i, u)| (format!("upstreams[{i}]"), u))
                .collect(),
        };
    let laddered = listed.len() > 1 || config.breaker.is_some() || config.retry.is_some();
    let breaker_config = match &config.breaker {
        Some(section) => {
            let breaker = section.get_ref().clone();
            breaker
                .check()
                .map_err(|e| at(section.span(), format!("breaker: {e}")))?;
            breaker
        }
        None => BreakerConfig::default(),
    };
    let mut upstreams: Vec<ResolvedUpstream> = Vec::with_capacity(listed.len());
    for (path, spanned) in listed {
        let upstream = spanned.get_ref();
        let name = match &upstream.name {
            Some(name) if name.trim().is_empty() => {
                return Err(at(
                    spanned.span(),
                    format!("{path}.name: must not be empty"),
                ))
            }
            Some(name) => name.clone(),
            None if path == "upstream" => "upstream".to_owned(),
            None => {
                return Err(at(
                    spanned.span(),
                    format!("{path}.name: each of several upstreams needs a name"),
                ))
            }
        };
        if upstreams.iter().any(|u| u.name == name) {
            return Err(at(
                spanned.span(),
                format!("{path}.name: two upstreams are named {name:?}"),
            ));
        }
        let base = &upstream.base_url;
        let base_url = match base.get_ref().parse::<Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() =>
            {
                uri
            }
            _ => {
                return Err(at(
                    base.span(),
                    format!(
                        "{path}.base_url: `{}` is not an http(s) URL",
                        base.get_ref()
                    ),
                ))
            }
        };
        let defaults = UpstreamTimeouts::default();
        let secs = |value: &Option<Spanned<Seconds>>, key: &str, default: Duration| {
            value.as_ref().map_or(Ok(default), |v| {
                v.get_ref()
                    .duration()
                    .ok_or_else(|| at(v.span(), format!("{path}.{key}: {}", Seconds::RULE)))
            })
        };
        let timeouts = UpstreamTimeouts {
            connect: secs(
                &upstream.connect_timeout_secs,
                "connect_timeout_secs",
                defaults.connect,
            )?,
            first_byte: secs(
                &upstream.first_byte_timeout_secs,
                "first_byte_timeout_secs",
                defaults.first_byte,
            )?,
            idle: secs(
                &upstream.idle_timeout_secs,
                "idle_timeout_secs",
                defaults.idle,
            )?,
        };
        let api_key = match &upstream.api_key_env {
            Some(var) => Some(env(var.get_ref()).ok_or_else(|| {
                at(
                    var.span(),
                    format!(
                        "{path}.api_key_env: environment variable {} is not set",
                        var.get_ref()
                    ),
                )
            })?),
            None => None,
        };
        let breaker = laddered.then(|| {
            Breaker::builder(name.clone())
                .config(breaker_config.clone())
                .build()
                .expect("checked above")
        });
        upstreams.push(ResolvedUpstream {
            name,
            base_url,
            kind: upstream.kind,
            api_key,
            timeouts,
            models: upstream.models.clone(),
            breaker,
        });
    }
    let (backoff, attempts) = match &config.retry {
        Some(retry) => {
            let r = retry.get_ref();
            if r.backoff.is_zero() || r.max_backoff < r.backoff {
                return Err(at(
                    retry.span(),
                    "retry: backoff must be over zero and at most max_backoff".into(),
                ));
            }
            (Some(Backoff::new(r.backoff, r.max_backoff)), r.attempts)
        }
        None => (laddered.then(Backoff::default), 0),
    };
    Ok((upstreams, backoff, attempts))
}

/// The ladder of a configuration's upstreams, each behind its breaker, or `None` when requests
/// go straight to the one upstream.
pub fn ladder(resolved: &Resolved) -> Option<Fallback<CircuitBreaker<Upstream>>> {
    let backoff = resolved.retry_backoff?;
    let mut ladder = Fallback::new()
        .with_retries(resolved.retry_attempts, backoff)
        .with_body_limit(resolved.max_body_bytes);
    for upstream in &resolved.upstreams {
        let breaker = upstream
            .breaker
            .clone()
            .expect("a ladder's upstreams have breakers");
        let service = CircuitBreakerLayer::new(breaker)
            .layer(Upstream::to(upstream, resolved.max_body_bytes));
        ladder = ladder.target_for_models(upstream.name.clone(), service, upstream.models.clone());
    }
    Some(ladder)
}

/// `GET /v1/moat/upstreams`: each upstream and where its breaker stands.
pub(crate) fn report(upstreams: &[ResolvedUpstream]) -> Bytes {
    let upstreams: Vec<serde_json::Value> = upstreams
        .iter()
        .map(|u| {
            serde_json::json!({
                "name": u.name,
                "models": u.models,
                "breaker": u.breaker.as_ref().map(Breaker::snapshot),
            })
        })
        .collect();
    let body = serde_json::json!({"object": "moat.upstreams", "upstreams": upstreams});
    Bytes::from(body.to_string())
}
