//! Work and limits shared across instances.
//!
//! Three instances on one database sweep one backlog of unfinished
//! messages, while visitors' messages keep arriving through all three; each
//! message is embedded once (counted by the fake OpenAI server, with no
//! vector cache to hide a second request) and clustered once, and work held
//! by a live instance is left to it until it dies.
//!
//! Two instances on one Redis share each token's rate limit, answer its
//! refusal exactly as one instance does, fall back to their own limits
//! while Redis is away and share again once it is back; a token revoked
//! is refused by every instance, as on one.

use std::collections::HashMap;

use actix_web::http::StatusCode;
use clusterd::{
    domain::token::{self, Scope},
    repository::Repository,
    settings::{EmbedderProvider, Settings},
};
use clusterd_migration::{Migrator, MigratorTrait};
use futures_util::future::join_all;
use sea_orm::{ConnectionTrait, Database};
use serde_json::{Value, json};

use crate::{
    fake_openai::FakeOpenAi,
    faults::ScratchRedis,
    helpers::{PATIENCE, TestApp, flush_all, fresh_database, redis_url, spawn_app_on},
};

const CREATORS: usize = 6;

/// Who holds a backlog message when the instances start.
#[derive(Clone, Copy, PartialEq)]
enum Holder {
    Nobody,
    /// An instance id with no row in `instances` (forgotten after it died).
    Vanished,
    /// An instance whose row expired (crashed).
    Crashed,
    /// An instance alive until the test kills it.
    Alive,
}

/// Inserts `texts` as `pending` messages held by `holder`, received
/// `age_secs` ago, round-robin over the creators.
async fn insert_backlog(db: &sea_orm::DatabaseConnection, texts: &[String], holder: Option<uuid::Uuid>, age_secs: i64) {
    let rows: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let key = hex::encode(clusterd::domain::text::norm_key(text));
            let holder = holder.map_or("NULL".to_owned(), |id| format!("'{id}'::uuid"));
            format!(
                "('{}', 'creator-share-{}', '{text}', decode('{key}', 'hex'), now() - interval '{age_secs} seconds', \
                 now() - interval '{age_secs} seconds' + interval '{i} milliseconds', 'pending', {holder}, \
                 now() - interval '{age_secs} seconds')",
                uuid::Uuid::now_v7(),
                i % CREATORS,
            )
        })
        .collect();
    db.execute_unprepared(&format!(
        "INSERT INTO messages (id, creator_id, text, norm_key, sent_at, received_at, status, claimed_by, claimed_at) \
         VALUES {}",
        rows.join(", ")
    ))
    .await
    .expect("insert the backlog");
}

fn texts(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix} question {i} about topic {}", i % 7)).collect()
}

async fn count(app: &TestApp, condition: &str) -> i64 {
    app.count("messages", condition).await
}

/// Waits until `n` messages are clustered, flushing every instance between
/// looks (the rest is the sweeps' work, on their timers).
async fn wait_clustered_count(apps: &[&TestApp], n: i64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        flush_all(apps).await;
        let done = count(apps[0], "status = 'clustered'").await;
        if done >= n {
            assert_eq!(done, n, "more messages clustered than expected");
            return;
        }
        let failed = count(apps[0], "status = 'failed'").await;
        assert_eq!(failed, 0, "no message fails");
        assert!(tokio::time::Instant::now() < deadline, "{done} of {n} messages clustered in time");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[actix_web::test]
async fn three_instances_sweeping_one_backlog_embed_and_cluster_each_message_once() {
    let db_url = fresh_database().await;
    let db = Database::connect(&db_url).await.expect("connect to the test database");
    Migrator::up(&db, None).await.expect("migrate");

    // The backlog, written while no instance runs. The held messages are
    // the oldest: a sweep that ignored their holder would take them first.
    let alive = uuid::Uuid::now_v7();
    let crashed = uuid::Uuid::now_v7();
    db.execute_unprepared(&format!(
        "INSERT INTO instances (id, alive_until) VALUES ('{alive}', now() + interval '1 hour'), \
         ('{crashed}', now() - interval '1 minute')"
    ))
    .await
    .expect("register the other instances");
    let backlog = [
        (Holder::Alive, texts("held", 60), Some(alive), 7200),
        (Holder::Nobody, texts("unclaimed", 360), None, 3600),
        (Holder::Vanished, texts("vanished", 60), Some(uuid::Uuid::now_v7()), 3600),
        (Holder::Crashed, texts("crashed", 60), Some(crashed), 3600),
    ];
    for (_, texts, holder, age) in &backlog {
        insert_backlog(&db, texts, *holder, *age).await;
    }
    let held: Vec<&String> = backlog.iter().filter(|b| b.0 == Holder::Alive).flat_map(|b| &b.1).collect();
    let takeable = backlog.iter().filter(|b| b.0 != Holder::Alive).map(|b| b.1.len()).sum::<usize>() as i64;

    let fake = FakeOpenAi::start().await;
    let openai = fake.settings();
    let tweak = move |s: &mut Settings| {
        s.embedder.provider = EmbedderProvider::OpenAi;
        s.embedder.openai = openai.clone();
        // Every embedding reaches the provider: a second one would be counted.
        s.embedder.cache.memory_entries = 0;
        s.redis.url = None;
        // Small claims, so that the three sweeps interleave over many rounds.
        s.recovery.batch = 20;
        // An instance's own work is never re-fed to itself during the test.
        s.recovery.stale_after_ms = 3_600_000;
    };
    let apps: Vec<TestApp> = join_all((0..3).map(|_| spawn_app_on(&db_url, tweak.clone()))).await;
    let apps: Vec<&TestApp> = apps.iter().collect();

    // Visitors' messages, round-robin over the instances, while they sweep.
    let live = texts("live", 30);
    let posts = live.iter().enumerate().map(|(i, text)| {
        let app = apps[i % 3];
        let body = json!({"creator_id": format!("creator-share-{}", i % CREATORS), "text": text});
        async move { app.post("/v1/messages", &body).await }
    });
    for (status, ack) in join_all(posts).await {
        assert_eq!(status, 202, "{ack}");
    }
    let live_count = live.len() as i64;

    wait_clustered_count(&apps, takeable + live_count).await;
    assert_eq!(
        count(apps[0], &format!("status = 'pending' AND claimed_by = '{alive}'")).await,
        held.len() as i64,
        "the live instance's work is left to it"
    );

    // The holder dies: its work is taken over, once.
    db.execute_unprepared(&format!(
        "UPDATE instances SET alive_until = now() - interval '1 second' WHERE id = '{alive}'"
    ))
    .await
    .expect("expire the holder");
    let total = takeable + live_count + held.len() as i64;
    wait_clustered_count(&apps, total).await;

    let mut sent: HashMap<String, usize> = HashMap::new();
    for request in fake.requests() {
        for input in request.inputs {
            *sent.entry(input).or_default() += 1;
        }
    }
    let expected: Vec<&String> = backlog.iter().flat_map(|b| &b.1).chain(&live).collect();
    for text in &expected {
        assert_eq!(sent.get(text.as_str()), Some(&1), "{text:?} is embedded exactly once");
    }
    assert_eq!(sent.len(), expected.len(), "nothing else was embedded");

    let mut recovered = 0.0;
    for app in &apps {
        recovered += app.metric("clusterd_messages_recovered_total").await;
    }
    assert_eq!(
        recovered as usize,
        backlog.iter().map(|b| b.1.len()).sum::<usize>(),
        "each backlog message claimed once"
    );

    // One clustering decision per message, in logs the replay checks whole.
    for creator in 0..CREATORS {
        apps[creator % 3].assert_cluster_invariants(&format!("creator-share-{creator}")).await;
    }
    assert_eq!(count(apps[0], "status = 'clustered'").await, total);
}

/// Auth on with a budget of 5 that cannot refill while a test runs (one
/// request per thousand seconds), shared through `redis` when given.
fn limited(redis: Option<String>) -> impl Fn(&mut Settings) + Clone {
    move |s: &mut Settings| {
        s.auth.enabled = true;
        s.auth.cache_ttl_ms = 0;
        s.auth.rate_per_sec = 0.001;
        s.auth.rate_burst = 5;
        s.limits.max_batch = 5;
        s.redis.url = redis.clone().map(Into::into);
    }
}

async fn ingest_token(app: &TestApp) -> (String, uuid::Uuid) {
    let (secret, hash) = token::generate();
    let id = Repository::new(app.db.clone()).create_token(&hash, &Scope::Ingest, "test").await.expect("store a token");
    (secret, id)
}

/// Status, body and `Retry-After` of one message sent with `token`.
async fn send(app: &TestApp, token: &str, text: &str) -> (StatusCode, Value, Option<String>) {
    let body = json!({"creator_id": "creator-limits", "text": text});
    let mut response = app
        .client
        .post(format!("{}/v1/messages", app.address))
        .bearer_auth(token)
        .send_json(&body)
        .await
        .expect("the server answers");
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body: Value = response.json().await.expect("a JSON body");
    (response.status(), body, retry_after)
}

/// Spends the budget of 5 across `first` (3) and `second` (2); then both
/// refuse; returns the refusal `second` gave.
async fn spend_across(first: &TestApp, second: &TestApp, token: &str) -> (Value, Option<String>) {
    for (i, app) in [first, first, first, second, second].into_iter().enumerate() {
        let (status, body, _) = send(app, token, &format!("within budget {i}")).await;
        assert_eq!(status, StatusCode::ACCEPTED, "request {i} is within the shared budget: {body}");
    }
    let (status, refused, retry_after) = send(second, token, "over budget").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "the budget is shared: {refused}");
    let (status, body, _) = send(first, token, "over budget again").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    (refused, retry_after)
}

#[actix_web::test]
async fn two_instances_on_one_redis_share_a_tokens_rate_limit_and_refuse_as_one_instance_does() {
    let db_url = fresh_database().await;
    let one = spawn_app_on(&db_url, limited(Some(redis_url()))).await;
    let two = spawn_app_on(&db_url, limited(Some(redis_url()))).await;
    let alone = spawn_app_on(&db_url, limited(None)).await;

    // One instance alone, in process: the refusal as it has always been.
    let (reference, _) = ingest_token(&alone).await;
    for i in 0..5 {
        assert_eq!(send(&alone, &reference, &format!("alone {i}")).await.0, StatusCode::ACCEPTED);
    }
    let (status, expected_body, expected_retry) = send(&alone, &reference, "alone, over budget").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);

    let (busy, _) = ingest_token(&one).await;
    let (refused, retry_after) = spend_across(&one, &two, &busy).await;
    assert_eq!(refused, expected_body, "the same body as one instance's refusal");
    assert!(expected_retry.is_some(), "a refusal carries Retry-After");
    assert_eq!(retry_after, expected_retry, "the same Retry-After as one instance's refusal");

    // Another token has its own budget, on either instance.
    let (calm, _) = ingest_token(&one).await;
    assert_eq!(send(&two, &calm, "another token").await.0, StatusCode::ACCEPTED);
    assert_eq!(send(&one, &calm, "another token again").await.0, StatusCode::ACCEPTED);
}

#[actix_web::test]
async fn without_redis_each_instance_limits_alone_and_shares_again_when_redis_is_back() {
    let mut redis = ScratchRedis::start();
    let db_url = fresh_database().await;
    let one = spawn_app_on(&db_url, limited(Some(redis.url()))).await;
    let two = spawn_app_on(&db_url, limited(Some(redis.url()))).await;

    redis.kill();
    // Each instance now has the whole budget to itself: 5 on each, then 429.
    let (token, _) = ingest_token(&one).await;
    for app in [&one, &two] {
        for i in 0..5 {
            let (status, body, _) = send(app, &token, &format!("redis away {i}")).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        }
        let (status, body, retry_after) = send(app, &token, "redis away, over budget").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert_eq!(body["error"]["code"], "rate_limited");
        assert!(retry_after.is_some());
    }

    redis.up();
    // Each instance tries Redis again after its rest: wait until both have
    // charged a probe token's budget there.
    let client = redis::Client::open(redis.url()).expect("a redis URL");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis accepts connections");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    for app in [&one, &two] {
        let (probe, probe_id) = ingest_token(app).await;
        loop {
            // Until then the instance's own limit answers (and may refuse).
            let (status, body, _) = send(app, &probe, "probe").await;
            assert!([StatusCode::ACCEPTED, StatusCode::TOO_MANY_REQUESTS].contains(&status), "{body}");
            let key = format!("clusterd:rate:token:{probe_id}");
            let exists: bool = redis::cmd("EXISTS").arg(&key).query_async(&mut conn).await.expect("EXISTS");
            if exists {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the instance did not return to Redis in time");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    // Shared again: a fresh token's budget of 5 spans both instances.
    let (fresh, _) = ingest_token(&one).await;
    spend_across(&one, &two, &fresh).await;
}

/// The revocation bound (`auth.cache_ttl_ms`, 0 here) holds on every
/// instance: none keeps a token alive that another instance saw revoked.
#[actix_web::test]
async fn a_token_revoked_is_refused_by_every_instance_within_the_cache_bound() {
    let db_url = fresh_database().await;
    let one = spawn_app_on(&db_url, limited(Some(redis_url()))).await;
    let two = spawn_app_on(&db_url, limited(Some(redis_url()))).await;
    let (secret, id) = ingest_token(&one).await;
    // Both instances have looked the token up.
    assert_eq!(send(&one, &secret, "before revocation").await.0, StatusCode::ACCEPTED);
    assert_eq!(send(&two, &secret, "before revocation too").await.0, StatusCode::ACCEPTED);

    Repository::new(one.db.clone()).revoke_token(id).await.expect("revoke");
    for app in [&one, &two] {
        let (status, body, _) = send(app, &secret, "after revocation").await;
        assert_eq!((status, &body["error"]["code"]), (StatusCode::UNAUTHORIZED, &json!("unauthorized")), "{body}");
    }
}
