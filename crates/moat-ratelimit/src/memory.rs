//! The in-memory store: sharded maps of fixed-size entries under a hard cap.
//!
//! Each rule has its own store. A key is a 64-bit seeded hash of the [`Key`]; its entry is one
//! `u64` theoretical arrival time per limit (plus an in-flight count when the rule limits
//! concurrency) in a per-shard slab, so an entry costs the same whatever the key was. When a
//! shard is full, it is swept: only entries whose state has fully reset (every limit back to its
//! full burst, nothing in flight) are evicted, because evicting a live key would hand an attacker
//! a fresh burst. If nothing can go, the new key is refused. Sweeps touch one shard at a time and
//! are skipped until the earliest time an entry can have reset.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::{Mutex, PoisonError};

use moat_core::store::PassThrough;

use crate::limit::{gcra, remaining, Gcra, Limit};

const SHARDS: usize = 64;

/// One limit's GCRA parameters in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cell {
    pub(crate) emission: u64,
    pub(crate) tolerance: u64,
}

impl From<&Limit> for Cell {
    fn from(limit: &Limit) -> Self {
        Self {
            emission: limit.emission_nanos(),
            tolerance: limit.tolerance_nanos(),
        }
    }
}

/// A limit's state after a decision, for response headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) remaining: u64,
    pub(crate) reset: u64,
}

/// What a store decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acquire {
    /// Every limit fits; state updated.
    Admitted,
    /// Limit `cell` does not fit for `retry_after` more nanoseconds; nothing changed.
    Wait { cell: usize, retry_after: u64 },
    /// Limit `cell` can never fit this cost; nothing changed.
    Never { cell: usize },
    /// The key's in-flight requests are at the rule's maximum.
    Busy,
    /// The store is at its key cap with nothing it may evict.
    Full,
}

#[derive(Debug, Default)]
struct Shard {
    index: HashMap<u64, u32, BuildHasherDefault<PassThrough>>,
    slab: Vec<u64>,
    free: Vec<u32>,
    /// No entry can have reset before this time: sweeping earlier finds nothing.
    next_sweep: u64,
}

/// The in-memory state of one rule.
#[derive(Debug)]
pub(crate) struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    cells: usize,
    concurrency: bool,
    per_shard_cap: usize,
}

impl MemoryStore {
    /// A store for `cells` limits per key (plus an in-flight count if `concurrency`), holding at
    /// most about `max_keys` keys.
    pub(crate) fn new(cells: usize, concurrency: bool, max_keys: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            cells,
            concurrency,
            per_shard_cap: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    fn stride(&self) -> usize {
        self.cells + usize::from(self.concurrency)
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, Shard> {
        // hashbrown indexes by the low bits and tags by the top 7: shard by bits in between.
        self.shards[(id >> 32) as usize % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Keys held now.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).index.len())
            .sum()
    }

    /// Checks `costs` against every limit and, only if all fit, charges them (and counts one
    /// more in flight when `max_in_flight` is set). `out` gets each limit's state (as many as it has room for: none when empty).
    pub(crate) fn acquire(
        &self,
        id: u64,
        now: u64,
        cells: &[Cell],
        costs: &[u64],
        max_in_flight: Option<u32>,
        out: &mut [Snapshot],
    ) -> Acquire {
        debug_assert_eq!(cells.len(), self.cells);
        let stride = self.stride();
        let mut shard = self.shard(id);
        let Some(base) = shard.slot(id, now, stride, self.cells, self.per_shard_cap) else {
            return Acquire::Full;
        };
        let entry = &mut shard.slab[base..base + stride];
        let mut verdict = Acquire::Admitted;
        for (i, (cell, &cost)) in cells.iter().zip(costs).enumerate() {
            match gcra(entry[i], now, cost, cell.emission, cell.tolerance) {
                Gcra::Fits { .. } => {}
                Gcra::Wait { retry_after } => match verdict {
                    Acquire::Wait {
                        retry_after: worst, ..
                    } if worst >= retry_after => {}
                    Acquire::Never { .. } => {}
                    _ => {
                        verdict = Acquire::Wait {
                            cell: i,
                            retry_after,
                        }
                    }
                },
                Gcra::Never => verdict = Acquire::Never { cell: i },
            }
        }
        if verdict == Acquire::Admitted {
            if let Some(max) = max_in_flight {
                if entry[self.cells] >= u64::from(max) {
                    verdict = Acquire::Busy;
                }
            }
        }
        if verdict == Acquire::Admitted {
            for (i, (cell, &cost)) in cells.iter().zip(costs).enumerate() {
                entry[i] = entry[i].max(now) + cost.saturating_mul(cell.emission);
            }
            if max_in_flight.is_some() {
                entry[self.cells] += 1;
            }
        }
        for (i, (cell, snapshot)) in cells.iter().zip(out.iter_mut()).enumerate() {
            let (left, reset) = remaining(entry[i], now, cell.emission, cell.tolerance);
            *snapshot = Snapshot {
                remaining: left,
                reset,
            };
        }
        verdict
    }

    /// Settles a past admission: moves each limit's state by `deltas` units (negative refunds)
    /// and, with `release`, counts one fewer in flight.
    pub(crate) fn adjust(&self, id: u64, now: u64, cells: &[Cell], deltas: &[i64], release: bool) {
        let stride = self.stride();
        let mut shard = self.shard(id);
        let Some(base) = shard.slot(id, now, stride, self.cells, self.per_shard_cap) else {
            return;
        };
        let entry = &mut shard.slab[base..base + stride];
        for (i, (cell, &delta)) in cells.iter().zip(deltas).enumerate() {
            let step = delta.unsigned_abs().saturating_mul(cell.emission);
            entry[i] = if delta >= 0 {
                entry[i].max(now).saturating_add(step)
            } else {
                entry[i].saturating_sub(step)
            };
        }
        if release && self.concurrency {
            entry[self.cells] = entry[self.cells].saturating_sub(1);
        }
    }
}

impl Shard {
    /// The slab offset of `id`'s entry, inserting one (evicting reset entries if full).
    fn slot(
        &mut self,
        id: u64,
        now: u64,
        stride: usize,
        cells: usize,
        cap: usize,
    ) -> Option<usize> {
        if let Some(&slot) = self.index.get(&id) {
            return Some(slot as usize * stride);
        }
        if self.index.len() >= cap {
            if now < self.next_sweep {
                return None;
            }
            self.sweep(now, stride, cells);
            if self.index.len() >= cap {
                return None;
            }
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                let slot = u32::try_from(self.slab.len() / stride).ok()?;
                self.slab.resize(self.slab.len() + stride, 0);
                slot
            }
        };
        let base = slot as usize * stride;
        self.slab[base..base + stride].fill(0);
        self.index.insert(id, slot);
        Some(base)
    }

    fn sweep(&mut self, now: u64, stride: usize, cells: usize) {
        let mut next = u64::MAX;
        let (slab, free) = (&self.slab, &mut self.free);
        self.index.retain(|_, slot| {
            let entry = &slab[*slot as usize * stride..][..stride];
            let full_reset_at = entry[..cells].iter().copied().max().unwrap_or(0);
            let in_flight = entry.get(cells).copied().unwrap_or(0);
            if full_reset_at <= now && in_flight == 0 {
                free.push(*slot);
                false
            } else {
                next = next.min(if in_flight > 0 {
                    now.saturating_add(1_000_000_000)
                } else {
                    full_reset_at
                });
                true
            }
        });
        self.next_sweep = if next == u64::MAX { now } else { next };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn cells(limits: &[Limit]) -> Vec<Cell> {
        limits.iter().map(Cell::from).collect()
    }

    #[test]
    fn several_limits_are_all_or_nothing() {
        let limits = [Limit::per_second(2), Limit::per_minute(3)];
        let cells = cells(&limits);
        let store = MemoryStore::new(2, false, 100);
        let mut out = [Snapshot::default(); 2];
        let now = 10 * SEC;
        assert_eq!(
            store.acquire(1, now, &cells, &[1, 1], None, &mut out),
            Acquire::Admitted
        );
        assert_eq!(
            store.acquire(1, now, &cells, &[1, 1], None, &mut out),
            Acquire::Admitted
        );
        assert_eq!(out[0].remaining, 0);
        assert_eq!(out[1].remaining, 1);
        // The per-second limit denies; the per-minute one must not be charged for it.
        assert!(matches!(
            store.acquire(1, now, &cells, &[1, 1], None, &mut out),
            Acquire::Wait { cell: 0, .. }
        ));
        assert_eq!(out[1].remaining, 1);
        let later = now + SEC;
        assert_eq!(
            store.acquire(1, later, &cells, &[1, 1], None, &mut out),
            Acquire::Admitted
        );
        let Acquire::Wait { cell, retry_after } =
            store.acquire(1, later + SEC, &cells, &[1, 1], None, &mut out)
        else {
            panic!("the per-minute limit is spent");
        };
        assert_eq!(cell, 1);
        assert_eq!(
            retry_after,
            20 * SEC - 2 * SEC,
            "the minute limit refills one unit per 20 s"
        );
        assert_eq!(
            store.acquire(2, now, &cells, &[1, 1], None, &mut out),
            Acquire::Admitted,
            "other keys are separate"
        );
    }

    #[test]
    fn concurrency_counts_until_released() {
        let cells = cells(&[Limit::per_second(100)]);
        let store = MemoryStore::new(1, true, 100);
        let mut out = [Snapshot::default()];
        assert_eq!(
            store.acquire(7, SEC, &cells, &[1], Some(2), &mut out),
            Acquire::Admitted
        );
        assert_eq!(
            store.acquire(7, SEC, &cells, &[1], Some(2), &mut out),
            Acquire::Admitted
        );
        assert_eq!(
            store.acquire(7, SEC, &cells, &[1], Some(2), &mut out),
            Acquire::Busy
        );
        store.adjust(7, SEC, &cells, &[0], true);
        assert_eq!(
            store.acquire(7, SEC, &cells, &[1], Some(2), &mut out),
            Acquire::Admitted
        );
    }

    #[test]
    fn settle_refunds_and_charges_debt() {
        let limit = Limit::per_minute(1000);
        let cells = cells(&[limit]);
        let store = MemoryStore::new(1, false, 100);
        let mut out = [Snapshot::default()];
        let now = 100 * SEC;
        assert_eq!(
            store.acquire(3, now, &cells, &[800], None, &mut out),
            Acquire::Admitted
        );
        assert_eq!(out[0].remaining, 200);
        store.adjust(3, now, &cells, &[-500], false);
        assert_eq!(
            store.acquire(3, now, &cells, &[0], None, &mut out),
            Acquire::Admitted
        );
        assert_eq!(out[0].remaining, 700, "used 300, not 800");
        store.adjust(3, now, &cells, &[600], false);
        assert_eq!(
            store.acquire(3, now, &cells, &[0], None, &mut out),
            Acquire::Admitted
        );
        assert_eq!(out[0].remaining, 100, "debt: used 900");
        assert!(matches!(
            store.acquire(3, now, &cells, &[200], None, &mut out),
            Acquire::Wait { .. }
        ));
        assert_eq!(
            store.acquire(3, now, &cells, &[1001], None, &mut out),
            Acquire::Never { cell: 0 }
        );
    }

    #[test]
    fn a_full_store_evicts_only_reset_keys() {
        let cells = cells(&[Limit::per_second(1)]);
        // One key per shard: ids that land in shard 0.
        let store = MemoryStore::new(1, false, SHARDS);
        let mut out = [Snapshot::default()];
        let id = |n: u64| n * SHARDS as u64 * (1 << 32);
        assert_eq!(
            store.acquire(id(1), SEC, &cells, &[1], None, &mut out),
            Acquire::Admitted
        );
        // The first key is still limited: a second key in the same shard is refused.
        assert_eq!(
            store.acquire(id(2), SEC, &cells, &[1], None, &mut out),
            Acquire::Full
        );
        // The first key must keep its state: it is still denied.
        assert!(matches!(
            store.acquire(id(1), SEC, &cells, &[1], None, &mut out),
            Acquire::Wait { .. }
        ));
        // Once it has fully reset, it may be evicted for a new key.
        assert_eq!(
            store.acquire(id(2), 2 * SEC, &cells, &[1], None, &mut out),
            Acquire::Admitted
        );
        assert_eq!(store.len(), 1);
    }
}
