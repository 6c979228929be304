//! [`QuotaLayer`], [`Quota`], [`QuotaHandle`] and the settlement of reservations.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Body;
use jiff::tz::TimeZone;
use moat_core::body::RequestBody;
use moat_core::decision::{Decision, Decisions, Outcome};
use moat_core::identity::{Caller, RequestHead};
use moat_core::kit::LayerOptions;
use moat_core::llm::WireFormat;
use moat_core::reject::{Protocol, Rejection};
use moat_core::request::{read_llm_request, LlmBody, SharedLlmRequest};
use moat_core::response::{Hook, Hooks, Interest, StreamEvent};
use moat_core::usage::{BodyOutcome, Usage, UsageReport};
use moat_core::Key;
use serde::Serialize;
use tower_layer::Layer;
use tower_service::Service;

use crate::alert::{AlertSink, BudgetAlert, TracingAlerts};
use crate::budget::{Amounts, Budget, Limits};
use crate::money::{Price, PriceTable, Usd};
use crate::store::{self, Claim, MemoryStore, Refusal, States, Ticket};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone)]
struct Config {
    budgets: Vec<Budget>,
    options: LayerOptions,
    prices: PriceTable,
    tz: TimeZone,
    completion_reserve: u64,
    cap_max_tokens: bool,
    reservation_ttl: Duration,
    thresholds: Vec<u64>,
    alerts: Arc<dyn AlertSink>,
    headers: bool,
    exact_counting: bool,
    charge_cache_hits: bool,
    #[cfg(feature = "redis")]
    redis: Option<Arc<crate::redis::RedisStore>>,
}

struct Inner {
    config: Config,
    store: MemoryStore,
}

/// Why a reservation was refused.
enum Refused {
    Budget(Refusal),
    /// A new key, and the budget holds as many keys as it may.
    Full {
        budget: usize,
    },
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Unavailable,
}

impl From<store::Refused> for Refused {
    fn from(refused: store::Refused) -> Self {
        match refused {
            store::Refused::Budget(refusal) => Self::Budget(refusal),
            store::Refused::Full { budget } => Self::Full { budget },
        }
    }
}

impl Inner {
    /// Settles one ticket with what was used, in memory at once or in Redis in the background.
    fn settle(self: &Arc<Self>, ticket: Ticket, used: Amounts) {
        self.store.metrics(ticket.budget).settled.increment(1);
        #[cfg(feature = "redis")]
        if ticket.remote {
            if let (Some(redis), Ok(runtime)) = (
                self.config.redis.clone(),
                tokio::runtime::Handle::try_current(),
            ) {
                let inner = self.clone();
                runtime.spawn(async move {
                    let budget = inner.store.budget(ticket.budget);
                    let slot = inner.slot(ticket.budget, &ticket.who);
                    match redis.settle(&slot, &budget.limits, &used, ticket.id, &inner.config.thresholds).await {
                        Ok((total, crossed)) => {
                            for percent in crossed {
                                inner.alert(ticket.budget, &ticket.who, percent, total, slot.window.end);
                            }
                            let percent = budget.limits.percent_used(&total);
                            inner.store.metrics(ticket.budget).used_percent.set(percent as f64);
                        }
                        Err(error) => tracing::warn!(target: "moat::quota", %error, "could not settle in redis"),
                    }
                });
            }
            return;
        }
        let (crossed, percent) =
            self.store
                .settle(&ticket, used, self.wall(), &self.config.thresholds);
        for c in crossed {
            self.alert(ticket.budget, &ticket.who, c.percent, c.used, c.resets);
        }
        self.store
            .metrics(ticket.budget)
            .used_percent
            .set(percent as f64);
    }

    fn alert(&self, budget: usize, who: &Key, percent: u64, used: Amounts, resets: i64) {
        self.store.metrics(budget).alerts.increment(1);
        let budget = self.store.budget(budget);
        self.config.alerts.alert(&BudgetAlert {
            budget: budget.name().to_owned(),
            key: who.to_string(),
            percent,
            used,
            limits: budget.limits,
            resets_at: rfc3339(resets),
        });
    }

    /// Drops a reservation without charging it.
    fn release(self: &Arc<Self>, ticket: Ticket) {
        #[cfg(feature = "redis")]
        if ticket.remote {
            if let (Some(redis), Ok(runtime)) = (
                self.config.redis.clone(),
                tokio::runtime::Handle::try_current(),
            ) {
                let inner = self.clone();
                runtime.spawn(async move {
                    let slot = inner.slot(ticket.budget, &ticket.who);
                    if let Err(error) = redis.view(&slot, Some(ticket.id)).await {
                        tracing::warn!(target: "moat::quota", %error, "could not release in redis");
                    }
                });
            }
            return;
        }
        self.store.release(&ticket);
    }

    #[cfg(feature = "redis")]
    fn slot<'a>(&'a self, budget: usize, who: &'a Key) -> crate::redis::Slot<'a> {
        let b = self.store.budget(budget);
        let window = self.store.window(budget, self.wall());
        let now = self
            .wall()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let left = u64::try_from(window.end).unwrap_or(0).saturating_sub(now);
        let (rolling, ttl) = match b.period {
            // The bucket after this one still carries it.
            crate::period::Period::Rolling(w) => (true, left + w.as_secs() + 60),
            _ => (false, left + 60),
        };
        crate::redis::Slot {
            budget: b.name(),
            key: who,
            window,
            rolling,
            ttl,
        }
    }

    /// Reserves every claim, or none.
    async fn reserve(
        &self,
        claims: &[Claim],
        shadow: &[bool],
    ) -> (Result<Vec<Ticket>, Refused>, Vec<Refusal>) {
        let ttl = u64::try_from(self.config.reservation_ttl.as_nanos()).unwrap_or(u64::MAX);
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.config.redis {
            // Boxed: the Redis path's state would otherwise make every request's future
            // (memory-only ones included) kilobytes larger.
            return Box::pin(self.reserve_in_redis(redis, claims, shadow, ttl)).await;
        }
        let (result, shadow_refusals) =
            self.store
                .reserve(claims, shadow, self.wall(), self.now(), ttl);
        (result.map_err(Refused::from), shadow_refusals)
    }

    /// Reserves in Redis, one budget after the other, giving back what it took when a later
    /// one refuses; Redis failing applies the store's failure policy to that budget.
    #[cfg(feature = "redis")]
    async fn reserve_in_redis(
        &self,
        redis: &crate::redis::RedisStore,
        claims: &[Claim],
        shadow: &[bool],
        ttl: u64,
    ) -> (Result<Vec<Ticket>, Refused>, Vec<Refusal>) {
        use crate::redis::OnStoreError;
        let mut tickets: Vec<Ticket> = Vec::with_capacity(claims.len());
        let mut shadow_refusals = Vec::new();
        for (claim, &is_shadow) in claims.iter().zip(shadow) {
            let budget = self.store.budget(claim.budget);
            let slot = self.slot(claim.budget, &claim.who);
            let id = self.store.next_id();
            let hold = self.config.reservation_ttl;
            let refusal = |(dimension, committed, needed)| Refusal {
                budget: claim.budget,
                dimension,
                committed,
                needed,
                resets: slot.window.end,
            };
            let mut outcome = redis
                .reserve(&slot, &budget.limits, &claim.amounts, id, hold)
                .await;
            if let (Ok(Err(refused)), true) = (&outcome, is_shadow) {
                shadow_refusals.push(refusal(*refused));
                outcome = redis
                    .reserve(&slot, &Limits::default(), &claim.amounts, id, hold)
                    .await;
            }
            let failed = match outcome {
                Ok(Ok(committed)) => {
                    tickets.push(Ticket {
                        budget: claim.budget,
                        who: claim.who,
                        key: claim.key,
                        id,
                        committed,
                        resets: slot.window.end,
                        remote: true,
                    });
                    continue;
                }
                Ok(Err(refused)) => Refused::Budget(refusal(refused)),
                Err(error) => {
                    metrics::counter!("moat_quota_store_errors_total").increment(1);
                    tracing::warn!(target: "moat::quota", %error, policy = ?redis.on_error, "redis unavailable");
                    match redis.on_error {
                        OnStoreError::FailOpen => continue,
                        OnStoreError::Local => {
                            let (local, _) = self.store.reserve(
                                std::slice::from_ref(claim),
                                &[is_shadow],
                                self.wall(),
                                self.now(),
                                ttl,
                            );
                            match local {
                                Ok(mut local) => {
                                    tickets.append(&mut local);
                                    continue;
                                }
                                Err(refused) => refused.into(),
                            }
                        }
                        // Fail closed: the safe choice for any policy added later.
                        _ => Refused::Unavailable,
                    }
                }
            };
            for t in tickets {
                self.release_now(t).await;
            }
            return (Err(failed), shadow_refusals);
        }
        (Ok(tickets), shadow_refusals)
    }

    #[cfg(feature = "redis")]
    async fn release_now(&self, ticket: Ticket) {
        match (&self.config.redis, ticket.remote) {
            (Some(redis), true) => {
                let slot = self.slot(ticket.budget, &ticket.who);
                if let Err(error) = redis.view(&slot, Some(ticket.id)).await {
                    tracing::warn!(target: "moat::quota", %error, "could not release in redis");
                }
            }
            _ => self.store.release(&ticket),
        }
    }

    /// A budget's usage and reservations for `who`, wherever they are kept.
    async fn view(&self, budget: usize, who: &Key) -> store::View {
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.config.redis {
            let slot = self.slot(budget, who);
            if let Ok((used, reserved)) = redis.view(&slot, None).await {
                return store::View {
                    used,
                    reserved,
                    resets: slot.window.end,
                };
            }
        }
        self.store.view(
            budget,
            self.store.id_of(budget, who),
            self.wall(),
            self.now(),
        )
    }

    fn now(&self) -> u64 {
        u64::try_from(self.config.options.clock.now().as_nanos()).unwrap_or(u64::MAX)
    }

    fn wall(&self) -> SystemTime {
        self.config.options.clock.wall()
    }
}

/// Token and spend budgets for a service.
///
/// Every service made from this layer and its clones shares one state, and so do handles taken
/// from it; builder calls made later, and layers built with
/// [`with_state_from`](Self::with_state_from), share the state of every budget they keep (by
/// name).
#[derive(Clone)]
#[must_use]
pub struct QuotaLayer {
    config: Config,
    states: States,
    inner: OnceLock<Arc<Inner>>,
}

impl std::fmt::Debug for QuotaLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaLayer")
            .field("budgets", &self.config.budgets)
            .field("completion_reserve", &self.config.completion_reserve)
            .finish()
    }
}

fn rfc3339(secs: i64) -> String {
    jiff::Timestamp::from_second(secs).map_or_else(|_| secs.to_string(), |t| t.to_string())
}

/// Why a quota configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// Two budgets have one name (a budget's name keys its state).
    DuplicateName {
        /// The name.
        budget: String,
    },
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DuplicateName { budget } => {
                write!(f, "two budgets are named {budget:?}: names must differ")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

impl QuotaLayer {
    /// A layer enforcing `budget`.
    pub fn new(budget: Budget) -> Self {
        Self {
            config: Config {
                budgets: vec![budget],
                options: LayerOptions::default(),
                prices: PriceTable::new(),
                tz: TimeZone::UTC,
                completion_reserve: 4096,
                cap_max_tokens: false,
                reservation_ttl: Duration::from_secs(600),
                thresholds: vec![50, 80, 100],
                alerts: Arc::new(TracingAlerts),
                headers: true,
                exact_counting: true,
                charge_cache_hits: false,
                #[cfg(feature = "redis")]
                redis: None,
            },
            states: States::default(),
            inner: OnceLock::new(),
        }
    }

    fn map(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.config);
        self.inner = OnceLock::new();
        self
    }

    fn options_mut(&mut self) -> &mut LayerOptions {
        self.inner = OnceLock::new();
        &mut self.config.options
    }

    /// The budgets of this configuration over the layer's states, made on first use.
    fn inner(&self) -> &Arc<Inner> {
        self.inner.get_or_init(|| {
            if self.config.exact_counting {
                // Not on the first request.
                moat_core::tokens::preload();
            }
            let config = self.config.clone();
            let store = MemoryStore::new(
                config.budgets.clone(),
                config.tz.clone(),
                config.options.max_keys,
                &self.states,
            );
            Arc::new(Inner { config, store })
        })
    }

    /// Adds a budget; a request must fit every budget that applies to it, or none is charged.
    ///
    /// # Panics
    ///
    /// If a budget of that name is there already; use [`try_budget`](Self::try_budget) to get an
    /// error instead.
    pub fn budget(self, budget: Budget) -> Self {
        self.try_budget(budget).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Adds a budget, or says why it cannot be added.
    pub fn try_budget(self, budget: Budget) -> Result<Self, ConfigError> {
        if self
            .config
            .budgets
            .iter()
            .any(|b| b.name() == budget.name())
        {
            return Err(ConfigError::DuplicateName {
                budget: budget.name().to_owned(),
            });
        }
        Ok(self.map(|c| c.budgets.push(budget)))
    }

    /// Takes over the state of `previous` (a layer built from an earlier configuration): each
    /// budget of this layer keeps its usage and reservations where the budget of the same name
    /// left them; budgets that are gone are forgotten.
    pub fn with_state_from(mut self, previous: &QuotaLayer) -> Self {
        self.states = previous.states.clone();
        let names: Vec<&str> = self.config.budgets.iter().map(Budget::name).collect();
        self.states.retain(&names);
        self.inner = OnceLock::new();
        self
    }

    /// Prices for spend budgets.
    pub fn with_prices(self, prices: PriceTable) -> Self {
        self.map(|c| c.prices = prices)
    }

    /// Aligns days and months to this time zone (default UTC).
    pub fn with_time_zone(self, tz: TimeZone) -> Self {
        self.map(|c| c.tz = tz)
    }

    /// Tokens reserved for the completion of a request that sets no `max_tokens` (default 4096).
    pub fn with_completion_reserve(self, tokens: u64) -> Self {
        self.map(|c| c.completion_reserve = tokens)
    }

    /// Writes the completion reserve into requests that set no `max_tokens`, so no response can
    /// use more than was reserved (default off).
    pub fn with_max_tokens_cap(self, on: bool) -> Self {
        self.map(|c| c.cap_max_tokens = on)
    }

    /// How long a reservation holds budget if its request never settles (default 10 minutes).
    pub fn with_reservation_ttl(self, ttl: Duration) -> Self {
        self.map(|c| c.reservation_ttl = ttl)
    }

    /// Alert thresholds in percent of a budget (default 50, 80, 100).
    pub fn with_thresholds(self, percents: impl IntoIterator<Item = u64>) -> Self {
        let mut thresholds: Vec<u64> = percents.into_iter().collect();
        thresholds.sort_unstable();
        self.map(|c| c.thresholds = thresholds)
    }

    /// Where alerts go (default: a `tracing` warning).
    pub fn with_alerts(self, sink: impl AlertSink) -> Self {
        let sink: Arc<dyn AlertSink> = Arc::new(sink);
        self.map(|c| c.alerts = sink)
    }

    /// Count OpenAI prompts exactly (default on, with the `tiktoken` feature), or reserve the
    /// byte-length upper bound for every model: cheaper, and settled to the real usage all the
    /// same.
    pub fn with_exact_counting(self, exact: bool) -> Self {
        self.map(|c| c.exact_counting = exact)
    }

    /// Whether responses carry `x-moat-quota-*` headers (default on).
    pub fn with_headers(self, on: bool) -> Self {
        self.map(|c| c.headers = on)
    }

    /// Whether a reply answered from a cache (moat-cache's hits) is charged the usage it
    /// reports, as if the provider had answered (default off: a hit cost no provider tokens,
    /// so it settles at zero, recorded as such).
    pub fn with_cache_hits_charged(self, charged: bool) -> Self {
        self.map(|c| c.charge_cache_hits = charged)
    }

    /// Keeps budgets in Redis, shared by every process using the same store and budgets.
    #[cfg(feature = "redis")]
    pub fn with_redis(self, store: crate::redis::RedisStore) -> Self {
        let store = Arc::new(store);
        self.map(|c| c.redis = Some(store))
    }

    /// A handle to read usage, sharing this layer's state (also after more builder calls).
    pub fn handle(&self) -> QuotaHandle {
        QuotaHandle {
            inner: self.inner().clone(),
        }
    }
}

moat_core::layer_options!(QuotaLayer);

impl<S> Layer<S> for QuotaLayer {
    type Service = Quota<S>;

    fn layer(&self, inner: S) -> Quota<S> {
        Quota {
            inner,
            quota: self.inner().clone(),
        }
    }
}

/// A service under token and spend budgets.
#[derive(Clone)]
pub struct Quota<S> {
    inner: S,
    quota: Arc<Inner>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Quota<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quota").field("inner", &self.inner).finish()
    }
}

impl<S> Quota<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

moat_core::layer_response_body! {
    /// The response body of [`Quota`]: the inner body, whose usage settles the request's
    /// reservations when it ends (and, when moat asked for the usage chunk, without it).
}

moat_core::layer_response_future! {
    /// The response future of [`Quota`].
}

/// What a request reserved, settled from its real usage when its response ends: the [`Hook`]
/// the layer attaches.
struct Settlement {
    quota: Arc<Inner>,
    tickets: Vec<Ticket>,
    price: Option<Price>,
    input_estimate: u64,
    /// Remove OpenAI's usage chunk: moat asked for it, the client did not.
    strip: bool,
    /// Charge a cache's reply as the provider's.
    charge_cache_hits: bool,
    done: bool,
    /// Where the settled usage and cost are recorded, when an outer layer listens.
    decisions: Option<Decisions>,
}

impl Settlement {
    /// Uncached prompt tokens, cached prompt tokens and output tokens that were used.
    fn used(&self, report: &UsageReport) -> (u64, u64, u64) {
        match report {
            // A cache answered: the provider did no work for this request.
            UsageReport {
                from_cache: true, ..
            } if !self.charge_cache_hits => (0, 0, 0),
            UsageReport { usage: Some(u), .. } => {
                let cached = u.cached_input_tokens.min(u.input_tokens);
                (u.input_tokens - cached, cached, u.output_tokens)
            }
            // No usage: an error answer cost nothing; otherwise the prompt and what was streamed
            // (dropped before any response, the provider may still have read the prompt).
            r if r.status >= 400
                && r.streamed_text_bytes == 0
                && r.outcome == BodyOutcome::Completed =>
            {
                (0, 0, 0)
            }
            r => (self.input_estimate, 0, r.streamed_text_bytes.div_ceil(4)),
        }
    }

    fn settle(&mut self, report: &UsageReport) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        if report.outcome == BodyOutcome::Failed {
            // The inner service failed: nothing reached the provider.
            for ticket in &self.tickets {
                self.quota.release(*ticket);
            }
            return;
        }
        let (uncached, cached, output) = self.used(report);
        let usd = self
            .price
            .map_or(Usd::ZERO, |p| p.cost(uncached, cached, output));
        if let Some(decisions) = &self.decisions {
            decisions.push(Decision::new(
                "quota",
                Outcome::UsageSettled {
                    usage: report
                        .usage
                        .filter(|_| !report.from_cache)
                        .unwrap_or_else(|| {
                            let mut estimate = Usage::default();
                            estimate.input_tokens = uncached + cached;
                            estimate.output_tokens = output;
                            estimate.total_tokens = uncached + cached + output;
                            estimate
                        }),
                    cost_usd_micros: self.price.map(|_| usd.micros()),
                },
            ));
        }
        for ticket in &self.tickets {
            let budget = self.quota.store.budget(ticket.budget);
            let input = if budget.count_cached {
                uncached + cached
            } else {
                uncached
            };
            self.quota.settle(*ticket, Amounts::new(input, output, usd));
        }
    }
}

impl Hook for Settlement {
    fn interest(&self) -> Interest {
        if self.strip {
            Interest::REWRITE
        } else {
            Interest::OBSERVE
        }
    }

    fn on_event(&mut self, event: &mut StreamEvent<'_>) {
        if self.strip && event.view().is_usage_only() {
            event.remove();
        }
    }

    fn on_end(mut self: Box<Self>, report: &UsageReport) {
        self.settle(report);
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        self.settle(&UsageReport::no_response(BodyOutcome::Abandoned));
    }
}

fn rejected<B>(rejection: Rejection, protocol: Protocol) -> Response<ResponseBody<B>> {
    rejection
        .with_layer("quota")
        .into_response(protocol)
        .map(ResponseBody::plain)
}

fn refusal_rejection(quota: &Inner, refusal: &Refusal) -> Rejection {
    let budget = quota.store.budget(refusal.budget);
    let unit = |v: u64| match refusal.dimension {
        crate::budget::Dimension::Usd => Usd::from_micros(v).to_string(),
        _ => format!("{v} tokens"),
    };
    if budget
        .limits
        .cap(refusal.dimension)
        .is_some_and(|cap| refusal.needed > cap)
    {
        // No amount of waiting helps: the request alone is larger than the whole budget. A 429
        // as OpenAI answers a request over a whole limit, told not to be retried.
        return Rejection::new(StatusCode::TOO_MANY_REQUESTS, "insufficient_quota", format!(
            "This request needs up to {} (its prompt and max_tokens), more than budget '{}' allows in a whole {} ({}). Lower max_tokens or shorten the prompt.",
            unit(refusal.needed),
            budget.name(),
            budget.period,
            budget.limits.describe(refusal.dimension),
        ))
        .with_code("request_exceeds_budget")
        .with_param("max_tokens")
        .with_header(HeaderName::from_static("x-should-retry"), HeaderValue::from_static("false"));
    }
    let now = quota
        .wall()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let wait = u64::try_from(refusal.resets)
        .unwrap_or(0)
        .saturating_sub(now);
    Rejection::new(
        StatusCode::TOO_MANY_REQUESTS,
        "insufficient_quota",
        format!(
            "Budget '{}' ({} per {}) is used up for this caller: {} used or reserved, this request needs up to {}. It resets at {} (in {}s).",
            budget.name(),
            budget.limits.describe(refusal.dimension),
            budget.period,
            unit(refusal.committed),
            unit(refusal.needed),
            rfc3339(refusal.resets),
            wait
        ),
    )
    .with_code("insufficient_quota")
    .with_header(HeaderName::from_static("x-should-retry"), HeaderValue::from_static("false"))
}

/// `x-moat-quota-*` headers for the tightest enforced budget after this request's reservation:
/// from what the reservation saw, without asking the store again. Worked out before the call,
/// so the tickets can go to the settlement as they are.
fn quota_headers(quota: &Inner, tickets: &[Ticket]) -> Vec<(HeaderName, HeaderValue)> {
    let tightest = tickets
        .iter()
        .filter(|t| quota.store.budget(t.budget).enforced())
        .map(|t| {
            let budget = quota.store.budget(t.budget);
            (budget.limits.percent_used(&t.committed), budget, t)
        })
        .max_by_key(|(percent, ..)| *percent);
    let Some((_, budget, ticket)) = tightest else {
        return Vec::new();
    };
    let remaining = budget.limits.remaining(&ticket.committed);
    let mut headers = Vec::with_capacity(4);
    if let Some(name) = quota.store.name_value(ticket.budget) {
        headers.push((BUDGET, name.clone()));
    }
    if budget.limits.tokens.is_some() {
        headers.push((REMAINING_TOKENS, HeaderValue::from(remaining.tokens)));
    }
    if budget.limits.has_usd() {
        let usd = remaining.usd.to_string();
        if let Ok(value) = HeaderValue::from_str(usd.trim_start_matches('$')) {
            headers.push((REMAINING_USD, value));
        }
    }
    headers.push((RESET, reset_value(ticket.resets)));
    headers
}

const BUDGET: HeaderName = HeaderName::from_static("x-moat-quota-budget");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-moat-quota-remaining-tokens");
const REMAINING_USD: HeaderName = HeaderName::from_static("x-moat-quota-remaining-usd");
const RESET: HeaderName = HeaderName::from_static("x-moat-quota-reset");

/// `resets` (seconds since the epoch) in RFC 3339, formatted once per thread and period: every
/// request of a period resets at the same moment.
fn reset_value(resets: i64) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(i64, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((at, value)) if *at == resets => value.clone(),
        _ => {
            let value = HeaderValue::from_str(&rfc3339(resets))
                .unwrap_or_else(|_| HeaderValue::from(resets));
            *last = Some((resets, value.clone()));
            value
        }
    })
}

/// A request's claim on the budgets that apply to it, before it is reserved.
struct Plan {
    claims: Vec<Claim>,
    shadow: Vec<bool>,
    price: Option<Price>,
    estimate: u64,
    reserve: u64,
    /// Write the reserve into a request that sets no `max_tokens`.
    cap: bool,
    /// Ask for the usage chunk the client did not (and remove it from the reply).
    strip: bool,
}

impl Inner {
    /// Which budgets apply to a parsed request and what it claims of them: `None` when none
    /// applies, a rejection when it cannot be priced.
    fn plan(
        &self,
        llm: &SharedLlmRequest,
        head: &RequestHead<'_>,
        caller: &Caller,
    ) -> Result<Option<Plan>, Rejection> {
        let estimate = llm.input_tokens(self.config.exact_counting).tokens;
        let (model, format, max_tokens, stream, include_usage) = llm.with(|r| {
            let stream = r.stream();
            (
                r.model().map(str::to_owned),
                r.format(),
                r.max_output_tokens(),
                stream,
                // Only a stream has a usage chunk to ask for.
                stream && r.include_usage(),
            )
        });
        let applicable: Vec<usize> = self
            .store
            .budgets()
            .enumerate()
            .filter(|(_, b)| b.scope().applies(head, caller, model.as_deref()))
            .map(|(i, _)| i)
            .collect();
        if applicable.is_empty() || format == WireFormat::Unknown {
            return Ok(None);
        }
        let spend = applicable
            .iter()
            .any(|&i| self.store.budget(i).limits.has_usd());
        let price = self.config.prices.price(model.as_deref());
        if spend && price.is_none() {
            return Err(Rejection::bad_request(format!(
                "model {:?} has no price, and a spend budget applies",
                model.as_deref().unwrap_or("")
            ))
            .with_code("model_not_priced")
            .with_param("model"));
        }
        let reserve = max_tokens.unwrap_or(self.config.completion_reserve);
        let usd = price.map_or(Usd::ZERO, |p| p.cost(estimate, 0, reserve));
        let claims = applicable
            .iter()
            .map(|&i| {
                let key = self.store.budget(i).scope().key_of(head, caller);
                self.store
                    .claim(i, key, Amounts::new(estimate, reserve, usd))
            })
            .collect();
        let shadow = applicable
            .iter()
            .map(|&i| !self.store.budget(i).enforced())
            .collect();
        Ok(Some(Plan {
            claims,
            shadow,
            price,
            estimate,
            reserve,
            cap: max_tokens.is_none() && self.config.cap_max_tokens,
            strip: stream
                && !include_usage
                && matches!(
                    format,
                    WireFormat::ChatCompletions | WireFormat::Completions
                ),
        }))
    }

    /// Reserves a plan, recording every decision: the tickets, or the refusal to send.
    async fn admit(
        &self,
        plan: &Plan,
        extensions: &http::Extensions,
    ) -> Result<Vec<Ticket>, Rejection> {
        let (result, shadow_refusals) = self.reserve(&plan.claims, &plan.shadow).await;
        for refusal in &shadow_refusals {
            let budget = self.store.budget(refusal.budget);
            self.store
                .metrics(refusal.budget)
                .shadow_denied
                .increment(1);
            Decisions::record(
                extensions,
                Decision::new(
                    "quota",
                    Outcome::ShadowRejected {
                        code: "insufficient_quota".into(),
                    },
                )
                .with_rule(budget.name().to_owned()),
            );
        }
        match result {
            Ok(tickets) => {
                for t in &tickets {
                    self.store.metrics(t.budget).reserved.increment(1);
                }
                Decisions::record(extensions, Decision::new("quota", Outcome::Allowed));
                Ok(tickets)
            }
            Err(Refused::Unavailable) => Err(Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "The budget store is unavailable. Please try again shortly.",
            )
            .with_code("quota_unavailable")
            .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1"))),
            Err(Refused::Full { budget }) => {
                self.store.metrics(budget).denied.increment(1);
                let name = self.store.budget(budget).name();
                tracing::warn!(target: "moat::quota", budget = %name, "budget store full: new caller refused");
                Err(Rejection::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    format!("Budget '{name}' tracks as many callers as it may; new callers are refused until some fall idle."),
                )
                .with_code("quota_store_full")
                .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("60")))
            }
            Err(Refused::Budget(refusal)) => {
                let budget = self.store.budget(refusal.budget);
                self.store.metrics(refusal.budget).denied.increment(1);
                tracing::debug!(target: "moat::quota", budget = %budget.name(), "insufficient quota");
                let rejection = refusal_rejection(self, &refusal);
                Decisions::record(
                    extensions,
                    Decision::new(
                        "quota",
                        Outcome::Rejected {
                            status: rejection.status().as_u16(),
                            code: rejection.code().unwrap_or_default().to_owned().into(),
                        },
                    )
                    .with_rule(budget.name().to_owned()),
                );
                Err(rejection)
            }
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Quota<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let quota = self.quota.clone();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let caller = quota.config.options.resolver.resolve(&mut req);
        ResponseFuture::new(async move {
            let protocol = Protocol::of(&req);
            // Requests no budget applies to leave this block and are passed on after it: awaited
            // inside a `match` arm, the matched value would be held in the future across it.
            let passed = 'budgeted: {
                let (mut req, llm) =
                    match read_llm_request(req, quota.config.options.body_limit).await {
                        Ok(LlmBody::Parsed { request, llm }) => (request, llm),
                        Ok(LlmBody::Unparsed(request)) => break 'budgeted request,
                        Err(rejection) => return Ok(rejected(rejection, protocol)),
                    };
                let plan = match quota.plan(&llm, &RequestHead::of(&req), &caller) {
                    Ok(Some(plan)) => plan,
                    Ok(None) => break 'budgeted req,
                    Err(rejection) => return Ok(rejected(rejection, protocol)),
                };
                let tickets = match quota.admit(&plan, req.extensions()).await {
                    Ok(tickets) => tickets,
                    Err(rejection) => return Ok(rejected(rejection, protocol)),
                };
                // Make the response report (and stay within) what was reserved.
                llm.with(|r| {
                    if plan.strip {
                        r.set_include_usage(true);
                    }
                    if plan.cap {
                        r.set_max_output_tokens(plan.reserve);
                    }
                });
                let headers = if quota.config.headers {
                    quota_headers(&quota, &tickets)
                } else {
                    Vec::new()
                };
                let decisions = req.extensions().get::<Decisions>().cloned();
                let hooks = Hooks::of(req.extensions_mut());
                hooks.attach(Settlement {
                    quota: quota.clone(),
                    tickets,
                    price: plan.price,
                    input_estimate: plan.estimate,
                    strip: plan.strip,
                    charge_cache_hits: quota.config.charge_cache_hits,
                    done: false,
                    decisions,
                });
                let mut response = Hooks::serve(Some(hooks), inner.call(req)).await?;
                for (name, value) in headers {
                    // Replacing whatever the upstream said under these names.
                    response.headers_mut().insert(name, value);
                }
                return Ok(response.map(ResponseBody::new));
            };
            Ok(inner.call(passed).await?.map(ResponseBody::passed))
        })
    }
}

/// One budget's state for a caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BudgetUsage {
    /// The budget's name.
    pub budget: String,
    /// Its period, e.g. `day`.
    pub period: String,
    /// Used this period.
    pub used: Amounts,
    /// Held by requests in flight.
    pub reserved: Amounts,
    /// The caps.
    pub limits: Limits,
    /// When the period starts over (RFC 3339).
    pub resets_at: String,
    /// Whether the budget is in shadow mode.
    pub shadow: bool,
}

/// Reads budget usage, sharing a [`QuotaLayer`]'s state.
#[derive(Clone)]
pub struct QuotaHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QuotaHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QuotaHandle { .. }")
    }
}

impl QuotaHandle {
    /// Every budget's state for the caller of `req` (its stored [`Caller`], keys as the budgets
    /// extract them); budgets restricted to models are included. The future does not borrow `req`.
    pub fn usage<B>(
        &self,
        req: &Request<B>,
    ) -> impl Future<Output = Vec<BudgetUsage>> + Send + 'static {
        let head = RequestHead::of(req);
        let caller = req
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_default();
        let keys: Vec<(usize, Key)> = self
            .inner
            .store
            .budgets()
            .enumerate()
            // Budgets limited to models apply to some of the caller's requests: listed too.
            .filter(|(_, b)| {
                b.scope()
                    .matches_head(head.method, head.uri.path(), &caller)
                    || !b.scope().models().is_empty()
            })
            .map(|(i, budget)| (i, budget.scope().key_of(&head, &caller)))
            .collect();
        let inner = self.inner.clone();
        async move {
            let mut out = Vec::with_capacity(keys.len());
            for (i, key) in keys {
                let budget = inner.store.budget(i);
                let view = inner.view(i, &key).await;
                out.push(BudgetUsage {
                    budget: budget.name().to_owned(),
                    period: budget.period.to_string(),
                    used: view.used,
                    reserved: view.reserved,
                    limits: budget.limits,
                    resets_at: rfc3339(view.resets),
                    shadow: !budget.enforced(),
                });
            }
            out
        }
    }
}
