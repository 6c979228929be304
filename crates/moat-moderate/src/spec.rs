//! What a configuration file says of output moderation, deserialized with serde (feature
//! `serde`): the gateway's `[moderate]`, and anyone else's in any format serde reads.
//!
//! ```
//! use moat_moderate::spec::ModerateSpec;
//!
//! let spec: ModerateSpec = serde_json::from_value(serde_json::json!({
//!     "action": "block",
//!     "stream_mode": "hold_back",
//!     "categories": {"sexual/minors": 0.1, "hate": 0.5},
//!     "actions": {"harassment": "mask"},
//!     "words": [{"category": "harassment", "severity": 2, "words": ["frak", "frakking"]}],
//!     "rules": [{"category": "violence", "severity": 2, "pattern": "^stab+ing$"}],
//!     "input": false
//! }))
//! .unwrap();
//! let layer = spec.layer().unwrap();
//! # let _ = layer;
//! ```

use std::collections::BTreeMap;

use moat_core::kit::{OnError, Scope, Score};
use serde::Deserialize;

use crate::category::Category;
use crate::lexicon::{Hit, Lexicon, Severity};
use crate::policy::{Action, Classifier, Policy, StreamMode};
use crate::service::ModerateLayer;

/// Output moderation (`[moderate]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ModerateSpec {
    /// `block` (default), `mask`, `flag` or `shadow`.
    #[serde(default)]
    pub action: Action,
    /// `hold_back` (default), `buffered` or `stream_first`.
    #[serde(default)]
    pub stream_mode: StreamMode,
    /// The threshold of every category not named in `categories` (default 0.5).
    pub threshold: Option<Score>,
    /// Per-category thresholds, e.g. `{ "sexual/minors" = 0.1, "hate" = 0.5 }`.
    #[serde(default)]
    pub categories: BTreeMap<Category, Score>,
    /// Per-category actions, e.g. `{ "harassment" = "mask" }`.
    #[serde(default)]
    pub actions: BTreeMap<Category, Action>,
    /// Also moderate the prompt (default false).
    #[serde(default)]
    pub input: bool,
    /// Only these routes (`/v1/chat/completions`, or `/v1/*` for a prefix); default every LLM
    /// route.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Only these models (exact, or `prefix*`); default every model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Only callers of these tiers; default every caller.
    #[serde(default)]
    pub tiers: Vec<String>,
    /// What a blocked whole reply says instead.
    pub message: Option<String>,
    /// Your words, added to the built-in lexicon.
    #[serde(default)]
    pub words: Vec<WordsSpec>,
    /// Your rules: regular expressions matched against each whole folded word.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    /// Leave out the built-in lexicon (only your words and rules, and the model).
    #[serde(default)]
    pub no_built_in_lexicon: bool,
    /// Leave out the learned model (lexicon only).
    #[serde(default)]
    pub no_model: bool,
    /// An OpenAI-compatible `/v1/moderations` endpoint asked beside the local classifier. The
    /// spec holds where and how; the HTTP client is the caller's
    /// ([`ExternalSpec::external`]).
    pub external: Option<ExternalSpec>,
    /// Policies of their own for some routes, models or tiers (`[[moderate.policies]]`), tried
    /// in order: the first whose `routes`, `models` and `tiers` admit a request moderates it,
    /// the section's policy moderates the rest. Each is a whole policy (a key it leaves out
    /// takes its default, not the section's value); `input` and `external` are the section's
    /// alone.
    #[serde(default)]
    pub policies: Vec<ModerateSpec>,
}

/// Words of one category and severity (`[[moderate.words]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct WordsSpec {
    /// The category.
    pub category: Category,
    /// 1 (mild), 2 (strong, the default) or 3 (severe).
    #[serde(default = "strong")]
    pub severity: u8,
    /// Words, stems (`frak~`) and phrases, in the lexicon's syntax ([`Lexicon`]).
    pub words: Vec<String>,
}

/// A rule (`[[moderate.rules]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RuleSpec {
    /// The category.
    pub category: Category,
    /// 1 (mild), 2 (strong, the default) or 3 (severe).
    #[serde(default = "strong")]
    pub severity: u8,
    /// A regular expression matched against each whole folded word.
    pub pattern: String,
}

fn strong() -> u8 {
    2
}

fn severity(level: u8) -> Result<Severity, String> {
    match level {
        1 => Ok(Severity::Mild),
        2 => Ok(Severity::Strong),
        3 => Ok(Severity::Severe),
        _ => Err(format!("severity must be 1, 2 or 3, not {level}")),
    }
}

/// An external moderator (`[moderate.external]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ExternalSpec {
    /// The full URL, e.g. `https://api.openai.com/v1/moderations`.
    pub url: String,
    /// The environment variable holding the bearer key.
    pub api_key_env: Option<String>,
    /// The moderation model to ask for (e.g. `omni-moderation-latest`).
    pub model: Option<String>,
    /// The longest wait for a verdict (default 1s).
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<std::time::Duration>,
    /// `open` (default: go on with the local verdict) or `closed` (withhold) when it fails or
    /// is late.
    #[serde(default)]
    pub on_error: OnError,
}

impl ExternalSpec {
    /// The moderator over `client`, its key read with `env`; an error names what is wrong.
    pub fn external<S>(
        &self,
        client: S,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<crate::External, String>
    where
        crate::OpenAiModerations<S>: crate::Moderator,
    {
        let uri: http::Uri = self
            .url
            .parse()
            .ok()
            .filter(|u: &http::Uri| matches!(u.scheme_str(), Some("http" | "https")))
            .ok_or_else(|| format!("external.url: `{}` is not an http(s) URL", self.url))?;
        let mut moderations = crate::OpenAiModerations::new(client, uri);
        if let Some(name) = &self.api_key_env {
            let key =
                env(name).ok_or_else(|| format!("external.api_key_env: `{name}` is not set"))?;
            let key = http::HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| {
                format!("external.api_key_env: `{name}` is not a valid header value")
            })?;
            moderations = moderations.key(key);
        }
        if let Some(model) = &self.model {
            moderations = moderations.model(model.clone());
        }
        let mut external = crate::External::new(moderations).on_error(self.on_error);
        if let Some(timeout) = self.timeout {
            external = external.budget(timeout);
        }
        Ok(external)
    }
}

impl ModerateSpec {
    /// The policy the spec describes; an error names what is wrong.
    pub fn policy(&self) -> Result<Policy, String> {
        let mut lexicon = if self.no_built_in_lexicon {
            Lexicon::new()
        } else {
            Lexicon::built_in()
        };
        for (i, spec) in self.words.iter().enumerate() {
            let hit = Hit {
                category: spec.category,
                severity: severity(spec.severity).map_err(|e| format!("words[{i}]: {e}"))?,
            };
            for word in &spec.words {
                lexicon
                    .add(word, hit)
                    .map_err(|e| format!("words[{i}]: `{word}`: {e}"))?;
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let hit = Hit {
                category: rule.category,
                severity: severity(rule.severity).map_err(|e| format!("rules[{i}]: {e}"))?,
            };
            lexicon
                .add_rule(&rule.pattern, hit)
                .map_err(|e| format!("rules[{i}]: {e}"))?;
        }
        let mut classifier = Classifier::new().lexicon(lexicon);
        if self.no_model {
            classifier = classifier.model(None, Category::Harassment);
        }
        let mut policy = Policy::new()
            .classifier(classifier)
            .action(self.action)
            .stream_mode(self.stream_mode);
        if let Some(threshold) = self.threshold {
            policy = policy.threshold(threshold.get());
        }
        for (&category, threshold) in &self.categories {
            policy = policy.threshold_for(category, threshold.get());
        }
        for (&category, &action) in &self.actions {
            policy = policy.action_for(category, action);
        }
        if let Some(message) = &self.message {
            policy = policy.message(message.clone());
        }
        Ok(policy)
    }

    /// The layer the spec describes, without its external moderator (see
    /// [`ExternalSpec::external`]).
    pub fn layer(&self) -> Result<ModerateLayer, String> {
        let mut layer = ModerateLayer::new(self.policy()?).with_input(self.input);
        for (i, spec) in self.policies.iter().enumerate() {
            let filters = [&spec.routes[..], &spec.models, &spec.tiers];
            let layer_keys = [
                ("input", spec.input),
                ("external", spec.external.is_some()),
                ("policies", !spec.policies.is_empty()),
            ];
            let scope = Scope::for_policy("moderate", i, filters, &layer_keys)
                .map_err(|e| e.to_string())?;
            let policy = spec.policy().map_err(|e| format!("policies[{i}].{e}"))?;
            layer = layer.with_policy_for(scope, policy);
        }
        Ok(
            match Scope::filter("moderate", &self.routes, &self.models, &self.tiers) {
                Some(scope) => layer.with_scope(scope),
                None => layer,
            },
        )
    }
}
