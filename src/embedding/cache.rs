//! The embedding cache: a bounded in-process LRU always, in front of Redis
//! when one is configured (shared by every instance, entries expire after a
//! TTL).
//!
//! The key is the SHA-256 of the model's name and the normalised text (case
//! and runs of whitespace folded, as for exact duplicates), so one model
//! never reads another's vectors and "How much?" and "how  much?" share an
//! entry. Redis stores a vector as its little-endian `f32` bytes; a value of
//! the wrong length is a miss. Redis failures and slow answers are misses,
//! never errors: after a failure Redis is skipped for a while
//! ([`crate::redis_link`]) so that an outage does not cost every batch a
//! timeout.

use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex},
    time::Duration,
};

use deadpool_redis::redis;
use lru::LruCache;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use crate::{
    domain::text::normalise,
    redis_link::{LinkError, RedisLink},
    settings::{EmbedCacheSettings, RedisSettings},
};

/// A cache key: SHA-256 of the model's name and the normalised text.
pub type Key = [u8; 32];

const REDIS_PREFIX: &str = "clusterd:emb:";

pub fn key(model: &str, text: &str) -> Key {
    let mut hasher = Sha256::new();
    hasher.update(model.as_bytes());
    hasher.update([0]);
    hasher.update(normalise(text).as_bytes());
    hasher.finalize().into()
}

pub struct EmbedCache {
    memory: Option<Mutex<LruCache<Key, Arc<[f32]>>>>,
    redis: Option<RedisCache>,
}

struct RedisCache {
    link: RedisLink,
    ttl_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("invalid redis.url: {0}")]
    Config(#[from] deadpool_redis::CreatePoolError),
}

/// Why a Redis round trip was skipped or failed; every key of it is then a
/// miss (logged and counted by the embedder, never returned to a client).
#[derive(Debug, thiserror::Error)]
pub enum RedisMiss {
    #[error("no redis")]
    NotConfigured,
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("MGET answered {got} values for {keys} keys")]
    Count { got: usize, keys: usize },
}

impl EmbedCache {
    /// Builds the cache; no connection is made here (Redis being down at
    /// start is an outage like any other, not a configuration error).
    pub fn new(settings: &EmbedCacheSettings, redis: &RedisSettings) -> Result<Self, CacheError> {
        let memory = NonZeroUsize::new(settings.memory_entries).map(|n| Mutex::new(LruCache::new(n)));
        let redis = match &redis.url {
            Some(url) if !url.expose_secret().is_empty() => Some(RedisCache {
                link: RedisLink::new(
                    url.expose_secret(),
                    redis.pool_size,
                    Duration::from_millis(settings.redis_timeout_ms),
                )?,
                ttl_secs: settings.redis_ttl_secs.max(1),
            }),
            _ => None,
        };
        Ok(Self { memory, redis })
    }

    pub fn has_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// In-process lookups, one per key.
    pub fn get_memory(&self, keys: &[Key]) -> Vec<Option<Arc<[f32]>>> {
        let Some(memory) = &self.memory else { return vec![None; keys.len()] };
        let mut memory = memory.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        keys.iter().map(|k| memory.get(k).cloned()).collect()
    }

    pub fn put_memory(&self, entries: &[(Key, Arc<[f32]>)]) {
        let Some(memory) = &self.memory else { return };
        let mut memory = memory.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (key, vector) in entries {
            memory.put(*key, vector.clone());
        }
    }

    /// Redis lookups, one per key, in one round trip; `Err` when Redis is
    /// not configured, resting, failing or slow (every key is then a miss).
    pub async fn get_redis(&self, keys: &[Key], dimensions: usize) -> Result<Vec<Option<Arc<[f32]>>>, RedisMiss> {
        let redis = self.redis.as_ref().ok_or(RedisMiss::NotConfigured)?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for key in keys {
            cmd.arg(redis_key(key));
        }
        let values: Vec<Option<Vec<u8>>> =
            redis.link.run(|mut conn| async move { cmd.query_async(&mut conn).await }).await?;
        if values.len() != keys.len() {
            return Err(RedisMiss::Count { got: values.len(), keys: keys.len() });
        }
        Ok(values.into_iter().map(|v| v.and_then(|bytes| decode(&bytes, dimensions))).collect())
    }

    /// Stores vectors in Redis with the TTL, in one round trip.
    pub async fn put_redis(&self, entries: &[(Key, Arc<[f32]>)]) -> Result<(), RedisMiss> {
        let redis = self.redis.as_ref().ok_or(RedisMiss::NotConfigured)?;
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (key, vector) in entries {
            pipe.cmd("SET").arg(redis_key(key)).arg(encode(vector)).arg("EX").arg(redis.ttl_secs).ignore();
        }
        Ok(redis.link.run(|mut conn| async move { pipe.query_async::<()>(&mut conn).await }).await?)
    }
}

fn redis_key(key: &Key) -> String {
    format!("{REDIS_PREFIX}{}", hex::encode(key))
}

fn encode(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn decode(bytes: &[u8], dimensions: usize) -> Option<Arc<[f32]>> {
    if bytes.len() != dimensions * 4 {
        return None;
    }
    Some(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_folds_case_and_whitespace_but_not_model_or_words() {
        assert_eq!(key("m", "How much?"), key("m", "  how   MUCH? "));
        assert_ne!(key("m", "How much?"), key("other", "How much?"));
        assert_ne!(key("m", "How much?"), key("m", "How much"));
        assert_ne!(key("ab", "c"), key("a", "bc"), "the model and the text are separated");
    }

    #[test]
    fn vectors_round_trip_and_wrong_lengths_are_misses() {
        let v = [0.25f32, -1.5, 3.0e-7];
        assert_eq!(decode(&encode(&v), 3).as_deref(), Some(&v[..]));
        assert!(decode(&encode(&v), 4).is_none());
        assert!(redis_key(&[0xab; 32]).starts_with("clusterd:emb:abab"));
        assert_eq!(redis_key(&[0; 32]).len(), REDIS_PREFIX.len() + 64);
    }

    #[test]
    fn memory_cache_is_bounded_least_recently_used() {
        let settings = EmbedCacheSettings { memory_entries: 2, redis_ttl_secs: 1, redis_timeout_ms: 1 };
        let cache = EmbedCache::new(&settings, &RedisSettings::default()).expect("no redis to configure");
        let v: Arc<[f32]> = Arc::from(vec![1.0f32]);
        let (a, b, c) = (key("m", "a"), key("m", "b"), key("m", "c"));
        cache.put_memory(&[(a, v.clone()), (b, v.clone())]);
        assert!(cache.get_memory(&[a])[0].is_some(), "a is now the most recent");
        cache.put_memory(&[(c, v)]);
        let hits: Vec<bool> = cache.get_memory(&[a, b, c]).iter().map(Option::is_some).collect();
        assert_eq!(hits, [true, false, true]);
        assert!(!cache.has_redis());
    }
}
