//! A rule: which requests, keyed how, limited to what.

use std::sync::Arc;

use moat_core::identity::KeyExtractor;
use moat_core::kit::Scope;

use crate::limit::Limit;

/// One rate-limit rule: a [`Scope`] (name, key, routes, methods, models, tiers, mode) and the
/// limits that hold in it.
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
#[derive(Debug, Clone)]
pub struct Rule {
    pub(crate) scope: Scope,
    pub(crate) limits: Vec<Limit>,
    pub(crate) tokens: Vec<Limit>,
    pub(crate) max_in_flight: Option<u32>,
}

moat_core::scoped!(Rule);

impl Rule {
    /// A rule named `name` (for headers, metrics, logs and its state), keyed by `key`. Add
    /// limits with [`limit`](Self::limit), [`tokens`](Self::tokens) or
    /// [`max_in_flight`](Self::max_in_flight).
    pub fn new(name: impl Into<Arc<str>>, key: impl KeyExtractor) -> Self {
        Self::in_scope(Scope::new(name, key))
    }

    /// A rule for requests in `scope`.
    pub fn in_scope(scope: Scope) -> Self {
        Self {
            scope,
            limits: Vec::new(),
            tokens: Vec::new(),
            max_in_flight: None,
        }
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

    /// Whether deciding needs the parsed body (token rates, model filters or a model key).
    pub(crate) fn needs_body(&self) -> bool {
        !self.tokens.is_empty() || self.scope.needs_body()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_core::identity::Global;

    #[test]
    fn the_body_is_read_only_for_token_rates_and_model_filters() {
        assert!(!Rule::new("r", Global)
            .limit(Limit::per_second(1))
            .route("/v1/*")
            .needs_body());
        assert!(Rule::new("r", Global)
            .tokens(Limit::per_second(1))
            .needs_body());
        assert!(Rule::new("r", Global)
            .limit(Limit::per_second(1))
            .model("gpt-4o")
            .needs_body());
    }
}
