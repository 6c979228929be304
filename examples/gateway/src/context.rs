//! What every section's layer is built with: one of each, shared.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use moat::core::clock::SharedClock;
use moat::core::identity::CallerResolver;
use moat::core::store::{RedisConnection, RedisTopology};

use crate::config::ConfigError;

/// The HTTP(S) client of the gateway's side calls (budget alert webhooks, the screening
/// classifier): HTTP/1.1, Mozilla's roots.
pub(crate) type SideClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

/// A new [`SideClient`].
pub(crate) fn side_client() -> SideClient {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

/// The top level's Redis and where the file names it.
pub(crate) type DefaultRedis = Option<(RedisTopology, Range<usize>)>;

/// The build context: the caller resolver (and its fingerprinter) every layer identifies
/// callers with, the clock they read, the body limit every layer reads up to, environment lookups, and
/// one Redis connection per server, shared by every store that uses it.
pub(crate) struct Context<'a> {
    pub(crate) source: &'a str,
    pub(crate) resolver: CallerResolver,
    pub(crate) clock: SharedClock,
    pub(crate) max_body_bytes: usize,
    pub(crate) env: &'a dyn Fn(&str) -> Option<String>,
    /// The top level's `redis_url`, `redis_cluster` or `redis_sentinel`, for sections that
    /// name none of their own.
    pub(crate) default_redis: DefaultRedis,
    /// `redis_ca_file`'s certificate.
    redis_ca: Option<Vec<u8>>,
    redis: RefCell<HashMap<RedisTopology, Arc<RedisConnection>>>,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("max_body_bytes", &self.max_body_bytes)
            // Not the URLs: they may hold passwords.
            .field("redis_connections", &self.redis.borrow().len())
            .finish()
    }
}

impl<'a> Context<'a> {
    pub(crate) fn new(
        source: &'a str,
        resolver: CallerResolver,
        max_body_bytes: usize,
        env: &'a dyn Fn(&str) -> Option<String>,
        default_redis: DefaultRedis,
        redis_ca: Option<Vec<u8>>,
    ) -> Self {
        Self {
            source,
            resolver,
            clock: moat::core::clock::system(),
            max_body_bytes,
            env,
            default_redis,
            redis_ca,
            redis: RefCell::default(),
        }
    }

    /// An error at `span`, naming `key`.
    pub(crate) fn error(&self, span: Range<usize>, message: impl std::fmt::Display) -> ConfigError {
        ConfigError::at(self.source, span, message.to_string())
    }

    /// The connection to the Redis server at `url` (the top-level `redis_url` or
    /// `redis_cluster` when `url` is `None`): one per server or cluster, however many stores
    /// use it.
    pub(crate) fn redis(
        &self,
        url: Option<(&str, Range<usize>)>,
        section: &str,
        span: Range<usize>,
    ) -> Result<Arc<RedisConnection>, ConfigError> {
        let (topology, span) = match url {
            Some((url, ref span)) => (RedisTopology::Node(url.to_owned()), span.clone()),
            None => self.default_redis.clone().ok_or_else(|| {
                self.error(
                    span,
                    format!("{section}.redis_url (or a top-level redis_url, redis_cluster or redis_sentinel) is required with store = \"redis\""),
                )
            })?,
        };
        if let Some(conn) = self.redis.borrow().get(&topology) {
            return Ok(conn.clone());
        }
        let conn = RedisConnection::connect(&topology, self.redis_ca.as_deref()).map_err(|e| {
            let key = match (&topology, url) {
                (_, Some(_)) => format!("{section}.redis_url"),
                (RedisTopology::Cluster(_), None) => "redis_cluster".to_owned(),
                (RedisTopology::Sentinel { .. }, None) => "redis_sentinel".to_owned(),
                (_, None) => "redis_url".to_owned(),
            };
            self.error(span, format!("{key}: {e}"))
        })?;
        let conn = Arc::new(conn);
        self.redis.borrow_mut().insert(topology, conn.clone());
        Ok(conn)
    }

    /// The Redis connections the stores share, one per server.
    pub(crate) fn redis_connections(&self) -> Vec<Arc<RedisConnection>> {
        self.redis.borrow().values().cloned().collect()
    }
}
