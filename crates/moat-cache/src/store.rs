//! Where replies are kept: in this process, bounded by bytes.

use std::sync::Arc;
use std::time::Duration;

use quick_cache::sync::Cache;
use quick_cache::Weighter;

use crate::entry::Entry;
use crate::key::CacheKey;

/// Counts an entry's bytes (its body and a fixed overhead), so the bound is on memory.
#[derive(Debug, Clone, Copy)]
struct ByBytes;

impl Weighter<CacheKey, Arc<Entry>> for ByBytes {
    fn weight(&self, _key: &CacheKey, entry: &Arc<Entry>) -> u64 {
        entry.body.len() as u64 + 128
    }
}

/// Replies in memory: a concurrent cache (CLOCK-Pro, from `quick_cache`) bounded by the bytes
/// it holds; the least useful entries go first when it is full, expired ones when read.
#[derive(Clone)]
pub struct MemoryStore {
    entries: Arc<Cache<CacheKey, Arc<Entry>, ByBytes>>,
    max_bytes: u64,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.entries.len())
            .field("bytes", &self.entries.weight())
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl MemoryStore {
    /// A store holding at most `max_bytes` of replies.
    pub fn new(max_bytes: u64) -> Self {
        // quick_cache sizes its tables by an estimate of the number of items.
        let items = usize::try_from(max_bytes / 4096)
            .unwrap_or(usize::MAX)
            .clamp(16, 1 << 20);
        Self {
            entries: Arc::new(Cache::with_weighter(items, max_bytes.max(1), ByBytes)),
            max_bytes,
        }
    }

    /// How many replies it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.len() == 0
    }

    /// The most bytes its replies may take.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The bytes its replies take.
    pub fn bytes(&self) -> u64 {
        self.entries.weight()
    }

    pub(crate) fn get(&self, key: &CacheKey, now: Duration, ttl: Duration) -> Option<Arc<Entry>> {
        let entry = self.entries.get(key)?;
        if now.saturating_sub(entry.stored) >= ttl {
            self.entries.remove(key);
            return None;
        }
        Some(entry)
    }

    pub(crate) fn insert(&self, key: CacheKey, entry: Entry) {
        self.entries.insert(key, Arc::new(entry));
    }
}
