//! A pooled Redis link that never holds a caller up: each round trip has a
//! timeout, and after any failure the link rests for [`REDIS_BACKOFF`]
//! (calls fail at once with [`LinkError::Resting`]) before it is tried
//! again. The embedding cache, the query cache and the shared rate limit
//! use it; each decides what a failure means for it (a miss, or the
//! in-process limiter).

use std::{
    future::Future,
    sync::Mutex,
    time::{Duration, Instant},
};

use deadpool_redis::{Pool, Runtime, redis};

/// How long Redis is left alone after a failure.
pub const REDIS_BACKOFF: Duration = Duration::from_secs(1);

/// Why a round trip was skipped or failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("redis is resting after a failure")]
    Resting,
    #[error("{0}")]
    Pool(#[from] deadpool_redis::PoolError),
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

pub struct RedisLink {
    pool: Pool,
    timeout: Duration,
    resting_until: Mutex<Option<Instant>>,
}

impl RedisLink {
    /// A pool of `pool_size` connections to `url`; no connection is made
    /// here (Redis down at start is an outage like any other).
    pub fn new(url: &str, pool_size: usize, timeout: Duration) -> Result<Self, deadpool_redis::CreatePoolError> {
        let mut config = deadpool_redis::Config::from_url(url);
        config.pool = Some(deadpool_redis::PoolConfig::new(pool_size.max(1)));
        Ok(Self {
            pool: config.create_pool(Some(Runtime::Tokio1))?,
            timeout: timeout.max(Duration::from_millis(1)),
            resting_until: Mutex::new(None),
        })
    }

    fn resting(&self) -> bool {
        let until = self.resting_until.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        until.is_some_and(|until| Instant::now() < until)
    }

    fn rest(&self) {
        *self.resting_until.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) =
            Some(Instant::now() + REDIS_BACKOFF);
    }

    /// Runs one round trip on a pooled connection within the timeout; a
    /// failure sends the link to rest.
    pub async fn run<T, F, Fut>(&self, call: F) -> Result<T, LinkError>
    where
        F: FnOnce(deadpool_redis::Connection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if self.resting() {
            return Err(LinkError::Resting);
        }
        let result = tokio::time::timeout(self.timeout, async { Ok(call(self.pool.get().await?).await?) })
            .await
            .unwrap_or(Err(LinkError::TimedOut(self.timeout)));
        if result.is_err() {
            self.rest();
        }
        result
    }
}
