//! Money as integers, and what models cost.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// An amount of US dollars, in micro-dollars (millionths). Never a float.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Usd(u64);

impl Usd {
    /// Nothing.
    pub const ZERO: Usd = Usd(0);

    /// `micros` millionths of a dollar.
    pub const fn from_micros(micros: u64) -> Self {
        Self(micros)
    }

    /// The amount in millionths of a dollar.
    pub const fn micros(self) -> u64 {
        self.0
    }

    /// Whole and fractional dollars from a decimal string such as `"5"`, `"5.00"` or
    /// `"0.000125"`; more than six decimals is an error, not a rounding.
    pub fn parse_dollars(s: &str) -> Option<Self> {
        let s = s.trim().trim_start_matches('$');
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        if whole.is_empty() && frac.is_empty() || frac.len() > 6 {
            return None;
        }
        let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || !digits(frac) {
            return None;
        }
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let frac: u64 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<6}").parse().ok()?
        };
        whole.checked_mul(1_000_000)?.checked_add(frac).map(Self)
    }

    pub(crate) fn saturating_add(self, other: Usd) -> Usd {
        Usd(self.0.saturating_add(other.0))
    }
}

/// Text that is not an amount of dollars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseUsdError {
    text: String,
}

impl fmt::Display for ParseUsdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not an amount of dollars with at most 6 decimals",
            self.text
        )
    }
}

impl std::error::Error for ParseUsdError {}

impl FromStr for Usd {
    type Err = ParseUsdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_dollars(s).ok_or_else(|| ParseUsdError { text: s.to_owned() })
    }
}

impl fmt::Display for Usd {
    /// `$5.00`, `$0.000125`: at least two decimals, at most six, no trailing zeros past two.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let frac = format!("{:06}", self.0 % 1_000_000);
        let frac = frac.trim_end_matches('0');
        write!(f, "${}.{frac:0<2}", self.0 / 1_000_000)
    }
}

/// A price per token, in nano-dollars (billionths), so that cheap models stay exact integers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PerToken(u64);

impl PerToken {
    /// `nanos` billionths of a dollar per token.
    pub const fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    /// Billionths of a dollar per token.
    pub const fn nanos(self) -> u64 {
        self.0
    }

    /// Dollars per million tokens, as providers list them ($2.50 / 1M tokens is 2,500
    /// nano-dollars a token).
    pub fn per_million(dollars: Usd) -> Self {
        Self(dollars.micros() / 1000)
    }

    /// From a float in dollars per token, as LiteLLM's table writes them (`2.5e-06`): rounded to
    /// the nearest nano-dollar once, at load time.
    fn from_dollars_f64(dollars: f64) -> Option<Self> {
        (dollars.is_finite() && dollars >= 0.0).then(|| Self((dollars * 1e9).round() as u64))
    }
}

/// What one model costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Price {
    /// Per prompt token.
    pub input: PerToken,
    /// Per generated token.
    pub output: PerToken,
    /// Per prompt token read from the provider's cache.
    pub cached_input: PerToken,
}

impl Price {
    /// A price with these per-token rates; cached input costs the same as input.
    pub fn new(input: PerToken, output: PerToken) -> Self {
        Self {
            input,
            output,
            cached_input: input,
        }
    }

    /// Sets the rate for cached prompt tokens.
    #[must_use]
    pub fn with_cached_input(mut self, cached: PerToken) -> Self {
        self.cached_input = cached;
        self
    }

    /// The cost of `uncached` + `cached` prompt tokens and `output` tokens, rounded up to the
    /// micro-dollar.
    pub fn cost(&self, uncached: u64, cached: u64, output: u64) -> Usd {
        let nanos = u128::from(uncached) * u128::from(self.input.0)
            + u128::from(cached) * u128::from(self.cached_input.0)
            + u128::from(output) * u128::from(self.output.0);
        Usd(u64::try_from(nanos.div_ceil(1000)).unwrap_or(u64::MAX))
    }
}

/// What to do with a model the price table does not list, when a spend budget applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UnknownModel {
    /// Refuse the request (400, code `model_not_priced`).
    #[default]
    Deny,
    /// Charge this price.
    Price(Price),
    /// Charge nothing.
    Free,
}

/// Prices by model.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    models: HashMap<String, Price>,
    unknown: UnknownModel,
}

/// Why a price table did not load.
#[derive(Debug)]
#[non_exhaustive]
pub struct PriceTableError(String);

impl fmt::Display for PriceTableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PriceTableError {}

impl PriceTable {
    /// An empty table: every model is unknown.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads LiteLLM's `model_prices_and_context_window.json`: entries with
    /// `input_cost_per_token`, `output_cost_per_token` and optionally
    /// `cache_read_input_token_cost`; others (such as `sample_spec`) are skipped.
    pub fn from_litellm_json(json: &str) -> Result<Self, PriceTableError> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| PriceTableError(format!("price table: {e}")))?;
        let map = value
            .as_object()
            .ok_or_else(|| PriceTableError("price table: not a JSON object".into()))?;
        let mut table = Self::new();
        for (model, entry) in map {
            let rate = |key: &str| {
                entry
                    .get(key)
                    .and_then(serde_json::Value::as_f64)
                    .and_then(PerToken::from_dollars_f64)
            };
            let (Some(input), Some(output)) =
                (rate("input_cost_per_token"), rate("output_cost_per_token"))
            else {
                continue;
            };
            let mut price = Price::new(input, output);
            if let Some(cached) = rate("cache_read_input_token_cost") {
                price = price.with_cached_input(cached);
            }
            table.models.insert(model.clone(), price);
        }
        Ok(table)
    }

    /// Adds or replaces a model's price.
    #[must_use]
    pub fn with_model(mut self, model: impl Into<String>, price: Price) -> Self {
        self.models.insert(model.into(), price);
        self
    }

    /// Sets the policy for models not in the table.
    #[must_use]
    pub fn with_unknown(mut self, policy: UnknownModel) -> Self {
        self.unknown = policy;
        self
    }

    /// How many models are listed.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// Whether no model is listed.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The price of `model`: listed as is, or without a `provider/` prefix; else the policy's
    /// (`None` when unknown models are denied).
    pub fn price(&self, model: Option<&str>) -> Option<Price> {
        let listed = model.and_then(|m| {
            self.models.get(m).or_else(|| {
                m.split_once('/')
                    .and_then(|(_, bare)| self.models.get(bare))
            })
        });
        match (listed, self.unknown) {
            (Some(price), _) => Some(*price),
            (None, UnknownModel::Price(price)) => Some(price),
            (None, UnknownModel::Free) => Some(Price::default()),
            (None, UnknownModel::Deny) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_parse_exactly_and_print_plainly() {
        assert_eq!(Usd::parse_dollars("5"), Some(Usd::from_micros(5_000_000)));
        assert_eq!(
            Usd::parse_dollars("5.00"),
            Some(Usd::from_micros(5_000_000))
        );
        assert_eq!(Usd::parse_dollars("$0.000125"), Some(Usd::from_micros(125)));
        assert_eq!(Usd::parse_dollars(".5"), Some(Usd::from_micros(500_000)));
        for bad in ["", ".", "1.0000001", "-1", "1e3", "abc"] {
            assert_eq!(Usd::parse_dollars(bad), None, "{bad}");
        }
        assert_eq!(Usd::from_micros(5_000_000).to_string(), "$5.00");
        assert_eq!(Usd::from_micros(125).to_string(), "$0.000125");
        assert_eq!(Usd::from_micros(1_500_000).to_string(), "$1.50");
    }

    #[test]
    fn costs_are_integers_rounded_up_to_the_micro_dollar() {
        // gpt-4o: $2.50 / 1M input, $10 / 1M output, $1.25 / 1M cached.
        let price = Price::new(PerToken::from_nanos(2500), PerToken::from_nanos(10_000))
            .with_cached_input(PerToken::from_nanos(1250));
        assert_eq!(price.cost(1_000_000, 0, 0), Usd::from_micros(2_500_000));
        assert_eq!(
            price.cost(0, 1_000_000, 1_000_000),
            Usd::from_micros(11_250_000)
        );
        assert_eq!(
            price.cost(1, 0, 0),
            Usd::from_micros(3),
            "2.5 micro-dollars round up"
        );
        assert_eq!(price.cost(0, 0, 0), Usd::ZERO);
        assert_eq!(
            PerToken::per_million("2.50".parse().unwrap()),
            PerToken::from_nanos(2500)
        );
        assert_eq!(
            PerToken::per_million("0.075".parse().unwrap()),
            PerToken::from_nanos(75)
        );
    }

    #[test]
    fn litellm_table_loads_and_looks_up_with_policies() {
        let json = r#"{
            "sample_spec": {"max_tokens": "set to max_output_tokens if provider specifies it"},
            "gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05, "cache_read_input_token_cost": 1.25e-06, "litellm_provider": "openai"},
            "claude-haiku-4-5": {"input_cost_per_token": 1e-06, "output_cost_per_token": 5e-06},
            "embedding-only": {"input_cost_per_token": 2e-08}
        }"#;
        let table = PriceTable::from_litellm_json(json).unwrap();
        assert_eq!(table.len(), 2);
        let gpt = table.price(Some("gpt-4o")).unwrap();
        assert_eq!(
            (
                gpt.input.nanos(),
                gpt.output.nanos(),
                gpt.cached_input.nanos()
            ),
            (2500, 10_000, 1250)
        );
        assert_eq!(table.price(Some("openai/gpt-4o")), Some(gpt));
        assert_eq!(table.price(Some("unknown")), None);
        assert_eq!(
            table
                .clone()
                .with_unknown(UnknownModel::Free)
                .price(Some("x")),
            Some(Price::default())
        );
        assert_eq!(
            table.with_unknown(UnknownModel::Price(gpt)).price(None),
            Some(gpt)
        );
        assert!(PriceTable::from_litellm_json("[1]").is_err());
        assert!(PriceTable::from_litellm_json("{").is_err());
    }
}
