//! `[quota]` and `[[quota.budgets]]`: from TOML to a `QuotaLayer`.

use moat::core::identity::{ApiKey, CallerResolver, Fingerprinter, Global, Model, Tenant};
use moat::quota::{
    AlertSink, Budget, BudgetAlert, PerToken, Period, Price, PriceTable, QuotaLayer, UnknownModel,
    Usd,
};
use serde::Deserialize;
use toml::Spanned;

use crate::limits::LimitsError;

/// `[quota]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// The budgets; a request must fit every budget that applies to it.
    #[serde(default)]
    pub budgets: Vec<Spanned<BudgetConfig>>,
    /// `memory` (default) or `redis`.
    pub store: Option<Spanned<String>>,
    /// With `store = "redis"`.
    pub redis_url: Option<Spanned<String>>,
    /// `fail_closed` (default), `fail_open` or `local`.
    pub on_store_error: Option<Spanned<String>>,
    /// A price table in LiteLLM's `model_prices_and_context_window.json` format.
    pub prices: Option<Spanned<String>>,
    /// `deny` (default), `free`, or `default` (charge `default_price`).
    pub unknown_model: Option<Spanned<String>>,
    /// The price of unknown models with `unknown_model = "default"`.
    pub default_price: Option<PriceConfig>,
    /// The time zone days and months start in (IANA name, default `UTC`).
    pub time_zone: Option<Spanned<String>>,
    /// Tokens reserved for a completion when a request sets no `max_tokens`.
    pub completion_reserve: Option<u64>,
    /// Write the reserve into requests without `max_tokens`, so none can overrun.
    #[serde(default)]
    pub cap_max_tokens: bool,
    /// Alert thresholds in percent (default 50, 80, 100).
    pub alert_thresholds: Option<Vec<u64>>,
    /// POST every alert as JSON to this URL.
    pub alert_webhook: Option<Spanned<String>>,
}

/// Dollars per million tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// Per million prompt tokens, e.g. `"2.50"`.
    pub input_per_million: Dollars,
    /// Per million generated tokens.
    pub output_per_million: Dollars,
}

/// Dollars written as a string (`"5.00"`) or a number (`5.00`), kept as integer micro-dollars.
#[derive(Debug, Clone, Copy)]
pub struct Dollars(pub Usd);

impl<'de> Deserialize<'de> for Dollars {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(f64),
            Whole(u64),
        }
        let text = match Raw::deserialize(deserializer)? {
            Raw::Text(s) => s,
            // A TOML float is read once, here, at six decimals; from then on it is an integer.
            Raw::Number(n) => format!("{n:.6}"),
            Raw::Whole(n) => n.to_string(),
        };
        Usd::parse_dollars(&text).map(Dollars).ok_or_else(|| {
            serde::de::Error::custom(format!("`{text}` is not an amount of dollars"))
        })
    }
}

/// Whose budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Per {
    /// Each API key.
    ApiKey,
    /// Each tenant.
    Tenant,
    /// Everyone together.
    Global,
    /// Each model.
    Model,
}

/// One `[[quota.budgets]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Names the budget in refusals, headers and alerts.
    pub name: String,
    /// `api_key`, `tenant`, `global` or `model`.
    pub per: Per,
    /// `minute`, `hour`, `day`, `month` or `rolling:24h`.
    pub period: Spanned<String>,
    /// Total tokens.
    pub tokens: Option<u64>,
    /// Prompt tokens.
    pub input_tokens: Option<u64>,
    /// Generated tokens.
    pub output_tokens: Option<u64>,
    /// Spend in dollars.
    pub usd: Option<Dollars>,
    /// Count cached prompt tokens against token caps (default true).
    pub count_cached: Option<bool>,
    /// Only these models (`prefix*` for a family).
    #[serde(default)]
    pub models: Vec<String>,
    /// Only callers of these tiers.
    #[serde(default)]
    pub tiers: Vec<String>,
    /// `enforce` (default) or `shadow`.
    pub mode: Option<String>,
}

/// Posts alerts to a webhook in the background.
#[derive(Debug, Clone)]
struct Webhook {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        http_body_util::Full<bytes::Bytes>,
    >,
    uri: http::Uri,
}

impl AlertSink for Webhook {
    fn alert(&self, alert: &BudgetAlert) {
        moat::quota::TracingAlerts.alert(alert);
        let Ok(body) =
            serde_json::to_vec(&serde_json::json!({"type": "moat.budget_alert", "alert": alert}))
        else {
            return;
        };
        let Ok(request) = http::Request::post(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        else {
            return;
        };
        let client = self.client.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = client.request(request).await {
                    tracing::warn!(target: "moat::gateway", %error, "alert webhook failed");
                }
            });
        }
    }
}

fn at(span: Option<std::ops::Range<usize>>, message: String) -> LimitsError {
    LimitsError { message, span }
}

/// The quota layer for `[quota]`, or `None` when it has no budgets.
pub fn layer(
    config: &QuotaConfig,
    resolver: CallerResolver,
    fingerprinter: &Fingerprinter,
) -> Result<Option<QuotaLayer>, LimitsError> {
    let redis = match config
        .store
        .as_ref()
        .map(|s| (s.get_ref().as_str(), s.span()))
    {
        None | Some(("memory", _)) => None,
        Some(("redis", span)) => {
            let url = config.redis_url.as_ref().ok_or_else(|| {
                at(
                    Some(span),
                    "quota.redis_url is required with store = \"redis\"".into(),
                )
            })?;
            let policy = match config
                .on_store_error
                .as_ref()
                .map(|s| (s.get_ref().as_str(), s.span()))
            {
                None | Some(("fail_closed", _)) => moat::quota::OnStoreError::FailClosed,
                Some(("fail_open", _)) => moat::quota::OnStoreError::FailOpen,
                Some(("local", _)) => moat::quota::OnStoreError::Local,
                Some((other, span)) => {
                    return Err(at(
                        Some(span),
                        format!(
                        "quota.on_store_error: `{other}` is not fail_closed, fail_open or local"
                    ),
                    ))
                }
            };
            let store = moat::quota::RedisStore::open(url.get_ref())
                .map_err(|e| at(Some(url.span()), format!("quota.redis_url: {e}")))?
                .with_on_error(policy);
            Some(store)
        }
        Some((other, span)) => {
            return Err(at(
                Some(span),
                format!("quota.store: `{other}` is not memory or redis"),
            ))
        }
    };
    let mut prices = match &config.prices {
        Some(path) => {
            let text = std::fs::read_to_string(path.get_ref()).map_err(|e| {
                at(
                    Some(path.span()),
                    format!("quota.prices: {}: {e}", path.get_ref()),
                )
            })?;
            PriceTable::from_litellm_json(&text)
                .map_err(|e| at(Some(path.span()), format!("quota.prices: {e}")))?
        }
        None => PriceTable::new(),
    };
    let unknown = match config
        .unknown_model
        .as_ref()
        .map(|s| (s.get_ref().as_str(), s.span()))
    {
        None | Some(("deny", _)) => UnknownModel::Deny,
        Some(("free", _)) => UnknownModel::Free,
        Some(("default", span)) => {
            let p = config.default_price.as_ref().ok_or_else(|| {
                at(
                    Some(span),
                    "quota.unknown_model = \"default\" needs [quota.default_price]".into(),
                )
            })?;
            UnknownModel::Price(Price::new(
                PerToken::per_million(p.input_per_million.0),
                PerToken::per_million(p.output_per_million.0),
            ))
        }
        Some((other, span)) => {
            return Err(at(
                Some(span),
                format!("quota.unknown_model: `{other}` is not deny, free or default"),
            ))
        }
    };
    prices = prices.with_unknown(unknown);
    let mut layer: Option<QuotaLayer> = None;
    for spanned in &config.budgets {
        let bc = spanned.get_ref();
        let err = |m: String| {
            at(
                Some(spanned.span()),
                format!("quota.budgets (name = {:?}): {m}", bc.name),
            )
        };
        let period: Period = bc
            .period
            .get_ref()
            .parse()
            .map_err(|e| at(Some(bc.period.span()), format!("quota.budgets.period: {e}")))?;
        let mut budget = match bc.per {
            Per::ApiKey => {
                Budget::new(bc.name.as_str(), ApiKey::new(fingerprinter.clone()), period)
            }
            Per::Tenant => Budget::new(bc.name.as_str(), Tenant::default(), period),
            Per::Global => Budget::new(bc.name.as_str(), Global, period),
            Per::Model => Budget::new(bc.name.as_str(), Model::default(), period),
        };
        if bc.tokens.is_none()
            && bc.input_tokens.is_none()
            && bc.output_tokens.is_none()
            && bc.usd.is_none()
        {
            return Err(err("set tokens, input_tokens, output_tokens or usd".into()));
        }
        if let Some(t) = bc.tokens {
            budget = budget.tokens(t);
        }
        if let Some(t) = bc.input_tokens {
            budget = budget.input_tokens(t);
        }
        if let Some(t) = bc.output_tokens {
            budget = budget.output_tokens(t);
        }
        if let Some(usd) = bc.usd {
            budget = budget.usd(usd.0);
        }
        if let Some(c) = bc.count_cached {
            budget = budget.count_cached(c);
        }
        for m in &bc.models {
            budget = budget.model(m.as_str());
        }
        for t in &bc.tiers {
            budget = budget.tier(t.as_str());
        }
        match bc.mode.as_deref() {
            None | Some("enforce") => {}
            Some("shadow") => budget = budget.shadow(),
            Some(other) => return Err(err(format!("mode `{other}` is not enforce or shadow"))),
        }
        layer = Some(match layer {
            None => QuotaLayer::new(budget),
            Some(layer) => layer.budget(budget),
        });
    }
    let Some(mut layer) = layer else {
        return Ok(None);
    };
    if let Some(store) = redis {
        layer = layer.with_redis(store);
    }
    layer = layer
        .with_prices(prices)
        .with_caller_resolver(resolver)
        .with_max_tokens_cap(config.cap_max_tokens);
    if let Some(tz) = &config.time_zone {
        let zone = jiff::tz::TimeZone::get(tz.get_ref())
            .map_err(|e| at(Some(tz.span()), format!("quota.time_zone: {e}")))?;
        layer = layer.with_time_zone(zone);
    }
    if let Some(reserve) = config.completion_reserve {
        layer = layer.with_completion_reserve(reserve);
    }
    if let Some(thresholds) = &config.alert_thresholds {
        layer = layer.with_thresholds(thresholds.iter().copied());
    }
    if let Some(url) = &config.alert_webhook {
        let uri: http::Uri = url
            .get_ref()
            .parse()
            .ok()
            .filter(|u: &http::Uri| matches!(u.scheme_str(), Some("http" | "https")))
            .ok_or_else(|| {
                at(
                    Some(url.span()),
                    format!(
                        "quota.alert_webhook: `{}` is not an http(s) URL",
                        url.get_ref()
                    ),
                )
            })?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        layer = layer.with_alerts(Webhook { client, uri });
    }
    Ok(Some(layer))
}
