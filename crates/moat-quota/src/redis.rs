//! Budgets in Redis, shared by every process pointed at it.
//!
//! One hash per budget and caller, `PREFIX{BUDGET:DIGEST}` (a hash tag: one Redis Cluster slot),
//! holds the period's usage, the previous rolling bucket, the alert marks and the reservations
//! in flight (`r:ID` fields with their expiry). Each operation is one Lua script, run atomically
//! on the server's clock: a reservation only fits if usage plus every live reservation plus it
//! stays under every cap, and expired reservations are swept by the scripts themselves. A request
//! touching several budgets reserves them in turn and gives back what it took when a later one
//! refuses, so budgets are never overrun (a refused request may briefly hold another budget).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use moat_core::store::{RedisConnection, StoreError};
use moat_core::Key;

use crate::budget::{Amounts, Dimension, Limits};
use crate::money::Usd;
use crate::period::Window;

pub use moat_core::store::OnStoreError;

// Shared by the scripts: roll the hash into window ARGV[1] (rolling if ARGV[3] == '1'), sweep
// expired reservations, and compute `used` (with the previous bucket's carry ARGV[2] ppm) and
// `reserved`.
const PRELUDE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HGETALL', KEYS[1])
local f = {}
for i = 1, #h, 2 do f[h[i]] = h[i + 1] end
local w, carry, rolling = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1'
local used, prev = {0, 0, 0, 0}, {0, 0, 0, 0}
if tonumber(f['w']) == w then
  for d = 1, 4 do used[d] = tonumber(f['u' .. d]) or 0; prev[d] = tonumber(f['p' .. d]) or 0 end
else
  if rolling and tonumber(f['w']) == w - 1 then
    for d = 1, 4 do prev[d] = tonumber(f['u' .. d]) or 0 end
  end
  redis.call('HSET', KEYS[1], 'w', w, 'a', 0, 'u1', 0, 'u2', 0, 'u3', 0, 'u4', 0,
    'p1', prev[1], 'p2', prev[2], 'p3', prev[3], 'p4', prev[4])
  f['a'] = '0'
end
local reserved = {0, 0, 0, 0}
for k, v in pairs(f) do
  if string.sub(k, 1, 2) == 'r:' then
    local a = {}
    for x in string.gmatch(v, '[^,]+') do a[#a + 1] = tonumber(x) end
    if a[5] <= now then
      redis.call('HDEL', KEYS[1], k)
    else
      for d = 1, 4 do reserved[d] = reserved[d] + a[d] end
    end
  end
end
local effective = {}
for d = 1, 4 do effective[d] = used[d] + math.floor(prev[d] * carry / 1000000) end
";

// ARGV: window, carry, rolling, ttl seconds, caps[4] (-1 = none), amounts[4], id, hold ms.
const RESERVE: &str = r"
for d = 1, 4 do
  local cap, need = tonumber(ARGV[4 + d]), tonumber(ARGV[8 + d])
  local have = effective[d] + reserved[d]
  if cap >= 0 and have + need > cap then return {1, d, have, need} end
end
redis.call('HSET', KEYS[1], 'r:' .. ARGV[13],
  string.format('%.0f,%.0f,%.0f,%.0f,%.0f', ARGV[9], ARGV[10], ARGV[11], ARGV[12], now + tonumber(ARGV[14])))
redis.call('EXPIRE', KEYS[1], ARGV[4])
local out = {0}
for d = 1, 4 do out[d + 1] = effective[d] + reserved[d] + tonumber(ARGV[8 + d]) end
return out
";

// ARGV: window, carry, rolling, ttl seconds, caps[4], used[4], id, thresholds...
const SETTLE: &str = r"
redis.call('HDEL', KEYS[1], 'r:' .. ARGV[13])
local pct = 0
for d = 1, 4 do
  used[d] = used[d] + tonumber(ARGV[8 + d])
  redis.call('HSET', KEYS[1], 'u' .. d, string.format('%.0f', used[d]))
  local cap = tonumber(ARGV[4 + d])
  local e = used[d] + math.floor(prev[d] * carry / 1000000)
  if cap > 0 then pct = math.max(pct, math.floor(e * 100 / cap)) elseif cap == 0 and e > 0 then pct = math.max(pct, 100) end
end
local marks = tonumber(f['a']) or 0
local crossed = {}
for i = 14, #ARGV do
  local bit = 2 ^ (i - 14)
  if pct >= tonumber(ARGV[i]) and math.floor(marks / bit) % 2 == 0 then
    marks = marks + bit
    crossed[#crossed + 1] = tonumber(ARGV[i])
  end
end
redis.call('HSET', KEYS[1], 'a', marks)
redis.call('EXPIRE', KEYS[1], ARGV[4])
local out = {used[1] + math.floor(prev[1] * carry / 1000000), used[2] + math.floor(prev[2] * carry / 1000000),
  used[3] + math.floor(prev[3] * carry / 1000000), used[4] + math.floor(prev[4] * carry / 1000000)}
for _, c in ipairs(crossed) do out[#out + 1] = c end
return out
";

// ARGV: window, carry, rolling, id. Returns used[4], reserved[4].
const VIEW: &str = r"
if ARGV[4] ~= '' then redis.call('HDEL', KEYS[1], 'r:' .. ARGV[4]) end
return {effective[1], effective[2], effective[3], effective[4], reserved[1], reserved[2], reserved[3], reserved[4]}
";

/// A Redis connection for [`QuotaLayer::with_redis`](crate::QuotaLayer::with_redis).
pub struct RedisStore {
    conn: Arc<RedisConnection>,
    timeout: Duration,
    prefix: String,
    pub(crate) on_error: OnStoreError,
    reserve: redis::Script,
    settle: redis::Script,
    view: redis::Script,
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

/// Where a budget entry lives and which period it is in.
pub(crate) struct Slot<'a> {
    pub(crate) budget: &'a str,
    pub(crate) key: &'a Key,
    pub(crate) window: Window,
    pub(crate) rolling: bool,
    /// Seconds the hash must outlive its last write: the period plus the previous bucket.
    pub(crate) ttl: u64,
}

fn caps(limits: &Limits) -> [i64; 4] {
    let c = |v: Option<u64>| v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
    [
        c(limits.input_tokens),
        c(limits.output_tokens),
        c(limits.tokens),
        c(limits.usd.map(Usd::micros)),
    ]
}

fn values(a: &Amounts) -> [u64; 4] {
    [a.input_tokens, a.output_tokens, a.tokens, a.usd.micros()]
}

fn amounts(v: &[i64]) -> Amounts {
    let g = |i: usize| u64::try_from(v.get(i).copied().unwrap_or(0)).unwrap_or(0);
    Amounts {
        input_tokens: g(0),
        output_tokens: g(1),
        tokens: g(2),
        usd: Usd::from_micros(g(3)),
    }
}

impl RedisStore {
    /// A store on a shared connection (one per server, for every store that uses it).
    pub fn with_connection(conn: Arc<RedisConnection>) -> Self {
        Self {
            conn,
            timeout: Duration::from_millis(200),
            prefix: "moat:q:".to_owned(),
            on_error: OnStoreError::default(),
            reserve: redis::Script::new(&format!("{PRELUDE}{RESERVE}")),
            settle: redis::Script::new(&format!("{PRELUDE}{SETTLE}")),
            view: redis::Script::new(&format!("{PRELUDE}{VIEW}")),
        }
    }

    /// A store at `url`, on a connection of its own. Connects on first use.
    pub fn open(url: &str) -> Result<Self, redis::RedisError> {
        Ok(Self::with_connection(Arc::new(RedisConnection::open(url)?)))
    }

    /// Prefixes every key (default `moat:q:`).
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Gives up on a call after this long (default 200 ms) and applies the failure policy.
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

    fn name(&self, slot: &Slot<'_>) -> String {
        slot.key.hash_tagged(&self.prefix, slot.budget)
    }

    fn window_args(invocation: &mut redis::ScriptInvocation<'_>, slot: &Slot<'_>) {
        invocation
            .arg(slot.window.id)
            .arg(slot.window.carry_ppm)
            .arg(if slot.rolling { "1" } else { "0" });
    }

    /// Reserves `need` if it fits: what is used and reserved with it, or the dimension, the
    /// committed amount and the need that did not fit.
    pub(crate) async fn reserve(
        &self,
        slot: &Slot<'_>,
        limits: &Limits,
        need: &Amounts,
        id: u64,
        hold: Duration,
    ) -> Result<Result<Amounts, (Dimension, u64, u64)>, StoreError> {
        let mut inv = self.reserve.key(self.name(slot));
        Self::window_args(&mut inv, slot);
        inv.arg(slot.ttl);
        for c in caps(limits) {
            inv.arg(c);
        }
        for v in values(need) {
            inv.arg(v);
        }
        inv.arg(id)
            .arg(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX));
        let reply: Vec<i64> = self.conn.run(inv, self.timeout).await?;
        if reply.first() == Some(&0) {
            return Ok(Ok(amounts(reply.get(1..).unwrap_or(&[]))));
        }
        let dim = match reply.get(1) {
            Some(1) => Dimension::InputTokens,
            Some(2) => Dimension::OutputTokens,
            Some(4) => Dimension::Usd,
            _ => Dimension::Tokens,
        };
        let g = |i: usize| u64::try_from(reply.get(i).copied().unwrap_or(0)).unwrap_or(0);
        Ok(Err((dim, g(2), g(3))))
    }

    /// Replaces reservation `id` with `used`: the period's usage after it, and the thresholds
    /// newly crossed.
    pub(crate) async fn settle(
        &self,
        slot: &Slot<'_>,
        limits: &Limits,
        used: &Amounts,
        id: u64,
        thresholds: &[u64],
    ) -> Result<(Amounts, Vec<u64>), StoreError> {
        let mut inv = self.settle.key(self.name(slot));
        Self::window_args(&mut inv, slot);
        inv.arg(slot.ttl);
        for c in caps(limits) {
            inv.arg(c);
        }
        for v in values(used) {
            inv.arg(v);
        }
        inv.arg(id);
        for t in thresholds.iter().take(32) {
            inv.arg(*t);
        }
        let reply: Vec<i64> = self.conn.run(inv, self.timeout).await?;
        let crossed = reply
            .iter()
            .skip(4)
            .filter_map(|v| u64::try_from(*v).ok())
            .collect();
        Ok((amounts(&reply), crossed))
    }

    /// The usage and reservations of a slot; with `release`, drops that reservation first.
    pub(crate) async fn view(
        &self,
        slot: &Slot<'_>,
        release: Option<u64>,
    ) -> Result<(Amounts, Amounts), StoreError> {
        let mut inv = self.view.key(self.name(slot));
        Self::window_args(&mut inv, slot);
        inv.arg(release.map(|id| id.to_string()).unwrap_or_default());
        let reply: Vec<i64> = self.conn.run(inv, self.timeout).await?;
        Ok((
            amounts(&reply[..reply.len().min(4)]),
            amounts(reply.get(4..).unwrap_or(&[])),
        ))
    }
}
