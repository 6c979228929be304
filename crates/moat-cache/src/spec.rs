//! What a configuration file says of the cache, deserialized with serde (feature `serde`): the
//! gateway's `[cache]`.
//!
//! ```
//! use moat_cache::spec::CacheSpec;
//!
//! let spec: CacheSpec = serde_json::from_value(serde_json::json!({
//!     "ttl": "1h", "max_entry_bytes": 1048576, "max_bytes": 268435456,
//!     "scope": "tenant", "only_deterministic": true, "store": "memory"
//! }))
//! .unwrap();
//! let layer = spec.layer().unwrap();
//! # let _ = layer;
//! ```

use std::time::Duration;

use serde::Deserialize;

use crate::key::CacheScope;
use crate::service::CacheLayer;
use crate::store::MemoryStore;

/// The response cache (`[cache]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CacheSpec {
    /// How long a reply is served (default 1h).
    #[serde(default, with = "humantime_serde::option")]
    pub ttl: Option<Duration>,
    /// The largest reply stored, in bytes (default 1 MiB).
    pub max_entry_bytes: Option<usize>,
    /// The bytes all replies may take (default 256 MiB).
    pub max_bytes: Option<u64>,
    /// `tenant` (default), `api_key` or `global`.
    #[serde(default)]
    pub scope: CacheScope,
    /// Cache only deterministic requests (default true).
    pub only_deterministic: Option<bool>,
    /// How long an identical request waits for one in flight before calling the upstream
    /// itself (default 30s).
    #[serde(default, with = "humantime_serde::option")]
    pub coalesce_wait: Option<Duration>,
    /// Routes cached whatever their sampling settings, e.g. `["/v1/embeddings"]`.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Where replies are kept: `memory` (the default) or `redis` (shared by several
    /// gateways, with memory in front).
    #[serde(default)]
    pub store: StoreName,
    /// The Redis server of `store = "redis"`, when not the configuration's shared one.
    pub redis_url: Option<String>,
    /// How long a Redis call may take before the request is served by the upstream instead
    /// (default 50ms).
    #[serde(default, with = "humantime_serde::option")]
    pub redis_timeout: Option<Duration>,
}

/// A store, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum StoreName {
    /// In this process.
    #[default]
    Memory,
    /// Redis, shared by several gateways (feature `redis`; the caller connects it, see
    /// [`CacheLayer::with_redis`](crate::CacheLayer)).
    Redis,
}

impl CacheSpec {
    /// The layer the spec describes, with its memory store; with `store = "redis"` the caller
    /// adds the Redis store over its own connection.
    pub fn layer(&self) -> Result<CacheLayer, String> {
        if self.ttl == Some(Duration::ZERO) {
            return Err("ttl: must be more than zero".into());
        }
        let store = MemoryStore::new(self.max_bytes.unwrap_or(256 << 20));
        let mut layer = CacheLayer::new(store)
            .with_scope(self.scope)
            .with_only_deterministic(self.only_deterministic.unwrap_or(true));
        if let Some(ttl) = self.ttl {
            layer = layer.with_ttl(ttl);
        }
        if let Some(wait) = self.coalesce_wait {
            layer = layer.with_coalesce_wait(wait);
        }
        if let Some(bytes) = self.max_entry_bytes {
            layer = layer.with_max_entry_bytes(bytes);
        }
        for route in &self.routes {
            layer = layer.with_route(route.clone());
        }
        Ok(layer)
    }
}
