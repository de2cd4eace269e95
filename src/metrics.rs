//! Prometheus metrics of the whole daemon, served on `GET /metrics`.
//! One [`Metrics`] per application, passed to whoever records.

use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_seconds: HistogramVec,
    pub http_in_flight: IntGauge,
    pub messages_ingested: IntCounter,
    pub messages_duplicate: IntCounter,
    pub ingest_rejected: IntCounterVec,
    pub ingest_commit_seconds: Histogram,
    pub ingest_group_size: Histogram,
    pub messages_embedded: IntCounter,
    pub embed_batch_size: Histogram,
    pub embed_seconds: Histogram,
    pub embed_queue: IntGauge,
    pub embed_provider_calls: IntCounterVec,
    pub embed_provider_texts: IntCounter,
    pub embed_provider_tokens: IntCounter,
    pub embed_provider_errors: IntCounter,
    pub embed_provider_retries: IntCounter,
    pub embed_cost_usd: Counter,
    pub embed_cache_hits: IntCounterVec,
    pub embed_cache_misses: IntCounter,
    pub embed_deduplicated: IntCounter,
    pub embed_cache_errors: IntCounter,
    pub messages_failed: IntCounter,
    pub messages_clustered: IntCounter,
    pub cluster_decisions: IntCounterVec,
    pub cluster_commit_seconds: Histogram,
    pub cluster_decide_seconds: Histogram,
    pub cluster_index_rebuilds: IntCounter,
    pub cluster_queue: IntGauge,
    pub cluster_indexed_creators: IntGauge,
    pub pipeline_dropped: IntCounterVec,
    pub pipeline_errors: IntCounterVec,
    pub messages_recovered: IntCounter,
    pub events_published: IntCounter,
    pub ws_connections: IntGauge,
    pub ws_subscriptions: IntGauge,
    pub ws_slow_closed: IntCounter,
    pub auth_refused: IntCounterVec,
    pub ws_refused: IntCounter,
    pub ws_stalled: IntCounter,
    pub query_cache: IntCounterVec,
    pub query_cache_errors: IntCounter,
    pub query_cache_writes: IntCounterVec,
    pub event_delivery_seconds: HistogramVec,
    pub fanout_published: IntCounter,
    pub fanout_publish_errors: IntCounter,
    pub fanout_coalesced: IntCounter,
    pub fanout_received: IntCounter,
    pub fanout_invalid: IntCounter,
    pub fanout_subscribed: IntGauge,
    pub fanout_polls: IntCounter,
}

/// Latency buckets from 0.25 ms to 10 s.
const LATENCY: &[f64] =
    &[0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Finer latency buckets for the clustering transaction, 0.5 ms to 10 s
/// (percentiles are interpolated within a bucket: see
/// loadtest/decision_bench.sh).
const COMMIT_LATENCY: &[f64] = &[
    0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04,
    0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// The in-memory decision per message, 1 us to 10 ms.
const DECIDE_LATENCY: &[f64] = &[
    1e-6, 2e-6, 3e-6, 5e-6, 7.5e-6, 1e-5, 1.5e-5, 2e-5, 3e-5, 4e-5, 5e-5, 7.5e-5, 1e-4, 1.5e-4, 2e-4, 3e-4, 5e-4,
    7.5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
];
const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("clusterd".into()), None).expect("a valid metric prefix");
        macro_rules! register {
            ($metric:expr) => {{
                let metric = $metric.expect("metric definitions are static and valid");
                registry.register(Box::new(metric.clone())).expect("metric names are unique");
                metric
            }};
        }
        let counter = |name: &str, help: &str| IntCounter::new(name, help);
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        };
        Self {
            http_requests: register!(IntCounterVec::new(
                Opts::new("http_requests_total", "HTTP requests by route and status"),
                &["route", "status"]
            )),
            http_seconds: register!(HistogramVec::new(
                HistogramOpts::new("http_request_seconds", "HTTP request latency by route").buckets(LATENCY.to_vec()),
                &["route"]
            )),
            http_in_flight: register!(IntGauge::new("http_requests_in_flight", "HTTP requests being handled")),
            messages_ingested: register!(counter("messages_ingested_total", "Messages durably stored")),
            messages_duplicate: register!(counter("messages_duplicate_total", "Messages answered as duplicates")),
            ingest_rejected: register!(IntCounterVec::new(
                Opts::new("ingest_rejected_total", "Messages refused by ingest, by reason"),
                &["reason"]
            )),
            ingest_commit_seconds: register!(histogram("ingest_commit_seconds", "Group commit latency", LATENCY)),
            ingest_group_size: register!(histogram("ingest_group_size", "Messages per group commit", SIZES)),
            messages_embedded: register!(counter("messages_embedded_total", "Messages embedded and stored")),
            embed_batch_size: register!(histogram("embed_batch_size", "Texts per embedding batch", SIZES)),
            embed_seconds: register!(histogram("embed_seconds", "Embedding provider latency per call", LATENCY)),
            embed_queue: register!(IntGauge::new("embed_queue", "Texts waiting for the embedder")),
            embed_provider_calls: register!(IntCounterVec::new(
                Opts::new("embed_provider_calls_total", "Embedding provider calls (one per batch), by provider"),
                &["provider"]
            )),
            embed_provider_texts: register!(counter(
                "embed_provider_texts_total",
                "Texts sent to the embedding provider (after cache and de-duplication)"
            )),
            embed_provider_tokens: register!(counter(
                "embed_provider_tokens_total",
                "Tokens the embedding provider processed (what a paid provider bills)"
            )),
            embed_provider_errors: register!(counter(
                "embed_provider_errors_total",
                "Embedding batches that failed after every attempt"
            )),
            embed_provider_retries: register!(counter(
                "embed_provider_retries_total",
                "Embedding requests retried (429, 5xx, timeouts)"
            )),
            embed_cost_usd: register!(Counter::new(
                "embed_cost_usd_total",
                "Estimated embedding cost in US dollars (tokens x embedder.openai.price_per_1k_tokens)"
            )),
            embed_cache_hits: register!(IntCounterVec::new(
                Opts::new("embed_cache_hits_total", "Texts whose vector came from a cache, by tier (memory, redis)"),
                &["tier"]
            )),
            embed_cache_misses: register!(counter(
                "embed_cache_misses_total",
                "Distinct texts of a batch found in no cache"
            )),
            embed_deduplicated: register!(counter(
                "embed_deduplicated_total",
                "Texts that shared the vector of an identical text in the same batch"
            )),
            embed_cache_errors: register!(counter(
                "embed_cache_errors_total",
                "Redis cache calls that failed or timed out (degraded to the in-process cache)"
            )),
            messages_failed: register!(counter(
                "messages_failed_total",
                "Messages marked failed (e.g. the embedding provider kept failing)"
            )),
            messages_clustered: register!(counter("messages_clustered_total", "Messages clustered")),
            cluster_decisions: register!(IntCounterVec::new(
                Opts::new(
                    "cluster_decisions_total",
                    "Clustering decisions by the step that placed the message (exact, trigram, vector, new)"
                ),
                &["step"]
            )),
            cluster_decide_seconds: register!(histogram(
                "cluster_decide_seconds",
                "In-memory clustering decision per message (the open-cluster index scan)",
                DECIDE_LATENCY
            )),
            cluster_index_rebuilds: register!(counter(
                "cluster_index_rebuilds_total",
                "Creator indexes (re)built from the database: first message, or changed elsewhere"
            )),
            cluster_commit_seconds: register!(histogram(
                "cluster_commit_seconds",
                "Clustering transaction latency per group",
                COMMIT_LATENCY
            )),
            cluster_queue: register!(IntGauge::new("cluster_queue", "Messages waiting for a clustering decision")),
            cluster_indexed_creators: register!(IntGauge::new(
                "cluster_indexed_creators",
                "Creators whose open-cluster index the clustering shards hold in memory"
            )),
            pipeline_dropped: register!(IntCounterVec::new(
                Opts::new(
                    "pipeline_deferred_total",
                    "Messages left to the recovery sweep because a stage queue was full"
                ),
                &["stage"]
            )),
            pipeline_errors: register!(IntCounterVec::new(
                Opts::new("pipeline_errors_total", "Failed pipeline steps (retried by the sweep)"),
                &["stage"]
            )),
            messages_recovered: register!(counter("messages_recovered_total", "Unfinished messages picked up again")),
            events_published: register!(counter("events_published_total", "Cluster events published")),
            ws_connections: register!(IntGauge::new("ws_connections", "Open WebSocket connections")),
            ws_subscriptions: register!(IntGauge::new("ws_subscriptions", "Active creator subscriptions")),
            ws_slow_closed: register!(counter("ws_slow_closed_total", "Subscribers closed for being too slow")),
            auth_refused: register!(IntCounterVec::new(
                Opts::new("auth_refused_total", "Requests and frames refused by auth or rate limits, by error code"),
                &["code"]
            )),
            ws_refused: register!(counter("ws_refused_total", "WebSocket upgrades refused at ws.max_connections")),
            ws_stalled: register!(counter("ws_stalled_total", "WebSocket clients dropped for not reading")),
            query_cache: register!(IntCounterVec::new(
                Opts::new("query_cache_total", "Query cache lookups by route (list, detail) and result (hit, miss)"),
                &["route", "result"]
            )),
            query_cache_errors: register!(counter(
                "query_cache_errors_total",
                "Query cache Redis calls that failed or timed out (degraded to the in-process cache)"
            )),
            query_cache_writes: register!(IntCounterVec::new(
                Opts::new(
                    "query_cache_writes_total",
                    "Query cache writes to Redis by result (stored, failed, dropped: too many in flight)"
                ),
                &["result"]
            )),
            event_delivery_seconds: register!(HistogramVec::new(
                HistogramOpts::new(
                    "event_delivery_seconds",
                    "From an event's commit (its `at`) to its hand-over to this instance's sessions, by path \
                     (local: committed here; redis: from another instance; log: the fallback poll)"
                )
                .buckets(LATENCY.to_vec()),
                &["path"]
            )),
            fanout_published: register!(counter(
                "fanout_published_total",
                "Events this instance published on Redis for the other instances"
            )),
            fanout_publish_errors: register!(counter(
                "fanout_publish_errors_total",
                "Failed Redis publishes (kept and published again once Redis answers)"
            )),
            fanout_coalesced: register!(counter(
                "fanout_coalesced_total",
                "Unpublished events dropped from a full outbox behind a later event of the same creator \
                 (receivers fill them from the log)"
            )),
            fanout_received: register!(counter(
                "fanout_received_total",
                "Events received over Redis from other instances"
            )),
            fanout_invalid: register!(counter(
                "fanout_invalid_total",
                "Redis messages on the event channels that could not be read (ignored)"
            )),
            fanout_subscribed: register!(IntGauge::new(
                "fanout_subscribed",
                "1 while this instance's Redis event subscription is live, else 0 (it polls the log)"
            )),
            fanout_polls: register!(counter(
                "fanout_polls_total",
                "Fallback reads of the event log for the subscribed creators, while Redis is away"
            )),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
