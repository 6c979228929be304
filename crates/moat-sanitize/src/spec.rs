//! What a configuration file says of prompt screening, deserialized with serde (feature
//! `serde`): the gateway's `[sanitize]`, and anyone else's in any format serde reads.
//!
//! ```
//! use moat_sanitize::spec::SanitizeSpec;
//!
//! let spec: SanitizeSpec = serde_json::from_value(serde_json::json!({
//!     "action": "block",
//!     "threshold": 0.8,
//!     "allow_system_from_client": false,
//!     "deny": ["(?i)reveal .* system prompt"],
//!     "max_prompt_bytes": 200000,
//!     "documents": {"threshold": 0.6}
//! }))
//! .unwrap();
//! let layer = spec.layer().unwrap();
//! # let _ = layer;
//! ```

use moat_core::kit::{Scope, Score};
use moat_core::llm::UnknownPolicy;
use serde::Deserialize;

use crate::classifier::{Classifier, External, OnError, PromptShields};
use crate::policy::{Action, Policy, Provenance};
use crate::service::SanitizeLayer;

/// Prompt screening (`[sanitize]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SanitizeSpec {
    /// `block` (default), `strip`, `annotate` or `shadow`.
    #[serde(default)]
    pub action: Action,
    /// The score (0 to 1) at which user text and documents are flagged (default 0.8; lower is
    /// stricter).
    pub threshold: Option<Score>,
    /// Accept system and developer messages from clients (default false).
    #[serde(default)]
    pub allow_system_from_client: bool,
    /// Regular expressions that refuse any text they match.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Regular expressions of which the last user message must match one.
    #[serde(default)]
    pub allow: Vec<String>,
    /// The most bytes of prompt text.
    pub max_prompt_bytes: Option<u64>,
    /// The most messages.
    pub max_messages: Option<u64>,
    /// The most prompt tokens.
    pub max_prompt_tokens: Option<u64>,
    /// User text: `{ threshold = 0.8 }` or `{ screen = false }`.
    pub user: Option<ProvenanceSpec>,
    /// System and developer text (not screened unless a threshold is given).
    pub system: Option<ProvenanceSpec>,
    /// Tool results and retrieved documents.
    pub documents: Option<ProvenanceSpec>,
    /// Text in parts of a request the parser does not know: `scan_all` (default), `reject`
    /// (400) or `pass` (unscreened).
    #[serde(default)]
    pub unknown: UnknownPolicy,
    /// Put a random marker in the system prompt and withhold replies that repeat it (default
    /// false).
    #[serde(default)]
    pub canary: bool,
    /// Only these routes (`/v1/chat/completions`, or `/v1/*` for a prefix); default all.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Only these models (exact, or `prefix*`); default all.
    #[serde(default)]
    pub models: Vec<String>,
    /// Only callers of these tiers; default all.
    #[serde(default)]
    pub tiers: Vec<String>,
    /// An external classifier shaped like Azure's Prompt Shields, asked after the local
    /// screening. The spec holds where and how; the HTTP client is the caller's
    /// ([`ClassifierSpec::external`]).
    pub classifier: Option<ClassifierSpec>,
    /// Policies of their own for some routes, models or tiers (`[[sanitize.policies]]`), tried
    /// in order: the first whose `routes`, `models` and `tiers` admit a request screens it,
    /// the section's policy screens the rest. Each is a whole policy (a key it leaves out takes
    /// its default, not the section's value); `unknown`, `canary` and `classifier` are the
    /// section's alone.
    #[serde(default)]
    pub policies: Vec<SanitizeSpec>,
}

/// An external classifier (`[sanitize.classifier]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClassifierSpec {
    /// The full URL to post to, e.g.
    /// `https://NAME.cognitiveservices.azure.com/contentsafety/text:shieldPrompt?api-version=2024-09-01`.
    pub url: String,
    /// The environment variable holding the key sent in `Ocp-Apim-Subscription-Key`.
    pub key_env: Option<String>,
    /// The longest wait for a verdict (default 500ms).
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<std::time::Duration>,
    /// `open` (default: pass on the local verdict) or `closed` (503) when it fails or is late.
    #[serde(default)]
    pub on_error: OnError,
}

impl ClassifierSpec {
    /// The classifier over `client`, its key read with `env`; an error names what is wrong.
    pub fn external<S>(
        &self,
        client: S,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<External, String>
    where
        PromptShields<S>: Classifier,
    {
        let uri: http::Uri = self
            .url
            .parse()
            .ok()
            .filter(|u: &http::Uri| matches!(u.scheme_str(), Some("http" | "https")))
            .ok_or_else(|| format!("classifier.url: `{}` is not an http(s) URL", self.url))?;
        let mut shields = PromptShields::new(client, uri);
        if let Some(name) = &self.key_env {
            let key =
                env(name).ok_or_else(|| format!("classifier.key_env: `{name}` is not set"))?;
            let key = http::HeaderValue::try_from(key)
                .map_err(|_| format!("classifier.key_env: `{name}` is not a valid header value"))?;
            shields = shields.key(key);
        }
        let mut external = External::new(shields).on_error(self.on_error);
        if let Some(timeout) = self.timeout {
            external = external.budget(timeout);
        }
        Ok(external)
    }
}

/// The screening of one provenance.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ProvenanceSpec {
    /// Its threshold.
    pub threshold: Option<Score>,
    /// `false` to not screen it at all (hidden characters and patterns are still checked).
    pub screen: Option<bool>,
}

impl SanitizeSpec {
    /// The policy the spec describes; an error names a pattern that does not compile.
    pub fn policy(&self) -> Result<Policy, String> {
        let compile = |what: &str, e: regex::Error| format!("{what}: {e}");
        let mut policy = Policy::new()
            .action(self.action)
            .allow_system_from_client(self.allow_system_from_client)
            .deny(&self.deny)
            .map_err(|e| compile("deny", e))?
            .allow(&self.allow)
            .map_err(|e| compile("allow", e))?;
        if let Some(threshold) = self.threshold {
            policy = policy.threshold(f64::from(threshold.get()));
        }
        for (provenance, spec) in [
            (Provenance::User, &self.user),
            (Provenance::System, &self.system),
            (Provenance::Document, &self.documents),
        ] {
            let Some(spec) = spec else { continue };
            let threshold = match (spec.screen, spec.threshold) {
                (Some(false), _) => None,
                (_, Some(threshold)) => Some(f64::from(threshold.get())),
                (_, None) => Some(
                    self.threshold
                        .map_or(crate::DEFAULT_THRESHOLD, |t| f64::from(t.get())),
                ),
            };
            policy = policy.threshold_for(provenance, threshold);
        }
        for (cap, set) in [
            (
                self.max_prompt_bytes,
                Policy::max_prompt_bytes as fn(Policy, u64) -> Policy,
            ),
            (self.max_messages, Policy::max_messages),
            (self.max_prompt_tokens, Policy::max_prompt_tokens),
        ] {
            if let Some(cap) = cap {
                policy = set(policy, cap);
            }
        }
        Ok(policy)
    }

    /// The layer the spec describes, without its classifier (see [`ClassifierSpec::external`]).
    pub fn layer(&self) -> Result<SanitizeLayer, String> {
        let mut layer = SanitizeLayer::new(self.policy()?)
            .with_unknown(self.unknown)
            .with_canary(self.canary);
        for (i, spec) in self.policies.iter().enumerate() {
            let filters = [&spec.routes[..], &spec.models, &spec.tiers];
            let layer_keys = [
                ("unknown", spec.unknown != UnknownPolicy::default()),
                ("canary", spec.canary),
                ("classifier", spec.classifier.is_some()),
                ("policies", !spec.policies.is_empty()),
            ];
            let scope = Scope::for_policy("sanitize", i, filters, &layer_keys)
                .map_err(|e| e.to_string())?;
            let policy = spec.policy().map_err(|e| format!("policies[{i}].{e}"))?;
            layer = layer.with_policy_for(scope, policy);
        }
        Ok(
            match Scope::filter("sanitize", &self.routes, &self.models, &self.tiers) {
                Some(scope) => layer.with_scope(scope),
                None => layer,
            },
        )
    }
}
