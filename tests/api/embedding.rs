//! The embedder stage through the daemon: the real local model, the cache
//! (in-process, Redis, Redis down), de-duplication, and cost accounting.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    fake_openai::{FakeOpenAi, Fault},
    helpers::{TestApp, fresh_database, model_dir, redis_url, spawn_app_on, spawn_app_with},
};
use clusterd::settings::{EmbedderProvider, Settings};

fn with_redis(settings: &mut Settings) {
    settings.redis.url = Some(redis_url().into());
}

fn without_redis(settings: &mut Settings) {
    settings.redis.url = None;
}

/// Posts `texts` in one batch for `creator`; returns the message ids.
async fn post_batch(app: &TestApp, creator: &str, texts: &[String]) -> Vec<String> {
    let messages: Vec<Value> = texts.iter().map(|t| json!({"creator_id": creator, "text": t})).collect();
    let (status, body) = app.post("/v1/messages/batch", &json!({"messages": messages})).await;
    assert_eq!(status.as_u16(), 202, "{body}");
    body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["message_id"].as_str().expect("an id").to_owned())
        .collect()
}

async fn wait_all(app: &TestApp, ids: &[String]) -> Vec<Value> {
    let mut messages = Vec::new();
    for id in ids {
        messages.push(app.wait_clustered(id).await);
    }
    messages
}

#[actix_web::test]
async fn the_local_model_clusters_paraphrases_together_and_other_questions_apart() {
    let app = spawn_app_with(|s| {
        s.embedder.provider = EmbedderProvider::Local;
        s.embedder.local.model_dir = model_dir();
        without_redis(s);
    })
    .await;
    let texts =
        ["How much does a ticket cost?", "what is the price of the tickets", "Where can I find the refund form?"]
            .map(String::from);
    let ids = post_batch(&app, "creator-local", &texts).await;
    let messages = wait_all(&app, &ids).await;
    assert_eq!(messages[0]["cluster_id"], messages[1]["cluster_id"], "two ways to ask the price: {messages:?}");
    assert_ne!(messages[0]["cluster_id"], messages[2]["cluster_id"], "the refund question is another one");

    // The stored vector is the model's: unit length, 384 dimensions.
    let norm = app.count("messages", "vector_dims(embedding) = 384 AND abs(vector_norm(embedding) - 1) < 1e-4").await;
    assert_eq!(norm, 3);
    assert_eq!(app.metric("clusterd_embed_provider_calls_total{provider=\"local\"}").await as usize, 1);
    assert!(app.metric("clusterd_embed_provider_tokens_total").await >= 20.0, "the model counts its tokens");
    assert_eq!(app.metric("clusterd_embed_cost_usd_total").await, 0.0, "the local model costs nothing");
}

#[actix_web::test]
async fn identical_texts_are_embedded_once_and_repeats_hit_the_memory_cache() {
    let app = spawn_app_with(without_redis).await;
    let tag = Uuid::now_v7().simple().to_string();
    let texts: Vec<String> = [
        "how much is the ticket",
        "How much is the TICKET",
        "  how much is   the ticket ",
        "is there a student discount",
        "Is there a student discount",
        "where is the venue",
    ]
    .iter()
    .map(|t| format!("{t} {tag}"))
    .collect();
    let ids = post_batch(&app, "creator-dedup", &texts).await;
    wait_all(&app, &ids).await;
    assert_eq!(app.metric("clusterd_embed_provider_texts_total").await as usize, 3, "three distinct texts");
    let dedup = app.metric("clusterd_embed_deduplicated_total").await;
    let memory = app.metric("clusterd_embed_cache_hits_total{tier=\"memory\"}").await;
    assert_eq!((dedup + memory) as usize, 3, "the other three shared a vector");

    // The same questions again, later: all from the in-process cache.
    let again: Vec<String> = texts.iter().map(|t| t.to_uppercase()).collect();
    let ids = post_batch(&app, "creator-dedup", &again).await;
    wait_all(&app, &ids).await;
    assert_eq!(app.metric("clusterd_embed_provider_texts_total").await as usize, 3, "no new provider work");
    assert!(app.metric("clusterd_embed_cache_hits_total{tier=\"memory\"}").await >= memory + 3.0);
    assert_eq!(app.metric("clusterd_embed_cache_errors_total").await, 0.0);
}

#[actix_web::test]
async fn redis_shares_vectors_between_instances_with_a_ttl() {
    let db = fresh_database().await;
    let first = spawn_app_on(&db, with_redis).await;
    let tag = Uuid::now_v7().simple().to_string();
    let texts: Vec<String> = (0..5).map(|i| format!("question number {i} about the tour {tag}")).collect();
    let ids = post_batch(&first, "creator-redis", &texts).await;
    wait_all(&first, &ids).await;
    assert_eq!(first.metric("clusterd_embed_provider_texts_total").await as usize, 5);
    assert_eq!(first.metric("clusterd_embed_cache_errors_total").await, 0.0, "redis answered");

    // The keys are in Redis, with the 30-day TTL of the defaults.
    let client = redis::Client::open(redis_url()).expect("a redis URL");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis accepts connections");
    let model = "hash-ngram-v1";
    let key = clusterd::embedding::cache::key(model, &texts[0]);
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let ttl: i64 = redis::cmd("TTL").arg(format!("clusterd:emb:{hex}")).query_async(&mut conn).await.expect("TTL");
    assert!(ttl > 29 * 24 * 3600 && ttl <= 30 * 24 * 3600, "ttl {ttl}");

    // A second instance with an empty memory cache finds them in Redis.
    let second = spawn_app_on(&db, with_redis).await;
    let ids = post_batch(&second, "creator-redis-2", &texts).await;
    wait_all(&second, &ids).await;
    assert_eq!(second.metric("clusterd_embed_cache_hits_total{tier=\"redis\"}").await as usize, 5);
    assert_eq!(second.metric("clusterd_embed_provider_texts_total").await, 0.0);
}

#[actix_web::test]
async fn a_redis_that_is_down_degrades_to_the_memory_cache_without_errors() {
    // Nothing listens on port 1 of the loopback: every Redis call fails.
    let app = spawn_app_with(|s| s.redis.url = Some("redis://127.0.0.1:1/".to_owned().into())).await;
    let tag = Uuid::now_v7().simple().to_string();
    let texts: Vec<String> = (0..4).map(|i| format!("is the show on day {i} sold out {tag}")).collect();
    let ids = post_batch(&app, "creator-no-redis", &texts).await;
    wait_all(&app, &ids).await;
    let ids = post_batch(&app, "creator-no-redis", &texts).await;
    wait_all(&app, &ids).await;
    assert!(app.metric("clusterd_embed_cache_errors_total").await >= 1.0, "the outage is visible on /metrics");
    assert_eq!(app.metric("clusterd_embed_provider_texts_total").await as usize, 4, "repeats came from memory");
    assert_eq!(app.metric("clusterd_pipeline_errors_total{stage=\"embed\"}").await, 0.0);
}

/// The daemon with `provider = "openai"` against the fake endpoint.
async fn spawn_openai_app(fake: &FakeOpenAi, max_attempts: u32) -> TestApp {
    let mut openai = fake.settings();
    openai.max_attempts = max_attempts;
    spawn_app_with(move |s| {
        s.embedder.provider = EmbedderProvider::OpenAi;
        s.embedder.openai = openai;
        without_redis(s);
    })
    .await
}

#[actix_web::test]
async fn openai_failures_mark_messages_failed_and_the_admin_retry_brings_them_back() {
    let fake = FakeOpenAi::start().await;
    for _ in 0..2 {
        fake.push(Fault::Status { code: 500, retry_after: None });
    }
    let app = spawn_openai_app(&fake, 2).await;
    let tag = Uuid::now_v7().simple().to_string();
    let id = app.post_message("creator-openai", &format!("is the show sold out {tag}")).await;

    let failed = app.wait_status(&id, "failed").await;
    let error = failed["error"].as_str().expect("a failed message carries its error");
    assert!(error.contains("500"), "the error names the status: {error}");
    assert_eq!(fake.request_count(), 2, "exactly max_attempts requests");
    assert_eq!(app.metric("clusterd_messages_failed_total").await, 1.0);
    assert_eq!(app.metric("clusterd_embed_provider_errors_total").await, 1.0);

    // Bad retry requests change nothing.
    let (status, body) = app.post("/v1/admin/messages/retry", &json!({"creator": "creator-openai"})).await;
    assert_eq!(status.as_u16(), 400, "{body}");
    let (status, _) = app.post("/v1/admin/messages/retry", &json!({"creator_id": "someone-else"})).await;
    assert_eq!(status.as_u16(), 200);
    assert_eq!(app.get(&format!("/v1/messages/{id}")).await.1["status"], "failed");

    // The provider is healthy again: the retry path finishes the work.
    let (status, body) = app.post("/v1/admin/messages/retry", &json!({"creator_id": "creator-openai"})).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    assert_eq!(body["retried"], 1);
    let clustered = app.wait_clustered(&id).await;
    assert!(clustered["error"].is_null(), "the error is cleared: {clustered}");
    let (_, again) = app.post("/v1/admin/messages/retry", &json!({})).await;
    assert_eq!(again["retried"], 0, "nothing is failed any more");
}

#[actix_web::test]
async fn openai_rate_limits_and_timeouts_delay_work_but_lose_nothing() {
    let fake = FakeOpenAi::start().await;
    fake.push(Fault::Status { code: 429, retry_after: Some(1) });
    fake.push(Fault::Delay(std::time::Duration::from_millis(800)));
    fake.push(Fault::Status { code: 503, retry_after: None });
    let app = spawn_openai_app(&fake, 5).await;
    let tag = Uuid::now_v7().simple().to_string();
    let texts: Vec<String> = (0..6).map(|i| format!("when does the tour reach city {i} {tag}")).collect();
    let ids = post_batch(&app, "creator-openai-429", &texts).await;
    wait_all(&app, &ids).await;
    assert_eq!(fake.pending_faults(), 0, "every fault was met");
    assert!(app.metric("clusterd_embed_provider_retries_total").await >= 3.0);
    assert_eq!(app.metric("clusterd_messages_failed_total").await, 0.0);

    // Cost accounting: the tokens the endpoint reported, priced per 1K.
    let expected_tokens: u64 = texts.iter().map(|t| FakeOpenAi::tokens(t)).sum();
    assert_eq!(app.metric("clusterd_embed_provider_tokens_total").await as u64, expected_tokens);
    let cost = app.metric("clusterd_embed_cost_usd_total").await;
    let expected_cost = expected_tokens as f64 / 1000.0 * fake.settings().price_per_1k_tokens;
    assert!((cost - expected_cost).abs() < 1e-12, "cost {cost}, expected {expected_cost}");
    // Every text was sent once in a successful request; the API key was sent.
    let inputs: Vec<String> = fake.requests().into_iter().last().map(|r| r.inputs).unwrap_or_default();
    assert_eq!(inputs.len(), texts.len(), "one request carried the whole batch");
}

#[actix_web::test]
async fn a_provider_slower_than_the_timeout_on_every_attempt_fails_visibly_and_can_be_retried() {
    let fake = FakeOpenAi::start().await;
    // Every attempt outlasts the client's 300 ms timeout (one slow answer
    // per attempt); after that the provider is healthy again.
    for _ in 0..3 {
        fake.push(Fault::Delay(std::time::Duration::from_secs(2)));
    }
    let app = spawn_openai_app(&fake, 3).await;
    let tag = Uuid::now_v7().simple().to_string();
    let ids = post_batch(
        &app,
        "creator-openai-slow",
        &[format!("is there parking {tag}"), format!("when do doors open {tag}")],
    )
    .await;

    for id in &ids {
        let failed = app.wait_status(id, "failed").await;
        let error = failed["error"].as_str().expect("a failed message carries its error");
        assert!(error.contains("within 300 ms"), "the error says the provider timed out: {error}");
        assert!(failed["cluster_id"].is_null(), "{failed}");
    }
    assert_eq!(fake.request_count(), 3, "max_attempts requests, then the batch gave up");
    assert_eq!(app.metric("clusterd_messages_failed_total").await, 2.0);
    assert!(app.metric("clusterd_embed_provider_retries_total").await >= 2.0);

    let (status, body) = app.post("/v1/admin/messages/retry", &json!({"creator_id": "creator-openai-slow"})).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    assert_eq!(body["retried"], 2);
    for id in &ids {
        let clustered = app.wait_clustered(id).await;
        assert!(clustered["error"].is_null(), "the error is cleared: {clustered}");
    }
    app.wait_settled("creator-openai-slow", 2).await;
    app.assert_cluster_invariants("creator-openai-slow").await;
}

#[actix_web::test]
async fn a_missing_model_stops_the_daemon_at_start_with_a_clear_error() {
    let db = fresh_database().await;
    let mut settings = crate::helpers::test_settings(&db);
    settings.embedder.provider = EmbedderProvider::Local;
    settings.embedder.local.model_dir = "/nonexistent/model".into();
    let error = match clusterd::startup::Application::build(settings).await {
        Ok(_) => panic!("the daemon must not start without its model"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("embedding provider") && error.contains("/nonexistent/model"), "{error}");
}
