//! The gateway's TOML configuration.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;

use moat::core::identity::{CallerResolver, Fingerprinter};
use moat::quota::QuotaLayer;
use moat::ratelimit::RateLimitLayer;
use moat::redact::RedactLayer;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::budgets::{self, QuotaConfig};
use crate::limits::{self, IdentityConfig, RateLimitConfig};
use crate::privacy::{self, RedactConfig};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where to listen.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The provider behind the gateway.
    pub upstream: UpstreamConfig,
    /// Virtual keys handed to clients; none means every caller is anonymous, keyed by IP.
    #[serde(default)]
    pub keys: Vec<Spanned<KeyConfig>>,
    /// Largest request body accepted, in bytes.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How callers are told apart.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Request, token and concurrency limits.
    #[serde(default)]
    pub ratelimit: RateLimitConfig,
    /// Token and spend budgets.
    #[serde(default)]
    pub quota: QuotaConfig,
    /// PII and secret redaction.
    pub redact: Option<RedactConfig>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_max_body_bytes() -> usize {
    moat::core::body::DEFAULT_BODY_LIMIT
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

/// `[upstream]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The provider's base URL including `/v1`, e.g. `https://api.openai.com/v1`.
    pub base_url: Spanned<String>,
    /// How the provider key is sent.
    #[serde(default)]
    pub kind: UpstreamKind,
    /// The environment variable holding the provider key; the key never leaves the server.
    pub api_key_env: Option<Spanned<String>>,
    /// Seconds to wait for the upstream's response headers.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

fn default_timeout_secs() -> u64 {
    600
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
}

/// A bad configuration: what is wrong, with the key and line where it can say.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigError {
    /// The message, naming the key.
    pub message: String,
    /// The 1-based line, when known.
    pub line: Option<usize>,
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
}

/// The configuration with environment variables read and every value checked.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The file as parsed.
    pub config: Config,
    /// The provider key, if configured.
    pub upstream_api_key: Option<String>,
    /// The virtual keys.
    pub keys: Vec<ResolvedKey>,
    /// Identifies callers for every layer.
    pub resolver: CallerResolver,
    /// Fingerprints API keys.
    pub fingerprinter: Fingerprinter,
    /// The rate-limit layer, when rules are configured.
    pub ratelimit: Option<RateLimitLayer>,
    /// The quota layer, when budgets are configured.
    pub quota: Option<QuotaLayer>,
    /// The redaction layer, when `[redact]` is configured.
    pub redact: Option<RedactLayer>,
}

fn line_of(source: &str, span: Range<usize>) -> usize {
    source[..span.start.min(source.len())].matches('\n').count() + 1
}

impl Config {
    /// Parses TOML text; the error names the key and line.
    pub fn parse(source: &str) -> Result<Self, ConfigError> {
        toml::from_str(source).map_err(|e| ConfigError {
            line: e.span().map(|span| line_of(source, span)),
            message: e.message().to_owned(),
        })
    }

    /// Parses and checks, reading environment variables through `env`.
    pub fn resolve(
        source: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Resolved, ConfigError> {
        let config = Self::parse(source)?;
        let at = |span: Range<usize>, message: String| ConfigError {
            message,
            line: Some(line_of(source, span)),
        };
        let base = &config.upstream.base_url;
        match base.get_ref().parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {}
            _ => {
                return Err(at(
                    base.span(),
                    format!(
                        "upstream.base_url: `{}` is not an http(s) URL",
                        base.get_ref()
                    ),
                ))
            }
        }
        let upstream_api_key =
            match &config.upstream.api_key_env {
                Some(name) => Some(env(name.get_ref()).filter(|v| !v.is_empty()).ok_or_else(
                    || {
                        at(
                            name.span(),
                            format!(
                                "upstream.api_key_env: environment variable {} is not set",
                                name.get_ref()
                            ),
                        )
                    },
                )?),
                None => None,
            };
        let mut keys: Vec<ResolvedKey> = Vec::with_capacity(config.keys.len());
        for spanned in &config.keys {
            let entry = spanned.get_ref();
            let err = |what: String| {
                at(
                    spanned.span(),
                    format!("keys (id = {:?}): {what}", entry.id),
                )
            };
            let given = [&entry.key, &entry.key_sha256, &entry.key_env]
                .iter()
                .filter(|k| k.is_some())
                .count();
            if given != 1 {
                return Err(err("set exactly one of key, key_sha256, key_env".into()));
            }
            let sha256 = if let Some(key) = &entry.key {
                Sha256::digest(key.as_bytes()).into()
            } else if let Some(hex) = &entry.key_sha256 {
                parse_sha256(hex).ok_or_else(|| err("key_sha256 must be 64 hex digits".into()))?
            } else {
                let name = entry.key_env.as_deref().unwrap_or_default();
                let key = env(name).filter(|v| !v.is_empty()).ok_or_else(|| {
                    err(format!("key_env: environment variable {name} is not set"))
                })?;
                Sha256::digest(key.as_bytes()).into()
            };
            if keys.iter().any(|k| k.entry.id == entry.id) {
                return Err(err("duplicate id".into()));
            }
            if keys.iter().any(|k| k.sha256 == sha256) {
                return Err(err("the same key is configured twice".into()));
            }
            keys.push(ResolvedKey {
                sha256,
                entry: entry.clone(),
            });
        }
        let limits_error = |e: limits::LimitsError| ConfigError {
            line: e.span.map(|span| line_of(source, span)),
            message: e.message,
        };
        let (resolver, fingerprinter) =
            limits::resolver(&config.identity, &env).map_err(limits_error)?;
        let ratelimit = limits::layer(
            &config.ratelimit,
            &config.identity,
            resolver.clone(),
            &fingerprinter,
        )
        .map_err(limits_error)?;
        let quota = budgets::layer(&config.quota, resolver.clone(), &fingerprinter)
            .map_err(limits_error)?;
        let redact =
            privacy::layer(config.redact.as_ref(), &fingerprinter, &env).map_err(limits_error)?;
        Ok(Resolved {
            config,
            upstream_api_key,
            keys,
            resolver,
            fingerprinter,
            ratelimit,
            quota,
            redact,
        })
    }
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
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
    fn a_good_file_resolves() {
        let env = |name: &str| (name == "OPENAI_API_KEY").then(|| "sk-real".to_owned());
        let resolved = Config::resolve(GOOD, env).unwrap();
        assert_eq!(resolved.config.listen.port(), 9000);
        assert_eq!(resolved.upstream_api_key.as_deref(), Some("sk-real"));
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
        let good = format!("{base}[ratelimit]\nstore = \"memory\"\n[[ratelimit.rules]]\nname = \"per-key\"\nkey = \"api_key\"\nlimits = [\"5/minute\", \"100/day\"]\ntokens = [\"20000/minute\"]\ntiers = [\"free\"]\nmethods = [\"POST\"]\nroutes = [\"/v1/*\"]\n[[ratelimit.rules]]\nname = \"by-header\"\nkey = \"header:x-user\"\nlimits = [\"1/second\"]\nmode = \"shadow\"\n");
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
}
