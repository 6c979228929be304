//! What shared stores have in common: the policy when they fail, and (feature `redis`) a Redis
//! connection that connects on first use, reconnects by itself and answers within a timeout.

use std::fmt;

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

    /// A multiplexed Redis connection, made on first use, that reconnects by itself. One is
    /// meant to be shared (in an `Arc`) by every store talking to the same server; each call
    /// gives up after the timeout its store passes.
    pub struct RedisConnection {
        client: redis::Client,
        conn: tokio::sync::OnceCell<ConnectionManager>,
        connect_timeout: Duration,
    }

    impl std::fmt::Debug for RedisConnection {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RedisConnection")
                .field("connect_timeout", &self.connect_timeout)
                .finish()
        }
    }

    impl RedisConnection {
        /// A connection to `url` (`redis://HOST:PORT/DB`, `rediss://` for TLS).
        pub fn open(url: &str) -> Result<Self, redis::RedisError> {
            Ok(Self {
                client: redis::Client::open(url)?,
                conn: tokio::sync::OnceCell::new(),
                connect_timeout: Duration::from_secs(1),
            })
        }

        /// Runs a script (`EVALSHA`, falling back to `EVAL` on `NOSCRIPT`) within `timeout`.
        pub async fn run<T: redis::FromRedisValue>(
            &self,
            invocation: redis::ScriptInvocation<'_>,
            timeout: Duration,
        ) -> Result<T, StoreError> {
            let call = async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(self.connect_timeout)
                    .set_number_of_retries(1);
                let mut conn = self
                    .conn
                    .get_or_try_init(|| {
                        ConnectionManager::new_with_config(self.client.clone(), config)
                    })
                    .await?
                    .clone();
                invocation.invoke_async::<T>(&mut conn).await
            };
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(e)) => Err(StoreError::failed(e)),
                Err(_) => Err(StoreError::TimedOut { after: timeout }),
            }
        }
    }
}
