//! What a configuration file says of redaction, deserialized with serde (feature `serde`):
//! the spec the gateway reads from TOML, and anyone else from any format serde reads.
//!
//! ```
//! use moat_core::identity::Fingerprinter;
//! use moat_redact::spec::RedactSpec;
//!
//! let spec: RedactSpec = serde_json::from_value(serde_json::json!({
//!     "entities": "all", "operators": {"credit_card": "mask"}, "thresholds": {"phone": 0.7}
//! }))
//! .unwrap();
//! let layer = spec.layer(&Fingerprinter::default(), &|_| None).unwrap();
//! # let _ = layer;
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use http::HeaderName;
use moat_core::decision::Mode;
use moat_core::identity::Fingerprinter;
use moat_core::kit::Scope;
use moat_core::llm::UnknownPolicy;
use serde::de::{self, Deserializer};
use serde::Deserialize;

pub use moat_core::kit::Score;

use crate::cipher::Cipher;
use crate::detect::Detector;
use crate::entity::{Entity, UnknownEntity};
use crate::redactor::{Operator, Redactor};
use crate::service::RedactLayer;
use crate::session::Sessions;

/// Redaction (`[redact]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RedactSpec {
    /// Entity names, `secrets` for every secret kind, or `all` (every entity but `person`); one
    /// name or a list.
    #[serde(deserialize_with = "one_or_many")]
    pub entities: Vec<EntitySet>,
    /// How values are replaced (default `pseudonymize`).
    pub operator: Option<OperatorName>,
    /// Operators for single entities, e.g. `{ credit_card = "mask" }`.
    #[serde(default)]
    pub operators: BTreeMap<Entity, OperatorName>,
    /// The environment variable holding the base64 AES-256 key for `encrypt`.
    pub encryption_key_env: Option<String>,
    /// Put the originals back in replies (default true).
    pub restore: Option<bool>,
    /// Also redact new personal data in replies (default false).
    pub reply_side: Option<bool>,
    /// The score a finding needs (default 0.5).
    pub threshold: Option<Score>,
    /// Scores for single entities, e.g. `{ phone = 0.7 }`.
    #[serde(default)]
    pub thresholds: BTreeMap<Entity, Score>,
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
    pub sessions: Option<SessionsSpec>,
    /// Only these routes (`/v1/chat/completions`, or `/v1/*` for a prefix); default all.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Only these models (exact, or `prefix*`); default all.
    #[serde(default)]
    pub models: Vec<String>,
    /// Only callers of these tiers; default all.
    #[serde(default)]
    pub tiers: Vec<String>,
    /// Redaction of its own for some routes, models or tiers (`[[redact.policies]]`), tried in
    /// order: the first whose `routes`, `models` and `tiers` admit a request redacts it, the
    /// section's entities and operators the rest. Each is a whole policy (a key it leaves out
    /// takes its default, not the section's value); `mode`, `unknown`, `restore`,
    /// `reply_side` and `sessions` are the section's alone.
    #[serde(default)]
    pub policies: Vec<RedactSpec>,
}

/// A name in `entities`: one entity, `secrets` (every secret kind) or `all` (every entity but
/// `person`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EntitySet {
    /// Every entity but `person`.
    All,
    /// Every secret kind.
    Secrets,
    /// One entity.
    One(Entity),
}

impl EntitySet {
    /// The entities it stands for.
    pub fn entities(self) -> impl Iterator<Item = Entity> {
        let (many, one): (&'static [Entity], _) = match self {
            Self::All => (&Entity::ALL, None),
            Self::Secrets => (&Entity::SECRETS, None),
            Self::One(entity) => (&[], Some(entity)),
        };
        many.iter().copied().chain(one)
    }
}

impl std::str::FromStr for EntitySet {
    type Err = UnknownEntity;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(Self::All),
            "secrets" => Ok(Self::Secrets),
            name => name.parse().map(Self::One),
        }
    }
}

impl<'de> Deserialize<'de> for EntitySet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// An operator, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum OperatorName {
    /// `[EMAIL_1]`, restored in replies.
    Pseudonymize,
    /// `[EMAIL]`.
    Redact,
    /// The last four characters kept.
    Mask,
    /// A keyed hash.
    Hash,
    /// AES-256-GCM, restored in replies (needs `encryption_key_env`).
    Encrypt,
    /// A realistic fake value.
    Fake,
}

/// Per-conversation vaults (`[redact.sessions]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SessionsSpec {
    /// The header naming the conversation (default `x-moat-conversation`).
    #[serde(default, deserialize_with = "header_name")]
    pub header: Option<HeaderName>,
    /// Seconds a session lives after its last request (default 3600).
    pub ttl_secs: Option<u64>,
    /// The most sessions kept (default 1024).
    pub max_sessions: Option<usize>,
    /// The most values per session (default 1024).
    pub max_values: Option<usize>,
}

/// Why a redaction spec cannot be built; the message names the key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedactSpecError {
    /// The key at fault, e.g. `entities`.
    pub key: &'static str,
    /// The entry of `policies` it is in, if it is in one.
    pub policy: Option<usize>,
    message: String,
}

impl fmt::Display for RedactSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.policy {
            Some(i) => write!(f, "redact.policies[{i}].{}: {}", self.key, self.message),
            None => write!(f, "redact.{}: {}", self.key, self.message),
        }
    }
}

impl std::error::Error for RedactSpecError {}

fn error(key: &'static str, message: impl fmt::Display) -> RedactSpecError {
    RedactSpecError {
        key,
        policy: None,
        message: message.to_string(),
    }
}

impl RedactSpec {
    /// The entities named: `all`, `secrets` and single names.
    pub fn entities(&self) -> Result<Vec<Entity>, RedactSpecError> {
        let entities: Vec<Entity> = self
            .entities
            .iter()
            .flat_map(|set| set.entities())
            .collect();
        if entities.is_empty() {
            return Err(error("entities", "name at least one entity, or \"all\""));
        }
        Ok(entities)
    }

    /// The layer. Hashes, fakes and session ids use `fingerprinter`; the `encrypt` key is read
    /// through `env` (the variable `encryption_key_env` names).
    pub fn layer(
        &self,
        fingerprinter: &Fingerprinter,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<RedactLayer, RedactSpecError> {
        let mut layer = RedactLayer::new(self.redactor(fingerprinter, env)?)
            .with_mode(self.mode)
            .with_unknown(self.unknown)
            .with_restore(self.restore.unwrap_or(true))
            .with_reply_side(self.reply_side.unwrap_or(false));
        for (i, spec) in self.policies.iter().enumerate() {
            let in_entry = |mut e: RedactSpecError| {
                e.policy = Some(i);
                e
            };
            let filters = [&spec.routes[..], &spec.models, &spec.tiers];
            let layer_keys = [
                ("mode", spec.mode != Mode::default()),
                ("unknown", spec.unknown != UnknownPolicy::default()),
                ("restore", spec.restore.is_some()),
                ("reply_side", spec.reply_side.is_some()),
                ("sessions", spec.sessions.is_some()),
                ("policies", !spec.policies.is_empty()),
            ];
            let scope = Scope::for_policy("redact", i, filters, &layer_keys)
                .map_err(|e| in_entry(error(e.key(), e.reason())))?;
            layer =
                layer.with_policy_for(scope, spec.redactor(fingerprinter, env).map_err(in_entry)?);
        }
        if let Some(s) = &self.sessions {
            let mut sessions = Sessions::new();
            if let Some(header) = &s.header {
                sessions = sessions.with_header(header.clone());
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
        if let Some(scope) = Scope::filter("redact", &self.routes, &self.models, &self.tiers) {
            layer = layer.with_scope(scope);
        }
        Ok(layer)
    }

    /// The redactor: the detector of its entities, thresholds and lists, with its operators.
    fn redactor(
        &self,
        fingerprinter: &Fingerprinter,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Redactor, RedactSpecError> {
        let operator =
            |name: OperatorName, key: &'static str| -> Result<Operator, RedactSpecError> {
                Ok(match name {
                    OperatorName::Pseudonymize => Operator::Pseudonymize,
                    OperatorName::Redact => Operator::Redact,
                    OperatorName::Mask => Operator::Mask,
                    OperatorName::Hash => Operator::Hash(fingerprinter.clone()),
                    OperatorName::Fake => Operator::Fake(fingerprinter.clone()),
                    OperatorName::Encrypt => Operator::Encrypt(self.cipher(key, env)?),
                })
            };
        let mut detector = Detector::new(&self.entities()?)
            .with_allow_list(&self.allow)
            .with_deny_list(&self.deny);
        if let Some(t) = self.threshold {
            detector = detector.with_default_threshold(t.get());
        }
        for (&entity, &t) in &self.thresholds {
            detector = detector.with_threshold(entity, t.get());
        }
        let mut redactor = Redactor::from(detector);
        if let Some(name) = self.operator {
            redactor = redactor.with_operator(operator(name, "operator")?);
        }
        for (&entity, &name) in &self.operators {
            redactor = redactor.with_operator_for(entity, operator(name, "operators")?);
        }
        Ok(redactor)
    }

    /// The cipher for `encrypt`: its key from the environment variable the spec names.
    fn cipher(
        &self,
        key: &'static str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Cipher, RedactSpecError> {
        let Some(var) = &self.encryption_key_env else {
            return Err(error(
                key,
                "\"encrypt\" needs encryption_key_env, the variable holding a base64 32-byte key",
            ));
        };
        let value = env(var).ok_or_else(|| {
            error(
                "encryption_key_env",
                format_args!("environment variable {var} is not set"),
            )
        })?;
        Cipher::from_base64(&value)
            .map_err(|e| error("encryption_key_env", format_args!("{var}: {e}")))
    }
}

/// One value or a list of them, with the error of the value at fault (an untagged enum would
/// only say that nothing matched).
fn one_or_many<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    struct OneOrMany<T>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>> de::Visitor<'de> for OneOrMany<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a name or a list of names")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<T>, E> {
            T::deserialize(de::value::StrDeserializer::<E>::new(v)).map(|one| vec![one])
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Vec<T>, A::Error> {
            Vec::deserialize(de::value::SeqAccessDeserializer::new(seq))
        }
    }

    d.deserialize_any(OneOrMany(std::marker::PhantomData))
}

fn header_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HeaderName>, D::Error> {
    let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
    HeaderName::try_from(&*text)
        .map(Some)
        .map_err(|_| de::Error::custom(format!("`{text}` is not a header name")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> Result<RedactSpec, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn entities_one_or_many_and_errors_name_their_key() {
        assert_eq!(
            spec(json!({"entities": "all"}))
                .unwrap()
                .entities()
                .unwrap()
                .len(),
            Entity::ALL.len()
        );
        assert_eq!(
            spec(json!({"entities": ["email", "phone"]}))
                .unwrap()
                .entities()
                .unwrap()
                .len(),
            2
        );
        let fp = Fingerprinter::default();
        let cases = [
            (json!({"entities": []}), "redact.entities"),
            (
                json!({"entities": "all", "operator": "encrypt"}),
                "needs encryption_key_env",
            ),
            (
                json!({"entities": "all", "operator": "encrypt", "encryption_key_env": "K"}),
                "K is not set",
            ),
        ];
        for (v, says) in cases {
            let e = spec(v.clone()).unwrap().layer(&fp, &|_| None).unwrap_err();
            assert!(e.to_string().contains(says), "{v}: {e}");
        }
        for (bad, says) in [
            (
                json!({"entities": ["email", "passport"]}),
                "unknown entity `passport`",
            ),
            (json!({"entities": "passport"}), ""),
            (
                json!({"entities": "all", "threshold": 1.5}),
                "between 0 and 1, not 1.5",
            ),
            (
                json!({"entities": "all", "thresholds": {"phone": -1}}),
                "between 0 and 1",
            ),
        ] {
            let e = spec(bad.clone()).unwrap_err();
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
        for bad in [
            json!({"entities": "all", "operator": "shred"}),
            json!({"entities": "all", "operators": {"passport": "mask"}}),
            json!({"entities": "all", "sessions": {"header": "bad header"}}),
            json!({"entities": "all", "typo": 1}),
        ] {
            assert!(spec(bad.clone()).is_err(), "{bad}");
        }
        let key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_owned();
        let ok = spec(
            json!({"entities": "all", "operator": "encrypt", "encryption_key_env": "K",
            "sessions": {"header": "x-conv", "ttl_secs": 5}}),
        )
        .unwrap();
        assert!(ok
            .layer(&fp, &|name| (name == "K").then(|| key.clone()))
            .is_ok());
    }
}
