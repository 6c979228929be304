//! Limiter state in Redis, shared by every process that points at it.
//!
//! Each rule decision is one Lua script run atomically on the server, on the server's own clock
//! (`TIME`), so processes with skewed clocks still agree. State is one hash per rule and key
//! (`PREFIX{RULE:DIGEST}`; the braces are a hash tag, so each key lives in one Redis Cluster
//! slot), expiring exactly when its state has fully reset. Scripts run by `EVALSHA`, falling
//! back to `EVAL` when the server answers `NOSCRIPT`. The connection is multiplexed and
//! reconnects by itself; every call has a timeout. Keys already over a limit are remembered
//! locally until their retry time, so a client hammering a denied key costs Redis nothing.
//!
//! In-flight caps stay per process: a counter in Redis would leak slots whenever a process dies
//! with requests open.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use moat_core::store::{RedisConnection, StoreError};
use moat_core::Key;

use crate::memory::{Acquire, Cell, Snapshot};

pub use moat_core::store::OnStoreError;

const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local fields = {}
for i = 1, n do fields[i] = tostring(i) end
local state = redis.call('HMGET', KEYS[1], unpack(fields))
local verdict, cell, wait = 0, -1, 0
local new = {}
for i = 1, n do
  local e, tol, cost = tonumber(ARGV[3*i - 1]), tonumber(ARGV[3*i]), tonumber(ARGV[3*i + 1])
  local tat = tonumber(state[i]) or 0
  local inc = cost * e
  if inc > tol then
    if verdict ~= 2 then verdict = 2; cell = i - 1; wait = 0 end
    new[i] = tat
  else
    local nt = math.max(tat, now) + inc
    new[i] = nt
    if verdict ~= 2 and nt - now > tol and nt - now - tol > wait then
      verdict = 1; cell = i - 1; wait = nt - now - tol
    end
  end
end
if verdict == 0 then
  local args, ahead = {}, 0
  for i = 1, n do
    args[#args + 1] = fields[i]
    args[#args + 1] = string.format('%.0f', new[i])
    ahead = math.max(ahead, new[i] - now)
  end
  redis.call('HSET', KEYS[1], unpack(args))
  redis.call('PEXPIRE', KEYS[1], math.floor(ahead / 1000) + 1)
end
local out = {verdict, cell, wait}
for i = 1, n do
  local tat = tonumber(state[i]) or 0
  if verdict == 0 then tat = new[i] end
  local e, tol = tonumber(ARGV[3*i - 1]), tonumber(ARGV[3*i])
  local ahead = math.max(tat - now, 0)
  out[#out + 1] = math.floor(math.max(tol - ahead, 0) / e)
  out[#out + 1] = ahead
end
return out
";

const ADJUST: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local fields = {}
for i = 1, n do fields[i] = tostring(i) end
local state = redis.call('HMGET', KEYS[1], unpack(fields))
local args, ahead = {}, 0
for i = 1, n do
  local e, d = tonumber(ARGV[2*i]), tonumber(ARGV[2*i + 1])
  local tat = tonumber(state[i]) or 0
  local nt
  if d >= 0 then nt = math.max(tat, now) + d * e else nt = math.max(tat + d * e, 0) end
  if d == 0 then nt = tat end
  args[#args + 1] = fields[i]
  args[#args + 1] = string.format('%.0f', nt)
  ahead = math.max(ahead, nt - now)
end
if ahead <= 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], unpack(args))
  redis.call('PEXPIRE', KEYS[1], math.floor(ahead / 1000) + 1)
end
return 1
";

/// A Redis connection for [`RateLimitLayer::with_redis`](crate::RateLimitLayer::with_redis).
pub struct RedisStore {
    conn: Arc<RedisConnection>,
    timeout: Duration,
    prefix: String,
    pub(crate) on_error: OnStoreError,
    acquire: redis::Script,
    adjust: redis::Script,
    denied: Mutex<DeniedKeys>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .finish()
    }
}

/// (rule name's hash, key digest) → (limit, local time in ns until which the key is known to be
/// denied).
type DeniedKeys = HashMap<(u64, [u8; 16]), (usize, u64)>;

/// Bound on the local denied-keys cache.
const MAX_DENIED: usize = 100_000;

impl RedisStore {
    /// A store on a shared connection (one per server, for every store that uses it).
    pub fn with_connection(conn: Arc<RedisConnection>) -> Self {
        Self {
            conn,
            timeout: Duration::from_millis(100),
            prefix: "moat:rl:".to_owned(),
            on_error: OnStoreError::default(),
            acquire: redis::Script::new(ACQUIRE),
            adjust: redis::Script::new(ADJUST),
            denied: Mutex::default(),
        }
    }

    /// A store at `url` (`redis://HOST:PORT/DB`, `rediss://` for TLS), on a connection of its
    /// own. Connects on first use.
    pub fn open(url: &str) -> Result<Self, redis::RedisError> {
        Ok(Self::with_connection(Arc::new(RedisConnection::open(url)?)))
    }

    /// Prefixes every key (default `moat:rl:`).
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Gives up on a call after this long (default 100 ms) and applies the failure policy.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What to do when Redis fails (default: fail closed).
    #[must_use]
    pub fn with_on_error(mut self, policy: OnStoreError) -> Self {
        self.on_error = policy;
        self
    }

    /// The Redis key of a rule's state for `key`.
    pub(crate) fn key_name(&self, rule: &str, key: &Key) -> String {
        key.hash_tagged(&self.prefix, rule)
    }

    /// A remembered denial of this key, if it still holds at `now` (local ns).
    pub(crate) fn cached_denial(&self, rule: u64, key: &Key, now: u64) -> Option<Acquire> {
        let denied = self.denied.lock().unwrap_or_else(PoisonError::into_inner);
        let &(cell, until) = denied.get(&(rule, key.digest()))?;
        (until > now).then_some(Acquire::Wait {
            cell,
            retry_after: until - now,
        })
    }

    fn remember_denial(&self, rule: u64, key: &Key, cell: usize, until: u64, now: u64) {
        let mut denied = self.denied.lock().unwrap_or_else(PoisonError::into_inner);
        if denied.len() >= MAX_DENIED {
            denied.retain(|_, (_, u)| *u > now);
            if denied.len() >= MAX_DENIED {
                denied.clear();
            }
        }
        denied.insert((rule, key.digest()), (cell, until));
    }

    /// The Redis version of [`MemoryStore::acquire`](crate::memory::MemoryStore::acquire).
    pub(crate) async fn acquire(
        &self,
        (rule, rule_name): (u64, &str),
        key: &Key,
        now: u64,
        cells: &[Cell],
        costs: &[u64],
        out: &mut [Snapshot],
    ) -> Result<Acquire, StoreError> {
        let name = self.key_name(rule_name, key);
        let mut invocation = self.acquire.key(name);
        invocation.arg(cells.len());
        for (cell, cost) in cells.iter().zip(costs) {
            invocation
                .arg(micros(cell.emission))
                .arg(micros(cell.tolerance))
                .arg(*cost);
        }
        let reply: Vec<i64> = self.conn.run(invocation, self.timeout).await?;
        if reply.len() != 3 + 2 * cells.len() {
            return Err(StoreError::failed(format_args!(
                "unexpected script reply of {} values",
                reply.len()
            )));
        }
        for (i, snapshot) in out.iter_mut().enumerate() {
            *snapshot = Snapshot {
                remaining: u64::try_from(reply[3 + 2 * i]).unwrap_or(0),
                reset: u64::try_from(reply[4 + 2 * i])
                    .unwrap_or(0)
                    .saturating_mul(1000),
            };
        }
        let cell = usize::try_from(reply[1]).unwrap_or(0);
        Ok(match reply[0] {
            0 => Acquire::Admitted,
            1 => {
                let retry_after = u64::try_from(reply[2])
                    .unwrap_or(0)
                    .saturating_mul(1000)
                    .max(1);
                self.remember_denial(rule, key, cell, now.saturating_add(retry_after), now);
                Acquire::Wait { cell, retry_after }
            }
            _ => Acquire::Never { cell },
        })
    }

    /// The Redis version of [`MemoryStore::adjust`](crate::memory::MemoryStore::adjust), without
    /// in-flight counts.
    pub(crate) async fn adjust(
        &self,
        rule_name: &str,
        key: &Key,
        cells: &[Cell],
        deltas: &[i64],
    ) -> Result<(), StoreError> {
        if deltas.iter().all(|d| *d == 0) {
            return Ok(());
        }
        let mut invocation = self.adjust.key(self.key_name(rule_name, key));
        invocation.arg(cells.len());
        for (cell, delta) in cells.iter().zip(deltas) {
            invocation.arg(micros(cell.emission)).arg(*delta);
        }
        self.conn
            .run::<i64>(invocation, self.timeout)
            .await
            .map(drop)
    }
}

/// Nanoseconds to whole microseconds, at least 1: the scripts count in µs so that times stay
/// exact in Lua's doubles.
fn micros(nanos: u64) -> u64 {
    (nanos / 1000).max(1)
}
