//! The in-memory budget store: reservations, settlement, periods, alerts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use jiff::tz::TimeZone;
use moat_core::Key;

use crate::budget::{Amounts, Budget, Dimension};
use crate::period::{Period, Window};

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

    /// Idle: nothing reserved and nothing used in the current period.
    fn is_idle(&self, window: Window) -> bool {
        self.reservations.is_empty()
            && self.window != window.id
            && (self.window + 1 != window.id || self.used == Amounts::default())
    }
}

type Shard = HashMap<[u8; 16], Entry>;

/// A request's claim on one budget.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claim {
    pub(crate) budget: usize,
    /// Who is charged (for alerts); stored under its digest.
    pub(crate) who: Key,
    pub(crate) key: [u8; 16],
    pub(crate) amounts: Amounts,
}

impl Claim {
    pub(crate) fn new(budget: usize, who: Key, amounts: Amounts) -> Self {
        Self {
            budget,
            who,
            key: who.digest(),
            amounts,
        }
    }
}

/// A reservation held by a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    pub(crate) budget: usize,
    pub(crate) who: Key,
    pub(crate) key: [u8; 16],
    pub(crate) id: u64,
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

pub(crate) struct MemoryStore {
    budgets: Vec<(Budget, Mutex<Shard>)>,
    tz: TimeZone,
    next_id: AtomicU64,
    max_keys: usize,
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

    pub(crate) fn new(budgets: Vec<Budget>, tz: TimeZone, max_keys: usize) -> Self {
        Self {
            budgets: budgets.into_iter().map(|b| (b, Mutex::default())).collect(),
            tz,
            // Shared stores hold reservations from many processes: start each process's ids at a
            // random point, so two never write the same reservation.
            next_id: AtomicU64::new({
                use std::hash::{BuildHasher, Hasher};
                std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish()
            }),
            max_keys,
        }
    }

    fn lock(&self, budget: usize) -> MutexGuard<'_, Shard> {
        self.budgets[budget]
            .1
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn window(&self, budget: usize, wall: SystemTime) -> Window {
        self.budgets[budget].0.period.window(wall, &self.tz)
    }

    /// Reserves every claim, or none: the first claim that does not fit is the refusal.
    /// `force` lists claims that are recorded even when they do not fit (shadow budgets).
    pub(crate) fn reserve(
        &self,
        claims: &[Claim],
        shadow: &[bool],
        wall: SystemTime,
        now: u64,
        ttl: u64,
    ) -> (Result<Vec<Ticket>, Refusal>, Vec<Refusal>) {
        // Lock in budget order, so two requests never wait on each other in a cycle.
        let mut order: Vec<usize> = (0..claims.len()).collect();
        order.sort_by_key(|&i| claims[i].budget);
        let mut guards: Vec<(usize, MutexGuard<'_, Shard>)> = Vec::with_capacity(claims.len());
        for &i in &order {
            if guards.last().map(|(b, _)| *b) != Some(claims[i].budget) {
                guards.push((claims[i].budget, self.lock(claims[i].budget)));
            }
        }
        let shard_of = |guards: &mut Vec<(usize, MutexGuard<'_, Shard>)>, budget: usize| {
            guards
                .iter()
                .position(|(b, _)| *b == budget)
                .expect("locked above")
        };
        let mut shadow_refusals = Vec::new();
        for (i, claim) in claims.iter().enumerate() {
            let (budget, _) = &self.budgets[claim.budget];
            let window = self.window(claim.budget, wall);
            let g = shard_of(&mut guards, claim.budget);
            let shard = &mut guards[g].1;
            if !shard.contains_key(&claim.key) && shard.len() >= self.max_keys {
                shard.retain(|_, e| !e.is_idle(window));
            }
            let full = !shard.contains_key(&claim.key) && shard.len() >= self.max_keys;
            let entry = shard.entry(claim.key).or_default();
            entry.roll(window, budget.period);
            entry.sweep(now);
            let committed = entry.used(window).add(entry.reserved());
            let breaks = budget
                .limits
                .breaks(&committed, &claim.amounts)
                .or(full.then_some((Dimension::Tokens, 0, 0, 0)));
            if let Some((dimension, committed, needed, _)) = breaks {
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
                    return (Err(refusal), shadow_refusals);
                }
            }
        }
        let mut tickets = Vec::with_capacity(claims.len());
        for claim in claims {
            let id = self.next_id();
            let g = shard_of(&mut guards, claim.budget);
            let entry = guards[g].1.get_mut(&claim.key).expect("created above");
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
                remote: false,
            });
        }
        (Ok(tickets), shadow_refusals)
    }

    /// Replaces a reservation with what was used; returns the alert thresholds it crossed.
    pub(crate) fn settle(
        &self,
        ticket: &Ticket,
        used: Amounts,
        wall: SystemTime,
        thresholds: &[u64],
    ) -> Vec<Crossed> {
        let (budget, _) = &self.budgets[ticket.budget];
        let window = self.window(ticket.budget, wall);
        let mut shard = self.lock(ticket.budget);
        let entry = shard.entry(ticket.key).or_default();
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
        crossed
    }

    /// Drops a reservation without charging it.
    pub(crate) fn release(&self, ticket: &Ticket) {
        if let Some(entry) = self.lock(ticket.budget).get_mut(&ticket.key) {
            entry.reservations.retain(|r| r.id != ticket.id);
        }
    }

    /// A key's state of one budget.
    pub(crate) fn view(&self, budget: usize, key: [u8; 16], wall: SystemTime, now: u64) -> View {
        let window = self.window(budget, wall);
        let mut shard = self.lock(budget);
        let Some(entry) = shard.get_mut(&key) else {
            return View {
                used: Amounts::default(),
                reserved: Amounts::default(),
                resets: window.end,
            };
        };
        entry.roll(window, self.budgets[budget].0.period);
        entry.sweep(now);
        View {
            used: entry.used(window),
            reserved: entry.reserved(),
            resets: window.end,
        }
    }

    pub(crate) fn budget(&self, index: usize) -> &Budget {
        &self.budgets[index].0
    }

    pub(crate) fn budgets(&self) -> impl Iterator<Item = &Budget> {
        self.budgets.iter().map(|(b, _)| b)
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

    fn claim(budget: usize, tokens: u64) -> Claim {
        Claim::new(budget, Key::GLOBAL, Amounts::new(tokens, 0, Usd::ZERO))
    }

    fn store(budgets: Vec<Budget>) -> MemoryStore {
        MemoryStore::new(budgets, TimeZone::UTC, 1000)
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
        assert_eq!(refused.budget, 1);
        assert_eq!(
            s.view(0, Key::GLOBAL.digest(), wall(0), 0).reserved,
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
            for c in s.settle(
                &t[0],
                Amounts::new(used, 0, Usd::ZERO),
                wall(secs),
                &thresholds,
            ) {
                fired.push((secs, c.percent));
            }
        }
        // The next day starts over; jumping past 50% and 80% at once fires both, once.
        assert_eq!(
            fired,
            vec![(1, 50), (3, 80), (4, 100), (86_400, 50), (86_400, 80)]
        );
    }
}
