//! Sliding windows of call outcomes, written without locks.
//!
//! Every slot or bucket is stamped with the breaker's generation (it changes on every state
//! transition), so a window is emptied by moving to a new generation, not by clearing it under
//! a lock; a call admitted before a transition writes under its own, stale stamp and is never
//! counted. A success is one or two relaxed atomic writes. The window is only summed when a
//! failure or a slow call could trip the breaker, and when a snapshot is taken.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::config::Window;
use crate::sync::{AtomicU32, AtomicU64};

/// What the window holds for one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) calls: u32,
    pub(crate) failures: u32,
    pub(crate) slow: u32,
}

impl Counts {
    pub(crate) fn failure_rate(self) -> f64 {
        ratio(self.failures, self.calls)
    }

    pub(crate) fn slow_rate(self) -> f64 {
        ratio(self.slow, self.calls)
    }
}

fn ratio(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        0.0
    } else {
        f64::from(part) / f64::from(whole)
    }
}

#[derive(Debug)]
pub(crate) enum Outcomes {
    /// The last `slots.len()` calls: slot `i` holds `generation << 3 | slow << 2 | failure << 1
    /// | 1`, zero when never written.
    Count {
        slots: Box<[AtomicU64]>,
        /// Calls recorded so far, wrapping at 2³² (where one slot is reused early, once in
        /// four billion calls).
        next: AtomicU32,
        /// `position % slots.len()` by multiplication: a division would be a third of a call.
        modulo: FastMod,
        /// The position after the last failure or slow call (or the last reset): once a whole
        /// window of successes lies past it, another success changes nothing and is not
        /// written (no read-modify-write on the hot path of a healthy upstream).
        dirty: AtomicU32,
    },
    /// One bucket per second, `epoch % buckets.len()`.
    Time { buckets: Box<[Bucket]> },
}

/// One second of a time window.
#[derive(Debug)]
pub(crate) struct Bucket {
    /// `generation << 32 | second`.
    stamp: AtomicU64,
    /// `calls << 42 | failures << 21 | slow`: 21 bits each (2 million calls per second).
    counts: AtomicU64,
}

const FIELD: u32 = 21;
const FIELD_MASK: u64 = (1 << FIELD) - 1;

impl Outcomes {
    pub(crate) fn new(window: Window) -> Self {
        match window {
            Window::Count(n) => Self::Count {
                slots: (0..n).map(|_| AtomicU64::new(0)).collect(),
                next: AtomicU32::new(0),
                modulo: FastMod::new(n),
                dirty: AtomicU32::new(0),
            },
            Window::Time(d) => Self::Time {
                buckets: (0..d.as_secs().max(1))
                    .map(|_| Bucket {
                        stamp: AtomicU64::new(0),
                        counts: AtomicU64::new(0),
                    })
                    .collect(),
            },
        }
    }

    /// How many calls a count window has recorded since it was made (0 for a time window).
    #[cfg(test)]
    pub(crate) fn position(&self) -> u32 {
        match self {
            Self::Count { next, .. } => next.load(Relaxed),
            Self::Time { .. } => 0,
        }
    }

    /// Empties the window for a new generation: returns its position, and makes every success
    /// count again until a whole window of them is written under the new generation.
    pub(crate) fn reset(&self) -> u32 {
        match self {
            Self::Count { next, dirty, .. } => {
                let position = next.load(Relaxed);
                dirty.store(position, Relaxed);
                position
            }
            Self::Time { .. } => 0,
        }
    }

    /// Whether a success would change nothing: a count window whose every slot holds a success
    /// of the current generation. A caller may then skip [`record`](Self::record).
    #[inline]
    pub(crate) fn is_clean(&self) -> bool {
        match self {
            Self::Count {
                slots, next, dirty, ..
            } => next.load(Relaxed).wrapping_sub(dirty.load(Relaxed)) >= slots.len() as u32,
            Self::Time { .. } => false,
        }
    }

    /// Records one call of generation `generation` that ended at `now`; for a count window,
    /// returns its position (see [`position`](Self::position)).
    #[inline]
    pub(crate) fn record(
        &self,
        generation: u32,
        now: impl FnOnce() -> Duration,
        failure: bool,
        slow: bool,
    ) -> Option<u32> {
        match self {
            Self::Count {
                slots,
                next,
                modulo,
                dirty,
            } => {
                let position = next.fetch_add(1, Relaxed);
                if failure || slow {
                    // Later in wrapping order wins, so positions may wrap around 2³².
                    let after = position.wrapping_add(1);
                    let _ = dirty.fetch_update(Relaxed, Relaxed, |seen| {
                        ((after.wrapping_sub(seen) as i32) > 0).then_some(after)
                    });
                }
                let i = modulo.of(position);
                let value =
                    u64::from(generation) << 3 | u64::from(slow) << 2 | u64::from(failure) << 1 | 1;
                slots[i as usize].store(value, Relaxed);
                Some(position)
            }
            Self::Time { buckets } => {
                let second = now().as_secs();
                let bucket = &buckets[(second % buckets.len() as u64) as usize];
                let stamp = u64::from(generation) << 32 | (second & 0xFFFF_FFFF);
                let seen = bucket.stamp.load(Relaxed);
                // The first call of a new second (or generation) takes the bucket over and
                // empties it. A call that adds between the takeover and the reset is lost: a
                // few calls at most, at a second's boundary, which a rate does not notice.
                if seen != stamp
                    && bucket
                        .stamp
                        .compare_exchange(seen, stamp, Relaxed, Relaxed)
                        .is_ok()
                {
                    bucket.counts.store(0, Relaxed);
                }
                let delta = 1 << (2 * FIELD) | u64::from(failure) << FIELD | u64::from(slow);
                bucket.counts.fetch_add(delta, Relaxed);
                None
            }
        }
    }

    /// What generation `generation` recorded, as of `now`.
    pub(crate) fn counts(&self, generation: u32, now: Duration) -> Counts {
        let mut counts = Counts::default();
        match self {
            Self::Count { slots, .. } => {
                for slot in slots.iter() {
                    let value = slot.load(Relaxed);
                    if value & 1 == 1 && (value >> 3) as u32 == generation {
                        counts.calls += 1;
                        counts.failures += (value >> 1 & 1) as u32;
                        counts.slow += (value >> 2 & 1) as u32;
                    }
                }
            }
            Self::Time { buckets } => {
                let second = now.as_secs();
                let oldest = second.saturating_sub(buckets.len() as u64 - 1);
                for bucket in buckets.iter() {
                    let stamp = bucket.stamp.load(Relaxed);
                    let at = stamp & 0xFFFF_FFFF;
                    if (stamp >> 32) as u32 != generation
                        || at < oldest & 0xFFFF_FFFF
                        || at > second & 0xFFFF_FFFF
                    {
                        continue;
                    }
                    let value = bucket.counts.load(Relaxed);
                    counts.calls += (value >> (2 * FIELD) & FIELD_MASK) as u32;
                    counts.failures += (value >> FIELD & FIELD_MASK) as u32;
                    counts.slow += (value & FIELD_MASK) as u32;
                }
            }
        }
        counts
    }
}

/// `a % d` for a fixed `d` as two multiplications (Lemire, Kaser and Kurz, "Faster remainder
/// by direct computation", 2019): exact for every 32-bit `a` and `d`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FastMod {
    m: u64,
    d: u32,
}

impl FastMod {
    pub(crate) fn new(d: u32) -> Self {
        Self {
            m: (u64::MAX / u64::from(d.max(1))).wrapping_add(1),
            d: d.max(1),
        }
    }

    #[inline]
    pub(crate) fn of(self, a: u32) -> u32 {
        let low = self.m.wrapping_mul(u64::from(a));
        ((u128::from(low) * u128::from(self.d)) >> 64) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn fast_modulo_is_exact() {
        for d in [1u32, 2, 3, 7, 10, 100, 9_999, 10_000] {
            let m = FastMod::new(d);
            for a in (0..5000).chain([u32::MAX, u32::MAX - 1, 1 << 31, 123_456_789]) {
                assert_eq!(m.of(a), a % d, "{a} % {d}");
            }
        }
    }

    #[test]
    fn a_count_window_holds_only_the_last_n_calls() {
        let w = Outcomes::new(Window::Count(4));
        for _ in 0..4 {
            w.record(7, || S, true, false);
        }
        assert_eq!(
            w.counts(7, S),
            Counts {
                calls: 4,
                failures: 4,
                slow: 0
            }
        );
        for _ in 0..3 {
            w.record(7, || S, false, true);
        }
        assert_eq!(
            w.counts(7, S),
            Counts {
                calls: 4,
                failures: 1,
                slow: 3
            }
        );
        assert_eq!(
            w.counts(8, S),
            Counts::default(),
            "a new generation is empty"
        );
    }

    #[test]
    fn a_window_full_of_successes_skips_more_but_never_hides_a_failure() {
        let w = Outcomes::new(Window::Count(3));
        for _ in 0..3 {
            assert!(!w.is_clean());
            w.record(1, || S, false, false);
        }
        assert!(w.is_clean(), "a success would change nothing");
        assert_eq!(w.position(), 3);
        w.record(1, || S, true, false);
        assert_eq!(w.counts(1, S).failures, 1);
        // The failure leaves only after three more calls, each written.
        for left in [1, 1, 0] {
            assert!(!w.is_clean());
            w.record(1, || S, false, false);
            assert_eq!(w.counts(1, S).failures, left);
        }
        assert!(w.is_clean());
        // A new generation starts empty and is written until full again.
        w.reset();
        assert!(!w.is_clean());
        w.record(2, || S, false, false);
        assert_eq!(w.counts(2, S).calls, 1);
    }

    #[test]
    fn a_time_window_forgets_what_left_it() {
        let w = Outcomes::new(Window::Time(Duration::from_secs(3)));
        w.record(1, || 10 * S, true, false);
        w.record(1, || 11 * S, false, false);
        w.record(1, || 12 * S, false, true);
        assert_eq!(w.counts(1, 12 * S).calls, 3);
        assert_eq!(w.counts(1, 13 * S).calls, 2, "second 10 left the window");
        assert_eq!(w.counts(1, 13 * S).failures, 0);
        // Second 13 reuses second 10's bucket and starts it empty.
        w.record(1, || 13 * S, false, false);
        assert_eq!(
            w.counts(1, 13 * S),
            Counts {
                calls: 3,
                failures: 0,
                slow: 1
            }
        );
        assert_eq!(w.counts(1, 100 * S).calls, 0, "long idle: nothing is left");
        assert_eq!(w.counts(2, 13 * S).calls, 0);
    }
}
