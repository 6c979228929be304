//! What every section's layer is built with: one of each, shared.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use moat::core::clock::SharedClock;
use moat::core::identity::CallerResolver;
use moat::core::store::RedisConnection;

use crate::config::ConfigError;

/// The build context: the caller resolver (and its fingerprinter) every layer identifies
/// callers with, the clock they read, the body limit every layer reads up to, environment lookups, and
/// one Redis connection per server, shared by every store that uses it.
pub(crate) struct Context<'a> {
    pub(crate) source: &'a str,
    pub(crate) resolver: CallerResolver,
    pub(crate) clock: SharedClock,
    pub(crate) max_body_bytes: usize,
    pub(crate) env: &'a dyn Fn(&str) -> Option<String>,
    /// The URL of `redis_url` at the top level, for sections that name none of their own.
    pub(crate) default_redis: Option<(String, Range<usize>)>,
    redis: RefCell<HashMap<String, Arc<RedisConnection>>>,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("max_body_bytes", &self.max_body_bytes)
            .field("redis", &self.redis.borrow().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl<'a> Context<'a> {
    pub(crate) fn new(
        source: &'a str,
        resolver: CallerResolver,
        max_body_bytes: usize,
        env: &'a dyn Fn(&str) -> Option<String>,
        default_redis: Option<(String, Range<usize>)>,
    ) -> Self {
        Self {
            source,
            resolver,
            clock: moat::core::clock::system(),
            max_body_bytes,
            env,
            default_redis,
            redis: RefCell::default(),
        }
    }

    /// An error at `span`, naming `key`.
    pub(crate) fn error(&self, span: Range<usize>, message: impl std::fmt::Display) -> ConfigError {
        ConfigError::at(self.source, span, message.to_string())
    }

    /// The connection to the Redis server at `url` (the top-level `redis_url` when `url` is
    /// `None`): one per server, however many stores use it.
    pub(crate) fn redis(
        &self,
        url: Option<(&str, Range<usize>)>,
        section: &str,
        span: Range<usize>,
    ) -> Result<Arc<RedisConnection>, ConfigError> {
        let (url, span) = match url {
            Some((url, span)) => (url.to_owned(), span),
            None => self.default_redis.clone().ok_or_else(|| {
                self.error(
                    span,
                    format!("{section}.redis_url (or a top-level redis_url) is required with store = \"redis\""),
                )
            })?,
        };
        if let Some(conn) = self.redis.borrow().get(&url) {
            return Ok(conn.clone());
        }
        let conn = Arc::new(
            RedisConnection::open(&url)
                .map_err(|e| self.error(span, format!("{section}.redis_url: {e}")))?,
        );
        self.redis.borrow_mut().insert(url, conn.clone());
        Ok(conn)
    }

    /// The Redis connections the stores share, one per server.
    pub(crate) fn redis_connections(&self) -> Vec<Arc<RedisConnection>> {
        self.redis.borrow().values().cloned().collect()
    }
}
