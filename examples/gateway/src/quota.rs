//! `[quota]` and `[[quota.budgets]]`: the crate's specs, plus prices, alerts and where state
//! lives.

use std::time::Duration;

use moat::core::store::OnStoreError;
use moat::quota::spec::BudgetSpec;
use moat::quota::{
    AlertSink, BudgetAlert, PerToken, Price, PriceTable, QuotaLayer, RedisStore, UnknownModel, Usd,
};
use serde::Deserialize;
use toml::Spanned;

use crate::config::{ConfigError, StoreKind};
use crate::context::Context;

/// `[quota]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// The budgets; a request must fit every budget that applies to it.
    #[serde(default)]
    pub budgets: Vec<Spanned<BudgetSpec>>,
    /// `memory` (default) or `redis`.
    #[serde(default)]
    pub store: StoreKind,
    /// With `store = "redis"` (else the top-level `redis_url`).
    pub redis_url: Option<Spanned<String>>,
    /// `fail_closed` (default), `fail_open` or `local`.
    #[serde(default)]
    pub on_store_error: OnStoreError,
    /// Milliseconds to wait for Redis.
    pub redis_timeout_ms: Option<u64>,
    /// A price table in LiteLLM's `model_prices_and_context_window.json` format.
    pub prices: Option<Spanned<String>>,
    /// `deny` (default), `free`, or `default` (charge `default_price`).
    #[serde(default)]
    pub unknown_model: UnknownModelName,
    /// The price of unknown models with `unknown_model = "default"`.
    pub default_price: Option<PriceConfig>,
    /// The time zone days and months start in (IANA name, default `UTC`).
    pub time_zone: Option<Spanned<String>>,
    /// Tokens reserved for a completion when a request sets no `max_tokens`.
    pub completion_reserve: Option<u64>,
    /// Charge replies answered by `[cache]` as if the provider had answered (default false:
    /// a hit costs nothing).
    #[serde(default)]
    pub charge_cache_hits: bool,
    /// Write the reserve into requests without `max_tokens`, so none can overrun.
    #[serde(default)]
    pub cap_max_tokens: bool,
    /// Alert thresholds in percent (default 50, 80, 100).
    pub alert_thresholds: Option<Vec<u64>>,
    /// POST every alert as JSON to this URL.
    pub alert_webhook: Option<Spanned<String>>,
    /// Keys kept in memory per budget.
    pub max_keys: Option<usize>,
}

/// What to do with a model the price table does not list, when a spend budget applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownModelName {
    /// Refuse the request.
    #[default]
    Deny,
    /// Charge nothing for it.
    Free,
    /// Charge `[quota.default_price]`.
    Default,
}

/// Dollars per million tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// Per million prompt tokens, e.g. `"2.50"`.
    pub input_per_million: Usd,
    /// Per million generated tokens.
    pub output_per_million: Usd,
}

/// Posts alerts to a webhook in the background.
#[derive(Debug, Clone)]
struct Webhook {
    client: crate::context::SideClient,
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

impl QuotaConfig {
    fn prices(
        &self,
        ctx: &Context<'_>,
        span: std::ops::Range<usize>,
    ) -> Result<PriceTable, ConfigError> {
        let prices = match &self.prices {
            Some(path) => {
                let text = std::fs::read_to_string(path.get_ref()).map_err(|e| {
                    ctx.error(
                        path.span(),
                        format!("quota.prices: {}: {e}", path.get_ref()),
                    )
                })?;
                PriceTable::from_litellm_json(&text)
                    .map_err(|e| ctx.error(path.span(), format!("quota.prices: {e}")))?
            }
            None => PriceTable::new(),
        };
        let unknown = match self.unknown_model {
            UnknownModelName::Deny => UnknownModel::Deny,
            UnknownModelName::Free => UnknownModel::Free,
            UnknownModelName::Default => {
                let p = self.default_price.as_ref().ok_or_else(|| {
                    ctx.error(
                        span,
                        "quota.unknown_model = \"default\" needs [quota.default_price]",
                    )
                })?;
                UnknownModel::Price(Price::new(
                    PerToken::per_million(p.input_per_million),
                    PerToken::per_million(p.output_per_million),
                ))
            }
        };
        Ok(prices.with_unknown(unknown))
    }

    /// The layer, or `None` without budgets.
    pub(crate) fn layer(
        &self,
        ctx: &Context<'_>,
        span: std::ops::Range<usize>,
    ) -> Result<Option<QuotaLayer>, ConfigError> {
        let mut layer: Option<QuotaLayer> = None;
        for spec in &self.budgets {
            let budget = spec
                .get_ref()
                .budget(&ctx.resolver)
                .map_err(|e| ctx.error(spec.span(), format!("quota.budgets: {e}")))?;
            layer = Some(match layer {
                None => QuotaLayer::new(budget),
                Some(layer) => layer
                    .try_budget(budget)
                    .map_err(|e| ctx.error(spec.span(), format!("quota.budgets: {e}")))?,
            });
        }
        let Some(mut layer) = layer else {
            return Ok(None);
        };
        layer = layer
            .with_prices(self.prices(ctx, span.clone())?)
            .with_caller_resolver(ctx.resolver.clone())
            .with_clock(ctx.clock.clone())
            .with_body_limit(ctx.max_body_bytes)
            .with_max_tokens_cap(self.cap_max_tokens)
            .with_cache_hits_charged(self.charge_cache_hits);
        if let Some(max) = self.max_keys {
            layer = layer.with_max_keys(max);
        }
        if let Some(tz) = &self.time_zone {
            let zone = jiff::tz::TimeZone::get(tz.get_ref())
                .map_err(|e| ctx.error(tz.span(), format!("quota.time_zone: {e}")))?;
            layer = layer.with_time_zone(zone);
        }
        if let Some(reserve) = self.completion_reserve {
            layer = layer.with_completion_reserve(reserve);
        }
        if let Some(thresholds) = &self.alert_thresholds {
            layer = layer.with_thresholds(thresholds.iter().copied());
        }
        if let Some(url) = &self.alert_webhook {
            let uri: http::Uri = url
                .get_ref()
                .parse()
                .ok()
                .filter(|u: &http::Uri| matches!(u.scheme_str(), Some("http" | "https")))
                .ok_or_else(|| {
                    ctx.error(
                        url.span(),
                        format!(
                            "quota.alert_webhook: `{}` is not an http(s) URL",
                            url.get_ref()
                        ),
                    )
                })?;
            layer = layer.with_alerts(Webhook {
                client: crate::context::side_client(),
                uri,
            });
        }
        if self.store == StoreKind::Redis {
            let url = self
                .redis_url
                .as_ref()
                .map(|u| (u.get_ref().as_str(), u.span()));
            let conn = ctx.redis(url, "quota", span)?;
            let mut store = RedisStore::with_connection(conn).with_on_error(self.on_store_error);
            if let Some(ms) = self.redis_timeout_ms {
                store = store.with_timeout(Duration::from_millis(ms));
            }
            layer = layer.with_redis(store);
        }
        Ok(Some(layer))
    }
}
