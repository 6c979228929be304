//! How much of a request is logged: levels chosen by rules on route, tenant and model, as
//! Kubernetes' audit policy chooses them.

use moat_core::kit::route_matches;
use moat_core::llm::model_matches;

/// How much of a request its record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Level {
    /// Not recorded (health probes, for instance).
    None,
    /// Who, what, when, the outcome and every decision; no bodies.
    #[default]
    Metadata,
    /// Also the request body, scrubbed, with the SHA-256 of the raw bytes.
    Request,
    /// Also the response body, scrubbed, with its SHA-256.
    RequestResponse,
}

impl Level {
    /// Its name in records and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Metadata => "metadata",
            Self::Request => "request",
            Self::RequestResponse => "request_response",
        }
    }
}

/// One rule: requests that match every list given (an empty list matches all) get `level`.
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
#[non_exhaustive]
pub struct LevelRule {
    /// Paths (`/v1/chat/completions`, or a prefix as `/v1/*`).
    #[cfg_attr(feature = "serde", serde(default))]
    pub routes: Vec<String>,
    /// Tenants.
    #[cfg_attr(feature = "serde", serde(default))]
    pub tenants: Vec<String>,
    /// Models (`gpt-4o`, or a prefix as `gpt-4*`).
    #[cfg_attr(feature = "serde", serde(default))]
    pub models: Vec<String>,
    /// The level of the requests it matches.
    pub level: Level,
}

impl LevelRule {
    /// A rule giving `level` to every request; narrow it with the `with_*` methods.
    pub fn new(level: Level) -> Self {
        Self {
            level,
            ..Self::default()
        }
    }

    /// Only these routes.
    #[must_use]
    pub fn with_routes<I: IntoIterator<Item = S>, S: Into<String>>(mut self, routes: I) -> Self {
        self.routes = routes.into_iter().map(Into::into).collect();
        self
    }

    /// Only these tenants.
    #[must_use]
    pub fn with_tenants<I: IntoIterator<Item = S>, S: Into<String>>(mut self, tenants: I) -> Self {
        self.tenants = tenants.into_iter().map(Into::into).collect();
        self
    }

    /// Only these models.
    #[must_use]
    pub fn with_models<I: IntoIterator<Item = S>, S: Into<String>>(mut self, models: I) -> Self {
        self.models = models.into_iter().map(Into::into).collect();
        self
    }

    fn route_matches(&self, path: &str) -> bool {
        self.routes.is_empty() || self.routes.iter().any(|r| route_matches(r, path))
    }

    fn matches(&self, path: &str, tenant: Option<&str>, model: Option<&str>) -> bool {
        self.route_matches(path)
            && (self.tenants.is_empty()
                || tenant.is_some_and(|t| self.tenants.iter().any(|x| x == t)))
            && (self.models.is_empty() || model_matches(&self.models, model))
    }
}

/// The levels: the first matching rule decides, else the default.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    default: Level,
    rules: Vec<LevelRule>,
}

impl Policy {
    /// Every request at `default`.
    pub fn new(default: Level) -> Self {
        Self {
            default,
            rules: Vec::new(),
        }
    }

    /// Adds a rule (rules are tried in the order added).
    #[must_use]
    pub fn with_rule(mut self, rule: LevelRule) -> Self {
        self.rules.push(rule);
        self
    }

    /// The level of a request, once its tenant and model are known.
    pub fn level(&self, path: &str, tenant: Option<&str>, model: Option<&str>) -> Level {
        self.rules
            .iter()
            .find(|r| r.matches(path, tenant, model))
            .map_or(self.default, |r| r.level)
    }

    /// The most a request on `path` could be logged at, whatever its tenant and model: what
    /// must be captured while its bodies pass (tenant and model are known only later).
    pub(crate) fn most_for(&self, path: &str) -> Level {
        let mut most = Level::None;
        for rule in self.rules.iter().filter(|r| r.route_matches(path)) {
            most = most.max(rule.level);
            if rule.tenants.is_empty() && rule.models.is_empty() {
                // It matches every request on the path: rules after it and the default are
                // never reached.
                return most;
            }
        }
        most.max(self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_rule_decides_and_capture_covers_every_possible_level() {
        let policy = Policy::new(Level::Metadata)
            .with_rule(LevelRule::new(Level::Metadata).with_tenants(["bank"]))
            .with_rule(
                LevelRule::new(Level::RequestResponse)
                    .with_routes(["/v1/chat/completions"])
                    .with_models(["gpt-4*"]),
            )
            .with_rule(LevelRule::new(Level::Request).with_routes(["/v1/*"]));
        let chat = "/v1/chat/completions";
        assert_eq!(
            policy.level(chat, Some("bank"), Some("gpt-4o")),
            Level::Metadata
        );
        assert_eq!(
            policy.level(chat, Some("acme"), Some("gpt-4o")),
            Level::RequestResponse
        );
        assert_eq!(policy.level(chat, None, Some("o3")), Level::Request);
        assert_eq!(policy.level("/healthz", None, None), Level::Metadata);
        assert_eq!(policy.most_for(chat), Level::RequestResponse);
        assert_eq!(policy.most_for("/v1/embeddings"), Level::Request);
        assert_eq!(policy.most_for("/healthz"), Level::Metadata);
        let quiet = Policy::new(Level::Metadata)
            .with_rule(LevelRule::new(Level::None).with_routes(["/healthz"]));
        assert_eq!(quiet.level("/healthz", None, None), Level::None);
        assert_eq!(quiet.most_for("/healthz"), Level::None);
        assert_eq!(quiet.most_for("/v1/chat/completions"), Level::Metadata);
        // A narrower rule before it can still record some requests on the path.
        let some = Policy::new(Level::Metadata)
            .with_rule(
                LevelRule::new(Level::Request)
                    .with_routes(["/healthz"])
                    .with_tenants(["ops"]),
            )
            .with_rule(LevelRule::new(Level::None).with_routes(["/healthz"]));
        assert_eq!(some.most_for("/healthz"), Level::Request);
    }
}
