//! `[redact]`: from TOML to a `RedactLayer`.

use std::collections::BTreeMap;
use std::time::Duration;

use http::HeaderName;
use moat::core::decision::Mode;
use moat::core::identity::Fingerprinter;
use moat::core::llm::UnknownPolicy;
use moat::redact::{Cipher, Detector, Entity, Operator, RedactLayer, Redactor, Sessions};
use serde::Deserialize;
use toml::Spanned;

use crate::limits::LimitsError;

/// `[redact]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactConfig {
    /// Entity names, `secrets` for every secret kind, or `all` (every entity but `person`).
    pub entities: Spanned<Vec<String>>,
    /// `pseudonymize` (default), `redact`, `mask`, `hash`, `encrypt` or `fake`.
    pub operator: Option<Spanned<String>>,
    /// Operators for single entities, e.g. `{ credit_card = "mask" }`.
    #[serde(default)]
    pub operators: BTreeMap<String, Spanned<String>>,
    /// The environment variable holding the base64 AES-256 key for `encrypt`.
    pub encryption_key_env: Option<Spanned<String>>,
    /// Put the originals back in replies (default true).
    pub restore: Option<bool>,
    /// Also redact new personal data in replies (default false).
    pub reply_side: Option<bool>,
    /// The score a finding needs (default 0.5).
    pub threshold: Option<Spanned<f32>>,
    /// Scores for single entities, e.g. `{ phone = 0.7 }`.
    #[serde(default)]
    pub thresholds: BTreeMap<String, Spanned<f32>>,
    /// Values never redacted: exact values, or domains for emails and URLs.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Terms always redacted (whole words, any case).
    #[serde(default)]
    pub deny: Vec<String>,
    /// `enforce` (default) or `shadow`: find and count, but send prompts unchanged.
    #[serde(default)]
    pub mode: Mode,
    /// Text in parts of a request the parser does not know: `scan_all` (default), `reject`
    /// (400) or `pass` (unscanned).
    #[serde(default)]
    pub unknown: UnknownPolicy,
    /// One vault per conversation instead of per request.
    pub sessions: Option<SessionsConfig>,
}

/// `[redact.sessions]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsConfig {
    /// The header naming the conversation (default `x-moat-conversation`).
    pub header: Option<Spanned<String>>,
    /// Seconds a session lives after its last request (default 3600).
    pub ttl_secs: Option<u64>,
    /// The most sessions kept (default 1024).
    pub max_sessions: Option<usize>,
    /// The most values per session (default 1024).
    pub max_values: Option<usize>,
}

fn at(span: std::ops::Range<usize>, message: String) -> LimitsError {
    LimitsError {
        message,
        span: Some(span),
    }
}

fn entity(name: &Spanned<String>, key: &str) -> Result<Entity, LimitsError> {
    name.get_ref()
        .parse()
        .map_err(|e| at(name.span(), format!("{key}: {e}")))
}

fn score(value: &Spanned<f32>, key: &str) -> Result<f32, LimitsError> {
    let v = *value.get_ref();
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(at(
            value.span(),
            format!("{key}: a score is between 0 and 1, not {v}"),
        ))
    }
}

/// The redaction layer for `[redact]`, or `None` without the table.
pub fn layer(
    config: Option<&RedactConfig>,
    fingerprinter: &Fingerprinter,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<RedactLayer>, LimitsError> {
    let Some(config) = config else {
        return Ok(None);
    };
    let mut entities = Vec::new();
    for name in config.entities.get_ref() {
        match name.as_str() {
            "all" => entities.extend(Entity::ALL),
            "secrets" => entities.extend(Entity::SECRETS),
            other => entities.push(
                other
                    .parse()
                    .map_err(|e| at(config.entities.span(), format!("redact.entities: {e}")))?,
            ),
        }
    }
    if entities.is_empty() {
        return Err(at(
            config.entities.span(),
            "redact.entities: name at least one entity, or \"all\"".into(),
        ));
    }
    let operator_named = |name: &Spanned<String>, key: &str| -> Result<Operator, LimitsError> {
        Ok(match name.get_ref().as_str() {
            "pseudonymize" => Operator::Pseudonymize,
            "redact" => Operator::Redact,
            "mask" => Operator::Mask,
            "hash" => Operator::Hash(fingerprinter.clone()),
            "fake" => Operator::Fake(fingerprinter.clone()),
            "encrypt" => Operator::Encrypt(cipher(config, name.span(), env)?),
            other => {
                return Err(at(
                    name.span(),
                    format!(
                        "{key}: `{other}` is not pseudonymize, redact, mask, hash, encrypt or fake"
                    ),
                ))
            }
        })
    };
    let mut detector = Detector::new(&entities)
        .with_allow_list(&config.allow)
        .with_deny_list(&config.deny);
    if let Some(threshold) = &config.threshold {
        detector = detector.with_default_threshold(score(threshold, "redact.threshold")?);
    }
    for (name, value) in &config.thresholds {
        let e = name
            .parse()
            .map_err(|e| at(value.span(), format!("redact.thresholds: {e}")))?;
        detector = detector.with_threshold(e, score(value, "redact.thresholds")?);
    }
    let mut redactor = Redactor::from(detector);
    if let Some(name) = &config.operator {
        redactor = redactor.with_operator(operator_named(name, "redact.operator")?);
    }
    for (name, op) in &config.operators {
        let e = entity(&Spanned::new(op.span(), name.clone()), "redact.operators")?;
        redactor = redactor.with_operator_for(e, operator_named(op, "redact.operators")?);
    }
    let mut layer = RedactLayer::new(redactor)
        .with_mode(config.mode)
        .with_unknown(config.unknown)
        .with_restore(config.restore.unwrap_or(true))
        .with_reply_side(config.reply_side.unwrap_or(false));
    if let Some(s) = &config.sessions {
        let mut sessions = Sessions::new();
        if let Some(header) = &s.header {
            let name = HeaderName::try_from(header.get_ref().as_str()).map_err(|_| {
                at(
                    header.span(),
                    format!(
                        "redact.sessions.header: `{}` is not a header name",
                        header.get_ref()
                    ),
                )
            })?;
            sessions = sessions.with_header(name);
        }
        if let Some(ttl) = s.ttl_secs {
            sessions = sessions.with_ttl(Duration::from_secs(ttl));
        }
        if let Some(n) = s.max_sessions {
            sessions = sessions.with_max_sessions(n);
        }
        if let Some(n) = s.max_values {
            sessions = sessions.with_max_values(n);
        }
        layer = layer.with_sessions(sessions);
    }
    Ok(Some(layer))
}

/// The cipher for `encrypt`: its key from the environment variable `encryption_key_env` names.
fn cipher(
    config: &RedactConfig,
    operator: std::ops::Range<usize>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Cipher, LimitsError> {
    let Some(var) = &config.encryption_key_env else {
        return Err(at(
            operator,
            "redact: \"encrypt\" needs encryption_key_env, the variable holding a base64 32-byte key".into(),
        ));
    };
    let key = env(var.get_ref()).ok_or_else(|| {
        at(
            var.span(),
            format!("redact.encryption_key_env: `{}` is not set", var.get_ref()),
        )
    })?;
    Cipher::from_base64(&key).map_err(|e| {
        at(
            var.span(),
            format!("redact.encryption_key_env: `{}`: {e}", var.get_ref()),
        )
    })
}
