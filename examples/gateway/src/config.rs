//! The gateway's TOML configuration: the top level, `[server]`, `[upstream]` and `[[keys]]`
//! here; each layer's section in its own module (`identity`, `ratelimit`, `quota`, `sanitize`,
//! `redact`),
//! built from the specs the layer crates define.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use moat::core::identity::CallerResolver;
use moat::core::store::RedisTopology;
use moat::quota::QuotaLayer;
use moat::ratelimit::RateLimitLayer;
use moat::redact::spec::RedactSpec;
use moat::redact::RedactLayer;
use moat::sanitize::spec::SanitizeSpec;
use moat::sanitize::SanitizeLayer;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::context::{Context, DefaultRedis};
use crate::identity::IdentityConfig;
use crate::quota::QuotaConfig;
use crate::ratelimit::RateLimitConfig;
use crate::server::{ServerConfig, ServerLimits};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where to listen.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The provider behind the gateway (or `[[upstreams]]`).
    pub upstream: Option<Spanned<UpstreamConfig>>,
    /// Providers tried in order, each behind its own circuit breaker.
    #[serde(default)]
    pub upstreams: Vec<Spanned<UpstreamConfig>>,
    /// When an upstream's circuit breaker opens.
    pub breaker: Option<Spanned<moat::breaker::BreakerConfig>>,
    /// How often a failing upstream is tried again before the next.
    pub retry: Option<Spanned<crate::upstreams::RetryConfig>>,
    /// Virtual keys handed to clients; none means every caller is anonymous, keyed by IP.
    #[serde(default)]
    pub keys: Vec<Spanned<KeyConfig>>,
    /// A file of more `[[keys]]`, by `key_sha256` only (no secret in it), read at start and on
    /// every reload: keys can be added, rotated and revoked without editing this file.
    pub keys_file: Option<Spanned<String>>,
    /// Largest request body accepted, in bytes (default 4 MiB); every layer reads up to this.
    pub max_body_bytes: Option<Spanned<usize>>,
    /// The Redis server of every section with `store = "redis"` that names none of its own; one
    /// connection serves them all.
    pub redis_url: Option<Spanned<String>>,
    /// Or a Redis Cluster (any of its nodes; the rest are discovered) for those sections.
    pub redis_cluster: Option<Spanned<Vec<String>>>,
    /// Or the primary that Redis Sentinel names.
    pub redis_sentinel: Option<Spanned<SentinelConfig>>,
    /// The authority (a PEM file) that signed the Redis servers' TLS certificates
    /// (`rediss://`), when it is not one the system trusts.
    pub redis_ca_file: Option<Spanned<String>>,
    /// Deadlines and caps for clients.
    #[serde(default)]
    pub server: ServerConfig,
    /// How callers are told apart.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Request, token and concurrency limits.
    pub ratelimit: Option<Spanned<RateLimitConfig>>,
    /// Token and spend budgets.
    pub quota: Option<Spanned<QuotaConfig>>,
    /// Prompt-injection and jailbreak screening.
    pub sanitize: Option<Spanned<SanitizeSpec>>,
    /// PII and secret redaction.
    pub redact: Option<Spanned<RedactSpec>>,
    /// Output moderation.
    pub moderate: Option<Spanned<moat::moderate::spec::ModerateSpec>>,
    /// The response cache.
    pub cache: Option<Spanned<moat::cache::spec::CacheSpec>>,
    /// The audit log.
    pub audit: Option<Spanned<crate::audit::AuditConfig>>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// Where a layer's state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In this process.
    #[default]
    Memory,
    /// In Redis, shared by every gateway pointed at it.
    Redis,
}

/// A duration in seconds, written as a whole or a decimal number (`30`, `0.5`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seconds(pub f64);

impl Seconds {
    /// What a valid value is, for error messages.
    pub const RULE: &'static str = "must be a number of seconds greater than 0";

    /// The duration, unless the value is not a positive, finite number of seconds.
    pub fn duration(self) -> Option<Duration> {
        (self.0.is_finite() && self.0 > 0.0 && self.0 < 1e9)
            .then(|| Duration::from_secs_f64(self.0))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Whole(i64),
            Decimal(f64),
        }
        Ok(Self(match Raw::deserialize(deserializer)? {
            Raw::Whole(n) => n as f64,
            Raw::Decimal(n) => n,
        }))
    }
}

/// Which API the upstream speaks, for how the provider key is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// `Authorization: Bearer KEY`.
    #[default]
    Openai,
    /// `x-api-key: KEY` and a default `anthropic-version`.
    Anthropic,
}

/// `[upstream]`, or one `[[upstreams]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Its name (needed when there are several), in `x-moat-fallback`, metrics and
    /// `/v1/moat/upstreams`.
    pub name: Option<String>,
    /// The models it serves (`gpt-4o*` matches by prefix); all when empty.
    #[serde(default)]
    pub models: Vec<String>,
    /// The provider's base URL including `/v1`, e.g. `https://api.openai.com/v1`.
    pub base_url: Spanned<String>,
    /// How the provider key is sent.
    #[serde(default)]
    pub kind: UpstreamKind,
    /// The environment variable holding the provider key; the key never leaves the server.
    pub api_key_env: Option<Spanned<String>>,
    /// Seconds to wait for the upstream's response head (default 600); `timeout_secs` is the
    /// same setting under its older name.
    #[serde(alias = "timeout_secs")]
    pub first_byte_timeout_secs: Option<Spanned<Seconds>>,
    /// Seconds to wait for a connection to the upstream (default 10).
    pub connect_timeout_secs: Option<Spanned<Seconds>>,
    /// Seconds a streamed reply may send nothing before it is cut off (default 300).
    pub idle_timeout_secs: Option<Spanned<Seconds>>,
}

/// The upstream's deadlines, with defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpstreamTimeouts {
    /// To connect.
    pub connect: Duration,
    /// From sending the request to the response head.
    pub first_byte: Duration,
    /// Between frames of the response body.
    pub idle: Duration,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            first_byte: Duration::from_secs(600),
            idle: Duration::from_secs(300),
        }
    }
}

/// `redis_sentinel = { master = "mymaster", nodes = [...], primary = "redis://:secret@primary/0" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// The name the sentinels monitor the primary under.
    pub master: String,
    /// The sentinels' URLs (with their own user and password, if they want them).
    pub nodes: Vec<String>,
    /// User, password, database and TLS (`rediss://`) for the primary, as a URL whose host is
    /// a placeholder: the sentinels name the primary. Default `redis://primary/0`.
    pub primary: Option<String>,
}

/// One `[[keys]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// A name for logs, audit and per-key limits.
    pub id: String,
    /// The key itself.
    pub key: Option<String>,
    /// Or the hex SHA-256 of the key.
    pub key_sha256: Option<String>,
    /// Or the environment variable holding the key.
    pub key_env: Option<String>,
    /// The tenant the key belongs to.
    pub tenant: Option<String>,
    /// The key's tier, e.g. `free`.
    pub tier: Option<String>,
    /// When the key stops working (RFC 3339, e.g. `2027-01-01T00:00:00Z`): 401 after, saying so.
    pub expires: Option<String>,
    /// The models the key may use (`gpt-4o*` matches by prefix); all when empty. Others get 403.
    #[serde(default)]
    pub models: Vec<String>,
    /// The routes the key may call (`/v1/chat/*` matches below); all when empty. Others get 403.
    #[serde(default)]
    pub routes: Vec<String>,
}

/// A bad configuration: what is wrong, naming the key path, and the line where it can say.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigError {
    /// The message, naming the key.
    pub message: String,
    /// The 1-based line, when known.
    pub line: Option<usize>,
}

impl ConfigError {
    /// An error at `span` of `source`.
    pub(crate) fn at(source: &str, span: Range<usize>, message: String) -> Self {
        Self {
            message,
            line: Some(line_of(source, span)),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A key ready for lookup: its SHA-256 and who it belongs to.
#[derive(Debug, Clone)]
pub struct ResolvedKey {
    /// SHA-256 of the key.
    pub sha256: [u8; 32],
    /// The entry.
    pub entry: KeyConfig,
    /// When it expires, parsed.
    pub expires: Option<jiff::Timestamp>,
}

/// The configuration with environment variables read and every value checked.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The file as parsed.
    pub config: Config,
    /// The largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Deadlines and caps for clients.
    pub server: ServerLimits,
    /// What [`Config::check`] found worth saying but not fatal (variables that are not set).
    pub warnings: Vec<String>,
    /// The providers, in the order they are tried.
    pub upstreams: Vec<crate::upstreams::ResolvedUpstream>,
    /// When requests go down a ladder of upstreams: the wait between retries of one.
    pub retry_backoff: Option<moat::breaker::Backoff>,
    /// Retries per upstream of a ladder.
    pub retry_attempts: u32,
    /// The virtual keys.
    pub keys: Vec<ResolvedKey>,
    /// Identifies callers for every layer (and fingerprints their API keys).
    pub resolver: CallerResolver,
    /// The rate-limit layer, when rules are configured.
    pub ratelimit: Option<RateLimitLayer>,
    /// The quota layer, when budgets are configured.
    pub quota: Option<QuotaLayer>,
    /// The screening layer, when `[sanitize]` is configured.
    pub sanitize: Option<SanitizeLayer>,
    /// The redaction layer, when `[redact]` is configured.
    pub redact: Option<RedactLayer>,
    /// The moderation layer, when `[moderate]` is configured.
    pub moderate: Option<moat::moderate::ModerateLayer>,
    /// The response cache, when `[cache]` is configured.
    pub cache: Option<moat::cache::CacheLayer>,
    /// The audit log, when `[audit]` is configured.
    pub audit: Option<crate::audit::ResolvedAudit>,
    /// The Redis connections the stores share (one per server), pinged by `/readyz`.
    pub redis: Vec<std::sync::Arc<moat::core::store::RedisConnection>>,
}

/// Checks `entries` (from `source`; `prefix` names a keys file in errors) and adds them to `keys`.
fn add_keys(
    keys: &mut Vec<ResolvedKey>,
    entries: &[Spanned<KeyConfig>],
    source: &str,
    prefix: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    for spanned in entries {
        let entry = spanned.get_ref();
        let err = |what: String| {
            let mut e = ConfigError::at(
                source,
                spanned.span(),
                format!("keys (id = {:?}): {what}", entry.id),
            );
            if !prefix.is_empty() {
                e.message = format!("{prefix}line {}: {}", e.line.unwrap_or(0), e.message);
                e.line = None;
            }
            e
        };
        if entry.id.trim().is_empty() {
            return Err(err("id is empty".into()));
        }
        let given = [&entry.key, &entry.key_sha256, &entry.key_env]
            .iter()
            .filter(|k| k.is_some())
            .count();
        if given != 1 {
            return Err(err("set exactly one of key, key_sha256, key_env".into()));
        }
        let sha256 = if let Some(key) = &entry.key {
            if key.trim().is_empty() {
                return Err(err("key is empty".into()));
            }
            Sha256::digest(key.as_bytes()).into()
        } else if let Some(hex) = &entry.key_sha256 {
            moat::core::hex::decode_32(hex.trim())
                .ok_or_else(|| err("key_sha256 must be 64 hex digits".into()))?
        } else {
            let name = entry.key_env.as_deref().unwrap_or_default();
            let key = env(name)
                .ok_or_else(|| err(format!("key_env: environment variable {name} is not set")))?;
            Sha256::digest(key.as_bytes()).into()
        };
        if keys.iter().any(|k| k.entry.id == entry.id) {
            return Err(err("duplicate id".into()));
        }
        if keys.iter().any(|k| k.sha256 == sha256) {
            return Err(err("the same key is configured twice".into()));
        }
        let expires = entry
            .expires
            .as_deref()
            .map(|at| {
                at.parse::<jiff::Timestamp>().map_err(|e| {
                    err(format!(
                        "expires {at:?} is not an RFC 3339 time (2027-01-01T00:00:00Z): {e}"
                    ))
                })
            })
            .transpose()?;
        keys.push(ResolvedKey {
            sha256,
            entry: entry.clone(),
            expires,
        });
    }
    Ok(())
}

/// The path as a user writes it: `ratelimit.rules[0].limits[1]`, without the segments
/// `toml::Spanned` adds.
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if key.starts_with("$__serde_spanned") {
                    continue;
                }
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    out
}

fn line_of(source: &str, span: Range<usize>) -> usize {
    source[..span.start.min(source.len())].matches('\n').count() + 1
}

impl Config {
    /// Parses TOML text; the error names the key path and the line.
    pub fn parse(source: &str) -> Result<Self, ConfigError> {
        let error = |message: &str, span: Option<Range<usize>>, path: String| ConfigError {
            line: span.map(|span| line_of(source, span)),
            message: if path.is_empty() {
                message.to_owned()
            } else {
                format!("{path}: {message}")
            },
        };
        let deserializer = toml::Deserializer::parse(source)
            .map_err(|e| error(e.message(), e.span(), String::new()))?;
        serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = key_path(e.path());
            let inner = e.into_inner();
            error(inner.message(), inner.span(), path)
        })
    }

    /// Parses and checks, reading environment variables through `env`; a variable the file
    /// names that is not set is an error.
    pub fn resolve(
        source: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Resolved, ConfigError> {
        Self::resolve_with(source, &|name| env(name).filter(|v| !v.is_empty()))
    }

    /// Parses and checks a new version of the file for a running gateway (a reload): as
    /// [`resolve`](Self::resolve), then the new layers take over `previous`'s state by name:
    /// rate-limit counters of the rules kept, budgets kept, redaction vaults, cached replies
    /// (when the cache's size is kept), and the breaker of each upstream kept with the same
    /// breaker settings.
    pub fn reload(
        source: &str,
        env: impl Fn(&str) -> Option<String>,
        previous: &Resolved,
    ) -> Result<Resolved, ConfigError> {
        let mut resolved = Self::resolve(source, env)?;
        if let (Some(new), Some(old)) = (resolved.ratelimit.take(), &previous.ratelimit) {
            resolved.ratelimit = Some(new.with_state_from(old));
        }
        if let (Some(new), Some(old)) = (resolved.quota.take(), &previous.quota) {
            resolved.quota = Some(new.with_state_from(old));
        }
        if let (Some(new), Some(old)) = (resolved.redact.take(), &previous.redact) {
            resolved.redact = Some(new.with_state_from(old));
        }
        if let (Some(new), Some(old)) = (resolved.cache.take(), &previous.cache) {
            resolved.cache = Some(new.with_state_from(old));
        }
        if let (Some(new), Some(old)) = (&resolved.audit, &previous.audit) {
            new.note_changes_from(old);
        }
        for upstream in &mut resolved.upstreams {
            let kept = previous.upstreams.iter().find_map(|old| {
                let breaker = old.breaker.as_ref()?;
                let same = old.name == upstream.name
                    && upstream
                        .breaker
                        .as_ref()
                        .is_some_and(|new| new.config() == breaker.config());
                same.then(|| breaker.clone())
            });
            if let Some(breaker) = kept {
                upstream.breaker = Some(breaker);
            }
        }
        Ok(resolved)
    }

    /// Checks a file without needing its secrets: a variable that is not set is a warning (in
    /// [`Resolved::warnings`]) and stands in as a placeholder; everything else is checked as
    /// [`resolve`](Self::resolve) checks it.
    pub fn check(
        source: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Resolved, ConfigError> {
        let unset = RefCell::new(BTreeSet::new());
        let lenient = |name: &str| {
            env(name).filter(|v| !v.is_empty()).or_else(|| {
                unset.borrow_mut().insert(name.to_owned());
                Some(placeholder(name))
            })
        };
        let resolved = Self::resolve_with(source, &lenient);
        let warnings = unset
            .into_inner()
            .into_iter()
            .map(|name| {
                format!(
                    "environment variable {name} is not set: the gateway will not start without it"
                )
            })
            .collect();
        resolved.map(|r| Resolved { warnings, ..r })
    }

    fn resolve_with(
        source: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Resolved, ConfigError> {
        let config = Self::parse(source)?;
        let at = |span: Range<usize>, message: String| ConfigError::at(source, span, message);
        let server = config.server.limits().map_err(|(span, m)| at(span, m))?;
        let (upstreams, retry_backoff, retry_attempts) =
            crate::upstreams::resolve(&config, source, env)?;
        let max_body_bytes = match &config.max_body_bytes {
            None => moat::core::body::DEFAULT_BODY_LIMIT,
            Some(v) if *v.get_ref() == 0 => {
                return Err(at(v.span(), "max_body_bytes: must be at least 1".into()))
            }
            Some(v) => *v.get_ref(),
        };
        let keys = config.keys(source, env)?;
        config.check_tiers(&keys).map_err(|(span, m)| at(span, m))?;
        let resolver = config
            .identity
            .resolver(env)
            .map_err(|(span, m)| at(span, m))?;
        let default_redis = config.default_redis().map_err(|(span, m)| at(span, m))?;
        let redis_ca = match &config.redis_ca_file {
            Some(file) => Some(std::fs::read(file.get_ref()).map_err(|e| {
                at(
                    file.span(),
                    format!("redis_ca_file: cannot read {}: {e}", file.get_ref()),
                )
            })?),
            None => None,
        };
        let ctx = Context::new(
            source,
            resolver.clone(),
            max_body_bytes,
            env,
            default_redis,
            redis_ca,
        );
        let ratelimit = match &config.ratelimit {
            Some(section) => section.get_ref().layer(&ctx, section.span())?,
            None => None,
        };
        let quota = match &config.quota {
            Some(section) => section.get_ref().layer(&ctx, section.span())?,
            None => None,
        };
        let sanitize = config
            .sanitize
            .as_ref()
            .map(|section| {
                let spec = section.get_ref();
                let mut layer = spec.layer()?.with_body_limit(max_body_bytes);
                if let Some(classifier) = &spec.classifier {
                    layer = layer
                        .with_classifier(classifier.external(crate::context::side_client(), env)?);
                }
                Ok(layer)
            })
            .transpose()
            .map_err(|e: String| {
                at(
                    config.sanitize.as_ref().map_or(0..0, Spanned::span),
                    format!("sanitize.{e}"),
                )
            })?;
        let redact = config
            .redact
            .as_ref()
            .map(|spec| crate::redact::layer(spec, &ctx))
            .transpose()?;
        let moderate = config
            .moderate
            .as_ref()
            .map(|section| {
                let spec = section.get_ref();
                let mut layer = spec.layer()?.with_body_limit(max_body_bytes);
                if let Some(external) = &spec.external {
                    layer =
                        layer.with_external(external.external(crate::context::side_client(), env)?);
                }
                Ok(layer)
            })
            .transpose()
            .map_err(|e: String| {
                at(
                    config.moderate.as_ref().map_or(0..0, Spanned::span),
                    format!("moderate.{e}"),
                )
            })?;
        let cache = match &config.cache {
            Some(section) => {
                let spec = section.get_ref();
                let mut layer = spec
                    .layer()
                    .map_err(|e| at(section.span(), format!("cache.{e}")))?
                    .with_body_limit(max_body_bytes)
                    .with_caller_resolver(resolver.clone());
                if spec.store == moat::cache::spec::StoreName::Redis {
                    let url = spec.redis_url.as_deref().map(|u| (u, section.span()));
                    let conn = ctx.redis(url, "cache", section.span())?;
                    let mut redis = moat::cache::RedisStore::new(conn);
                    if let Some(timeout) = spec.redis_timeout {
                        redis = redis.with_timeout(timeout);
                    }
                    layer = layer.with_redis(redis);
                }
                Some(layer)
            }
            None => None,
        };
        let audit = match &config.audit {
            Some(section) => {
                // Every secret the configuration holds: none may reach a logged body.
                let secrets = keys
                    .iter()
                    .filter_map(|k| {
                        k.entry
                            .key
                            .clone()
                            .or_else(|| k.entry.key_env.as_deref().and_then(env))
                    })
                    .chain(upstreams.iter().filter_map(|u| u.api_key.clone()))
                    .collect();
                Some(
                    section
                        .get_ref()
                        .resolve(env, secrets)
                        .map_err(|m| at(section.span(), m))?,
                )
            }
            None => None,
        };
        let redis = ctx.redis_connections();
        Ok(Resolved {
            config,
            max_body_bytes,
            server,
            warnings: Vec::new(),
            upstreams,
            retry_backoff,
            retry_attempts,
            keys,
            resolver,
            ratelimit,
            quota,
            sanitize,
            redact,
            moderate,
            cache,
            audit,
            redis,
        })
    }

    /// The virtual keys, each checked.
    fn keys(
        &self,
        source: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<ResolvedKey>, ConfigError> {
        let mut keys: Vec<ResolvedKey> = Vec::with_capacity(self.keys.len());
        add_keys(&mut keys, &self.keys, source, "", env)?;
        if let Some(file) = &self.keys_file {
            let path = file.get_ref();
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::at(source, file.span(), format!("keys_file: {path}: {e}"))
            })?;
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct KeysFile {
                #[serde(default)]
                keys: Vec<Spanned<KeyConfig>>,
            }
            let listed: KeysFile = toml::from_str(&text).map_err(|e| ConfigError {
                line: None,
                message: format!(
                    "keys_file {path}: {}{}",
                    e.span()
                        .map(|span| format!("line {}: ", line_of(&text, span)))
                        .unwrap_or_default(),
                    e.message()
                ),
            })?;
            if let Some(plain) = listed
                .keys
                .iter()
                .find(|k| k.get_ref().key_sha256.is_none())
            {
                return Err(ConfigError {
                    line: None,
                    message: format!(
                        "keys_file {path}: line {}: keys (id = {:?}): only key_sha256 is accepted here",
                        line_of(&text, plain.span()),
                        plain.get_ref().id
                    ),
                });
            }
            let prefix = format!("keys_file {path}: ");
            add_keys(&mut keys, &listed.keys, &text, &prefix, env)?;
        }
        Ok(keys)
    }

    /// The top level's Redis (`redis_url`, `redis_cluster` or `redis_sentinel`: at most one),
    /// for the sections with `store = "redis"` that name none of their own.
    fn default_redis(&self) -> Result<DefaultRedis, (Range<usize>, String)> {
        let mut named = Vec::new();
        if let Some(url) = &self.redis_url {
            named.push((
                "redis_url",
                url.span(),
                RedisTopology::Node(url.get_ref().clone()),
            ));
        }
        if let Some(nodes) = &self.redis_cluster {
            if nodes.get_ref().is_empty() {
                return Err((nodes.span(), "redis_cluster: name at least one node".into()));
            }
            named.push((
                "redis_cluster",
                nodes.span(),
                RedisTopology::Cluster(nodes.get_ref().clone()),
            ));
        }
        if let Some(sentinel) = &self.redis_sentinel {
            let spec = sentinel.get_ref();
            if spec.nodes.is_empty() {
                return Err((
                    sentinel.span(),
                    "redis_sentinel.nodes: name at least one sentinel".into(),
                ));
            }
            let topology = RedisTopology::Sentinel {
                master: spec.master.clone(),
                nodes: spec.nodes.clone(),
                primary: spec
                    .primary
                    .clone()
                    .unwrap_or_else(|| "redis://primary/0".to_owned()),
            };
            named.push(("redis_sentinel", sentinel.span(), topology));
        }
        match named.len() {
            0 => Ok(None),
            1 => {
                let (_, span, topology) = named.remove(0);
                Ok(Some((topology, span)))
            }
            _ => Err((
                named[1].1.clone(),
                format!(
                    "{}: set one of redis_url, redis_cluster and redis_sentinel, not {} and {}",
                    named[1].0, named[0].0, named[1].0
                ),
            )),
        }
    }

    /// Every tier a rule or budget is limited to must be some key's tier (or the spike guard's
    /// quarantine tier): a misspelt tier would make the rule apply to nobody, silently.
    fn check_tiers(&self, keys: &[ResolvedKey]) -> Result<(), (Range<usize>, String)> {
        let mut known: BTreeSet<&str> = keys
            .iter()
            .filter_map(|k| k.entry.tier.as_deref())
            .collect();
        let ratelimit = self.ratelimit.as_ref().map(Spanned::get_ref);
        known.extend(
            ratelimit
                .and_then(|r| r.spike.as_ref())
                .and_then(|s| s.quarantine_tier()),
        );
        let named = |tiers: &[String]| tiers.iter().find(|t| !known.contains(t.as_str())).cloned();
        let say = |what: String, tier: String| {
            let have = if known.is_empty() {
                "no key has a tier".to_owned()
            } else {
                format!(
                    "the tiers are {}",
                    known
                        .iter()
                        .map(|t| format!("`{t}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            format!("{what}: tier `{tier}` is not the tier of any key ({have}), so it would apply to nobody")
        };
        for rule in ratelimit.map_or(&[][..], |r| &r.rules) {
            if let Some(tier) = named(&rule.get_ref().tiers) {
                let what = format!("ratelimit.rules (name = {:?})", rule.get_ref().name);
                return Err((rule.span(), say(what, tier)));
            }
        }
        let quota = self.quota.as_ref().map(Spanned::get_ref);
        for budget in quota.map_or(&[][..], |q| &q.budgets) {
            if let Some(tier) = named(&budget.get_ref().tiers) {
                let what = format!("quota.budgets (name = {:?})", budget.get_ref().name);
                return Err((budget.span(), say(what, tier)));
            }
        }
        Ok(())
    }
}

/// A stand-in for a secret that is not set, when checking a file: valid wherever a secret goes
/// (a base64 32-byte key included) and different for each variable.
pub(crate) fn placeholder(name: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(name.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const GOOD: &str = r#"
listen = "127.0.0.1:9000"
[upstream]
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"

[[keys]]
id = "alice"
key = "sk-moat-alice"
tenant = "acme"
tier = "free"

[[keys]]
id = "bob"
key_sha256 = "3a6eb0790f39ac87c94f3856b2dd2c5d110e6811602261a9a923d3bb23adc8b7"
"#;

    #[test]
    fn one_redis_topology_at_a_time_and_a_readable_authority() {
        let env = |name: &str| (name == "OPENAI_API_KEY").then(|| "sk-real".to_owned());
        let both = format!(
            "redis_url = \"redis://127.0.0.1:1\"\nredis_sentinel = {{ master = \"m\", nodes = [\"redis://127.0.0.1:2\"] }}\n{GOOD}"
        );
        let error = Config::resolve(&both, env).unwrap_err().to_string();
        assert!(
            error
                .contains("redis_sentinel: set one of redis_url, redis_cluster and redis_sentinel"),
            "{error}"
        );
        let no_nodes = format!("redis_sentinel = {{ master = \"m\", nodes = [] }}\n{GOOD}");
        let error = Config::resolve(&no_nodes, env).unwrap_err().to_string();
        assert!(
            error.contains("redis_sentinel.nodes: name at least one"),
            "{error}"
        );
        let missing = format!("redis_ca_file = \"/nonexistent/ca.pem\"\n{GOOD}");
        let error = Config::resolve(&missing, env).unwrap_err().to_string();
        assert!(
            error.contains("redis_ca_file: cannot read /nonexistent/ca.pem"),
            "{error}"
        );
    }

    #[test]
    fn a_good_file_resolves() {
        let env = |name: &str| (name == "OPENAI_API_KEY").then(|| "sk-real".to_owned());
        let resolved = Config::resolve(GOOD, env).unwrap();
        assert_eq!(resolved.config.listen.port(), 9000);
        assert_eq!(resolved.upstreams[0].api_key.as_deref(), Some("sk-real"));
        assert_eq!(resolved.keys.len(), 2);
        assert_eq!(
            resolved.keys[0].sha256,
            <[u8; 32]>::from(Sha256::digest(b"sk-moat-alice"))
        );
        assert_eq!(resolved.keys[0].entry.tier.as_deref(), Some("free"));
    }

    #[test]
    fn ratelimit_rules_build_a_layer_and_bad_ones_name_their_line() {
        let base = "[upstream]\nbase_url = \"http://x/v1\"\n";
        let good = format!("{base}[[keys]]\nid = \"a\"\nkey = \"k\"\ntier = \"free\"\n[ratelimit]\nstore = \"memory\"\n[[ratelimit.rules]]\nname = \"per-key\"\nkey = \"api_key\"\nlimits = [\"5/minute\", \"100/day\"]\ntokens = [\"20000/minute\"]\ntiers = [\"free\"]\nmethods = [\"POST\"]\nroutes = [\"/v1/*\"]\n[[ratelimit.rules]]\nname = \"by-header\"\nkey = \"header:x-user\"\nlimits = [\"1/second\"]\nmode = \"shadow\"\n");
        assert!(Config::resolve(&good, no_env).unwrap().ratelimit.is_some());
        assert!(Config::resolve(base, no_env).unwrap().ratelimit.is_none());

        let bad_limit = format!(
            "{base}[[ratelimit.rules]]\nname = \"r\"\nkey = \"ip\"\nlimits = [\"5/fortnight\"]\n"
        );
        let e = Config::resolve(&bad_limit, no_env).unwrap_err();
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.message.contains("5/fortnight"), "{e}");

        let bad_key = format!(
            "{base}[[ratelimit.rules]]\nname = \"r\"\nkey = \"user\"\nlimits = [\"5/minute\"]\n"
        );
        let e = Config::resolve(&bad_key, no_env).unwrap_err();
        assert_eq!(e.line, Some(5));
        assert!(e.message.contains("unknown key `user`"), "{e}");

        let no_limits = format!("{base}[[ratelimit.rules]]\nname = \"empty\"\nkey = \"ip\"\n");
        let e = Config::resolve(&no_limits, no_env).unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("no limits"), "{e}");

        let redis_no_url = format!("{base}[ratelimit]\nstore = \"redis\"\n[[ratelimit.rules]]\nname = \"r\"\nkey = \"ip\"\nlimits = [\"1/second\"]\n");
        assert!(Config::resolve(&redis_no_url, no_env)
            .unwrap_err()
            .message
            .contains("redis_url"));

        let proxies =
            format!("{base}[identity]\ntrusted_proxies = [\"10.0.0.0/8\", \"not-a-net\"]\n");
        assert_eq!(Config::resolve(&proxies, no_env).unwrap_err().line, Some(4));
    }

    #[test]
    fn quota_budgets_build_and_bad_ones_name_their_line() {
        let base = "[upstream]\nbase_url = \"http://x/v1\"\n";
        let good = format!("{base}[quota]\ntime_zone = \"Europe/Paris\"\nunknown_model = \"free\"\n[[quota.budgets]]\nname = \"daily\"\nper = \"api_key\"\nperiod = \"day\"\ntokens = 200000\nusd = 5.00\n[[quota.budgets]]\nname = \"roll\"\nper = \"global\"\nperiod = \"rolling:24h\"\nusd = \"100\"\n");
        assert!(Config::resolve(&good, no_env).unwrap().quota.is_some());
        let bad_period = format!("{base}[[quota.budgets]]\nname = \"b\"\nper = \"global\"\nperiod = \"fortnight\"\ntokens = 1\n");
        let e = Config::resolve(&bad_period, no_env).unwrap_err();
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.message.contains("fortnight"));
        let no_cap =
            format!("{base}[[quota.budgets]]\nname = \"b\"\nper = \"global\"\nperiod = \"day\"\n");
        assert!(Config::resolve(&no_cap, no_env)
            .unwrap_err()
            .message
            .contains("set tokens"));
        let bad_tz = format!("{base}[quota]\ntime_zone = \"Mars/Olympus\"\n[[quota.budgets]]\nname = \"b\"\nper = \"global\"\nperiod = \"day\"\ntokens = 1\n");
        assert_eq!(Config::resolve(&bad_tz, no_env).unwrap_err().line, Some(4));
        let bad_usd = format!("{base}[[quota.budgets]]\nname = \"b\"\nper = \"global\"\nperiod = \"day\"\nusd = \"five\"\n");
        assert_eq!(Config::resolve(&bad_usd, no_env).unwrap_err().line, Some(7));
        let missing_prices = format!("{base}[quota]\nprices = \"/nonexistent/prices.json\"\n[[quota.budgets]]\nname = \"b\"\nper = \"global\"\nperiod = \"day\"\ntokens = 1\n");
        assert_eq!(
            Config::resolve(&missing_prices, no_env).unwrap_err().line,
            Some(4)
        );
    }

    #[test]
    fn values_that_would_silently_do_nothing_are_errors() {
        let base = "[upstream]\nbase_url = \"http://x/v1\"\n";
        let keyed = format!("{base}[[keys]]\nid = \"a\"\nkey = \"k\"\ntier = \"free\"\n");
        let cases = [
            (format!("{base}[[keys]]\nid = \"a\"\nkey = \"\"\n"), 3, "key is empty"),
            (format!("{base}[[keys]]\nid = \"\"\nkey = \"k\"\n"), 3, "id is empty"),
            (
                format!("{keyed}[[ratelimit.rules]]\nname = \"r\"\nkey = \"api_key\"\nlimits = [\"1/second\"]\ntiers = [\"fre\"]\n"),
                7,
                "tier `fre` is not the tier of any key (the tiers are `free`)",
            ),
            (
                format!("{base}[[quota.budgets]]\nname = \"b\"\nper = \"global\"\nperiod = \"day\"\ntokens = 1\ntiers = [\"pro\"]\n"),
                3,
                "no key has a tier",
            ),
            (format!("max_body_bytes = 0\n{base}"), 1, "max_body_bytes: must be at least 1"),
            (
                format!("{base}timeout_secs = 0\n"),
                3,
                "upstream.first_byte_timeout_secs: must be a number of seconds greater than 0",
            ),
            (
                format!("{base}[server]\nheader_read_timeout_secs = 0\n"),
                4,
                "server.header_read_timeout_secs",
            ),
            (format!("{base}[server]\nmax_connections = 0\n"), 4, "server.max_connections"),
        ];
        for (source, line, says) in cases {
            let e = Config::resolve(&source, no_env).unwrap_err();
            assert_eq!(e.line, Some(line), "{source}: {e}");
            assert!(e.message.contains(says), "{source}: {e}");
        }
        // A quarantine tier counts as a tier.
        let quarantine = format!("{keyed}[ratelimit.spike]\nquarantine = \"tier:restricted\"\n[[ratelimit.rules]]\nname = \"r\"\nkey = \"ip\"\nlimits = [\"1/second\"]\ntiers = [\"restricted\"]\n");
        assert!(Config::resolve(&quarantine, no_env).is_ok());
        let timeouts = format!(
            "{base}timeout_secs = 30\nconnect_timeout_secs = 0.25\nidle_timeout_secs = 5\n"
        );
        let t = Config::resolve(&timeouts, no_env).unwrap().upstreams[0].timeouts;
        assert_eq!(
            (t.first_byte, t.connect, t.idle),
            (
                Duration::from_secs(30),
                Duration::from_millis(250),
                Duration::from_secs(5)
            )
        );
    }

    #[test]
    fn check_warns_about_unset_secrets_instead_of_failing() {
        let source = format!(
            "{GOOD}[[keys]]\nid = \"carol\"\nkey_env = \"CAROL_KEY\"\n[redact]\nentities = [\"all\"]\noperator = \"encrypt\"\nencryption_key_env = \"MOAT_REDACT_KEY\"\n"
        );
        assert!(Config::resolve(&source, no_env).is_err());
        let checked = Config::check(&source, no_env).unwrap();
        assert_eq!(checked.warnings.len(), 3, "{:?}", checked.warnings);
        for name in ["OPENAI_API_KEY", "CAROL_KEY", "MOAT_REDACT_KEY"] {
            assert!(checked.warnings.iter().any(|w| w.contains(name)), "{name}");
        }
        // What is wrong is still an error.
        let broken = source.replace("id = \"carol\"", "id = \"alice\"");
        assert!(Config::check(&broken, no_env)
            .unwrap_err()
            .message
            .contains("duplicate id"));
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let e = Config::parse(
            "listen = \"127.0.0.1:1\"\n[upstream]\nbase_url = \"http://x\"\nbogus = 1\n",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(4));
        assert!(e.message.contains("bogus"), "{e}");

        let e =
            Config::parse("listen = \"nope\"\n[upstream]\nbase_url = \"http://x\"\n").unwrap_err();
        assert_eq!(e.line, Some(1));
        let e = Config::parse("listen = 5\n[upstream]\nbase_url = \"http://x\"\n").unwrap_err();
        assert_eq!(e.line, Some(1));
        assert!(e.message.starts_with("listen: "), "{e}");

        // Deep keys are named by their path, as written.
        let base = "[upstream]\nbase_url = \"http://x/v1\"\n";
        let deep = format!("{base}[[ratelimit.rules]]\nname = \"r\"\nkey = \"ip\"\nlimits = [\"1/second\", \"5/fortnight\"]\n");
        let e = Config::parse(&deep).unwrap_err();
        assert_eq!(e.line, Some(6));
        assert!(
            e.message.starts_with("ratelimit.rules[0].limits[1]: "),
            "{e}"
        );
        let entity = format!("{base}[redact]\nentities = [\"email\", \"passport\"]\n");
        let e = Config::parse(&entity).unwrap_err();
        assert_eq!(e.line, Some(4));
        assert!(
            e.message
                .starts_with("redact.entities[1]: unknown entity `passport`"),
            "{e}"
        );
        let one = format!("{base}[redact]\nentities = \"all\"\n");
        let all = format!("{base}[redact]\nentities = [\"all\"]\n");
        for source in [one, all] {
            let spec = Config::parse(&source).unwrap().redact.unwrap().into_inner();
            assert_eq!(
                spec.entities().unwrap().len(),
                moat::redact::Entity::ALL.len()
            );
        }

        let e = Config::resolve(GOOD, no_env).unwrap_err();
        assert_eq!(e.line, Some(5));
        assert!(e.to_string().contains("OPENAI_API_KEY"), "{e}");

        let e = Config::resolve("[upstream]\nbase_url = \"ftp://x\"\n", no_env).unwrap_err();
        assert_eq!(
            (e.line, e.message.starts_with("upstream.base_url")),
            (Some(2), true)
        );

        let two = "[upstream]\nbase_url = \"http://x/v1\"\n[[keys]]\nid = \"a\"\nkey = \"k\"\nkey_env = \"K\"\n";
        let e = Config::resolve(two, no_env).unwrap_err();
        assert!(e.message.contains("exactly one"), "{e}");
        assert_eq!(e.line, Some(3), "the line of the entry's [[keys]] header");

        let dup = "[upstream]\nbase_url = \"http://x/v1\"\n[[keys]]\nid = \"a\"\nkey = \"k\"\n[[keys]]\nid = \"b\"\nkey = \"k\"\n";
        assert!(Config::resolve(dup, no_env)
            .unwrap_err()
            .message
            .contains("twice"));
        let bad_hex =
            "[upstream]\nbase_url = \"http://x/v1\"\n[[keys]]\nid = \"a\"\nkey_sha256 = \"zz\"\n";
        assert!(Config::resolve(bad_hex, no_env)
            .unwrap_err()
            .message
            .contains("64 hex"));
    }

    #[test]
    fn upstreams_breaker_and_retry_resolve_and_mistakes_are_named() {
        let ladder = "[[upstreams]]\nname = \"primary\"\nbase_url = \"http://a/v1\"\nmodels = [\"gpt-4o*\"]\n[[upstreams]]\nname = \"backup\"\nbase_url = \"http://b/v1\"\n[breaker]\nfailure_rate = 0.5\nminimum_calls = 10\nwindow = \"count:20\"\nopen_for = \"10s\"\nhalf_open_calls = 2\nslow_call = \"30s\"\n[retry]\nattempts = 2\n";
        let resolved = Config::resolve(ladder, no_env).unwrap();
        let names: Vec<&str> = resolved.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["primary", "backup"]);
        assert_eq!(resolved.upstreams[0].models, ["gpt-4o*"]);
        let breaker = resolved.upstreams[1].breaker.as_ref().unwrap();
        assert_eq!(breaker.config().open_for, Duration::from_secs(10));
        assert_eq!(breaker.config().window, moat::breaker::Window::Count(20));
        assert_eq!(resolved.retry_attempts, 2);

        let single = Config::resolve("[upstream]\nbase_url = \"http://a/v1\"\n", no_env).unwrap();
        assert!(
            single.upstreams[0].breaker.is_none() && single.retry_backoff.is_none(),
            "straight through"
        );

        for (source, says, line) in [
            ("[upstream]\nbase_url = \"http://a/v1\"\n[[upstreams]]\nname = \"b\"\nbase_url = \"http://b/v1\"\n", "not both", Some(1)),
            ("listen = \"127.0.0.1:1\"\n", "no upstream", None),
            ("[[upstreams]]\nbase_url = \"http://a/v1\"\n[[upstreams]]\nname = \"b\"\nbase_url = \"http://b/v1\"\n", "upstreams[0].name", Some(1)),
            ("[[upstreams]]\nname = \"a\"\nbase_url = \"http://a/v1\"\n[[upstreams]]\nname = \"a\"\nbase_url = \"http://b/v1\"\n", "two upstreams are named", Some(4)),
            ("[[upstreams]]\nname = \"a\"\nbase_url = \"ftp://a\"\n", "upstreams[0].base_url", Some(3)),
            ("[upstream]\nbase_url = \"http://a/v1\"\n[breaker]\nwindow = \"sliding:5\"\n", "breaker.window", Some(4)),
            ("[upstream]\nbase_url = \"http://a/v1\"\n[breaker]\nopen_for = \"soon\"\n", "breaker.open_for", Some(4)),
            ("[upstream]\nbase_url = \"http://a/v1\"\n[breaker]\nfailure_rate = 2.0\n", "failure_rate must be", Some(3)),
            ("[upstream]\nbase_url = \"http://a/v1\"\n[breaker]\nbogus = 1\n", "unknown field `bogus`", Some(4)),
            ("[upstream]\nbase_url = \"http://a/v1\"\n[retry]\nattempts = 1\nbackoff = \"10s\"\nmax_backoff = \"1s\"\n", "retry: backoff", Some(3)),
        ] {
            let e = Config::resolve(source, no_env).unwrap_err();
            assert!(e.message.contains(says), "{source}: {e}");
            assert_eq!(e.line, line, "{source}: {e}");
        }
    }
}
