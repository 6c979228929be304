//! `[redact]`: the crate's spec, with the environment the gateway reads keys from.

use moat::redact::spec::RedactSpec;
use moat::redact::RedactLayer;
use toml::Spanned;

use crate::config::ConfigError;
use crate::context::Context;

/// The layer for `[redact]`.
pub(crate) fn layer(
    spec: &Spanned<RedactSpec>,
    ctx: &Context<'_>,
) -> Result<RedactLayer, ConfigError> {
    spec.get_ref()
        .layer(ctx.resolver.fingerprinter(), ctx.env)
        .map(|layer| layer.with_body_limit(ctx.max_body_bytes))
        .map_err(|e| ctx.error(spec.span(), e))
}
