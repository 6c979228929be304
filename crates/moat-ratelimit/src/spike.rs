//! Spike guard: a key whose short-term rate jumps far above its own baseline.
//!
//! Each key keeps two exponentially weighted rates (events per second): a short one (default
//! time constant 1 minute) and a baseline (default 1 day). When, for a key seen for at least the
//! warm-up, the short rate exceeds both `factor` times the baseline and a floor, the guard fires
//! once per cooldown: a `tracing` warning under `moat::ratelimit`, the counter
//! `moat_ratelimit_spikes_total`, and your [`SpikeAlerts`] sink. With a quarantine, the key is
//! then refused, or moved to a lower tier, for the cooldown. A key going from 100 requests a day
//! to 100,000 is a leaked key until proven otherwise.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasherDefault;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use moat_core::Key;

use moat_core::store::{KeyHasher, PassThrough};

/// What happens to a key while it is quarantined.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Quarantine {
    /// Refuse its requests (429, code `key_quarantined`).
    Reject,
    /// Treat the caller as this tier, so that tier's rules apply.
    Tier(Arc<str>),
}

/// A spike the guard saw.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SpikeAlert {
    /// The key (fingerprinted: never a raw API key).
    pub key: Key,
    /// Requests per second over the short window.
    pub rate: f64,
    /// The key's baseline, requests per second.
    pub baseline: f64,
    /// The quarantine applied, if any, and for how long.
    pub quarantine: Option<(Quarantine, Duration)>,
}

/// Receives spike alerts. Closures implement it.
pub trait SpikeAlerts: Send + Sync + 'static {
    /// Called once per spike and cooldown.
    fn alert(&self, alert: &SpikeAlert);
}

impl<F: Fn(&SpikeAlert) + Send + Sync + 'static> SpikeAlerts for F {
    fn alert(&self, alert: &SpikeAlert) {
        self(alert)
    }
}

/// Settings of the spike guard.
#[derive(Clone)]
pub struct SpikeGuard {
    pub(crate) short: Duration,
    pub(crate) baseline: Duration,
    pub(crate) factor: f64,
    pub(crate) min_rate: f64,
    pub(crate) warmup: Duration,
    pub(crate) cooldown: Duration,
    pub(crate) quarantine: Option<Quarantine>,
    pub(crate) alerts: Option<Arc<dyn SpikeAlerts>>,
}

impl fmt::Debug for SpikeGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpikeGuard")
            .field("short", &self.short)
            .field("baseline", &self.baseline)
            .field("factor", &self.factor)
            .field("min_rate", &self.min_rate)
            .field("warmup", &self.warmup)
            .field("cooldown", &self.cooldown)
            .field("quarantine", &self.quarantine)
            .finish()
    }
}

impl Default for SpikeGuard {
    fn default() -> Self {
        Self {
            short: Duration::from_secs(60),
            baseline: Duration::from_secs(86_400),
            factor: 20.0,
            min_rate: 1.0,
            warmup: Duration::from_secs(3600),
            cooldown: Duration::from_secs(900),
            quarantine: None,
            alerts: None,
        }
    }
}

impl SpikeGuard {
    /// Alerts only, with the defaults: fire when the 1-minute rate is over 20x the 1-day
    /// baseline and over 1 request per second, for keys seen for an hour; 15-minute cooldown.
    pub fn new() -> Self {
        Self::default()
    }

    /// The short window's time constant.
    #[must_use]
    pub fn with_short_window(mut self, window: Duration) -> Self {
        self.short = window.max(Duration::from_millis(1));
        self
    }

    /// The baseline's time constant.
    #[must_use]
    pub fn with_baseline_window(mut self, window: Duration) -> Self {
        self.baseline = window.max(Duration::from_millis(1));
        self
    }

    /// How many times its baseline a key's short rate must reach.
    #[must_use]
    pub fn with_factor(mut self, factor: f64) -> Self {
        self.factor = factor.max(1.0);
        self
    }

    /// The short rate (requests per second) below which nothing fires.
    #[must_use]
    pub fn with_min_rate(mut self, per_second: f64) -> Self {
        self.min_rate = per_second.max(0.0);
        self
    }

    /// How long a key must be known before it can fire (its baseline needs history).
    #[must_use]
    pub fn with_warmup(mut self, warmup: Duration) -> Self {
        self.warmup = warmup;
        self
    }

    /// How long a quarantine lasts, and the quiet time between alerts for one key.
    #[must_use]
    pub fn with_cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// Quarantines a spiking key for the cooldown.
    #[must_use]
    pub fn with_quarantine(mut self, quarantine: Quarantine) -> Self {
        self.quarantine = Some(quarantine);
        self
    }

    /// Sends alerts to `sink` too.
    #[must_use]
    pub fn with_alerts(mut self, sink: impl SpikeAlerts) -> Self {
        self.alerts = Some(Arc::new(sink));
        self
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    first: u64,
    last: u64,
    short: f64,
    baseline: f64,
    /// Until when the key is quarantined and alerts are quiet.
    quiet_until: u64,
}

const SHARDS: usize = 16;

type Shard = Mutex<HashMap<u64, Entry, BuildHasherDefault<PassThrough>>>;

/// Per-key rates, bounded like the limiter's store. The guard's settings come with each
/// observation, so a rebuilt layer keeps the rates it learned.
pub(crate) struct SpikeTable {
    hasher: KeyHasher,
    shards: Box<[Shard]>,
    per_shard_cap: usize,
    spikes: metrics::Counter,
}

impl fmt::Debug for SpikeTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpikeTable")
            .field("per_shard_cap", &self.per_shard_cap)
            .finish()
    }
}

/// The guard's verdict on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SpikeVerdict {
    Pass,
    Quarantined(Quarantine),
}

fn decay(rate: f64, elapsed: u64, tau: Duration) -> f64 {
    rate * (-(elapsed as f64) / tau.as_nanos() as f64).exp()
}

impl SpikeTable {
    pub(crate) fn new(max_keys: usize) -> Self {
        Self {
            hasher: KeyHasher::random(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard_cap: max_keys.div_ceil(SHARDS).max(1),
            spikes: metrics::counter!("moat_ratelimit_spikes_total"),
        }
    }

    /// Counts one request of `key` at `now` and says whether `g` lets it pass.
    pub(crate) fn observe(&self, g: &SpikeGuard, key: &Key, now: u64) -> SpikeVerdict {
        let id = self.hasher.hash(key);
        let mut shard = self.shards[(id >> 40) as usize % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= self.per_shard_cap && !shard.contains_key(&id) {
            // Forget keys idle for a baseline window and not quarantined.
            let idle = u64::try_from(g.baseline.as_nanos()).unwrap_or(u64::MAX);
            shard.retain(|_, e| e.quiet_until > now || now.saturating_sub(e.last) < idle);
            if shard.len() >= self.per_shard_cap {
                return SpikeVerdict::Pass;
            }
        }
        let entry = shard.entry(id).or_insert(Entry {
            first: now,
            last: now,
            ..Entry::default()
        });
        let elapsed = now.saturating_sub(entry.last);
        entry.short = decay(entry.short, elapsed, g.short) + 1.0 / g.short.as_secs_f64();
        entry.baseline =
            decay(entry.baseline, elapsed, g.baseline) + 1.0 / g.baseline.as_secs_f64();
        entry.last = now;
        if entry.quiet_until > now {
            return match &g.quarantine {
                Some(q) => SpikeVerdict::Quarantined(q.clone()),
                None => SpikeVerdict::Pass,
            };
        }
        let age = now - entry.first;
        let warm = Duration::from_nanos(age) >= g.warmup;
        // An average that started at zero underestimates a young key: correct for its age.
        let seen = 1.0 - (-(age as f64) / g.baseline.as_nanos() as f64).exp();
        let baseline = if seen > 0.0 {
            entry.baseline / seen
        } else {
            entry.baseline
        };
        if !warm || entry.short < g.min_rate || entry.short < g.factor * baseline {
            return SpikeVerdict::Pass;
        }
        let cooldown = u64::try_from(g.cooldown.as_nanos()).unwrap_or(u64::MAX);
        entry.quiet_until = now.saturating_add(cooldown);
        let alert = SpikeAlert {
            key: *key,
            rate: entry.short,
            baseline,
            quarantine: g.quarantine.clone().map(|q| (q, g.cooldown)),
        };
        drop(shard);
        self.spikes.increment(1);
        tracing::warn!(
            target: "moat::ratelimit",
            key = %alert.key,
            rate = alert.rate,
            baseline = alert.baseline,
            quarantine = ?alert.quarantine,
            "request rate spike"
        );
        if let Some(sink) = &g.alerts {
            sink.alert(&alert);
        }
        match alert.quarantine {
            Some((q, _)) => SpikeVerdict::Quarantined(q),
            None => SpikeVerdict::Pass,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_core::identity::KeyKind;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_key_jumping_from_100_a_day_to_100_a_minute_fires_once() {
        let fired = Arc::new(Mutex::new(Vec::new()));
        let sink = fired.clone();
        let guard = SpikeGuard::new()
            .with_quarantine(Quarantine::Reject)
            .with_alerts(move |a: &SpikeAlert| sink.lock().unwrap().push(a.clone()));
        let table = SpikeTable::new(1000);
        let key = Key::new(KeyKind::ApiKey, [7; 16]);
        let mut now = 0;
        // Three days at 100 a day.
        for _ in 0..300 {
            now += 864 * SEC;
            assert_eq!(table.observe(&guard, &key, now), SpikeVerdict::Pass);
        }
        // Then 100,000 a day: more than one a second.
        let mut first_quarantined = None;
        for i in 0..600 {
            now += SEC * 3 / 4;
            if table.observe(&guard, &key, now) != SpikeVerdict::Pass && first_quarantined.is_none()
            {
                first_quarantined = Some(i);
            }
        }
        let i = first_quarantined.expect("the spike is caught");
        assert!(i < 120, "within a couple of minutes: request {i}");
        assert_eq!(fired.lock().unwrap().len(), 1, "one alert per cooldown");
        let alert = fired.lock().unwrap()[0].clone();
        assert!(alert.rate > 20.0 * alert.baseline);
        // After the cooldown, a key back to its old pace passes again.
        now += 3600 * SEC;
        assert_eq!(table.observe(&guard, &key, now), SpikeVerdict::Pass);
    }

    #[test]
    fn steady_heavy_keys_and_new_keys_do_not_fire() {
        let guard = SpikeGuard::new().with_quarantine(Quarantine::Reject);
        let table = SpikeTable::new(1000);
        let key = Key::new(KeyKind::ApiKey, [8; 16]);
        let mut now = 0;
        // A key that has always done 2 per second.
        for _ in 0..200_000 {
            now += SEC / 2;
            assert_eq!(table.observe(&guard, &key, now), SpikeVerdict::Pass);
        }
        // A brand-new key bursting: no history, no verdict (the rate limits handle it).
        let fresh = Key::new(KeyKind::ApiKey, [9; 16]);
        for _ in 0..1000 {
            now += SEC / 100;
            assert_eq!(table.observe(&guard, &fresh, now), SpikeVerdict::Pass);
        }
    }
}
