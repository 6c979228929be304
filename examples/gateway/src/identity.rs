//! `[identity]`: how callers are told apart, by every layer alike.

use ipnet::IpNet;
use moat::core::identity::{CallerResolver, ClientIp, Fingerprinter};
use serde::Deserialize;
use toml::Spanned;

/// `[identity]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Proxies in front of the gateway whose `X-Forwarded-For` entries are trusted.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// The environment variable with the secret API keys are fingerprinted under. Set it when
    /// several gateways share Redis, so they agree on keys.
    pub fingerprint_secret_env: Option<Spanned<String>>,
}

impl IdentityConfig {
    /// The caller resolver (with its fingerprinter); `Err` names the unset variable.
    pub(crate) fn resolver(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<CallerResolver, (std::ops::Range<usize>, String)> {
        let fingerprinter = match &self.fingerprint_secret_env {
            Some(name) => {
                let secret = env(name.get_ref()).ok_or_else(|| {
                    (
                        name.span(),
                        format!(
                            "identity.fingerprint_secret_env: environment variable {} is not set",
                            name.get_ref()
                        ),
                    )
                })?;
                Fingerprinter::new(secret.as_bytes())
            }
            None => Fingerprinter::default(),
        };
        let client_ip = ClientIp::new(self.trusted_proxies.iter().copied());
        Ok(CallerResolver::new(fingerprinter, client_ip))
    }
}
