//! [`KeyedLimiter`]: the in-memory limiter without HTTP, for any keyed decision.

use std::fmt;
use std::time::Duration;

use moat_core::clock::{self, SharedClock};
use moat_core::Key;

use crate::limit::Limit;
use crate::limiter::MAX_CELLS;
use crate::memory::{Acquire, Cell, MemoryStore};
use moat_core::store::KeyHasher;

/// Keyed GCRA limits in memory: the store behind [`RateLimitLayer`](crate::RateLimitLayer),
/// usable on its own (jobs, WebSocket messages, tool calls).
///
/// ```
/// use moat_core::identity::{Key, KeyKind};
/// use moat_ratelimit::{KeyedLimiter, Limit};
///
/// let limiter = KeyedLimiter::new([Limit::per_second(2), Limit::per_minute(5)]);
/// let key = Key::new(KeyKind::ApiKey, [1; 16]);
/// assert!(limiter.check(&key).is_ok());
/// assert!(limiter.check(&key).is_ok());
/// let denied = limiter.check(&key).unwrap_err();
/// assert!(denied.retry_after().as_millis() > 0);
/// ```
pub struct KeyedLimiter {
    store: MemoryStore,
    cells: Vec<Cell>,
    hasher: KeyHasher,
    clock: SharedClock,
    max_keys: usize,
}

impl fmt::Debug for KeyedLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedLimiter")
            .field("cells", &self.cells)
            .finish()
    }
}

/// Why a [`KeyedLimiter`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    retry_after: Option<Duration>,
}

impl Denied {
    /// How long until the same check would pass; zero when it never can (more than a burst) or
    /// the limiter is at its key cap.
    pub fn retry_after(&self) -> Duration {
        self.retry_after.unwrap_or_default()
    }

    /// Whether waiting helps: `false` for a cost over a limit's burst.
    pub fn can_retry(&self) -> bool {
        self.retry_after.is_some()
    }
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_after {
            Some(wait) => write!(f, "rate limited for {wait:?}"),
            None => f.write_str("over the limit's burst"),
        }
    }
}

impl std::error::Error for Denied {}

impl KeyedLimiter {
    /// A limiter enforcing every one of `limits` (at most 8) per key.
    ///
    /// # Panics
    ///
    /// With no limits or more than 8.
    pub fn new(limits: impl IntoIterator<Item = Limit>) -> Self {
        let cells: Vec<Cell> = limits.into_iter().map(|l| Cell::from(&l)).collect();
        assert!(
            (1..=MAX_CELLS).contains(&cells.len()),
            "a KeyedLimiter takes 1 to {MAX_CELLS} limits"
        );
        Self::build(cells, clock::system(), 1_000_000)
    }

    fn build(cells: Vec<Cell>, clock: SharedClock, max_keys: usize) -> Self {
        Self {
            store: MemoryStore::new(cells.len(), false, max_keys),
            cells,
            hasher: KeyHasher::random(),
            clock,
            max_keys,
        }
    }

    /// Reads time from `clock`.
    #[must_use]
    pub fn with_clock(self, clock: SharedClock) -> Self {
        Self::build(self.cells, clock, self.max_keys)
    }

    /// Caps the keys held (default 1,000,000); see the crate docs on eviction.
    #[must_use]
    pub fn with_max_keys(self, max_keys: usize) -> Self {
        Self::build(self.cells, self.clock, max_keys.max(1))
    }

    /// One unit for `key` on every limit.
    pub fn check(&self, key: &Key) -> Result<(), Denied> {
        self.check_n(key, 1)
    }

    /// `n` units for `key` on every limit, all or nothing.
    pub fn check_n(&self, key: &Key, n: u64) -> Result<(), Denied> {
        let now = u64::try_from(self.clock.now().as_nanos()).unwrap_or(u64::MAX);
        let costs = [n; MAX_CELLS];
        // No headers to fill: no snapshots asked for.
        match self.store.acquire(
            self.hasher.hash(key),
            now,
            &self.cells,
            &costs[..self.cells.len()],
            None,
            &mut [],
        ) {
            Acquire::Admitted => Ok(()),
            Acquire::Wait { retry_after, .. } => Err(Denied {
                retry_after: Some(Duration::from_nanos(retry_after)),
            }),
            Acquire::Never { .. } | Acquire::Busy | Acquire::Full => {
                Err(Denied { retry_after: None })
            }
        }
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_core::clock::ManualClock;
    use moat_core::identity::KeyKind;
    use std::sync::Arc;

    #[test]
    fn check_and_check_n_on_a_driven_clock() {
        let clock = ManualClock::new();
        let limiter =
            KeyedLimiter::new([Limit::per_second(10)]).with_clock(Arc::new(clock.clone()));
        let key = Key::new(KeyKind::ApiKey, [3; 16]);
        assert!(limiter.check_n(&key, 10).is_ok());
        let denied = limiter.check(&key).unwrap_err();
        assert_eq!(denied.retry_after(), Duration::from_millis(100));
        assert!(denied.can_retry());
        clock.advance(Duration::from_millis(100));
        assert!(limiter.check(&key).is_ok());
        assert!(!limiter.check_n(&key, 11).unwrap_err().can_retry());
        assert_eq!(limiter.len(), 1);
    }
}
