//! The exact query cache of the two hot reads: a page of a creator's
//! clusters (`GET /v1/creators/{id}/clusters`) and a cluster with a page of
//! its messages (`GET /v1/clusters/{id}`). A bounded in-process LRU always
//! (when `cache.max_entries` > 0), in front of Redis when `redis.url` is
//! set, which every instance shares.
//!
//! Exactness: an entry's key holds the creator's `last_event_id` of the
//! state the answer shows (see [`crate::operations`]), and every
//! change to a creator's clusters appends an event, bumping it, in the
//! transaction that makes the change. A reader first reads the creator's
//! current `last_event_id` (on the primary), then looks up the key for it:
//! once a write is committed (and so before any client is answered for it)
//! every key of an older state is unreachable. Nothing is ever invalidated;
//! unreachable entries leave by LRU order and by their TTL
//! (`cache.ttl_secs`, Redis `EX`).
//!
//! The key also holds a namespace naming the database (PostgreSQL's system
//! identifier, the database's oid and the timeline, read at start) and this
//! build's version, so that two deployments (or two test databases) sharing
//! one Redis never read each other's answers, nor a new build an old
//! build's. The rest of the key is the request's parameters; the whole is
//! hashed (SHA-256) into a fixed-length Redis key `clusterd:q:<hex>`.
//!
//! Writes to Redis go behind the answer (`cache.write_behind`): a spawned
//! task does the `SET`, at most [`MAX_PENDING_WRITES`] at a time (beyond,
//! the write is dropped: a later miss writes it). This stays exact, since
//! the key, not the time of the write, names the state the body shows; a
//! reader on another instance that comes before the write lands misses.
//!
//! Values are the exact JSON body that was answered. Redis failures and
//! slow answers are misses, never errors: after a failure Redis is left
//! alone for [`REDIS_BACKOFF`](crate::redis_link::REDIS_BACKOFF), then tried again, so an outage costs the
//! shared tier only and the cache comes back with Redis by itself.

use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use deadpool_redis::redis;
use lru::LruCache;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::{
    metrics::Metrics,
    redis_link::{LinkError, RedisLink},
    settings::{QueryCacheSettings, RedisSettings},
};

const REDIS_PREFIX: &str = "clusterd:q:";

/// Redis writes in flight at most, with `cache.write_behind`.
pub const MAX_PENDING_WRITES: usize = 64;

/// A cached route, as `clusterd_query_cache_total{route}` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    List,
    Detail,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Self::List => "list",
            Self::Detail => "detail",
        }
    }
}

/// A cache key: SHA-256 of the namespace, the route, the creator, its
/// `last_event_id` and the request's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key([u8; 32]);

impl Key {
    fn redis(&self) -> String {
        format!("{REDIS_PREFIX}{}", hex::encode(self.0))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueryCacheError {
    #[error("invalid redis.url: {0}")]
    Config(#[from] deadpool_redis::CreatePoolError),
}

struct Entry {
    body: Arc<str>,
    expires: Instant,
}

struct Memory {
    entries: LruCache<Key, Entry>,
    /// Sum of the bodies' lengths, kept under `max_bytes`.
    bytes: usize,
    max_bytes: usize,
}

/// One per application; shared by the handlers.
pub struct QueryCache {
    enabled: bool,
    namespace: String,
    ttl: Duration,
    memory: Option<Mutex<Memory>>,
    redis: Option<Arc<RedisLink>>,
    /// Write-behind permits (`None`: writes are awaited).
    writes: Option<Arc<Semaphore>>,
    metrics: Arc<Metrics>,
}

impl QueryCache {
    /// Builds the cache for the database named by `namespace` (see
    /// [`crate::repository::Repository::cache_namespace`]); no connection
    /// is made here (Redis down at start is an outage like any other).
    pub fn new(
        settings: &QueryCacheSettings,
        redis: &RedisSettings,
        namespace: String,
        metrics: Arc<Metrics>,
    ) -> Result<Self, QueryCacheError> {
        let memory = NonZeroUsize::new(settings.max_entries)
            .filter(|_| settings.enabled)
            .map(|n| Mutex::new(Memory { entries: LruCache::new(n), bytes: 0, max_bytes: settings.max_memory_bytes }));
        let redis = match &redis.url {
            Some(url) if settings.enabled && !url.expose_secret().is_empty() => Some(Arc::new(RedisLink::new(
                url.expose_secret(),
                redis.pool_size,
                Duration::from_millis(settings.redis_timeout_ms),
            )?)),
            _ => None,
        };
        Ok(Self {
            enabled: settings.enabled,
            namespace: format!("{namespace}/{}", env!("CARGO_PKG_VERSION")),
            ttl: Duration::from_secs(settings.ttl_secs.max(1)),
            memory,
            redis,
            writes: settings.write_behind.then(|| Arc::new(Semaphore::new(MAX_PENDING_WRITES))),
            metrics,
        })
    }

    /// Whether answers are cached at all (`cache.enabled`).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn has_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// The key of `route` for `creator_id` at `last_event_id`, with the
    /// request's parameters in `parts` (each separated, so no two lists of
    /// parts make one key).
    pub fn key(&self, route: Route, creator_id: &str, last_event_id: i64, parts: &[&str]) -> Key {
        let mut hasher = Sha256::new();
        for part in [self.namespace.as_str(), route.name(), creator_id, &last_event_id.to_string()]
            .into_iter()
            .chain(parts.iter().copied())
        {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        Key(hasher.finalize().into())
    }

    /// The body cached under `key`: the in-process LRU, then Redis (a Redis
    /// hit is kept in process too). Counts a hit or a miss for `route`.
    pub async fn get(&self, route: Route, key: &Key) -> Option<Arc<str>> {
        let found = match self.get_memory(key) {
            Some(body) => Some(body),
            None => match self.get_redis(key).await {
                Some(body) => {
                    self.put_memory(*key, body.clone());
                    Some(body)
                }
                None => None,
            },
        };
        let result = if found.is_some() { "hit" } else { "miss" };
        self.metrics.query_cache.with_label_values(&[route.name(), result]).inc();
        found
    }

    /// Keeps `body` under `key`, in process and in Redis, for
    /// `cache.ttl_secs`; with `cache.write_behind` the Redis write is left to
    /// a spawned task and this returns at once.
    pub async fn put(&self, key: Key, body: Arc<str>) {
        if !self.enabled {
            return;
        }
        self.put_memory(key, body.clone());
        let Some(redis) = &self.redis else { return };
        let ttl = self.ttl.as_secs();
        let Some(writes) = &self.writes else {
            store(redis, &self.metrics, key, body, ttl).await;
            return;
        };
        match writes.clone().try_acquire_owned() {
            Ok(permit) => {
                let (redis, metrics) = (redis.clone(), self.metrics.clone());
                tokio::spawn(async move {
                    store(&redis, &metrics, key, body, ttl).await;
                    drop(permit);
                });
            }
            Err(_) => self.metrics.query_cache_writes.with_label_values(&["dropped"]).inc(),
        }
    }

    fn get_memory(&self, key: &Key) -> Option<Arc<str>> {
        let mut memory = self.memory.as_ref()?.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match memory.entries.get(key) {
            Some(entry) if entry.expires > Instant::now() => Some(entry.body.clone()),
            Some(_) => {
                if let Some(expired) = memory.entries.pop(key) {
                    memory.bytes -= expired.body.len();
                }
                None
            }
            None => None,
        }
    }

    fn put_memory(&self, key: Key, body: Arc<str>) {
        let Some(memory) = &self.memory else { return };
        let mut memory = memory.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if body.len() > memory.max_bytes {
            return;
        }
        memory.bytes += body.len();
        let entry = Entry { body, expires: Instant::now() + self.ttl };
        if let Some((_, replaced)) = memory.entries.push(key, entry) {
            // The entry pushed out (least recent, or the old value of this key).
            memory.bytes -= replaced.body.len();
        }
        while memory.bytes > memory.max_bytes {
            match memory.entries.pop_lru() {
                Some((_, evicted)) => memory.bytes -= evicted.body.len(),
                None => break,
            }
        }
    }

    async fn get_redis(&self, key: &Key) -> Option<Arc<str>> {
        let redis = self.redis.as_ref()?;
        let name = key.redis();
        let value: Result<Option<Vec<u8>>, LinkError> =
            redis.run(|mut conn| async move { redis::cmd("GET").arg(name).query_async(&mut conn).await }).await;
        match value {
            Ok(value) => value.and_then(|bytes| String::from_utf8(bytes).ok()).map(Arc::from),
            Err(error) => {
                redis_failed(&self.metrics, &error);
                None
            }
        }
    }
}

/// `SET key body EX ttl`, counted in `clusterd_query_cache_writes_total`.
async fn store(redis: &RedisLink, metrics: &Metrics, key: Key, body: Arc<str>, ttl: u64) {
    let stored = redis
        .run(|mut conn| async move {
            redis::cmd("SET")
                .arg(key.redis())
                .arg(body.as_bytes())
                .arg("EX")
                .arg(ttl)
                .query_async::<()>(&mut conn)
                .await
        })
        .await;
    let result = match stored {
        Ok(()) => "stored",
        Err(error) => {
            redis_failed(metrics, &error);
            "failed"
        }
    };
    metrics.query_cache_writes.with_label_values(&[result]).inc();
}

fn redis_failed(metrics: &Metrics, error: &LinkError) {
    if !matches!(error, LinkError::Resting) {
        tracing::debug!(%error, "query cache: Redis failed; in-process only for now");
        metrics.query_cache_errors.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max_entries: usize, max_memory_bytes: usize) -> QueryCache {
        let settings = QueryCacheSettings {
            enabled: true,
            ttl_secs: 60,
            max_entries,
            max_memory_bytes,
            redis_timeout_ms: 1,
            write_behind: true,
        };
        QueryCache::new(&settings, &RedisSettings::default(), "db".into(), Arc::new(Metrics::new()))
            .expect("no redis to configure")
    }

    #[test]
    fn keys_differ_by_every_part_and_cannot_be_spliced() {
        let c = cache(4, 1 << 20);
        let base = c.key(Route::List, "alice", 7, &["open", "recent"]);
        assert_eq!(base, c.key(Route::List, "alice", 7, &["open", "recent"]));
        assert_ne!(base, c.key(Route::List, "alice", 8, &["open", "recent"]), "a new event, a new key");
        assert_ne!(base, c.key(Route::Detail, "alice", 7, &["open", "recent"]));
        assert_ne!(base, c.key(Route::List, "bob", 7, &["open", "recent"]));
        assert_ne!(base, c.key(Route::List, "alice", 7, &["openrecent"]));
        assert_ne!(base, c.key(Route::List, "alice", 7, &["open", "", "recent"]));
        let other_db = QueryCache::new(
            &QueryCacheSettings {
                enabled: true,
                ttl_secs: 60,
                max_entries: 4,
                max_memory_bytes: 1,
                redis_timeout_ms: 1,
                write_behind: true,
            },
            &RedisSettings::default(),
            "another db".into(),
            Arc::new(Metrics::new()),
        )
        .expect("no redis");
        assert_ne!(base, other_db.key(Route::List, "alice", 7, &["open", "recent"]), "databases never share keys");
        assert!(base.redis().starts_with(REDIS_PREFIX) && base.redis().len() == REDIS_PREFIX.len() + 64);
    }

    #[actix_web::test]
    async fn memory_is_bounded_by_entries_and_bytes() {
        let c = cache(2, 10);
        let (a, b, d) =
            (c.key(Route::List, "a", 1, &[]), c.key(Route::List, "b", 1, &[]), c.key(Route::List, "d", 1, &[]));
        c.put(a, "aaaa".into()).await;
        c.put(b, "bbbb".into()).await;
        assert!(c.get(Route::List, &a).await.is_some(), "a is now the most recent");
        c.put(d, "dd".into()).await;
        assert!(c.get(Route::List, &b).await.is_none(), "two entries at most: b went");
        assert_eq!(c.get(Route::List, &a).await.as_deref(), Some("aaaa"));
        c.put(b, "bbbbbbbb".into()).await;
        assert!(c.get(Route::List, &d).await.is_none() && c.get(Route::List, &a).await.is_none(), "10 bytes at most");
        assert_eq!(c.get(Route::List, &b).await.as_deref(), Some("bbbbbbbb"));
        c.put(a, "more than ten bytes".into()).await;
        assert!(c.get(Route::List, &a).await.is_none(), "a body larger than the bound is not kept");
    }

    #[actix_web::test]
    async fn a_disabled_cache_keeps_nothing() {
        let settings = QueryCacheSettings {
            enabled: false,
            ttl_secs: 60,
            max_entries: 10,
            max_memory_bytes: 100,
            redis_timeout_ms: 1,
            write_behind: true,
        };
        let c = QueryCache::new(&settings, &RedisSettings::default(), "db".into(), Arc::new(Metrics::new()))
            .expect("no redis");
        let k = c.key(Route::Detail, "a", 1, &[]);
        c.put(k, "x".into()).await;
        assert!(!c.enabled() && c.get(Route::Detail, &k).await.is_none());
    }
}
