//! A budget: whose usage, over what period, capped at what.

use std::sync::Arc;

use moat_core::decision::Mode;
use moat_core::identity::KeyExtractor;
use moat_core::kit::Scope;
use serde::Serialize;

use crate::money::Usd;
use crate::period::Period;

/// Amounts of usage: tokens and money.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Amounts {
    /// Prompt tokens (cached ones only when the budget counts them).
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// Input plus output.
    pub tokens: u64,
    /// Spend.
    pub usd: Usd,
}

impl Amounts {
    /// Input and output tokens and their cost.
    pub fn new(input_tokens: u64, output_tokens: u64, usd: Usd) -> Self {
        Self {
            input_tokens,
            output_tokens,
            tokens: input_tokens.saturating_add(output_tokens),
            usd,
        }
    }

    pub(crate) fn add(self, o: Amounts) -> Amounts {
        Amounts {
            input_tokens: self.input_tokens.saturating_add(o.input_tokens),
            output_tokens: self.output_tokens.saturating_add(o.output_tokens),
            tokens: self.tokens.saturating_add(o.tokens),
            usd: self.usd.saturating_add(o.usd),
        }
    }

    /// This amount scaled by `ppm` millionths (the part of a past rolling bucket that still counts).
    pub(crate) fn scaled(self, ppm: u64) -> Amounts {
        let s =
            |v: u64| u64::try_from(u128::from(v) * u128::from(ppm) / 1_000_000).unwrap_or(u64::MAX);
        Amounts {
            input_tokens: s(self.input_tokens),
            output_tokens: s(self.output_tokens),
            tokens: s(self.tokens),
            usd: Usd::from_micros(s(self.usd.micros())),
        }
    }
}

/// The caps of a budget; `None` is uncapped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Limits {
    /// Total tokens.
    pub tokens: Option<u64>,
    /// Prompt tokens.
    pub input_tokens: Option<u64>,
    /// Generated tokens.
    pub output_tokens: Option<u64>,
    /// Spend.
    pub usd: Option<Usd>,
}

/// Which cap a request would break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dimension {
    Tokens,
    InputTokens,
    OutputTokens,
    Usd,
}

/// One cap: which, how much, and how to read it from amounts.
type Cap = (Dimension, Option<u64>, fn(&Amounts) -> u64);

impl Limits {
    fn caps(&self) -> [Cap; 4] {
        [
            (Dimension::Tokens, self.tokens, |a| a.tokens),
            (Dimension::InputTokens, self.input_tokens, |a| {
                a.input_tokens
            }),
            (Dimension::OutputTokens, self.output_tokens, |a| {
                a.output_tokens
            }),
            (Dimension::Usd, self.usd.map(Usd::micros), |a| {
                a.usd.micros()
            }),
        ]
    }

    /// The first cap `committed + extra` breaks, with the committed amount and the cap.
    pub(crate) fn breaks(
        &self,
        committed: &Amounts,
        extra: &Amounts,
    ) -> Option<(Dimension, u64, u64, u64)> {
        self.caps().into_iter().find_map(|(dim, cap, get)| {
            let cap = cap?;
            let (have, need) = (get(committed), get(extra));
            (have.saturating_add(need) > cap).then_some((dim, have, need, cap))
        })
    }

    /// The cap of one dimension (micro-dollars for spend).
    pub(crate) fn cap(&self, dim: Dimension) -> Option<u64> {
        self.caps()
            .into_iter()
            .find_map(|(d, cap, _)| (d == dim).then_some(cap))
            .flatten()
    }

    /// The largest share of any cap that `used` takes, in percent (rounded down).
    pub(crate) fn percent_used(&self, used: &Amounts) -> u64 {
        self.caps()
            .into_iter()
            .filter_map(|(_, cap, get)| cap.map(|cap| get(used).saturating_mul(100) / cap.max(1)))
            .max()
            .unwrap_or(0)
    }

    /// What is left of each cap after `committed`.
    pub(crate) fn remaining(&self, committed: &Amounts) -> Amounts {
        let left = |cap: Option<u64>, v: u64| cap.map_or(u64::MAX, |c| c.saturating_sub(v));
        Amounts {
            input_tokens: left(self.input_tokens, committed.input_tokens),
            output_tokens: left(self.output_tokens, committed.output_tokens),
            tokens: left(self.tokens, committed.tokens),
            usd: Usd::from_micros(left(self.usd.map(Usd::micros), committed.usd.micros())),
        }
    }

    pub(crate) fn has_usd(&self) -> bool {
        self.usd.is_some()
    }

    pub(crate) fn describe(&self, dim: Dimension) -> String {
        match dim {
            Dimension::Tokens => format!("{} tokens", self.tokens.unwrap_or_default()),
            Dimension::InputTokens => {
                format!("{} input tokens", self.input_tokens.unwrap_or_default())
            }
            Dimension::OutputTokens => {
                format!("{} output tokens", self.output_tokens.unwrap_or_default())
            }
            Dimension::Usd => self.usd.unwrap_or_default().to_string(),
        }
    }
}

/// A token or spend budget: a [`Scope`] (name, key, routes, methods, models, tiers, mode), a
/// period and caps.
///
/// ```
/// use moat_core::identity::{ApiKey, Tenant};
/// use moat_quota::{Budget, Period, Usd};
///
/// let per_key = Budget::new("daily-tokens", ApiKey::default(), Period::Day).tokens(200_000);
/// let per_tenant = Budget::new("monthly-spend", Tenant::default(), Period::Month)
///     .usd("500.00".parse::<Usd>().unwrap())
///     .model("gpt-4o*");
/// assert_eq!(per_key.name(), "daily-tokens");
/// # let _ = per_tenant;
/// ```
#[derive(Debug, Clone)]
pub struct Budget {
    pub(crate) scope: Scope,
    pub(crate) period: Period,
    pub(crate) limits: Limits,
    pub(crate) count_cached: bool,
}

moat_core::scoped!(Budget);

impl Budget {
    /// A budget named `name` (for refusals, headers, alerts and its state), per `key` (API key,
    /// tenant, model, global, or a pair), over `period`. Cap it with [`tokens`](Self::tokens),
    /// [`usd`](Self::usd) and friends.
    pub fn new(name: impl Into<Arc<str>>, key: impl KeyExtractor, period: Period) -> Self {
        Self::in_scope(Scope::new(name, key), period)
    }

    /// A budget for requests in `scope`, over `period`.
    pub fn in_scope(scope: Scope, period: Period) -> Self {
        Self {
            scope,
            period,
            limits: Limits::default(),
            count_cached: true,
        }
    }

    /// Caps total tokens.
    #[must_use]
    pub fn tokens(mut self, tokens: u64) -> Self {
        self.limits.tokens = Some(tokens);
        self
    }

    /// Caps prompt tokens.
    #[must_use]
    pub fn input_tokens(mut self, tokens: u64) -> Self {
        self.limits.input_tokens = Some(tokens);
        self
    }

    /// Caps generated tokens.
    #[must_use]
    pub fn output_tokens(mut self, tokens: u64) -> Self {
        self.limits.output_tokens = Some(tokens);
        self
    }

    /// Caps spend (needs prices for the models used).
    #[must_use]
    pub fn usd(mut self, usd: Usd) -> Self {
        self.limits.usd = Some(usd);
        self
    }

    /// Whether prompt tokens served from the provider's cache count against token caps
    /// (default yes; spend always uses the cached price).
    #[must_use]
    pub fn count_cached(mut self, count: bool) -> Self {
        self.count_cached = count;
        self
    }

    /// The budget's caps.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether it is enforced (not in shadow mode).
    pub(crate) fn enforced(&self) -> bool {
        self.scope.mode() == Mode::Enforce
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_checks_and_shares() {
        let limits = Limits {
            tokens: Some(1000),
            usd: Some(Usd::from_micros(500)),
            ..Limits::default()
        };
        let used = Amounts::new(300, 400, Usd::from_micros(100));
        assert_eq!(
            limits.breaks(&used, &Amounts::new(100, 100, Usd::ZERO)),
            None
        );
        assert_eq!(
            limits.breaks(&used, &Amounts::new(200, 101, Usd::ZERO)),
            Some((Dimension::Tokens, 700, 301, 1000))
        );
        assert_eq!(
            limits
                .breaks(&used, &Amounts::new(0, 0, Usd::from_micros(401)))
                .map(|b| b.0),
            Some(Dimension::Usd)
        );
        assert_eq!(limits.percent_used(&used), 70);
        assert_eq!(limits.remaining(&used).tokens, 300);
        assert_eq!(limits.remaining(&used).input_tokens, u64::MAX);
        assert_eq!(
            Amounts::new(100, 100, Usd::from_micros(10)).scaled(250_000),
            Amounts::new(25, 25, Usd::from_micros(2))
        );
    }
}
