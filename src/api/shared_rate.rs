//! Per-token rate limits shared by every instance on one Redis: GCRA (the
//! generic cell rate algorithm, what `governor` runs in process) in one Lua
//! script, so that reading and advancing a token's theoretical arrival time
//! is atomic across instances. The clock is Redis's (`TIME`), so instances'
//! clocks need not agree.
//!
//! Protocol, per charge: `EVAL` on key `clusterd:rate:<key>` with the
//! emission interval and the burst tolerance in microseconds and the cost;
//! the answer is `0` (allowed, the state advanced) or the microseconds to
//! wait (refused, nothing spent). The key expires once the budget is full
//! again. A Redis that fails or answers slower than `auth.rate_redis_timeout_ms`
//! is skipped for [`REDIS_BACKOFF`](crate::redis_link::REDIS_BACKOFF) and the
//! caller falls back to its in-process limiter; the next charge after the
//! rest tries Redis again.

use std::time::Duration;

use deadpool_redis::redis;
use secrecy::ExposeSecret;

use crate::{
    redis_link::{LinkError, RedisLink},
    settings::{AuthSettings, RedisSettings},
};

/// KEYS[1]: the token's key; ARGV: emission interval (µs per request),
/// tolerance (µs: interval × burst), cost (requests). Stores the
/// theoretical arrival time in µs of Redis time.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local increment = interval * tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + increment
local wait = new_tat - tolerance - now
if wait > 0 then return math.ceil(wait) end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return 0
"#;

const PREFIX: &str = "clusterd:rate:";

/// The Redis side of the per-token limits.
pub struct SharedRate {
    link: RedisLink,
    interval_us: f64,
    tolerance_us: f64,
}

impl SharedRate {
    /// `None` without Redis or without a limit. No connection is made here:
    /// Redis down at start is an outage like any other.
    pub fn new(auth: &AuthSettings, redis: &RedisSettings) -> Result<Option<Self>, deadpool_redis::CreatePoolError> {
        let url = match &redis.url {
            Some(url) if !url.expose_secret().is_empty() && auth.rate_per_sec > 0.0 => url,
            _ => return Ok(None),
        };
        let interval_us = 1e6 / auth.rate_per_sec;
        Ok(Some(Self {
            link: RedisLink::new(
                url.expose_secret(),
                redis.pool_size,
                Duration::from_millis(auth.rate_redis_timeout_ms),
            )?,
            interval_us,
            tolerance_us: interval_us * f64::from(auth.burst().get()),
        }))
    }

    /// Spends `cost` of `key`'s shared budget: `Ok(None)` if allowed,
    /// `Ok(Some(wait))` if refused (nothing spent), `Err` if Redis could not
    /// decide in time.
    pub async fn charge(&self, key: &str, cost: u32) -> Result<Option<Duration>, LinkError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(GCRA).arg(1).arg(format!("{PREFIX}{key}")).arg(self.interval_us).arg(self.tolerance_us).arg(cost);
        let wait_us: u64 = self.link.run(|mut conn| async move { cmd.query_async(&mut conn).await }).await?;
        Ok((wait_us > 0).then(|| Duration::from_micros(wait_us)))
    }
}
