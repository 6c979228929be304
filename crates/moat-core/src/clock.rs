//! Injectable time.
//!
//! Every layer reads time through a [`Clock`], so tests can freeze and drive it instead of
//! sleeping. [`SystemClock`] is the default; [`ManualClock`] only moves when told to.
//!
//! ```
//! use moat_core::clock::{Clock, ManualClock};
//! use std::time::Duration;
//!
//! let clock = ManualClock::new();
//! let start = clock.now();
//! clock.advance(Duration::from_millis(1500));
//! assert_eq!(clock.now() - start, Duration::from_millis(1500));
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of monotonic and wall-clock time.
///
/// `now` is monotonic: a [`Duration`] since an arbitrary, fixed origin of this clock. Rate
/// limiters work on it. `wall` is calendar time for periods aligned to days and months.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Monotonic time since this clock's origin.
    fn now(&self) -> Duration;

    /// Wall-clock time.
    fn wall(&self) -> SystemTime;
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Duration {
        (**self).now()
    }

    fn wall(&self) -> SystemTime {
        (**self).wall()
    }
}

/// The real clock: monotonic time since the first use in this process, and
/// [`SystemTime::now`].
///
/// Monotonic time comes from `quanta`: the CPU's time-stamp counter, calibrated against the
/// OS clock, where it is invariant (a few ns), else the OS clock. A rate-limit decision reads
/// it once, and `clock_gettime` alone would be half the decision's cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        static ORIGIN: OnceLock<quanta::Instant> = OnceLock::new();
        let origin = *ORIGIN.get_or_init(quanta::Instant::now);
        quanta::Instant::now().saturating_duration_since(origin)
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when [`advance`](ManualClock::advance) or
/// [`set_wall`](ManualClock::set_wall) is called. Clones share the same time.
#[derive(Clone, Default)]
pub struct ManualClock {
    inner: Arc<ManualInner>,
}

#[derive(Default)]
struct ManualInner {
    mono_nanos: AtomicU64,
    wall_nanos: AtomicU64,
}

impl ManualClock {
    /// A clock at monotonic zero and wall time 2026-01-01T00:00:00Z.
    pub fn new() -> Self {
        let clock = Self::default();
        // 2026-01-01T00:00:00Z: a fixed, documented starting point makes calendar tests readable.
        clock.set_wall(UNIX_EPOCH + Duration::from_secs(1_767_225_600));
        clock
    }

    /// Moves both monotonic and wall time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.inner.mono_nanos.fetch_add(nanos, Ordering::SeqCst);
        self.inner.wall_nanos.fetch_add(nanos, Ordering::SeqCst);
    }

    /// Sets the wall-clock time, leaving monotonic time alone.
    pub fn set_wall(&self, at: SystemTime) {
        let nanos = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        self.inner
            .wall_nanos
            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.inner.mono_nanos.load(Ordering::SeqCst))
    }

    fn wall(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.inner.wall_nanos.load(Ordering::SeqCst))
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock")
            .field("now", &self.now())
            .field("wall", &self.wall())
            .finish()
    }
}

/// A shared, type-erased clock, as layers store it.
pub type SharedClock = Arc<dyn Clock>;

/// The default clock as a [`SharedClock`].
pub fn system() -> SharedClock {
    // The first reading calibrates the time-stamp counter (up to 200 ms): when a layer is
    // built, not on its first request.
    let _ = SystemClock.now();
    Arc::new(SystemClock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_is_monotonic() {
        let a = SystemClock.now();
        let b = SystemClock.now();
        assert!(b >= a);
    }

    #[test]
    fn manual_clock_moves_only_when_told_and_clones_share_time() {
        let clock = ManualClock::new();
        let other = clock.clone();
        let wall = clock.wall();
        assert_eq!(clock.now(), Duration::ZERO);
        other.advance(Duration::from_secs(61));
        assert_eq!(clock.now(), Duration::from_secs(61));
        assert_eq!(
            clock.wall().duration_since(wall).unwrap(),
            Duration::from_secs(61)
        );
        clock.set_wall(UNIX_EPOCH);
        assert_eq!(other.wall(), UNIX_EPOCH);
        assert_eq!(other.now(), Duration::from_secs(61));
    }

    #[test]
    fn shared_clock_dispatches() {
        let manual = ManualClock::new();
        let shared: SharedClock = Arc::new(manual.clone());
        manual.advance(Duration::from_millis(5));
        assert_eq!(shared.now(), Duration::from_millis(5));
    }
}
