//! Replies in Redis, shared by several gateways (feature `redis`).
//!
//! A reply is kept under `moat:cache:{hex key}` (the key is already a SHA-256: no prompt text
//! in Redis keys), its body deflated, with the TTL as Redis's own expiry. Every call gives up
//! after a timeout, and a failure falls through: a lookup that fails is a miss (the provider
//! answers), a write that fails is dropped. Each process also keeps what it stores and finds
//! in memory in front of Redis, so its own repeats and the requests waiting on one reply do not
//! wait on the network.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use moat_core::llm::WireFormat;
use moat_core::store::{RedisConnection, StoreError};

use crate::entry::Entry;
use crate::key::CacheKey;

/// The largest body inflated from Redis: what was stored was at most the layer's
/// `max_entry_bytes`, but Redis is not trusted to say so.
const MAX_INFLATED: usize = 64 << 20;

const VERSION: u8 = 1;

static GET: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new("return redis.call('GET', KEYS[1])"));
static SET: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new("return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])")
});

/// Replies in Redis.
#[derive(Debug, Clone)]
pub struct RedisStore {
    conn: Arc<RedisConnection>,
    timeout: Duration,
}

impl RedisStore {
    /// Replies kept through `conn` (shared with the other stores on the same server), each
    /// call given 50 ms.
    pub fn new(conn: Arc<RedisConnection>) -> Self {
        Self {
            conn,
            timeout: Duration::from_millis(50),
        }
    }

    /// How long a call may take before it counts as failed.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn redis_key(key: &CacheKey) -> String {
        format!("moat:cache:{}", key.hex())
    }

    /// The reply under `key`, and how long ago it was stored.
    pub(crate) async fn get(
        &self,
        key: &CacheKey,
    ) -> Result<Option<(Entry, Duration)>, StoreError> {
        let mut call = GET.prepare_invoke();
        call.key(Self::redis_key(key));
        let value: Option<Vec<u8>> = self.conn.run(call, self.timeout).await?;
        Ok(value.and_then(|bytes| decode(&bytes)))
    }

    /// Stores `entry` under `key` for `ttl`.
    pub(crate) async fn insert(
        &self,
        key: &CacheKey,
        entry: &Entry,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut call = SET.prepare_invoke();
        call.key(Self::redis_key(key))
            .arg(encode(entry))
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        self.conn.run::<()>(call, self.timeout).await
    }
}

fn format_code(format: WireFormat) -> u8 {
    match format {
        WireFormat::ChatCompletions => 1,
        WireFormat::Completions => 2,
        WireFormat::Responses => 3,
        WireFormat::Embeddings => 4,
        WireFormat::AnthropicMessages => 5,
        _ => 0,
    }
}

fn format_of(code: u8) -> WireFormat {
    match code {
        1 => WireFormat::ChatCompletions,
        2 => WireFormat::Completions,
        3 => WireFormat::Responses,
        4 => WireFormat::Embeddings,
        5 => WireFormat::AnthropicMessages,
        _ => WireFormat::Unknown,
    }
}

fn wall_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Version, SSE flag, API, when stored (Unix ms), then the deflated body.
fn encode(entry: &Entry) -> Vec<u8> {
    let mut out = vec![VERSION, u8::from(entry.sse), format_code(entry.format)];
    out.extend_from_slice(&wall_millis().to_le_bytes());
    out.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(&entry.body, 1));
    out
}

fn decode(bytes: &[u8]) -> Option<(Entry, Duration)> {
    if bytes.len() < 11 || bytes[0] != VERSION {
        return None;
    }
    let stored = u64::from_le_bytes(bytes[3..11].try_into().ok()?);
    let body =
        miniz_oxide::inflate::decompress_to_vec_with_limit(&bytes[11..], MAX_INFLATED).ok()?;
    let age = Duration::from_millis(wall_millis().saturating_sub(stored));
    Some((
        Entry {
            body: Bytes::from(body),
            sse: bytes[1] == 1,
            format: format_of(bytes[2]),
            stored: Duration::ZERO,
        },
        age,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_encoding_and_bad_bytes_are_refused() {
        let entry = Entry {
            body: Bytes::from("data: {\"x\":1}\n\n".repeat(100)),
            sse: true,
            format: WireFormat::ChatCompletions,
            stored: Duration::ZERO,
        };
        let bytes = encode(&entry);
        assert!(bytes.len() < entry.body.len() / 4, "deflated");
        let (back, age) = decode(&bytes).unwrap();
        assert_eq!(back.body, entry.body);
        assert!(back.sse);
        assert_eq!(back.format, WireFormat::ChatCompletions);
        assert!(age < Duration::from_secs(60));
        assert!(decode(b"").is_none());
        assert!(decode(&[9; 20]).is_none(), "another version");
        let mut garbled = bytes.clone();
        garbled.truncate(15);
        assert!(decode(&garbled).is_none());
    }
}
