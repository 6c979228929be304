//! `[redact]`: from TOML to a `RedactLayer`.

use moat::core::identity::Fingerprinter;
use moat::redact::{Entity, Operator, RedactLayer, Redactor};
use serde::Deserialize;
use toml::Spanned;

use crate::limits::LimitsError;

/// `[redact]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactConfig {
    /// Entity names, `secrets` for every secret kind, or `all`.
    pub entities: Spanned<Vec<String>>,
    /// `pseudonymize` (default), `redact`, `mask` or `hash`.
    pub operator: Option<Spanned<String>>,
    /// Put the originals back in replies (default true).
    pub restore: Option<bool>,
    /// Also redact new personal data in replies (not available yet: must be false).
    pub reply_side: Option<Spanned<bool>>,
}

fn at(span: std::ops::Range<usize>, message: String) -> LimitsError {
    LimitsError {
        message,
        span: Some(span),
    }
}

/// The redaction layer for `[redact]`, or `None` without the table.
pub fn layer(
    config: Option<&RedactConfig>,
    fingerprinter: &Fingerprinter,
) -> Result<Option<RedactLayer>, LimitsError> {
    let Some(config) = config else {
        return Ok(None);
    };
    let mut entities = Vec::new();
    for name in config.entities.get_ref() {
        match name.as_str() {
            "all" => entities.extend(Entity::ALL),
            "secrets" => entities.extend(Entity::SECRETS),
            other => entities.push(other.parse().map_err(|e: String| {
                at(config.entities.span(), format!("redact.entities: {e}"))
            })?),
        }
    }
    if entities.is_empty() {
        return Err(at(
            config.entities.span(),
            "redact.entities: name at least one entity, or \"all\"".into(),
        ));
    }
    let operator = match config
        .operator
        .as_ref()
        .map(|o| (o.get_ref().as_str(), o.span()))
    {
        None | Some(("pseudonymize", _)) => Operator::Pseudonymize,
        Some(("redact", _)) => Operator::Redact,
        Some(("mask", _)) => Operator::Mask,
        Some(("hash", _)) => Operator::Hash(fingerprinter.clone()),
        Some(("encrypt", span)) => {
            return Err(at(
                span,
                "redact.operator: \"encrypt\" is not available yet".into(),
            ))
        }
        Some((other, span)) => {
            return Err(at(
                span,
                format!("redact.operator: `{other}` is not pseudonymize, redact, mask or hash"),
            ))
        }
    };
    if let Some(reply_side) = &config.reply_side {
        if *reply_side.get_ref() {
            return Err(at(
                reply_side.span(),
                "redact.reply_side: reply-side redaction is not available yet".into(),
            ));
        }
    }
    let redactor = Redactor::new(&entities).with_operator(operator);
    Ok(Some(
        RedactLayer::new(redactor).with_restore(config.restore.unwrap_or(true)),
    ))
}
