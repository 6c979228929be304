//! A rule: which requests, keyed how, limited to what.

use std::fmt;
use std::sync::Arc;

use http::Method;
use moat_core::decision::Mode;
use moat_core::identity::{Caller, KeyExtractor};
use moat_core::llm::model_matches;

use crate::limit::Limit;

/// One rate-limit rule.
///
/// ```
/// use moat_core::identity::ApiKey;
/// use moat_ratelimit::{Limit, Rule};
///
/// let rule = Rule::new("free-tier", ApiKey::default())
///     .limit(Limit::per_second(10))
///     .limit(Limit::per_minute(600))
///     .tokens(Limit::per_minute(20_000))
///     .max_in_flight(4)
///     .route("/v1/chat/completions")
///     .tier("free");
/// assert_eq!(rule.name(), "free-tier");
/// ```
#[derive(Clone)]
pub struct Rule {
    pub(crate) name: Arc<str>,
    pub(crate) key: Arc<dyn KeyExtractor>,
    pub(crate) limits: Vec<Limit>,
    pub(crate) tokens: Vec<Limit>,
    pub(crate) max_in_flight: Option<u32>,
    pub(crate) routes: Vec<String>,
    pub(crate) methods: Vec<Method>,
    pub(crate) models: Vec<String>,
    pub(crate) tiers: Vec<String>,
    pub(crate) mode: Mode,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("limits", &self.limits)
            .field("tokens", &self.tokens)
            .field("max_in_flight", &self.max_in_flight)
            .field("routes", &self.routes)
            .field("methods", &self.methods)
            .field("models", &self.models)
            .field("tiers", &self.tiers)
            .field("mode", &self.mode)
            .finish()
    }
}

impl Rule {
    /// A rule named `name` (for headers, metrics and logs), keyed by `key`. Add limits with
    /// [`limit`](Self::limit), [`tokens`](Self::tokens) or [`max_in_flight`](Self::max_in_flight).
    pub fn new(name: impl Into<Arc<str>>, key: impl KeyExtractor) -> Self {
        Self {
            name: name.into(),
            key: Arc::new(key),
            limits: Vec::new(),
            tokens: Vec::new(),
            max_in_flight: None,
            routes: Vec::new(),
            methods: Vec::new(),
            models: Vec::new(),
            tiers: Vec::new(),
            mode: Mode::Enforce,
        }
    }

    /// The rule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a request rate; a request must fit every one.
    #[must_use]
    pub fn limit(mut self, limit: Limit) -> Self {
        self.limits.push(limit);
        self
    }

    /// Adds a token rate: requests are charged their estimated tokens on admission and settled
    /// from the response's real `usage`.
    #[must_use]
    pub fn tokens(mut self, limit: Limit) -> Self {
        self.tokens.push(limit);
        self
    }

    /// Limits requests in flight per key; one is released when its response body ends.
    #[must_use]
    pub fn max_in_flight(mut self, max: u32) -> Self {
        self.max_in_flight = Some(max.max(1));
        self
    }

    /// Applies only to this path, or to paths under it if it ends with `/*`. May be repeated.
    #[must_use]
    pub fn route(mut self, route: impl Into<String>) -> Self {
        self.routes.push(route.into());
        self
    }

    /// Applies only to this method. May be repeated.
    #[must_use]
    pub fn method(mut self, method: Method) -> Self {
        self.methods.push(method);
        self
    }

    /// Applies only to requests for this model (the body is parsed). A trailing `*` matches a
    /// prefix. May be repeated.
    #[must_use]
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.models.push(model.into());
        self
    }

    /// Applies only to callers of this tier (the [`Caller`]'s). May be repeated.
    #[must_use]
    pub fn tier(mut self, tier: impl Into<String>) -> Self {
        self.tiers.push(tier.into());
        self
    }

    /// Decides and records, but lets everything through.
    #[must_use]
    pub fn shadow(mut self) -> Self {
        self.mode = Mode::Shadow;
        self
    }

    /// Sets the mode.
    #[must_use]
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Whether deciding needs the parsed body (token rates, model filters or a model key).
    pub(crate) fn needs_body(&self) -> bool {
        !self.tokens.is_empty() || !self.models.is_empty() || self.key.needs_body()
    }

    /// Whether the rule applies, judged on what is known without the body.
    pub(crate) fn matches_head(&self, method: &Method, path: &str, caller: &Caller) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && (self.routes.is_empty() || self.routes.iter().any(|r| route_matches(r, path)))
            && caller.in_tiers(&self.tiers)
    }

    /// Whether the rule's model filter admits `model`.
    pub(crate) fn matches_model(&self, model: Option<&str>) -> bool {
        model_matches(&self.models, model)
    }
}

fn route_matches(route: &str, path: &str) -> bool {
    match route.strip_suffix("/*") {
        Some(prefix) => {
            path == prefix || path.starts_with(prefix) && path[prefix.len()..].starts_with('/')
        }
        None => route == path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_core::identity::Global;

    #[test]
    fn matching_on_route_method_tier_and_model() {
        let rule = Rule::new("r", Global)
            .route("/v1/chat/completions")
            .route("/v1/beta/*")
            .method(Method::POST)
            .tier("free")
            .model("gpt-4o")
            .model("claude-*");
        let free = Caller::new().with_tier("free");
        let paid = Caller::new().with_tier("paid");
        assert!(rule.matches_head(&Method::POST, "/v1/chat/completions", &free));
        assert!(rule.matches_head(&Method::POST, "/v1/beta/x/y", &free));
        assert!(rule.matches_head(&Method::POST, "/v1/beta", &free));
        assert!(!rule.matches_head(&Method::POST, "/v1/betamax", &free));
        assert!(!rule.matches_head(&Method::GET, "/v1/chat/completions", &free));
        assert!(!rule.matches_head(&Method::POST, "/v1/chat/completions", &paid));
        assert!(!rule.matches_head(&Method::POST, "/v1/chat/completions", &Caller::new()));
        assert!(rule.matches_model(Some("gpt-4o")));
        assert!(rule.matches_model(Some("claude-haiku-4-5")));
        assert!(!rule.matches_model(Some("gpt-4o-mini")));
        assert!(!rule.matches_model(None));
        assert!(rule.needs_body());
        assert!(!Rule::new("r", Global)
            .limit(Limit::per_second(1))
            .needs_body());
        assert!(Rule::new("r", Global)
            .tokens(Limit::per_second(1))
            .needs_body());
    }
}
