//! What stores have in common: seeded key ids for in-memory maps, the policy when a shared store
//! fails, and (feature `redis`) a Redis
//! connection that connects on first use, reconnects by itself and answers within a timeout.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};

use crate::identity::Key;

/// What to do when a shared store cannot be reached in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OnStoreError {
    /// Refuse the request with 503 (the safe default for cost control).
    #[default]
    FailClosed,
    /// Let the request through, uncounted.
    FailOpen,
    /// Decide with this process's memory instead.
    Local,
}

/// A [`Hasher`] for maps keyed by [`KeyHasher`] ids: the id is already a seeded hash, so it
/// passes straight through (`HashMap<u64, V, BuildHasherDefault<PassThrough>>`).
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Seeded hashing of [`Key`]s into the 64-bit ids in-memory stores index by: a few ns, where
/// [`Key::digest`] (for shared stores, the same in every process) costs a SHA-256. The seed is
/// random per hasher, so ids cannot be aimed at one shard. Two keys share an id with
/// probability 2⁻⁶⁴.
///
/// Hashbrown indexes by an id's low bits and tags by its top 7: shard by the bits in between
/// (`(id >> 32) % shards`).
#[derive(Debug, Clone, Copy)]
pub struct KeyHasher {
    seed: [u64; 3],
}

fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl KeyHasher {
    /// A hasher with a random per-process seed, so ids cannot be aimed at one shard.
    pub fn random() -> Self {
        let state = RandomState::new();
        let mut seed = [0; 3];
        for (i, s) in seed.iter_mut().enumerate() {
            let mut h = state.build_hasher();
            h.write_usize(i);
            *s = h.finish() | 1;
        }
        Self { seed }
    }

    /// The id of `key`.
    pub fn hash(&self, key: &Key) -> u64 {
        let id = key.id();
        let lo = u64::from_le_bytes(id[..8].try_into().expect("8 bytes"));
        let hi = u64::from_le_bytes(id[8..].try_into().expect("8 bytes"));
        let kind = key.kind() as u64;
        let h = fold(lo ^ self.seed[0], hi ^ self.seed[1].rotate_left(17) ^ kind);
        fold(h ^ self.seed[2], 0x9E37_79B9_7F4A_7C15)
    }
}

/// A shared store failed or did not answer in time.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// No answer within the timeout.
    TimedOut {
        /// The timeout.
        after: std::time::Duration,
    },
    /// The store answered with an error, or could not be reached.
    Failed {
        /// What went wrong.
        message: String,
    },
}

impl StoreError {
    /// A failure, described.
    pub fn failed(message: impl fmt::Display) -> Self {
        Self::Failed {
            message: message.to_string(),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TimedOut { after } => write!(f, "no answer within {after:?}"),
            Self::Failed { message } => f.write_str(message),
        }
    }
}

impl std::error::Error for StoreError {}

#[cfg(feature = "redis")]
pub use self::redis_connection::RedisConnection;

#[cfg(feature = "redis")]
mod redis_connection {
    use std::time::Duration;

    use redis::aio::{ConnectionManager, ConnectionManagerConfig};

    use super::StoreError;

    /// A multiplexed Redis connection, made on first use, that reconnects by itself: to one
    /// server, or to a Redis Cluster (slot routing, `MOVED`/`ASK`, topology refresh by the
    /// redis crate's cluster client). One is meant to be shared (in an `Arc`) by every store
    /// talking to the same server or cluster; each call gives up after the timeout its store
    /// passes, whatever happens inside it (connecting included: a connection attempt itself
    /// waits at most a second, retried once).
    ///
    /// Every moat script touches the keys of one hash tag, so of one slot: in a cluster each
    /// decision runs on the one node that owns its key.
    pub struct RedisConnection {
        target: Target,
        connect_timeout: Duration,
    }

    enum Target {
        Node {
            client: redis::Client,
            conn: tokio::sync::OnceCell<ConnectionManager>,
        },
        Cluster {
            client: redis::cluster::ClusterClient,
            conn: tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>,
        },
    }

    impl std::fmt::Debug for RedisConnection {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let kind = match self.target {
                Target::Node { .. } => "node",
                Target::Cluster { .. } => "cluster",
            };
            f.debug_struct("RedisConnection")
                .field("kind", &kind)
                .field("connect_timeout", &self.connect_timeout)
                .finish()
        }
    }

    /// A connection to one server or a cluster, made on first use.
    enum Connection {
        Node(ConnectionManager),
        Cluster(redis::cluster_async::ClusterConnection),
    }

    impl RedisConnection {
        /// A connection to `url` (`redis://HOST:PORT/DB`, `rediss://` for TLS).
        pub fn open(url: &str) -> Result<Self, redis::RedisError> {
            Ok(Self {
                target: Target::Node {
                    client: redis::Client::open(url)?,
                    conn: tokio::sync::OnceCell::new(),
                },
                connect_timeout: Duration::from_secs(1),
            })
        }

        /// A connection to the Redis Cluster that these nodes belong to (any of them will do to
        /// discover the rest; `redis://` or `rediss://`, with a user and password if the
        /// cluster wants them).
        pub fn open_cluster<S: AsRef<str>>(nodes: &[S]) -> Result<Self, redis::RedisError> {
            let connect_timeout = Duration::from_secs(1);
            let nodes: Vec<&str> = nodes.iter().map(AsRef::as_ref).collect();
            let client = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(connect_timeout)
                .build()?;
            Ok(Self {
                target: Target::Cluster {
                    client,
                    conn: tokio::sync::OnceCell::new(),
                },
                connect_timeout,
            })
        }

        /// The shared connection, made on first use.
        async fn connection(&self) -> Result<Connection, redis::RedisError> {
            match &self.target {
                Target::Node { client, conn } => {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(self.connect_timeout)
                        .set_number_of_retries(1);
                    Ok(Connection::Node(
                        conn.get_or_try_init(|| {
                            ConnectionManager::new_with_config(client.clone(), config)
                        })
                        .await?
                        .clone(),
                    ))
                }
                Target::Cluster { client, conn } => Ok(Connection::Cluster(
                    conn.get_or_try_init(|| client.get_async_connection())
                        .await?
                        .clone(),
                )),
            }
        }

        /// Runs a script (`EVALSHA`, falling back to `EVAL` on `NOSCRIPT`) within `timeout`.
        pub async fn run<T: redis::FromRedisValue>(
            &self,
            invocation: redis::ScriptInvocation<'_>,
            timeout: Duration,
        ) -> Result<T, StoreError> {
            let call = async {
                match self.connection().await? {
                    Connection::Node(mut conn) => invocation.invoke_async::<T>(&mut conn).await,
                    Connection::Cluster(mut conn) => invocation.invoke_async::<T>(&mut conn).await,
                }
            };
            within(timeout, call).await
        }

        /// Whether the server answers a `PING` within `timeout`: for readiness checks.
        pub async fn ping(&self, timeout: Duration) -> Result<(), StoreError> {
            let call = async {
                match self.connection().await? {
                    Connection::Node(mut conn) => {
                        redis::cmd("PING").query_async::<()>(&mut conn).await
                    }
                    Connection::Cluster(mut conn) => {
                        redis::cmd("PING").query_async::<()>(&mut conn).await
                    }
                }
            };
            within(timeout, call).await
        }
    }

    async fn within<T>(
        timeout: Duration,
        call: impl std::future::Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StoreError::failed(e)),
            Err(_) => Err(StoreError::TimedOut { after: timeout }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::KeyKind;

    #[test]
    fn key_hashes_separate_kinds_and_spread_over_shards() {
        let h = KeyHasher::random();
        let a = Key::new(KeyKind::ApiKey, [1; 16]);
        let b = Key::new(KeyKind::Header, [1; 16]);
        assert_ne!(h.hash(&a), h.hash(&b));
        const SHARDS: usize = 64;
        let mut seen = [0usize; SHARDS];
        for i in 0..6400u32 {
            let ip = std::net::Ipv4Addr::from(0x0A00_0000 + i);
            seen[(h.hash(&Key::ip(ip.into())) >> 32) as usize % SHARDS] += 1;
        }
        assert!(
            seen.iter().all(|&n| n > 50),
            "sequential IPs spread evenly: {seen:?}"
        );
    }
}
