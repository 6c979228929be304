//! The in-memory budget store: reservations, settlement, periods, alerts.
//!
//! Each budget has its own state: 64 shards, each a lock over a map from a key's seeded id to its
//! usage and reservations, so requests of different callers rarely wait on one lock. The store
//! holds at most about `max_keys` keys per budget (the cap split evenly over the shards). When a
//! shard is full, a new key makes it sweep: only idle entries go (nothing reserved, nothing used
//! in the current period), because forgetting a live key would hand it a fresh budget; if none
//! can go, the new key is refused (503, "full") rather than let memory grow. A sweep scans one
//! shard; when it frees less than a sixteenth of it, the shard does not sweep again before the
//! period ends (when its entries can next fall idle), so a flood of new keys costs each request
//! a refusal, not a scan: sweeping stays amortized O(16) per new key.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use http::HeaderValue;
use metrics::{Counter, Gauge};

use jiff::tz::TimeZone;
use moat_core::kit::NamedStates;
use moat_core::store::{KeyHasher, PassThrough};
use moat_core::Key;

use crate::budget::{Amounts, Budget, Dimension};

use crate::period::{Period, Window, WindowCache};

/// One key's usage of one budget.
#[derive(Debug, Clone, Default)]
struct Entry {
    window: i64,
    used: Amounts,
    /// Rolling budgets: the previous bucket's usage, fading out.
    previous: Amounts,
    reservations: Vec<Reservation>,
    /// Alert thresholds already fired this period (bit i: the i-th threshold).
    alerted: u32,
}

#[derive(Debug, Clone, Copy)]
struct Reservation {
    id: u64,
    amounts: Amounts,
    /// Monotonic nanoseconds after which the reservation no longer holds budget.
    expires: u64,
}

impl Entry {
    /// Moves the entry into `window`, starting the usage over when a period has passed.
    fn roll(&mut self, window: Window, period: Period) {
        if window.id == self.window {
            return;
        }
        self.previous = match period {
            Period::Rolling(_) if window.id == self.window + 1 => self.used,
            _ => Amounts::default(),
        };
        self.used = Amounts::default();
        self.alerted = 0;
        self.window = window.id;
    }

    fn sweep(&mut self, now: u64) {
        self.reservations.retain(|r| r.expires > now);
    }

    fn used(&self, window: Window) -> Amounts {
        self.used.add(self.previous.scaled(window.carry_ppm))
    }

    fn reserved(&self) -> Amounts {
        self.reservations
            .iter()
            .fold(Amounts::default(), |a, r| a.add(r.amounts))
    }

    /// Idle: nothing reserved and nothing used that still counts (in the current period, or,
    /// for a rolling one, the bucket before it).
    fn is_idle(&self, window: Window, period: Period) -> bool {
        let rolling = matches!(period, Period::Rolling(_));
        self.reservations.is_empty()
            && self.window != window.id
            && (!rolling || self.window + 1 != window.id || self.used == Amounts::default())
    }
}

const SHARDS: usize = 64;

/// The shard of an id: by bits hashbrown does not index or tag by.
fn shard_of(id: u64) -> usize {
    (id >> 32) as usize % SHARDS
}

#[derive(Debug, Default)]
struct Shard {
    entries: HashMap<u64, Entry, BuildHasherDefault<PassThrough>>,
    /// A full shard does not sweep before this period (a window id): nothing new can have
    /// fallen idle.
    next_sweep: i64,
}

/// One budget's counters, registered once.
pub(crate) struct BudgetMetrics {
    pub(crate) reserved: Counter,
    pub(crate) denied: Counter,
    pub(crate) shadow_denied: Counter,
    pub(crate) settled: Counter,
    pub(crate) alerts: Counter,
    pub(crate) used_percent: Gauge,
}

impl BudgetMetrics {
    fn new(budget: &str) -> Self {
        let b = budget.to_owned();
        Self {
            reserved: metrics::counter!("moat_quota_reserved_total", "budget" => b.clone()),
            denied: metrics::counter!("moat_quota_denied_total", "budget" => b.clone()),
            shadow_denied: metrics::counter!("moat_quota_shadow_denied_total", "budget" => b.clone()),
            settled: metrics::counter!("moat_quota_settled_total", "budget" => b.clone()),
            alerts: metrics::counter!("moat_quota_alerts_total", "budget" => b.clone()),
            used_percent: metrics::gauge!("moat_quota_used_percent", "budget" => b),
        }
    }
}

/// One budget's state: every key's usage and reservations, and the budget's counters.
pub(crate) struct BudgetState {
    metrics: BudgetMetrics,
    /// Ids of keys in `shards`, seeded per budget.
    hasher: KeyHasher,
    shards: Box<[Mutex<Shard>]>,
    per_shard_cap: usize,
    sweeps: AtomicU64,
}

impl BudgetState {
    fn new(name: &str, max_keys: usize) -> Self {
        Self {
            metrics: BudgetMetrics::new(name),
            hasher: KeyHasher::random(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard_cap: max_keys.div_ceil(SHARDS).max(1),
            sweeps: AtomicU64::new(0),
        }
    }
}

/// A layer's states: each budget's by name, and the reservation ids they are all handed out
/// from.
#[derive(Debug, Clone)]
pub(crate) struct States {
    budgets: NamedStates<BudgetState>,
    next_id: Arc<AtomicU64>,
}

impl Default for States {
    fn default() -> Self {
        Self {
            budgets: NamedStates::new(),
            // Shared stores hold reservations from many processes: start each process's ids at
            // a random point, so two never write the same reservation.
            next_id: Arc::new(AtomicU64::new({
                use std::hash::{BuildHasher, Hasher};
                std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish()
            })),
        }
    }
}

impl States {
    /// Forgets the budgets not named in `keep`.
    pub(crate) fn retain(&self, keep: &[&str]) {
        self.budgets.retain(keep);
    }
}

/// A request's claim on one budget.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claim {
    pub(crate) budget: usize,
    /// Who is charged (for alerts, and the name of its state in Redis).
    pub(crate) who: Key,
    /// Its id in memory.
    pub(crate) key: u64,
    pub(crate) amounts: Amounts,
}

/// A reservation held by a request, and the budget's state once it was made (for headers).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    pub(crate) budget: usize,
    pub(crate) who: Key,
    pub(crate) key: u64,
    pub(crate) id: u64,
    /// Used and reserved, this reservation included.
    pub(crate) committed: Amounts,
    /// Seconds since the epoch when the period starts over.
    pub(crate) resets: i64,
    /// Held in Redis rather than in memory.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) remote: bool,
}

/// Why a claim did not fit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refusal {
    pub(crate) budget: usize,
    pub(crate) dimension: Dimension,
    pub(crate) committed: u64,
    pub(crate) needed: u64,
    /// Seconds since the epoch when the budget's period starts over.
    pub(crate) resets: i64,
}

/// What [`MemoryStore::reserve`] refused.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refused {
    /// A budget does not fit.
    Budget(Refusal),
    /// A new key, and the budget holds as many keys as it may.
    Full { budget: usize },
}

/// A budget's state for one key, for headers and the usage endpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    pub(crate) used: Amounts,
    pub(crate) reserved: Amounts,
    pub(crate) resets: i64,
}

/// An alert threshold crossed by a settlement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Crossed {
    pub(crate) percent: u64,
    pub(crate) used: Amounts,
    pub(crate) resets: i64,
}

/// The budgets of one configuration, over the states they take from a layer's [`States`].
pub(crate) struct MemoryStore {
    budgets: Vec<Slot>,
    tz: TimeZone,
    next_id: Arc<AtomicU64>,
}

/// A budget, its state, and what is worked out once for it.
struct Slot {
    budget: Budget,
    state: Arc<BudgetState>,
    window: WindowCache,
    /// The budget's name as a header value (none for a name no header can carry).
    name_value: Option<HeaderValue>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("budgets", &self.budgets.len())
            .finish()
    }
}

impl MemoryStore {
    pub(crate) fn next_id(&self) -> u64 {
        // Wrapping: the ids only need to differ from those still held.
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn new(
        budgets: Vec<Budget>,
        tz: TimeZone,
        max_keys: usize,
        states: &States,
    ) -> Self {
        Self {
            budgets: budgets
                .into_iter()
                .map(|budget| {
                    let state = states.budgets.get(
                        budget.scope().shared_name(),
                        |_| true,
                        || BudgetState::new(budget.name(), max_keys),
                    );
                    Slot {
                        name_value: HeaderValue::from_bytes(budget.name().as_bytes()).ok(),
                        budget,
                        state,
                        window: WindowCache::default(),
                    }
                })
                .collect(),
            tz,
            next_id: states.next_id.clone(),
        }
    }

    /// `who`'s claim of `amounts` on budget `budget`.
    pub(crate) fn claim(&self, budget: usize, who: Key, amounts: Amounts) -> Claim {
        Claim {
            budget,
            who,
            key: self.id_of(budget, &who),
            amounts,
        }
    }

    /// `who`'s id in a budget's maps.
    pub(crate) fn id_of(&self, budget: usize, who: &Key) -> u64 {
        self.budgets[budget].state.hasher.hash(who)
    }

    fn lock(&self, budget: usize, key: &u64) -> MutexGuard<'_, Shard> {
        self.budgets[budget].state.shards[shard_of(*key)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn window(&self, budget: usize, wall: SystemTime) -> Window {
        let slot = &self.budgets[budget];
        slot.window.window(&slot.budget.period, wall, &self.tz)
    }

    /// Makes room for one more key in a full shard, if sweeping may find any; whether there is.
    fn make_room(state: &BudgetState, shard: &mut Shard, window: Window, period: Period) -> bool {
        let cap = state.per_shard_cap;
        if shard.entries.len() < cap {
            return true;
        }
        if window.id < shard.next_sweep {
            return false;
        }
        state.sweeps.fetch_add(1, Ordering::Relaxed);
        let before = shard.entries.len();
        shard.entries.retain(|_, e| !e.is_idle(window, period));
        let freed = before - shard.entries.len();
        if freed < cap / 16 {
            // Nothing more falls idle before the period ends.
            shard.next_sweep = window.id + 1;
        }
        shard.entries.len() < cap
    }

    /// Reserves every claim, or none: the first claim that does not fit is the refusal.
    /// Claims of `shadow` budgets are recorded even when they do not fit (their refusals are
    /// returned apart).
    pub(crate) fn reserve(
        &self,
        claims: &[Claim],
        shadow: &[bool],
        wall: SystemTime,
        now: u64,
        ttl: u64,
    ) -> (Result<Vec<Ticket>, Refused>, Vec<Refusal>) {
        // Lock in (budget, shard) order, so two requests never wait on each other in a cycle.
        let shard_of = |c: &Claim| (c.budget, shard_of(c.key));
        let mut order: Vec<usize> = (0..claims.len()).collect();
        order.sort_by_key(|&i| shard_of(&claims[i]));
        let mut guards: Vec<((usize, usize), MutexGuard<'_, Shard>)> =
            Vec::with_capacity(claims.len());
        for &i in &order {
            let at = shard_of(&claims[i]);
            if guards.last().map(|(s, _)| *s) != Some(at) {
                guards.push((at, self.lock(claims[i].budget, &claims[i].key)));
            }
        }
        let guard = |guards: &[((usize, usize), MutexGuard<'_, Shard>)], c: &Claim| {
            guards
                .iter()
                .position(|(s, _)| *s == shard_of(c))
                .expect("locked above")
        };
        let mut shadow_refusals = Vec::new();
        for (i, claim) in claims.iter().enumerate() {
            let Slot { budget, state, .. } = &self.budgets[claim.budget];
            let window = self.window(claim.budget, wall);
            let g = guard(&guards, claim);
            let shard = &mut *guards[g].1;
            if !shard.entries.contains_key(&claim.key)
                && !Self::make_room(state, shard, window, budget.period)
            {
                return (
                    Err(Refused::Full {
                        budget: claim.budget,
                    }),
                    shadow_refusals,
                );
            }
            let entry = shard.entries.entry(claim.key).or_default();
            entry.roll(window, budget.period);
            entry.sweep(now);
            let committed = entry.used(window).add(entry.reserved());
            if let Some((dimension, committed, needed, _)) =
                budget.limits.breaks(&committed, &claim.amounts)
            {
                let refusal = Refusal {
                    budget: claim.budget,
                    dimension,
                    committed,
                    needed,
                    resets: window.end,
                };
                if shadow[i] {
                    shadow_refusals.push(refusal);
                } else {
                    return (Err(Refused::Budget(refusal)), shadow_refusals);
                }
            }
        }
        let mut tickets = Vec::with_capacity(claims.len());
        for claim in claims {
            let id = self.next_id();
            let window = self.window(claim.budget, wall);
            let g = guard(&guards, claim);
            let entry = guards[g]
                .1
                .entries
                .get_mut(&claim.key)
                .expect("created above");
            entry.reservations.push(Reservation {
                id,
                amounts: claim.amounts,
                expires: now.saturating_add(ttl),
            });
            tickets.push(Ticket {
                budget: claim.budget,
                who: claim.who,
                key: claim.key,
                id,
                committed: entry.used(window).add(entry.reserved()),
                resets: window.end,
                remote: false,
            });
        }
        (Ok(tickets), shadow_refusals)
    }

    /// Replaces a reservation with what was used; returns the alert thresholds it crossed, and
    /// the budget's share used now (percent).
    pub(crate) fn settle(
        &self,
        ticket: &Ticket,
        used: Amounts,
        wall: SystemTime,
        thresholds: &[u64],
    ) -> (Vec<Crossed>, u64) {
        let budget = &self.budgets[ticket.budget].budget;
        let window = self.window(ticket.budget, wall);
        let mut shard = self.lock(ticket.budget, &ticket.key);
        let entry = shard.entries.entry(ticket.key).or_default();
        entry.roll(window, budget.period);
        entry.reservations.retain(|r| r.id != ticket.id);
        entry.used = entry.used.add(used);
        let percent = budget.limits.percent_used(&entry.used(window));
        let mut crossed = Vec::new();
        for (bit, &threshold) in thresholds.iter().enumerate().take(32) {
            if percent >= threshold && entry.alerted & (1 << bit) == 0 {
                entry.alerted |= 1 << bit;
                crossed.push(Crossed {
                    percent: threshold,
                    used: entry.used(window),
                    resets: window.end,
                });
            }
        }
        (crossed, percent)
    }

    /// Drops a reservation without charging it.
    pub(crate) fn release(&self, ticket: &Ticket) {
        if let Some(entry) = self
            .lock(ticket.budget, &ticket.key)
            .entries
            .get_mut(&ticket.key)
        {
            entry.reservations.retain(|r| r.id != ticket.id);
        }
    }

    /// A key's state of one budget.
    pub(crate) fn view(&self, budget: usize, key: u64, wall: SystemTime, now: u64) -> View {
        let window = self.window(budget, wall);
        let mut shard = self.lock(budget, &key);
        let Some(entry) = shard.entries.get_mut(&key) else {
            return View {
                used: Amounts::default(),
                reserved: Amounts::default(),
                resets: window.end,
            };
        };
        entry.roll(window, self.budgets[budget].budget.period);
        entry.sweep(now);
        View {
            used: entry.used(window),
            reserved: entry.reserved(),
            resets: window.end,
        }
    }

    pub(crate) fn budget(&self, index: usize) -> &Budget {
        &self.budgets[index].budget
    }

    /// The budget's name, as a header value.
    pub(crate) fn name_value(&self, index: usize) -> Option<&HeaderValue> {
        self.budgets[index].name_value.as_ref()
    }

    pub(crate) fn metrics(&self, index: usize) -> &BudgetMetrics {
        &self.budgets[index].state.metrics
    }

    pub(crate) fn budgets(&self) -> impl Iterator<Item = &Budget> {
        self.budgets.iter().map(|slot| &slot.budget)
    }

    /// Keys held by one budget.
    #[cfg(test)]
    pub(crate) fn len(&self, budget: usize) -> usize {
        self.budgets[budget]
            .state
            .shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entries
                    .len()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Usd;
    use moat_core::identity::Global;
    use std::time::{Duration, UNIX_EPOCH};

    const T0: u64 = 1_767_225_600; // 2026-01-01T00:00:00Z

    fn wall(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T0 + secs)
    }

    /// The id the tests' global caller has in every budget.
    const GLOBAL_ID: u64 = 7;

    fn claim(budget: usize, tokens: u64) -> Claim {
        Claim {
            budget,
            who: Key::GLOBAL,
            key: GLOBAL_ID,
            amounts: Amounts::new(tokens, 0, Usd::ZERO),
        }
    }

    fn store(budgets: Vec<Budget>) -> MemoryStore {
        MemoryStore::new(budgets, TimeZone::UTC, 1000, &States::default())
    }

    #[test]
    fn reservations_count_until_settled_or_expired() {
        let s = store(vec![Budget::new("b", Global, Period::Day).tokens(100)]);
        let (t1, _) = s.reserve(&[claim(0, 60)], &[false], wall(0), 0, 1_000);
        let t1 = t1.unwrap();
        assert!(
            s.reserve(&[claim(0, 60)], &[false], wall(0), 0, 1_000)
                .0
                .is_err(),
            "60 + 60 > 100 while reserved"
        );
        assert!(s
            .settle(&t1[0], Amounts::new(10, 0, Usd::ZERO), wall(0), &[])
            .0
            .is_empty());
        assert!(
            s.reserve(&[claim(0, 60)], &[false], wall(0), 0, 1_000)
                .0
                .is_ok(),
            "settled at 10"
        );
        // The second reservation was never settled: it expires.
        assert!(s
            .reserve(&[claim(0, 60)], &[false], wall(0), 500, 1_000)
            .0
            .is_err());
        assert!(
            s.reserve(&[claim(0, 60)], &[false], wall(0), 1_001, 1_000)
                .0
                .is_ok(),
            "the crashed request's hold expired"
        );
    }

    #[test]
    fn hierarchies_are_all_or_nothing() {
        let s = store(vec![
            Budget::new("key", Global, Period::Day).tokens(1000),
            Budget::new("tenant", Global, Period::Day).tokens(50),
        ]);
        let refused = s
            .reserve(
                &[claim(0, 100), claim(1, 100)],
                &[false, false],
                wall(0),
                0,
                1_000,
            )
            .0
            .unwrap_err();
        assert!(matches!(
            refused,
            Refused::Budget(Refusal { budget: 1, .. })
        ));
        assert_eq!(
            s.view(0, GLOBAL_ID, wall(0), 0).reserved,
            Amounts::default(),
            "the key budget was not charged"
        );
    }

    #[test]
    fn periods_roll_over_and_rolling_windows_fade() {
        let s = store(vec![
            Budget::new("day", Global, Period::Day).tokens(100),
            Budget::new("roll", Global, Period::Rolling(Duration::from_secs(3600))).tokens(100),
        ]);
        for b in 0..2 {
            let t = s
                .reserve(&[claim(b, 100)], &[false], wall(0), 0, u64::MAX)
                .0
                .unwrap();
            s.settle(&t[0], Amounts::new(100, 0, Usd::ZERO), wall(0), &[]);
        }
        assert!(s
            .reserve(&[claim(0, 1)], &[false], wall(86_399), 0, 1)
            .0
            .is_err());
        assert!(
            s.reserve(&[claim(0, 1)], &[false], wall(86_400), 0, 1)
                .0
                .is_ok(),
            "a new day"
        );
        // Rolling: three quarters into the next hour, a quarter of the last hour still counts.
        assert!(s
            .reserve(&[claim(1, 76)], &[false], wall(3600 + 2700), 0, 1)
            .0
            .is_err());
        assert!(s
            .reserve(&[claim(1, 75)], &[false], wall(3600 + 2700), 0, 1)
            .0
            .is_ok());
    }

    #[test]
    fn alerts_fire_once_per_threshold_per_period() {
        let s = store(vec![Budget::new("b", Global, Period::Day).tokens(100)]);
        let thresholds = [50, 80, 100];
        let mut fired = Vec::new();
        for (secs, used) in [
            (0, 40),
            (1, 15),
            (2, 5),
            (3, 30),
            (4, 10),
            (5, 10),
            (86_400, 85),
            (86_401, 1),
        ] {
            let t = s
                .reserve(&[claim(0, 0)], &[false], wall(secs), 0, 1)
                .0
                .unwrap();
            for c in s
                .settle(
                    &t[0],
                    Amounts::new(used, 0, Usd::ZERO),
                    wall(secs),
                    &thresholds,
                )
                .0
            {
                fired.push((secs, c.percent));
            }
        }
        // The next day starts over; jumping past 50% and 80% at once fires both, once.
        assert_eq!(
            fired,
            vec![(1, 50), (3, 80), (4, 100), (86_400, 50), (86_400, 80)]
        );
    }

    #[test]
    fn a_full_store_refuses_new_keys_without_sweeping_each_time_and_recovers_next_period() {
        const KEYS: usize = 1_000_000;
        let s = MemoryStore::new(
            vec![Budget::new("b", Global, Period::Day).tokens(1_000_000)],
            TimeZone::UTC,
            KEYS,
            &States::default(),
        );
        let claim_for = |i: usize| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let who = Key::new(moat_core::identity::KeyKind::ApiKey, id);
            s.claim(0, who, Amounts::new(1, 0, Usd::ZERO))
        };
        // A million callers each use some of the day's budget: every entry is live.
        let mut admitted = 0;
        for i in 0..KEYS {
            if let Ok(t) = s.reserve(&[claim_for(i)], &[false], wall(0), 0, 1).0 {
                s.settle(&t[0], Amounts::new(1, 0, Usd::ZERO), wall(0), &[]);
                admitted += 1;
            }
        }
        assert!(admitted > KEYS * 9 / 10, "{admitted}");
        assert!(s.len(0) <= KEYS.div_ceil(SHARDS) * SHARDS);
        let sweeps = s.budgets[0].state.sweeps.load(Ordering::Relaxed);
        // An attacker's new keys are refused; each full shard swept at most once for them.
        for i in KEYS..KEYS + 100_000 {
            if let Err(refused) = s.reserve(&[claim_for(i)], &[false], wall(10), 0, 1).0 {
                assert!(matches!(refused, Refused::Full { budget: 0 }));
            }
        }
        let swept = s.budgets[0].state.sweeps.load(Ordering::Relaxed) - sweeps;
        assert!(
            swept <= SHARDS as u64,
            "{swept} sweeps for 100,000 new keys"
        );
        // Known callers are still served.
        assert!(s
            .reserve(&[claim_for(7)], &[false], wall(20), 0, 1)
            .0
            .is_ok());
        // The next day the old entries are idle: new keys get in.
        assert!(s
            .reserve(
                &[claim_for(KEYS + 200_000)],
                &[false],
                wall(86_400 + 1),
                0,
                1
            )
            .0
            .is_ok());
    }
}
