//! The shared state of a rate limiter and its decisions.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, StatusCode};
use metrics::Counter;
use moat_core::decision::{Decision, Decisions, Outcome};
use moat_core::identity::{Caller, RequestHead};
use moat_core::kit::{LayerOptions, NamedStates};
use moat_core::response::{Hook, Interest};
use moat_core::usage::{BodyOutcome, UsageReport};
use moat_core::{Key, Rejection};

use crate::headers::{self, Binding, Headers};
use crate::memory::{Acquire, Cell, MemoryStore, Snapshot};
use crate::rule::Rule;
use crate::spike::{Quarantine, SpikeGuard, SpikeTable, SpikeVerdict};
use moat_core::decision::Mode;
use moat_core::store::KeyHasher;

/// At most this many limits (request plus token) in one rule.
pub(crate) const MAX_CELLS: usize = 8;

/// Settings shared by every rule of a layer.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) rules: Vec<Rule>,
    pub(crate) options: LayerOptions,
    pub(crate) headers: Headers,
    pub(crate) completion_reserve: u64,
    #[cfg(feature = "redis")]
    pub(crate) redis: Option<Arc<crate::redis::RedisStore>>,
    pub(crate) spike: Option<SpikeGuard>,
}

/// A layer's states: one store per rule, and the spike guard's table, by name.
#[derive(Debug, Clone, Default)]
pub(crate) struct States {
    rules: NamedStates<RuleStore>,
    spike: NamedStates<SpikeTable>,
}

impl States {
    /// Forgets the rules not named in `keep`.
    pub(crate) fn retain(&self, keep: &[&str]) {
        self.rules.retain(keep);
    }
}

/// One rule's state: the keys' limits (and in-flight counts), the seeded hashing that indexes
/// them, and the rule's counters.
pub(crate) struct RuleStore {
    memory: MemoryStore,
    hasher: KeyHasher,
    metrics: RuleMetrics,
    cells: usize,
    concurrency: bool,
    /// The rule's name hashed: how the Redis store's denied-keys cache knows the rule.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    name_id: u64,
}

impl RuleStore {
    fn new(rule: &Rule, cells: usize, max_keys: usize) -> Self {
        let concurrency = rule.max_in_flight.is_some();
        Self {
            memory: MemoryStore::new(cells, concurrency, max_keys),
            hasher: KeyHasher::random(),
            metrics: RuleMetrics::new(rule.name()),
            cells,
            concurrency,
            name_id: {
                use std::hash::{BuildHasher, Hasher};
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write(rule.name().as_bytes());
                h.finish()
            },
        }
    }

    /// Whether this state can serve `rule` (a rule with other limits needs a new store).
    fn fits(&self, rule: &Rule, cells: usize) -> bool {
        self.cells == cells && self.concurrency == rule.max_in_flight.is_some()
    }
}

struct RuleMetrics {
    allowed: Counter,
    denied: Counter,
    shadow_denied: Counter,
    near_limit: Counter,
}

impl RuleMetrics {
    fn new(rule: &str) -> Self {
        let rule = rule.to_owned();
        Self {
            allowed: metrics::counter!("moat_ratelimit_allowed_total", "rule" => rule.clone()),
            denied: metrics::counter!("moat_ratelimit_denied_total", "rule" => rule.clone()),
            shadow_denied: metrics::counter!("moat_ratelimit_shadow_denied_total", "rule" => rule.clone()),
            near_limit: metrics::counter!("moat_ratelimit_near_limit_total", "rule" => rule),
        }
    }
}

pub(crate) struct RuleState {
    pub(crate) rule: Rule,
    /// Request limits, then token limits.
    cells: Vec<Cell>,
    /// Each limit's burst as a header value, formatted once.
    limit_values: Vec<HeaderValue>,
    store: Arc<RuleStore>,
}

impl RuleState {
    fn token_cells(&self) -> std::ops::Range<usize> {
        self.rule.limits.len()..self.cells.len()
    }
}

/// A configuration and the states it decides with; every clone of a rate-limited service shares
/// one.
pub(crate) struct Limiter {
    pub(crate) config: Config,
    rules: Vec<RuleState>,
    spike: Option<(SpikeGuard, Arc<SpikeTable>)>,
    pub(crate) needs_body: bool,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("rules", &self.config.rules)
            .field("headers", &self.config.headers)
            .field("max_keys", &self.config.options.max_keys)
            .finish()
    }
}

/// What the limiter knows of an LLM request body.
#[derive(Debug, Clone, Default)]
pub(crate) struct BodyFacts {
    pub(crate) model: Option<String>,
    /// Estimated prompt tokens.
    pub(crate) input: u64,
    /// Tokens reserved for the completion.
    pub(crate) reserve: u64,
    pub(crate) is_llm: bool,
}

/// One rule's charge for an admitted request, kept until its response body ends.
#[derive(Debug, Clone, Copy)]
struct Held {
    rule: usize,
    id: u64,
    /// Only the Redis store needs the key again (its state is named by the key's digest).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    key: Key,
    tokens: u64,
    in_flight: bool,
    /// Charged in Redis rather than in memory.
    remote: bool,
}

/// The tightest request and token limits, for headers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Bindings {
    pub(crate) requests: Option<Binding>,
    pub(crate) tokens: Option<Binding>,
}

pub(crate) enum Verdict {
    Allow {
        admission: Option<Admission>,
        bindings: Bindings,
    },
    Deny(Denial),
}

/// A refusal, decided without allocating and rendered into a response afterwards.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Denial {
    /// A rule's limit refused the request.
    Limit {
        rule: usize,
        verdict: Acquire,
        token_cost: u64,
        snapshots: [Snapshot; MAX_CELLS],
    },
    /// The spike guard quarantined the key.
    Quarantined,
    /// The shared store failed and the policy is to fail closed.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Unavailable,
}

/// The error code of a refusal.
fn code_of(verdict: Acquire) -> &'static str {
    match verdict {
        Acquire::Never { .. } => "request_too_large",
        Acquire::Busy => "concurrency_limit_exceeded",
        Acquire::Full => "rate_limiter_full",
        Acquire::Wait { .. } | Acquire::Admitted => "rate_limit_exceeded",
    }
}

impl Limiter {
    /// The limiter for `config`, with the states of its rules taken from `states` by name.
    pub(crate) fn new(config: Config, states: &States) -> Self {
        let max_keys = config.options.max_keys;
        let rules = config
            .rules
            .iter()
            .map(|rule| {
                let cells: Vec<Cell> = rule
                    .limits
                    .iter()
                    .chain(&rule.tokens)
                    .map(Cell::from)
                    .collect();
                let n = cells.len();
                let store = states.rules.get(
                    rule.scope().shared_name(),
                    |s| s.fits(rule, n),
                    || RuleStore::new(rule, n, max_keys),
                );
                RuleState {
                    cells,
                    limit_values: rule
                        .limits
                        .iter()
                        .chain(&rule.tokens)
                        .map(|limit| headers::number(limit.burst()))
                        .collect(),
                    store,
                    rule: rule.clone(),
                }
            })
            .collect();
        let needs_body = config.rules.iter().any(Rule::needs_body);
        let spike = config.spike.clone().map(|guard| {
            let name: Arc<str> = Arc::from("spike");
            let table = states
                .spike
                .get(&name, |_| true, || SpikeTable::new(max_keys));
            (guard, table)
        });
        Self {
            config,
            rules,
            spike,
            needs_body,
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.config.options.clock.now().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Keys held in memory by the rule named `rule`.
    pub(crate) fn keys_held(&self, rule: &str) -> usize {
        self.rules
            .iter()
            .find(|r| r.rule.name() == rule)
            .map_or(0, |r| r.store.memory.len())
    }

    /// Whether decisions go to a shared store (and so are asynchronous).
    pub(crate) fn is_shared(&self) -> bool {
        #[cfg(feature = "redis")]
        return self.config.redis.is_some();
        #[cfg(not(feature = "redis"))]
        false
    }

    /// Whether any rule that applies to this head needs the body to decide.
    pub(crate) fn needs_body_for(&self, head: &RequestHead<'_>, caller: &Caller) -> bool {
        self.needs_body
            && self.rules.iter().any(|r| {
                r.rule.needs_body()
                    && r.rule
                        .scope()
                        .matches_head(head.method, head.uri.path(), caller)
            })
    }

    /// The applicable rules of a request, with their keys and costs.
    fn steps<'a>(
        &'a self,
        head: &'a RequestHead<'a>,
        caller: &'a Caller,
        model: Option<&'a str>,
        token_cost: u64,
    ) -> impl Iterator<Item = Step<'a>> + 'a {
        self.rules
            .iter()
            .enumerate()
            .filter_map(move |(index, state)| {
                let scope = state.rule.scope();
                if !scope.applies(head, caller, model) {
                    return None;
                }
                let key = scope.key_of(head, caller);
                let mut costs = [1u64; MAX_CELLS];
                costs[state.token_cells()].fill(token_cost);
                Some(Step {
                    state,
                    index,
                    id: state.store.hasher.hash(&key),
                    key,
                    costs,
                    token_cost,
                })
            })
    }

    /// Records and counts a rule's verdict. `Some` when the request must be refused.
    fn conclude(
        &self,
        head: &RequestHead<'_>,
        step: &Step<'_>,
        verdict: Acquire,
        snapshots: &[Snapshot],
        remote: bool,
        tally: &mut Tally,
    ) -> Option<Denial> {
        let state = step.state;
        let rule = &state.rule;
        let shadow = rule.scope().mode() == Mode::Shadow;
        if verdict == Acquire::Admitted {
            state.store.metrics.allowed.increment(1);
            let near = rule
                .limits
                .iter()
                .chain(&rule.tokens)
                .zip(snapshots)
                .any(|(limit, s)| s.remaining.saturating_mul(5) < limit.burst());
            if near {
                state.store.metrics.near_limit.increment(1);
            }
            if !shadow && self.config.headers != Headers::NONE {
                tally.bindings =
                    self.bindings(state, snapshots, std::mem::take(&mut tally.bindings));
            }
            tally.held.push(Held {
                rule: step.index,
                id: step.id,
                key: step.key,
                tokens: step.token_cost,
                in_flight: rule.max_in_flight.is_some(),
                remote,
            });
            record(head, tally.recording, rule, Outcome::Allowed);
            return None;
        }
        let code = Cow::Borrowed(code_of(verdict));
        if shadow {
            state.store.metrics.shadow_denied.increment(1);
            tracing::debug!(target: "moat::ratelimit", rule = %rule.name(), key = %step.key, "shadow rule would deny");
            record(
                head,
                tally.recording,
                rule,
                Outcome::ShadowRejected { code },
            );
            return None;
        }
        state.store.metrics.denied.increment(1);
        tracing::debug!(target: "moat::ratelimit", rule = %rule.name(), key = %step.key, "denied");
        record(
            head,
            tally.recording,
            rule,
            Outcome::Rejected { status: 429, code },
        );
        let mut kept = [Snapshot::default(); MAX_CELLS];
        kept[..snapshots.len()].copy_from_slice(snapshots);
        Some(Denial::Limit {
            rule: step.index,
            verdict,
            token_cost: step.token_cost,
            snapshots: kept,
        })
    }

    fn admit(self: &Arc<Self>, tally: Tally, facts: Option<&BodyFacts>) -> Verdict {
        let Tally { held, bindings, .. } = tally;
        // Keep only what needs settling when the body ends.
        let settles = |h: &Held| {
            h.in_flight || (h.tokens > 0 && !self.rules[h.rule].token_cells().is_empty())
        };
        let admission = if held.iter().any(settles) {
            Some(Admission {
                limiter: self.clone(),
                held: held.into_iter().filter(settles).collect(),
                input_estimate: facts.map_or(0, |f| f.input),
                settled: false,
            })
        } else {
            None
        };
        Verdict::Allow {
            admission,
            bindings,
        }
    }

    /// Runs the spike guard: the caller to decide for (demoted to a quarantine tier), or `None`
    /// when the key is quarantined outright.
    fn spike_check<'c>(&self, caller: &'c Caller, now: u64) -> Option<Cow<'c, Caller>> {
        let Some(spike) = &self.spike else {
            return Some(Cow::Borrowed(caller));
        };
        let key = caller
            .api_key
            .map(|fp| fp.key())
            .or_else(|| caller.ip.map(Key::ip))
            .unwrap_or(Key::GLOBAL);
        let (guard, table) = spike;
        match table.observe(guard, &key, now) {
            SpikeVerdict::Pass => Some(Cow::Borrowed(caller)),
            SpikeVerdict::Quarantined(Quarantine::Reject) => None,
            SpikeVerdict::Quarantined(Quarantine::Tier(tier)) => {
                Some(Cow::Owned(caller.clone().with_tier(tier)))
            }
        }
    }

    /// Decides a request in memory: every applicable rule must admit it, or none is charged.
    pub(crate) fn decide(
        self: &Arc<Self>,
        head: &RequestHead<'_>,
        caller: &Caller,
        facts: Option<&BodyFacts>,
    ) -> Verdict {
        let now = self.now();
        let Some(caller) = self.spike_check(caller, now) else {
            return Verdict::Deny(Denial::Quarantined);
        };
        let caller = &*caller;
        let model = facts.and_then(|f| f.model.as_deref());
        let token_cost = facts
            .filter(|f| f.is_llm)
            .map_or(0, |f| f.input + f.reserve);
        let mut tally = Tally::for_request(head);
        for step in self.steps(head, caller, model, token_cost) {
            let n = step.state.cells.len();
            let mut snapshots = [Snapshot::default(); MAX_CELLS];
            let verdict = step.state.store.memory.acquire(
                step.id,
                now,
                &step.state.cells,
                &step.costs[..n],
                step.state.rule.max_in_flight,
                &mut snapshots[..n],
            );
            if let Some(denial) =
                self.conclude(head, &step, verdict, &snapshots[..n], false, &mut tally)
            {
                for h in tally.held.into_iter() {
                    self.undo_local(h, now);
                }
                return Verdict::Deny(denial);
            }
        }
        self.admit(tally, facts)
    }

    /// Decides a request against Redis, applying the failure policy when Redis fails.
    #[cfg(feature = "redis")]
    pub(crate) async fn decide_shared(
        self: &Arc<Self>,
        head: &RequestHead<'_>,
        caller: &Caller,
        facts: Option<&BodyFacts>,
    ) -> Verdict {
        use crate::redis::OnStoreError;
        let Some(redis) = self.config.redis.clone() else {
            return self.decide(head, caller, facts);
        };
        let now = self.now();
        let Some(caller) = self.spike_check(caller, now) else {
            return Verdict::Deny(Denial::Quarantined);
        };
        let caller = &*caller;
        let model = facts.and_then(|f| f.model.as_deref());
        let token_cost = facts
            .filter(|f| f.is_llm)
            .map_or(0, |f| f.input + f.reserve);
        let mut tally = Tally::for_request(head);
        for step in self.steps(head, caller, model, token_cost) {
            let state = step.state;
            let n = state.cells.len();
            let max_in_flight = state.rule.max_in_flight;
            let mut snapshots = [Snapshot::default(); MAX_CELLS];
            let local = |snapshots: &mut [Snapshot]| {
                state.store.memory.acquire(
                    step.id,
                    now,
                    &state.cells,
                    &step.costs[..n],
                    max_in_flight,
                    snapshots,
                )
            };
            let (mut verdict, remote) = if n == 0 {
                (local(&mut snapshots[..n]), false)
            } else if let Some(cached) = redis.cached_denial(state.store.name_id, &step.key, now) {
                (cached, true)
            } else {
                match redis
                    .acquire(
                        (state.store.name_id, state.rule.name()),
                        &step.key,
                        now,
                        &state.cells,
                        &step.costs[..n],
                        &mut snapshots[..n],
                    )
                    .await
                {
                    Ok(verdict) => (verdict, true),
                    Err(error) => {
                        metrics::counter!("moat_ratelimit_store_errors_total").increment(1);
                        tracing::warn!(target: "moat::ratelimit", %error, policy = ?redis.on_error, "redis unavailable");
                        match redis.on_error {
                            OnStoreError::FailOpen => continue,
                            OnStoreError::Local => (local(&mut snapshots[..n]), false),
                            // Fail closed: the safe choice for any policy added later.
                            _ => {
                                self.undo_all(tally.held, now).await;
                                return Verdict::Deny(Denial::Unavailable);
                            }
                        }
                    }
                }
            };
            // In-flight caps are per process: take the slot locally once Redis has admitted.
            if remote && verdict == Acquire::Admitted && max_in_flight.is_some() {
                let zero = [0u64; MAX_CELLS];
                let mut scratch = [Snapshot::default(); MAX_CELLS];
                if state.store.memory.acquire(
                    step.id,
                    now,
                    &state.cells,
                    &zero[..n],
                    max_in_flight,
                    &mut scratch[..n],
                ) == Acquire::Busy
                {
                    let mut undo = HeldList::default();
                    undo.push(Held {
                        rule: step.index,
                        id: step.id,
                        key: step.key,
                        tokens: token_cost,
                        in_flight: false,
                        remote: true,
                    });
                    self.undo_all(undo, now).await;
                    verdict = Acquire::Busy;
                }
            }
            if let Some(denial) =
                self.conclude(head, &step, verdict, &snapshots[..n], remote, &mut tally)
            {
                self.undo_all(tally.held, now).await;
                return Verdict::Deny(denial);
            }
        }
        self.admit(tally, facts)
    }

    /// Decides with whichever store is configured.
    pub(crate) async fn decide_async(
        self: &Arc<Self>,
        head: &RequestHead<'_>,
        caller: &Caller,
        facts: Option<&BodyFacts>,
    ) -> Verdict {
        #[cfg(feature = "redis")]
        if self.is_shared() {
            // Boxed: the Redis path's state would otherwise make every request's future
            // (memory-only ones included) kilobytes larger.
            return Box::pin(self.decide_shared(head, caller, facts)).await;
        }
        self.decide(head, caller, facts)
    }

    #[cfg(feature = "redis")]
    async fn undo_all(&self, held: HeldList, now: u64) {
        for h in held.into_iter() {
            if h.remote {
                if let Some(redis) = &self.config.redis {
                    let state = &self.rules[h.rule];
                    let deltas = undo_deltas(state, h.tokens);
                    let n = state.cells.len();
                    if let Err(error) = redis
                        .adjust(state.rule.name(), &h.key, &state.cells, &deltas[..n])
                        .await
                    {
                        tracing::warn!(target: "moat::ratelimit", %error, "could not undo a charge in redis");
                    }
                }
                self.release_local(h, now);
            } else {
                self.undo_local(h, now);
            }
        }
    }

    /// Frees a held in-flight slot without touching limits.
    fn release_local(&self, held: Held, now: u64) {
        if held.in_flight {
            let state = &self.rules[held.rule];
            let zero = [0i64; MAX_CELLS];
            state
                .store
                .memory
                .adjust(held.id, now, &state.cells, &zero[..state.cells.len()], true);
        }
    }

    fn bindings(&self, state: &RuleState, snapshots: &[Snapshot], mut b: Bindings) -> Bindings {
        let rule = &state.rule;
        for (i, ((limit, s), value)) in rule
            .limits
            .iter()
            .chain(&rule.tokens)
            .zip(snapshots)
            .zip(&state.limit_values)
            .enumerate()
        {
            let binding = Binding {
                limit: limit.burst(),
                limit_value: value.clone(),
                remaining: s.remaining,
                reset: Duration::from_nanos(s.reset),
                window: limit.period(),
            };
            if i < rule.limits.len() {
                b.requests = Binding::tighter(b.requests, binding);
            } else {
                b.tokens = Binding::tighter(b.tokens, binding);
            }
        }
        b
    }

    /// Takes back everything an in-memory admission charged (a later rule denied the request).
    fn undo_local(&self, held: Held, now: u64) {
        let state = &self.rules[held.rule];
        let deltas = undo_deltas(state, held.tokens);
        state.store.memory.adjust(
            held.id,
            now,
            &state.cells,
            &deltas[..state.cells.len()],
            held.in_flight,
        );
    }

    /// The response of a refusal.
    pub(crate) fn render(&self, denial: Denial) -> Rejection {
        match denial {
            Denial::Limit {
                rule,
                verdict,
                token_cost,
                snapshots,
            } => {
                let state = &self.rules[rule];
                self.rejection(state, verdict, token_cost, &snapshots[..state.cells.len()])
            }
            Denial::Quarantined => {
                let cooldown = self
                    .config
                    .spike
                    .as_ref()
                    .map_or(Duration::ZERO, |g| g.cooldown);
                Rejection::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_exceeded",
                    format!(
                        "This key's request rate jumped far above its usual level, so it is paused for {}.",
                        headers::duration_string(cooldown)
                    ),
                )
                .with_code("key_quarantined")
                .with_header(http::header::RETRY_AFTER, HeaderValue::from(cooldown.as_secs().max(1)))
                .with_layer("ratelimit")
            }
            Denial::Unavailable => Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "The rate limiter's store is unavailable. Please try again shortly.",
            )
            .with_code("rate_limiter_unavailable")
            .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1"))
            .with_layer("ratelimit"),
        }
    }

    fn rejection(
        &self,
        state: &RuleState,
        verdict: Acquire,
        token_cost: u64,
        snapshots: &[Snapshot],
    ) -> Rejection {
        let rule = &state.rule;
        let limit_of = |cell: usize| rule.limits.iter().chain(&rule.tokens).nth(cell).copied();
        let kind = |cell: usize| {
            if cell < rule.limits.len() {
                "requests"
            } else {
                "tokens"
            }
        };
        let too_many = |message: String, code: &'static str| {
            Rejection::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                message,
            )
            .with_code(code)
            .with_layer("ratelimit")
        };
        let mut rejection = match verdict {
            Acquire::Wait { cell, retry_after } => {
                let wait = Duration::from_nanos(retry_after);
                let limit = limit_of(cell).map(|l| l.to_string()).unwrap_or_default();
                let mut r = too_many(
                    format!(
                        "Rate limit reached for {} on rule '{}' ({limit}). Please try again in {}.",
                        kind(cell),
                        rule.name(),
                        headers::duration_string(wait)
                    ),
                    code_of(verdict),
                );
                let mut h = http::HeaderMap::new();
                headers::retry_after(&mut h, wait);
                for (name, value) in h {
                    if let Some(name) = name {
                        r = r.with_header(name, value);
                    }
                }
                r
            }
            Acquire::Never { cell } => {
                let limit = limit_of(cell).map(|l| l.to_string()).unwrap_or_default();
                too_many(
                    format!(
                        "This request needs about {token_cost} tokens, more than rule '{}' allows at once ({limit}). Reduce the prompt or max_tokens.",
                        rule.name()
                    ),
                    "request_too_large",
                )
                .with_header(http::header::HeaderName::from_static("x-should-retry"), HeaderValue::from_static("false"))
            }
            Acquire::Busy => too_many(
                format!(
                    "Too many requests in flight for rule '{}' (at most {}). Wait for one to finish.",
                    rule.name(),
                    rule.max_in_flight.unwrap_or_default()
                ),
                "concurrency_limit_exceeded",
            )
            .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1")),
            Acquire::Full | Acquire::Admitted => too_many(
                "Too many distinct clients right now. Please try again shortly.".to_owned(),
                "rate_limiter_full",
            )
            .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1")),
        };
        let bindings = self.bindings(state, snapshots, Bindings::default());
        let mut h = http::HeaderMap::new();
        headers::write(
            self.config.headers,
            &mut h,
            bindings.requests,
            bindings.tokens,
        );
        for (name, value) in h {
            if let Some(name) = name {
                rejection = rejection.with_header(name, value);
            }
        }
        rejection
    }
}

/// What the rules admitted so far: charges to keep or undo, and the tightest limits.
#[derive(Default)]
struct Tally {
    held: HeldList,
    bindings: Bindings,
    /// Whether the request records its decisions (looked up once, not per rule).
    recording: bool,
}

impl Tally {
    fn for_request(head: &RequestHead<'_>) -> Self {
        Self {
            recording: Decisions::is_recording(head.extensions),
            ..Self::default()
        }
    }
}

/// Charges held by a request: the first few inline, so a typical admission allocates nothing.
#[derive(Default)]
struct HeldList {
    inline: [Option<Held>; 4],
    spill: Vec<Held>,
}

impl HeldList {
    fn push(&mut self, held: Held) {
        match self.inline.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => *slot = Some(held),
            None => self.spill.push(held),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Held> {
        self.inline.iter().flatten().chain(&self.spill)
    }

    fn into_iter(self) -> impl Iterator<Item = Held> {
        self.inline.into_iter().flatten().chain(self.spill)
    }
}

/// One applicable rule of a request.
struct Step<'a> {
    state: &'a RuleState,
    index: usize,
    key: Key,
    id: u64,
    costs: [u64; MAX_CELLS],
    token_cost: u64,
}

/// Deltas that take back one request and its tokens.
fn undo_deltas(state: &RuleState, tokens: u64) -> [i64; MAX_CELLS] {
    let mut deltas = [-1i64; MAX_CELLS];
    deltas[state.token_cells()].fill(-i64::try_from(tokens).unwrap_or(i64::MAX));
    deltas
}

fn record(head: &RequestHead<'_>, recording: bool, rule: &Rule, outcome: Outcome) {
    if recording {
        Decisions::record(
            head.extensions,
            Decision::new("ratelimit", outcome).with_rule(rule.name().to_owned()),
        );
    }
}

/// What an admitted request holds until its response body ends: its token charge, to settle
/// from the real usage, and its in-flight slot, to release. The [`Hook`] the layer attaches.
pub(crate) struct Admission {
    limiter: Arc<Limiter>,
    held: Vec<Held>,
    input_estimate: u64,
    settled: bool,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("held", &self.held)
            .finish()
    }
}

impl Admission {
    /// Whether settling needs the response's usage (a token limit charged this request).
    pub(crate) fn wants_usage(&self) -> bool {
        self.held.iter().any(|h| h.tokens > 0)
    }

    /// Settles against what was used; `None` keeps the estimate.
    fn settle(&mut self, report: Option<&UsageReport>) {
        self.settled = true;
        let used = report.map(|r| match r.usage {
            Some(usage) => usage
                .total_tokens
                .max(usage.input_tokens + usage.output_tokens),
            // No usage: charge the prompt and what was streamed, unless nothing happened at all.
            None if r.streamed_text_bytes > 0 || r.outcome != BodyOutcome::Completed => {
                self.input_estimate + r.streamed_text_bytes.div_ceil(4)
            }
            None => 0,
        });
        let now = self.limiter.now();
        for h in &self.held {
            let state = &self.limiter.rules[h.rule];
            let mut deltas = [0i64; MAX_CELLS];
            if let Some(used) = used {
                let delta = i64::try_from(used).unwrap_or(i64::MAX)
                    - i64::try_from(h.tokens).unwrap_or(i64::MAX);
                deltas[state.token_cells()].fill(delta);
            }
            if h.remote {
                #[cfg(feature = "redis")]
                self.limiter.settle_remote(h.rule, h.key, deltas);
                self.limiter.release_local(*h, now);
            } else {
                let n = state.cells.len();
                state
                    .store
                    .memory
                    .adjust(h.id, now, &state.cells, &deltas[..n], h.in_flight);
            }
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        // Dropped before a response (cancelled, or the inner service failed): the provider may
        // still have done the work, so keep the estimate, but free the in-flight slot.
        if !self.settled {
            self.settle(None);
        }
    }
}

#[cfg(feature = "redis")]
impl Limiter {
    /// Settles a Redis charge in the background: bodies end in synchronous code.
    fn settle_remote(self: &Arc<Self>, rule: usize, key: Key, deltas: [i64; MAX_CELLS]) {
        if deltas.iter().all(|d| *d == 0) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(target: "moat::ratelimit", "no tokio runtime to settle a redis charge");
            return;
        };
        let limiter = self.clone();
        runtime.spawn(async move {
            let Some(redis) = &limiter.config.redis else { return };
            let state = &limiter.rules[rule];
            let n = state.cells.len();
            if let Err(error) = redis.adjust(state.rule.name(), &key, &state.cells, &deltas[..n]).await {
                tracing::warn!(target: "moat::ratelimit", %error, "could not settle a charge in redis");
            }
        });
    }
}

impl Hook for Admission {
    fn interest(&self) -> Interest {
        if self.wants_usage() {
            Interest::OBSERVE
        } else {
            Interest::END
        }
    }

    fn on_end(mut self: Box<Self>, report: &UsageReport) {
        match report.outcome {
            // No response: keep the estimate (the provider may have done the work), free the
            // slot.
            BodyOutcome::Failed | BodyOutcome::Abandoned => self.settle(None),
            // A cache answered: no provider tokens were spent.
            _ if report.from_cache => {
                let mut free = report.clone();
                free.usage = Some(moat_core::usage::Usage::default());
                self.settle(Some(&free));
            }
            _ => self.settle(Some(report)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::Limit;
    use moat_core::clock::ManualClock;
    use moat_core::identity::{ApiKey, PeerAddr};

    fn limiter(rules: Vec<Rule>) -> Arc<Limiter> {
        let mut options = LayerOptions::default();
        options.clock = Arc::new(ManualClock::new());
        options.max_keys = 1000;
        Arc::new(Limiter::new(
            Config {
                rules,
                options,
                headers: Headers::default(),
                completion_reserve: 1024,
                #[cfg(feature = "redis")]
                redis: None,
                spike: None,
            },
            &States::default(),
        ))
    }

    #[test]
    fn the_deny_decision_allocates_nothing() {
        let limiter = limiter(vec![
            Rule::new("per-key", ApiKey::default()).limit(Limit::per_minute(1))
        ]);
        let mut req = http::Request::builder()
            .header("x-api-key", "sk-1")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(PeerAddr("192.0.2.1:1".parse().unwrap()));
        let caller = limiter.config.options.resolver.resolve(&mut req);
        let head = RequestHead::of(&req);
        assert!(matches!(
            limiter.decide(&head, &caller, None),
            Verdict::Allow { .. }
        ));
        let info = allocation_counter::measure(|| {
            let verdict = limiter.decide(&head, &caller, None);
            assert!(matches!(verdict, Verdict::Deny(Denial::Limit { .. })));
        });
        assert_eq!(info.count_total, 0, "{info:?}");
    }
}
