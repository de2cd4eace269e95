//! Typed settings, loaded once at start from layered configuration: the
//! compiled-in defaults (`config/default.toml`), then the optional files
//! `$CLUSTERD_CONFIG_DIR/default.toml` and `$CLUSTERD_CONFIG_DIR/$CLUSTERD_ENV.toml`,
//! then `CLUSTERD__SECTION__KEY` environment variables. [`Settings::load_files`]
//! stops before the environment: tests build their settings from files
//! alone, so that a developer's shell (or `make test`'s exports) cannot
//! leak into them.

use std::{net::SocketAddr, path::Path, time::Duration};

use config::{Config, ConfigBuilder, Environment, File, FileFormat, builder::DefaultState};
use secrecy::SecretString;
use serde::Deserialize;

/// The defaults, compiled in so that the binary needs no files to run.
const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub embedder: EmbedderSettings,
    #[serde(default)]
    pub redis: RedisSettings,
    pub cache: QueryCacheSettings,
    pub fanout: FanoutSettings,
    pub ingest: IngestSettings,
    pub clustering: ClusteringSettings,
    pub index: IndexSettings,
    pub recovery: RecoverySettings,
    pub limits: Limits,
    pub ws: WsSettings,
    pub auth: AuthSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    pub bind: SocketAddr,
    /// Where to write the port the server listens on, once it is bound
    /// (useful with port 0); unset: nowhere.
    #[serde(default)]
    pub port_file: Option<std::path::PathBuf>,
    /// 0: one worker per CPU core.
    pub workers: usize,
    pub shutdown_timeout_secs: u64,
    /// Concurrent connections per worker; beyond it the worker stops
    /// accepting until one closes.
    pub max_connections: usize,
    /// Time a new connection has to send its request head (408 beyond).
    pub client_request_timeout_ms: u64,
    /// Time allowed for the last bytes to flush when a connection closes.
    pub client_disconnect_timeout_ms: u64,
    /// Time limit of one request, body included (503 beyond).
    pub request_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    /// May carry a password, so it never prints.
    pub url: SecretString,
    pub min_connections: u32,
    pub max_connections: u32,
    pub idle_timeout_secs: u64,
    pub connect_timeout_secs: u64,
    pub start_wait_secs: u64,
    pub statement_timeout_ms: u64,
    /// Prepared statements each connection keeps for reuse (sqlx's
    /// statement cache). At least 1: sqlx 0.9 names and keeps every
    /// statement it prepares, so 0 would only stop the reuse, not the
    /// keeping (see `validate`).
    pub statement_cache_capacity: usize,
    /// Send `statement_timeout` and `hnsw.ef_search` as connection startup
    /// options (they then bound every statement). PgBouncer refuses startup
    /// options: `false` behind it, and each transaction sets them with
    /// `SET LOCAL` instead.
    pub startup_options: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbedderProvider {
    /// all-MiniLM-L6-v2 in-process (candle).
    Local,
    /// Any OpenAI-compatible embeddings endpoint.
    #[serde(rename = "openai")]
    OpenAi,
    /// Character n-gram feature hashing, for tests and benchmarks.
    Hash,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EmbedderSettings {
    pub provider: EmbedderProvider,
    pub dimensions: usize,
    pub batch_size: usize,
    pub max_wait_ms: u64,
    pub pool_size: usize,
    pub queue_capacity: usize,
    pub local: LocalModelSettings,
    pub openai: OpenAiSettings,
    pub cache: EmbedCacheSettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LocalModelSettings {
    /// Folder holding config.json, tokenizer.json and model.safetensors.
    pub model_dir: std::path::PathBuf,
    /// Longest input in tokens, [CLS] and [SEP] included.
    pub max_tokens: usize,
    /// Dedicated inference threads (batches run in parallel).
    pub threads: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OpenAiSettings {
    pub base_url: String,
    /// Never printed; usually from CLUSTERD__EMBEDDER__OPENAI__API_KEY.
    pub api_key: SecretString,
    pub model: String,
    /// Sent as `dimensions` when non-zero (models that can shorten vectors).
    pub request_dimensions: usize,
    /// Most inputs in one request (the API allows 2048).
    pub max_inputs: usize,
    pub price_per_1k_tokens: f64,
    pub timeout_ms: u64,
    pub max_attempts: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EmbedCacheSettings {
    /// Entries of the in-process cache (0 disables it).
    pub memory_entries: usize,
    /// Time to live of Redis entries.
    pub redis_ttl_secs: u64,
    /// Time allowed for one Redis round trip before it counts as a miss.
    pub redis_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RedisSettings {
    /// Unset: no Redis (the embedding cache stays in-process).
    pub url: Option<SecretString>,
    pub pool_size: usize,
}

/// The exact query cache of cluster lists and details (`crate::query_cache`).
#[derive(Debug, Clone, Deserialize)]
pub struct QueryCacheSettings {
    pub enabled: bool,
    /// Time to live of an entry, in process and in Redis (`EX`).
    pub ttl_secs: u64,
    /// Entries of the in-process LRU (0: none; Redis alone when set).
    pub max_entries: usize,
    /// Bytes of bodies the in-process LRU holds at most.
    pub max_memory_bytes: usize,
    /// Time allowed for one Redis round trip before it counts as a miss.
    pub redis_timeout_ms: u64,
    /// Writes to Redis in the background, never delaying the answer
    /// (false: the answer waits for the `SET`).
    pub write_behind: bool,
}

/// Live events across instances, over Redis pub/sub (with `redis.url`).
#[derive(Debug, Clone, Deserialize)]
pub struct FanoutSettings {
    /// Names this deployment's event channels; empty: the database name in
    /// `database.url`. Instances of one deployment must agree.
    pub namespace: String,
    /// While the subscription is down, how often the subscribed creators'
    /// logs are read.
    pub fallback_poll_ms: u64,
    /// Back-off between reconnection attempts, doubling from min to max.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// How often the subscription connection is pinged, and how long a
    /// connect, ping or publish may take before the connection counts as lost.
    pub ping_interval_ms: u64,
    pub timeout_ms: u64,
    /// Events waiting to be published beyond which the outbox keeps only
    /// each creator's newest.
    pub outbox_capacity: usize,
}

impl FanoutSettings {
    pub fn fallback_poll(&self) -> Duration {
        Duration::from_millis(self.fallback_poll_ms)
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct IngestSettings {
    pub pool_size: usize,
    pub max_group: usize,
    pub queue_capacity: usize,
    /// Longest wait for a group commit before its clients get 503: a
    /// database that hangs must not hold writes forever.
    pub commit_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClusteringSettings {
    pub shards: usize,
    pub max_group: usize,
    pub queue_capacity: usize,
    pub trigram_threshold: f32,
    pub trigram_members: usize,
    pub core_threshold: f32,
    pub review_threshold: f32,
    pub background_prior: f32,
    pub background_prior_pairs: f32,
    pub learning_rate: f32,
    pub learning_margin: f32,
    pub min_bar_offset: f32,
    pub max_bar_offset: f32,
    pub suggest_threshold: f32,
    pub label_exact_max: i64,
    pub cached_creators: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IndexSettings {
    pub hnsw_enabled: bool,
    pub hnsw_m: u32,
    pub hnsw_ef_construction: u32,
    pub hnsw_ef_search: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RecoverySettings {
    pub sweep_interval_ms: u64,
    pub stale_after_ms: u64,
    pub batch: usize,
    /// How long an instance's claims on unfinished work outlive its last
    /// renewal (renewed every third of it); after a crash, its work waits
    /// this long for another instance.
    pub instance_ttl_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Limits {
    pub max_text_chars: usize,
    pub max_body_bytes: usize,
    pub max_frame_bytes: usize,
    pub max_batch: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WsSettings {
    pub heartbeat_interval_ms: u64,
    pub client_timeout_ms: u64,
    pub subscriber_buffer: usize,
    pub max_inflight_ingest: usize,
    /// Concurrent WebSocket sessions; the next upgrade answers 503.
    pub max_connections: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuthSettings {
    /// Off: every request is allowed (local experiments only; the daemon
    /// warns loudly at start).
    pub enabled: bool,
    /// How long a token lookup (found or not) is reused before the
    /// database is asked again: the longest a revoked token keeps working.
    pub cache_ttl_ms: u64,
    /// Requests (and messages, for batches) per second per token; 0: no
    /// limit. May be fractional.
    pub rate_per_sec: f64,
    /// Requests a token may make at once after being idle; 0: `rate_per_sec`.
    pub rate_burst: u32,
    /// A Redis round trip of the shared rate limit slower than this lets
    /// the instance decide alone (see `api::shared_rate`).
    pub rate_redis_timeout_ms: u64,
}

impl AuthSettings {
    pub fn cache_ttl(&self) -> Duration {
        Duration::from_millis(self.cache_ttl_ms)
    }

    /// The burst the rate limit allows (at least one request).
    pub fn burst(&self) -> std::num::NonZeroU32 {
        let burst = if self.rate_burst > 0 { self.rate_burst } else { self.rate_per_sec.ceil() as u32 };
        std::num::NonZeroU32::new(burst).unwrap_or(std::num::NonZeroU32::MIN)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub filter: String,
}

impl Settings {
    /// Loads the settings the way the daemon does: compiled-in defaults,
    /// files from `$CLUSTERD_CONFIG_DIR` (default `config`) for
    /// `$CLUSTERD_ENV`, then the environment.
    pub fn load() -> Result<Self, SettingsError> {
        let dir = std::env::var("CLUSTERD_CONFIG_DIR").unwrap_or_else(|_| "config".into());
        let env = std::env::var("CLUSTERD_ENV").ok();
        Self::load_from(Path::new(&dir), env.as_deref())
    }

    /// Loads the layers from `dir` for the environment `env`, then the
    /// process environment.
    pub fn load_from(dir: &Path, env: Option<&str>) -> Result<Self, SettingsError> {
        let environment = Environment::with_prefix("CLUSTERD").prefix_separator("__").separator("__").try_parsing(true);
        Self::build(Self::files(dir, env).add_source(environment))
    }

    /// Loads the compiled-in defaults and the files from `dir` for the
    /// environment `env`, without the process environment.
    pub fn load_files(dir: &Path, env: Option<&str>) -> Result<Self, SettingsError> {
        Self::build(Self::files(dir, env))
    }

    fn files(dir: &Path, env: Option<&str>) -> ConfigBuilder<DefaultState> {
        let mut builder = Config::builder()
            .add_source(File::from_str(DEFAULTS, FileFormat::Toml))
            .add_source(File::from(dir.join("default.toml")).required(false));
        if let Some(env) = env {
            builder = builder.add_source(File::from(dir.join(format!("{env}.toml"))).required(false));
        }
        builder
    }

    fn build(builder: ConfigBuilder<DefaultState>) -> Result<Self, SettingsError> {
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |what: &str| Err(SettingsError::Invalid(what.to_owned()));
        if !(1..=16_000).contains(&self.embedder.dimensions) {
            return invalid("embedder.dimensions must be between 1 and 16000");
        }
        if self.embedder.batch_size == 0 || self.embedder.pool_size == 0 {
            return invalid("embedder.batch_size and embedder.pool_size must be at least 1");
        }
        if self.embedder.local.threads == 0 || !(3..=512).contains(&self.embedder.local.max_tokens) {
            return invalid("embedder.local.threads must be at least 1 and max_tokens between 3 and 512");
        }
        let openai = &self.embedder.openai;
        if openai.max_attempts == 0 || !(1..=2048).contains(&openai.max_inputs) {
            return invalid("embedder.openai.max_attempts must be at least 1 and max_inputs between 1 and 2048");
        }
        let auth = &self.auth;
        if !(auth.rate_per_sec >= 0.0 && auth.rate_per_sec.is_finite()) {
            return invalid("auth.rate_per_sec must be 0 (no limit) or a positive number");
        }
        if auth.rate_per_sec > 0.0 && (auth.burst().get() as usize) < self.limits.max_batch {
            return invalid(
                "auth.rate_burst (or rate_per_sec) must be at least limits.max_batch, or no batch could pass",
            );
        }
        if self.ingest.pool_size == 0 || self.ingest.max_group == 0 || self.ingest.commit_timeout_ms == 0 {
            return invalid("ingest.pool_size, ingest.max_group and ingest.commit_timeout_ms must be at least 1");
        }
        if self.recovery.instance_ttl_ms < 3 || self.recovery.sweep_interval_ms == 0 {
            return invalid("recovery.instance_ttl_ms must be at least 3 and recovery.sweep_interval_ms at least 1");
        }
        if self.clustering.shards == 0 || self.clustering.max_group == 0 {
            return invalid("clustering.shards and clustering.max_group must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.clustering.trigram_threshold) {
            return invalid("clustering.trigram_threshold must be between 0 and 1");
        }
        let c = &self.clustering;
        if ![c.core_threshold, c.background_prior, c.suggest_threshold].iter().all(|t| (-1.0..=1.0).contains(t))
            || !c.review_threshold.is_finite()
        {
            return invalid(
                "clustering.core_threshold, background_prior and suggest_threshold must be between -1 and 1, \
                 review_threshold a number",
            );
        }
        let learning_ok = (0.0..=1.0).contains(&c.learning_rate)
            && c.learning_margin.is_finite()
            && c.learning_margin >= 0.0
            && c.min_bar_offset.is_finite()
            && c.max_bar_offset.is_finite()
            && c.min_bar_offset <= 0.0
            && c.max_bar_offset >= 0.0;
        if !(c.background_prior_pairs.is_finite() && c.background_prior_pairs >= 0.0 && learning_ok) {
            return invalid(
                "clustering.background_prior_pairs and learning_margin must be >= 0, learning_rate within 0..1, \
                 min_bar_offset <= 0 <= max_bar_offset",
            );
        }
        if c.cached_creators == 0 || c.label_exact_max < 1 {
            return invalid("clustering.cached_creators and clustering.label_exact_max must be at least 1");
        }
        if self.database.min_connections > self.database.max_connections || self.database.max_connections == 0 {
            return invalid("database.min_connections must not exceed database.max_connections (>= 1)");
        }
        if self.database.statement_cache_capacity == 0 {
            return invalid(
                "database.statement_cache_capacity must be at least 1: with 0, sqlx 0.9 still prepares every \
                 statement under a name and never closes it (one more prepared statement in the server session \
                 per statement run, for the connection's life), and PgBouncer's transaction mode works no better",
            );
        }
        if self.limits.max_text_chars == 0 || self.limits.max_batch == 0 {
            return invalid("limits.max_text_chars and limits.max_batch must be at least 1");
        }
        if self.ws.subscriber_buffer == 0 || self.ws.max_inflight_ingest == 0 || self.ws.max_connections == 0 {
            return invalid("ws.subscriber_buffer, ws.max_inflight_ingest and ws.max_connections must be at least 1");
        }
        if self.ws.heartbeat_interval_ms == 0 || self.ws.client_timeout_ms < self.ws.heartbeat_interval_ms {
            return invalid("ws.heartbeat_interval_ms must be at least 1 and ws.client_timeout_ms at least as long");
        }
        let fanout = &self.fanout;
        if fanout.fallback_poll_ms == 0
            || fanout.ping_interval_ms == 0
            || fanout.timeout_ms == 0
            || fanout.outbox_capacity == 0
            || fanout.reconnect_min_ms == 0
            || fanout.reconnect_max_ms < fanout.reconnect_min_ms
        {
            return invalid(
                "fanout.fallback_poll_ms, ping_interval_ms, timeout_ms, outbox_capacity and reconnect_min_ms must be \
                 at least 1, reconnect_max_ms at least reconnect_min_ms",
            );
        }
        let server = &self.server;
        if server.max_connections == 0 || server.client_request_timeout_ms == 0 || server.request_timeout_ms == 0 {
            return invalid(
                "server.max_connections, server.client_request_timeout_ms and server.request_timeout_ms must be at least 1",
            );
        }
        Ok(())
    }
}

impl IngestSettings {
    pub fn commit_timeout(&self) -> Duration {
        Duration::from_millis(self.commit_timeout_ms)
    }
}

impl EmbedderSettings {
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self { url: None, pool_size: 8 }
    }
}

impl RecoverySettings {
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.sweep_interval_ms)
    }
    pub fn instance_ttl(&self) -> Duration {
        Duration::from_millis(self.instance_ttl_ms)
    }
    pub fn stale_after(&self) -> Duration {
        Duration::from_millis(self.stale_after_ms)
    }
}

impl ServerSettings {
    pub fn client_request_timeout(&self) -> Duration {
        Duration::from_millis(self.client_request_timeout_ms)
    }
    pub fn client_disconnect_timeout(&self) -> Duration {
        Duration::from_millis(self.client_disconnect_timeout_ms)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

impl WsSettings {
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    pub fn client_timeout(&self) -> Duration {
        Duration::from_millis(self.client_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_validate() {
        let settings = Settings::load_files(Path::new("config"), None).expect("defaults load");
        assert_eq!(settings.server.bind.port(), 8080);
        assert_eq!(settings.database.min_connections, 5);
        assert_eq!(settings.database.max_connections, 20);
        assert_eq!(settings.database.idle_timeout_secs, 30);
        assert_eq!(settings.database.connect_timeout_secs, 2);
        assert_eq!(settings.embedder.provider, EmbedderProvider::Local);
        assert_eq!(settings.embedder.local.max_tokens, 256);
        assert_eq!(settings.embedder.cache.redis_ttl_secs, 30 * 24 * 3600);
        assert_eq!(settings.embedder.openai.max_inputs, 2048);
        assert_eq!(settings.limits.max_text_chars, 4000);
        assert_eq!(settings.server.max_connections, 25_000);
        assert_eq!(settings.server.request_timeout_ms, 30_000);
        assert_eq!(settings.ws.max_connections, 20_000);
        assert!(settings.cache.enabled);
        assert_eq!(settings.cache.ttl_secs, 300);
    }

    #[test]
    fn nonsense_limits_are_refused() {
        let defaults = Settings::load_files(Path::new("config"), None).expect("defaults load");
        let tweaks: [fn(&mut Settings); 5] = [
            |s| s.database.statement_cache_capacity = 0,
            |s| s.ws.max_connections = 0,
            |s| s.ws.heartbeat_interval_ms = 0,
            |s| s.ws.client_timeout_ms = s.ws.heartbeat_interval_ms - 1,
            |s| s.server.request_timeout_ms = 0,
        ];
        for tweak in tweaks {
            let mut settings = defaults.clone();
            tweak(&mut settings);
            assert!(matches!(settings.validate(), Err(SettingsError::Invalid(_))));
        }
    }

    #[test]
    fn test_layer_overrides_defaults() {
        let settings = Settings::load_files(Path::new("config"), Some("test")).expect("test config loads");
        assert_eq!(settings.server.bind.port(), 0);
        assert_eq!(settings.limits.max_text_chars, 4000, "untouched keys keep their default");
    }

    #[test]
    fn secrets_do_not_print() {
        let mut settings = Settings::load_files(Path::new("config"), None).expect("defaults load");
        settings.embedder.openai.api_key = "sk-very-secret".to_owned().into();
        settings.redis.url = Some("redis://:hunter2@127.0.0.1:6379/".to_owned().into());
        let printed = format!("{settings:?}");
        assert!(!printed.contains("55432"));
        assert!(!printed.contains("sk-very-secret"));
        assert!(!printed.contains("hunter2"));
    }
}
