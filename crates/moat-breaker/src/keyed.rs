//! A breaker per key (model, API key, deployment), in a bounded map.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasherDefault;
use std::sync::{Arc, PoisonError, RwLock};

use moat_core::clock::{self, SharedClock};
use moat_core::identity::{KeyExtractor, RequestHead};
use moat_core::store::{KeyHasher, PassThrough};
use moat_core::Key;

use crate::breaker::{Breaker, State};
use crate::config::{BreakerConfig, ConfigError};

const SHARDS: usize = 16;

/// Breakers made on demand, one per key, all with one configuration.
///
/// The map holds at most `max_keys` breakers (default 10,000). When a new key arrives at a full
/// shard, a closed breaker makes room; an open or half-open breaker is never evicted, since
/// forgetting it would send traffic to a failing upstream. If no breaker can go, requests of
/// the new key share one overflow breaker until room is made.
///
/// A key extractor that reads the body (`model`) sees the request parsed by an outer moat
/// layer (rate limit, quota, redact); without one, every request shares the global key.
///
/// ```
/// use moat_breaker::{Breakers, BreakerConfig, CircuitBreakerLayer};
/// use http::HeaderName;
/// use moat_core::identity::HeaderKey;
///
/// let per_deployment = Breakers::builder("azure", HeaderKey::new(HeaderName::from_static("x-deployment")))
///     .config(BreakerConfig::default())
///     .max_keys(1_000)
///     .build()
///     .unwrap();
/// let layer = CircuitBreakerLayer::keyed(per_deployment);
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct Breakers {
    shared: Arc<Shared>,
}

struct Shared {
    name: Arc<str>,
    config: BreakerConfig,
    clock: SharedClock,
    key: Arc<dyn KeyExtractor>,
    per_shard: usize,
    hasher: KeyHasher,
    shards: [RwLock<HashMap<u64, Breaker, BuildHasherDefault<PassThrough>>>; SHARDS],
    overflow: Breaker,
}

impl fmt::Debug for Breakers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breakers")
            .field("name", &self.shared.name)
            .field("key", &self.shared.key)
            .field("len", &self.len())
            .finish()
    }
}

/// Builds [`Breakers`].
#[must_use]
pub struct BreakersBuilder {
    name: Arc<str>,
    key: Arc<dyn KeyExtractor>,
    config: BreakerConfig,
    clock: Option<SharedClock>,
    max_keys: usize,
}

impl fmt::Debug for BreakersBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakersBuilder")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("config", &self.config)
            .field("max_keys", &self.max_keys)
            .finish()
    }
}

impl BreakersBuilder {
    /// Each breaker's configuration (default: [`BreakerConfig::default`]).
    pub fn config(mut self, config: BreakerConfig) -> Self {
        self.config = config;
        self
    }

    /// Reads time from `clock` (default: the system clock).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Keeps at most `max_keys` breakers, rounded up to a multiple of 16 (default 10,000).
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// The breakers, none made yet.
    pub fn build(self) -> Result<Breakers, ConfigError> {
        let clock = self.clock.unwrap_or_else(clock::system);
        let overflow = Breaker::builder(self.name.clone())
            .config(self.config.clone())
            .clock(clock.clone())
            .build()?;
        Ok(Breakers {
            shared: Arc::new(Shared {
                name: self.name,
                config: self.config,
                clock,
                key: self.key,
                per_shard: self.max_keys.div_ceil(SHARDS).max(1),
                hasher: KeyHasher::random(),
                shards: std::array::from_fn(|_| RwLock::new(HashMap::default())),
                overflow,
            }),
        })
    }
}

impl Breakers {
    /// A builder of breakers named `name`, one per key `key` extracts.
    pub fn builder(name: impl Into<Arc<str>>, key: impl KeyExtractor) -> BreakersBuilder {
        BreakersBuilder {
            name: name.into(),
            key: Arc::new(key),
            config: BreakerConfig::default(),
            clock: None,
            max_keys: 10_000,
        }
    }

    /// The breaker for a request.
    pub fn breaker_for(&self, head: &RequestHead<'_>) -> Breaker {
        let key = self.shared.key.extract(head).unwrap_or(Key::GLOBAL);
        self.get(key)
    }

    /// The breaker for `key`, made if there is none.
    pub fn get(&self, key: Key) -> Breaker {
        let shared = &self.shared;
        let key = shared.hasher.hash(&key);
        let shard = &shared.shards[(key >> 32) as usize % SHARDS];
        if let Some(breaker) = shard
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return breaker.clone();
        }
        let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(breaker) = map.get(&key) {
            return breaker.clone();
        }
        if map.len() >= shared.per_shard {
            let closed = map
                .iter()
                .find(|(_, b)| b.state() == State::Closed)
                .map(|(k, _)| *k);
            match closed {
                Some(evicted) => {
                    map.remove(&evicted);
                }
                None => return shared.overflow.clone(),
            }
        }
        let breaker = Breaker::builder(shared.name.clone())
            .config(shared.config.clone())
            .clock(shared.clock.clone())
            .build()
            .expect("checked when first built");
        map.insert(key, breaker.clone());
        breaker
    }

    /// How many breakers are held.
    pub fn len(&self) -> usize {
        self.shared
            .shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Whether no breaker is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::CallOutcome;
    use crate::config::Window;
    use moat_core::clock::ManualClock;
    use moat_core::identity::KeyKind;

    fn key(i: u32) -> Key {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_le_bytes());
        Key::new(KeyKind::Header, id)
    }

    #[test]
    fn keys_get_their_own_breaker_and_open_ones_are_never_evicted() {
        let config = BreakerConfig::default()
            .with_minimum_calls(1)
            .with_window(Window::Count(1));
        let breakers = Breakers::builder("k", moat_core::identity::Global)
            .config(config)
            .clock(Arc::new(ManualClock::new()))
            .max_keys(16)
            .build()
            .unwrap();
        let a = breakers.get(key(1));
        a.try_acquire().unwrap().record(CallOutcome::Failure);
        assert_eq!(breakers.get(key(1)).state(), State::Open, "same breaker");
        assert_eq!(breakers.get(key(2)).state(), State::Closed);
        for i in 3..10_000 {
            let _ = breakers.get(key(i));
        }
        assert!(breakers.len() <= 16, "bounded: {}", breakers.len());
        assert_eq!(breakers.get(key(1)).state(), State::Open, "still held");
    }
}
