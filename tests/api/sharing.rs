//! Work shared across instances: three instances on one database sweep one
//! backlog of unfinished messages, while visitors' messages keep arriving
//! through all three; each message is embedded once (counted by the fake
//! OpenAI server, with no vector cache to hide a second request) and
//! clustered once, and work held by a live instance is left to it until it
//! dies.

use std::collections::HashMap;

use clusterd::settings::{EmbedderProvider, Settings};
use clusterd_migration::{Migrator, MigratorTrait};
use futures_util::future::join_all;
use sea_orm::{ConnectionTrait, Database};
use serde_json::json;

use crate::{
    fake_openai::FakeOpenAi,
    helpers::{PATIENCE, TestApp, flush_all, fresh_database, spawn_app_on},
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
