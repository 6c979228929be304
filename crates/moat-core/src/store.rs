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
pub use self::redis_connection::{RedisConnection, RedisTopology};

#[cfg(feature = "redis")]
mod redis_connection {
    use std::sync::{Mutex, PoisonError};
    use std::time::{Duration, Instant};

    use redis::aio::{
        ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
    };
    use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
    use redis::{
        ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisError, RedisFuture, TlsCertificates,
    };

    use super::StoreError;

    /// Where the Redis a store talks to lives.
    #[derive(Debug, Clone, PartialEq, Eq, Hash)]
    #[non_exhaustive]
    pub enum RedisTopology {
        /// One server: `redis://[USER:PASSWORD@]HOST:PORT/DB`, `rediss://` for TLS.
        Node(String),
        /// A Redis Cluster: any of its nodes (the rest are discovered), same URL forms.
        Cluster(Vec<String>),
        /// A primary found through Sentinel.
        Sentinel {
            /// The name the sentinels monitor the primary under (`mymaster`).
            master: String,
            /// The sentinels' URLs (their own user, password and TLS).
            nodes: Vec<String>,
            /// User, password, database and TLS for the primary, as a URL whose host is only a
            /// placeholder (the sentinels name the primary): `redis://:secret@primary/0`.
            primary: String,
        },
    }

    impl RedisTopology {
        /// Whether any of its URLs is `rediss://`.
        fn uses_tls(&self) -> bool {
            let tls = |url: &String| {
                url.as_str()
                    .into_connection_info()
                    .is_ok_and(|info| matches!(info.addr, ConnectionAddr::TcpTls { .. }))
            };
            match self {
                Self::Node(url) => tls(url),
                Self::Cluster(nodes) => nodes.iter().any(tls),
                Self::Sentinel { nodes, primary, .. } => tls(primary) || nodes.iter().any(tls),
            }
        }
    }

    /// A multiplexed Redis connection, made on first use, that reconnects by itself: to one
    /// server, to a Redis Cluster (slot routing, `MOVED`/`ASK`, topology refresh by the redis
    /// crate's cluster client), or to the primary that Sentinel names (asked again whenever the
    /// primary stops answering or turns read-only, so a promoted replica takes over without a
    /// restart). One is meant to be shared (in an `Arc`) by every store talking to the same
    /// Redis; each call gives up after the timeout its store passes, whatever happens inside it
    /// (connecting included: a connection attempt itself waits at most a second).
    ///
    /// Reconnection does not stampede: one caller at a time reconnects while the others wait
    /// for its result, and after a failed attempt callers fail at once (their store's
    /// [`OnStoreError`](super::OnStoreError) applies) until a backoff of 100 ms, doubling up
    /// to 2 s, has passed.
    ///
    /// Every moat script touches the keys of one hash tag, so of one slot: in a cluster each
    /// decision runs on the one node that owns its key, and a failed node affects only the
    /// callers whose keys it owns.
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
        Sentinel(Box<SentinelTarget>),
    }

    /// The primary Sentinel named last, and the means to ask again.
    struct SentinelTarget {
        /// Held while asking: one reconnection at a time.
        resolver: tokio::sync::Mutex<Resolver>,
        current: Mutex<Option<(u64, MultiplexedConnection)>>,
    }

    struct Resolver {
        client: SentinelClient,
        generation: u64,
        failures: u32,
        retry_at: Option<Instant>,
    }

    impl std::fmt::Debug for RedisConnection {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let kind = match self.target {
                Target::Node { .. } => "node",
                Target::Cluster { .. } => "cluster",
                Target::Sentinel(_) => "sentinel",
            };
            f.debug_struct("RedisConnection")
                .field("kind", &kind)
                .field("connect_timeout", &self.connect_timeout)
                .finish()
        }
    }

    /// A connection to one server, a cluster, or Sentinel's primary (with the generation it
    /// was made in, to forget exactly that one when it fails).
    enum Connection {
        Node(ConnectionManager),
        Cluster(redis::cluster_async::ClusterConnection),
        Sentinel(u64, MultiplexedConnection),
    }

    impl ConnectionLike for Connection {
        fn req_packed_command<'a>(
            &'a mut self,
            cmd: &'a redis::Cmd,
        ) -> RedisFuture<'a, redis::Value> {
            match self {
                Self::Node(c) => c.req_packed_command(cmd),
                Self::Cluster(c) => c.req_packed_command(cmd),
                Self::Sentinel(_, c) => c.req_packed_command(cmd),
            }
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            cmd: &'a redis::Pipeline,
            offset: usize,
            count: usize,
        ) -> RedisFuture<'a, Vec<redis::Value>> {
            match self {
                Self::Node(c) => c.req_packed_commands(cmd, offset, count),
                Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
                Self::Sentinel(_, c) => c.req_packed_commands(cmd, offset, count),
            }
        }

        fn get_db(&self) -> i64 {
            match self {
                Self::Node(c) => c.get_db(),
                Self::Cluster(c) => c.get_db(),
                Self::Sentinel(_, c) => c.get_db(),
            }
        }
    }

    const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    const FIRST_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(2);

    fn certificates(root_certificate: Option<&[u8]>) -> Option<TlsCertificates> {
        root_certificate.map(|pem| TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.to_vec()),
        })
    }

    impl RedisConnection {
        /// A connection to `url` (`redis://[USER:PASSWORD@]HOST:PORT/DB`, `rediss://` for TLS).
        pub fn open(url: &str) -> Result<Self, RedisError> {
            Self::connect(&RedisTopology::Node(url.to_owned()), None)
        }

        /// A connection to the Redis Cluster that these nodes belong to (any of them will do to
        /// discover the rest; `redis://` or `rediss://`, with a user and password if the
        /// cluster wants them).
        pub fn open_cluster<S: AsRef<str>>(nodes: &[S]) -> Result<Self, RedisError> {
            let nodes = nodes.iter().map(|n| n.as_ref().to_owned()).collect();
            Self::connect(&RedisTopology::Cluster(nodes), None)
        }

        /// A connection to the primary that the sentinels at `nodes` monitor as `master`; see
        /// [`RedisTopology::Sentinel`] for `primary`.
        pub fn open_sentinel<S: AsRef<str>>(
            master: &str,
            nodes: &[S],
            primary: &str,
        ) -> Result<Self, RedisError> {
            let topology = RedisTopology::Sentinel {
                master: master.to_owned(),
                nodes: nodes.iter().map(|n| n.as_ref().to_owned()).collect(),
                primary: primary.to_owned(),
            };
            Self::connect(&topology, None)
        }

        /// A connection to `topology`; `root_certificate` (PEM) is the authority that signed
        /// the servers' TLS certificates, when it is not one the system trusts.
        pub fn connect(
            topology: &RedisTopology,
            root_certificate: Option<&[u8]>,
        ) -> Result<Self, RedisError> {
            // The authority is for `rediss://` servers; plain ones beside them (a section's own
            // `redis_url`) connect as their URLs say.
            let certs = certificates(root_certificate).filter(|_| topology.uses_tls());
            let target = match topology {
                RedisTopology::Node(url) => Target::Node {
                    client: match certs {
                        Some(certs) => redis::Client::build_with_tls(url.as_str(), certs)?,
                        None => redis::Client::open(url.as_str())?,
                    },
                    conn: tokio::sync::OnceCell::new(),
                },
                RedisTopology::Cluster(nodes) => {
                    let mut builder =
                        redis::cluster::ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                            .connection_timeout(CONNECT_TIMEOUT);
                    if let Some(certs) = certs {
                        builder = builder.certs(certs);
                    }
                    Target::Cluster {
                        client: builder.build()?,
                        conn: tokio::sync::OnceCell::new(),
                    }
                }
                RedisTopology::Sentinel {
                    master,
                    nodes,
                    primary,
                } => Target::Sentinel(Box::new(SentinelTarget {
                    resolver: tokio::sync::Mutex::new(Resolver {
                        client: sentinel_client(master, nodes, primary, certs)?,
                        generation: 0,
                        failures: 0,
                        retry_at: None,
                    }),
                    current: Mutex::new(None),
                })),
            };
            Ok(Self {
                target,
                connect_timeout: CONNECT_TIMEOUT,
            })
        }

        /// The shared connection, made on first use.
        async fn connection(&self) -> Result<Connection, RedisError> {
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
                Target::Sentinel(sentinel) => sentinel.connection(self.connect_timeout).await,
            }
        }

        /// Runs `op` on the shared connection within `timeout`; a Sentinel primary that failed
        /// (or did not answer) is forgotten, so the next call asks the sentinels again.
        async fn call<T>(
            &self,
            timeout: Duration,
            op: impl AsyncFnOnce(&mut Connection) -> Result<T, RedisError>,
        ) -> Result<T, StoreError> {
            let mut generation = None;
            let attempt = async {
                let mut conn = self.connection().await?;
                if let Connection::Sentinel(made, _) = conn {
                    generation = Some(made);
                }
                op(&mut conn).await
            };
            let outcome = tokio::time::timeout(timeout, attempt).await;
            if let (Target::Sentinel(sentinel), Some(generation)) = (&self.target, generation) {
                let lost = match &outcome {
                    Err(_) => true,
                    Ok(Err(e)) => primary_lost(e),
                    Ok(Ok(_)) => false,
                };
                if lost {
                    sentinel.forget(generation);
                }
            }
            match outcome {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(e)) => Err(StoreError::failed(e)),
                Err(_) => Err(StoreError::TimedOut { after: timeout }),
            }
        }

        /// Runs a script (`EVALSHA`, falling back to `EVAL` on `NOSCRIPT`) within `timeout`.
        pub async fn run<T: redis::FromRedisValue>(
            &self,
            invocation: redis::ScriptInvocation<'_>,
            timeout: Duration,
        ) -> Result<T, StoreError> {
            self.call(timeout, async move |conn: &mut Connection| {
                invocation.invoke_async::<T>(conn).await
            })
            .await
        }

        /// Whether the server answers a `PING` within `timeout`: for readiness checks.
        pub async fn ping(&self, timeout: Duration) -> Result<(), StoreError> {
            self.call(timeout, async |conn: &mut Connection| {
                redis::cmd("PING").query_async::<()>(conn).await
            })
            .await
        }
    }

    /// Whether `error` means the primary is gone or is no longer the primary.
    fn primary_lost(error: &RedisError) -> bool {
        error.is_unrecoverable_error()
            || error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || matches!(error.kind(), ErrorKind::ReadOnly | ErrorKind::MasterDown)
    }

    fn sentinel_client(
        master: &str,
        nodes: &[String],
        primary: &str,
        certs: Option<TlsCertificates>,
    ) -> Result<SentinelClient, RedisError> {
        let sentinels = nodes
            .iter()
            .map(|n| n.as_str().into_connection_info())
            .collect::<Result<Vec<_>, _>>()?;
        let primary = primary.into_connection_info()?;
        let mut builder = SentinelClientBuilder::new(
            sentinels.iter().map(|s| s.addr.clone()),
            master.to_owned(),
            SentinelServerType::Master,
        )?
        .set_client_to_redis_db(primary.redis.db);
        // Sentinels share one user and password (the first URL's), as Sentinel deployments do.
        if let Some(first) = sentinels.first() {
            if let Some(user) = &first.redis.username {
                builder = builder.set_client_to_sentinel_username(user.clone());
            }
            if let Some(password) = &first.redis.password {
                builder = builder.set_client_to_sentinel_password(password.clone());
            }
            if let ConnectionAddr::TcpTls { insecure, .. } = first.addr {
                builder = builder.set_client_to_sentinel_tls_mode(tls_mode(insecure));
            }
        }
        if let Some(user) = primary.redis.username {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = primary.redis.password {
            builder = builder.set_client_to_redis_password(password);
        }
        if let ConnectionAddr::TcpTls { insecure, .. } = primary.addr {
            builder = builder.set_client_to_redis_tls_mode(tls_mode(insecure));
        }
        if let Some(certs) = certs {
            builder = builder
                .set_client_to_sentinel_certificates(certs.clone())
                .set_client_to_redis_certificates(certs);
        }
        builder.build()
    }

    fn tls_mode(insecure: bool) -> redis::TlsMode {
        if insecure {
            redis::TlsMode::Insecure
        } else {
            redis::TlsMode::Secure
        }
    }

    impl SentinelTarget {
        fn current(&self) -> Option<Connection> {
            let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            current
                .as_ref()
                .map(|(generation, conn)| Connection::Sentinel(*generation, conn.clone()))
        }

        /// The primary's connection: the one made last, else a new one (one caller at a time
        /// makes it; the rest wait and share it).
        async fn connection(&self, connect_timeout: Duration) -> Result<Connection, RedisError> {
            if let Some(conn) = self.current() {
                return Ok(conn);
            }
            let mut resolver = self.resolver.lock().await;
            if let Some(conn) = self.current() {
                return Ok(conn);
            }
            if resolver.retry_at.is_some_and(|at| Instant::now() < at) {
                return Err(RedisError::from((
                    ErrorKind::MasterDown,
                    "no primary from the sentinels yet; backing off",
                )));
            }
            let config =
                redis::AsyncConnectionConfig::new().set_connection_timeout(connect_timeout);
            let made = async {
                resolver
                    .client
                    .async_get_client()
                    .await?
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
            }
            .await;
            match made {
                Ok(conn) => {
                    resolver.generation += 1;
                    resolver.failures = 0;
                    resolver.retry_at = None;
                    let generation = resolver.generation;
                    *self.current.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some((generation, conn.clone()));
                    Ok(Connection::Sentinel(generation, conn))
                }
                Err(e) => {
                    let backoff = FIRST_BACKOFF
                        .saturating_mul(1 << resolver.failures.min(5))
                        .min(MAX_BACKOFF);
                    resolver.failures += 1;
                    resolver.retry_at = Some(Instant::now() + backoff);
                    Err(e)
                }
            }
        }

        /// Forgets the connection made in `generation` (not a newer one another caller made).
        fn forget(&self, generation: u64) {
            let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            if current
                .as_ref()
                .is_some_and(|(made, _)| *made == generation)
            {
                *current = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::KeyKind;

    #[cfg(feature = "redis")]
    #[test]
    fn an_authority_applies_to_tls_servers_only() {
        use super::{RedisConnection, RedisTopology};
        let pem = b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n";
        let plain = RedisTopology::Node("redis://127.0.0.1:6379".to_owned());
        assert!(RedisConnection::connect(&plain, Some(pem)).is_ok());
        let cluster = RedisTopology::Cluster(vec!["redis://127.0.0.1:7000".to_owned()]);
        assert!(RedisConnection::connect(&cluster, Some(pem)).is_ok());
        let sentinel = RedisTopology::Sentinel {
            master: "mymaster".to_owned(),
            nodes: vec!["redis://127.0.0.1:26379".to_owned()],
            primary: "redis://primary/0".to_owned(),
        };
        assert!(RedisConnection::connect(&sentinel, Some(pem)).is_ok());
        // A TLS server does get the authority (this one is not a certificate at all).
        let tls = RedisTopology::Node("rediss://127.0.0.1:6380".to_owned());
        assert!(RedisConnection::connect(&tls, Some(pem)).is_err());
    }

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
