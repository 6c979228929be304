//! What a configuration file says of budgets, deserialized with serde (feature `serde`): the
//! specs the gateway reads from TOML, and anyone else from any format serde reads.
//!
//! ```
//! use moat_core::identity::CallerResolver;
//! use moat_quota::spec::BudgetSpec;
//!
//! let spec: BudgetSpec = serde_json::from_value(serde_json::json!({
//!     "name": "daily", "per": "api_key", "period": "day", "tokens": 200000, "usd": "5.00"
//! }))
//! .unwrap();
//! let budget = spec.budget(&CallerResolver::default()).unwrap();
//! assert_eq!(budget.name(), "daily");
//! ```

use std::fmt;

use moat_core::decision::Mode;
use moat_core::identity::CallerResolver;
use moat_core::kit::{HttpMethod, KeySpec, ScopeSpec};
use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::budget::Budget;
use crate::money::Usd;
use crate::period::Period;

/// One budget (`[[quota.budgets]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BudgetSpec {
    /// Names the budget in refusals, headers, alerts and state.
    pub name: String,
    /// Whose budget: `api_key`, `ip`, `tenant`, `global`, `model` or `header:NAME`.
    pub per: KeySpec,
    /// `minute`, `hour`, `day`, `month` or `rolling:24h`.
    pub period: Period,
    /// Total tokens.
    pub tokens: Option<u64>,
    /// Prompt tokens.
    pub input_tokens: Option<u64>,
    /// Generated tokens.
    pub output_tokens: Option<u64>,
    /// Spend in dollars: `"5.00"`, `5.00` or `5`.
    pub usd: Option<Usd>,
    /// Count cached prompt tokens against token caps (default true).
    pub count_cached: Option<bool>,
    /// Only these models (`prefix*` for a family).
    #[serde(default)]
    pub models: Vec<String>,
    /// Only callers of these tiers.
    #[serde(default)]
    pub tiers: Vec<String>,
    /// Only these paths (`/prefix/*` for a subtree).
    #[serde(default)]
    pub routes: Vec<String>,
    /// Only these methods.
    #[serde(default)]
    pub methods: Vec<HttpMethod>,
    /// `enforce` (default) or `shadow`.
    #[serde(default)]
    pub mode: Mode,
}

/// A budget spec that caps nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoCap {
    budget: String,
}

impl fmt::Display for NoCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "budget {:?} caps nothing: set tokens, input_tokens, output_tokens or usd",
            self.budget
        )
    }
}

impl std::error::Error for NoCap {}

impl BudgetSpec {
    /// The budget, keyed as `resolver` identifies callers.
    pub fn budget(&self, resolver: &CallerResolver) -> Result<Budget, NoCap> {
        if self.tokens.is_none()
            && self.input_tokens.is_none()
            && self.output_tokens.is_none()
            && self.usd.is_none()
        {
            return Err(NoCap {
                budget: self.name.clone(),
            });
        }
        let scope = ScopeSpec {
            name: &self.name,
            key: &self.per,
            routes: &self.routes,
            methods: &self.methods,
            models: &self.models,
            tiers: &self.tiers,
            mode: self.mode,
        }
        .scope(resolver);
        let mut budget = Budget::in_scope(scope, self.period);
        if let Some(t) = self.tokens {
            budget = budget.tokens(t);
        }
        if let Some(t) = self.input_tokens {
            budget = budget.input_tokens(t);
        }
        if let Some(t) = self.output_tokens {
            budget = budget.output_tokens(t);
        }
        if let Some(usd) = self.usd {
            budget = budget.usd(usd);
        }
        if let Some(c) = self.count_cached {
            budget = budget.count_cached(c);
        }
        Ok(budget)
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Usd {
    /// Dollars written as a string (`"5.00"`) or a number (`5.00`, `5`), kept as integer
    /// micro-dollars; a float is read once, here, at six decimals.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Whole(u64),
            Number(f64),
        }
        let text = match Raw::deserialize(deserializer)? {
            Raw::Text(s) => s,
            Raw::Whole(n) => n.to_string(),
            Raw::Number(n) => format!("{n:.6}"),
        };
        text.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn specs_read_what_files_say_and_refuse_the_rest() {
        for usd in [json!("5.00"), json!(5.0), json!(5)] {
            let spec: BudgetSpec = serde_json::from_value(
                json!({"name": "b", "per": "tenant", "period": "rolling:24h", "usd": usd}),
            )
            .unwrap();
            assert_eq!(spec.usd, Some(Usd::from_micros(5_000_000)));
            assert!(spec.budget(&CallerResolver::default()).is_ok());
        }
        let nothing: BudgetSpec =
            serde_json::from_value(json!({"name": "b", "per": "global", "period": "day"})).unwrap();
        assert!(nothing
            .budget(&CallerResolver::default())
            .unwrap_err()
            .to_string()
            .contains("caps nothing"));
        for bad in [
            json!({"name": "b", "per": "global", "period": "fortnight", "tokens": 1}),
            json!({"name": "b", "per": "global", "period": "day", "usd": "five"}),
            json!({"name": "b", "per": "user", "period": "day", "tokens": 1}),
            json!({"name": "b", "per": "global", "period": "day", "tokens": 1, "typo": 1}),
        ] {
            assert!(
                serde_json::from_value::<BudgetSpec>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }
}
