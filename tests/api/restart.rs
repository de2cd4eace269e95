//! The daemon killed with SIGKILL and restarted: every acknowledged message
//! ends clustered, exactly once. Runs the real binary.

use std::{process::Stdio, time::Duration};

use sea_orm::ConnectionTrait;
use serde_json::json;

use crate::helpers::{Daemon, PATIENCE, clusterd_command, fresh_database};

/// Starts `clusterd serve` on `db_url` with the test settings and
/// `extra_env` (nothing else of the test's environment), on a port of its
/// own choosing; returns it with its port.
pub(crate) async fn start_daemon(db_url: &str, extra_env: &[(&str, &str)]) -> (Daemon, u16) {
    start_daemon_at(db_url, "127.0.0.1:0", extra_env).await
}

/// As [`start_daemon`], listening on `bind`.
async fn start_daemon_at(db_url: &str, bind: &str, extra_env: &[(&str, &str)]) -> (Daemon, u16) {
    let mut command = clusterd_command(db_url);
    command.stdout(Stdio::null()).stderr(if std::env::var("TEST_LOG").is_ok() {
        Stdio::inherit()
    } else {
        Stdio::null()
    });
    command.envs(extra_env.iter().copied());
    let mut daemon = Daemon::start_at(command, bind);
    let port = daemon.port().await;
    (daemon, port)
}

pub(crate) async fn wait_ready(client: &awc::Client, port: u16) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(response) = client.get(format!("http://127.0.0.1:{port}/readyz")).send().await
            && response.status() == 200
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the daemon did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_web::test]
async fn acknowledged_messages_survive_sigkill_and_are_clustered_after_restart() {
    let db_url = fresh_database().await;
    let client = awc::Client::default();
    // First life: the embedder never flushes, so acknowledged messages stay
    // `pending`, as if the daemon died right after the acks.
    let (mut daemon, port) = start_daemon(
        &db_url,
        &[("CLUSTERD__EMBEDDER__BATCH_SIZE", "100000"), ("CLUSTERD__EMBEDDER__MAX_WAIT_MS", "3600000")],
    )
    .await;
    wait_ready(&client, port).await;
    let mut acked = Vec::new();
    for i in 0..40 {
        let body = json!({"creator_id": format!("creator-{}", i % 3), "text": format!("question number {i} about tickets"), "external_id": format!("e{i}")});
        let mut response =
            client.post(format!("http://127.0.0.1:{port}/v1/messages")).send_json(&body).await.expect("an answer");
        assert_eq!(response.status(), 202);
        let ack: serde_json::Value = response.json().await.expect("an ack");
        acked.push(ack["message_id"].as_str().expect("an id").to_owned());
    }
    daemon.child.kill().expect("SIGKILL");
    daemon.child.wait().expect("the daemon exits");

    let db = sea_orm::Database::connect(&db_url).await.expect("connect");
    let count = |sql: &'static str| count(&db, sql);
    assert_eq!(count("SELECT count(*) AS n FROM messages WHERE status = 'pending'").await, 40);

    // Second life, normal settings: the start-up sweep resumes the work.
    // (On a port of its own again: nothing needs the first one.)
    let (mut daemon, port) = start_daemon(&db_url, &[]).await;
    wait_ready(&client, port).await;
    let clustered = "SELECT count(*) AS n FROM messages WHERE status = 'clustered'";
    wait_count(&db, clustered, 40, "acknowledged messages were not clustered after the restart").await;
    daemon.child.kill().expect("SIGKILL");
    daemon.child.wait().expect("the daemon exits");

    assert_eq!(count("SELECT count(*) AS n FROM messages").await, 40, "stored exactly once");
    assert_eq!(count("SELECT count(*) AS n FROM events").await, 40, "one event per decision");
    assert_eq!(
        count("SELECT count(*) AS n FROM (SELECT creator_id FROM events GROUP BY creator_id HAVING max(event_id) <> count(*)) gaps").await,
        0,
        "event ids are 1..n per creator"
    );
    for id in acked {
        let row = db
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                "SELECT count(*) AS n FROM messages WHERE id = $1::uuid AND cluster_id IS NOT NULL",
                [id.into()],
            ))
            .await
            .expect("query")
            .expect("a row");
        assert_eq!(row.try_get::<i64>("", "n").expect("a count"), 1);
    }
}

/// Counts what `sql` selects as `n`.
pub(crate) async fn count(db: &sea_orm::DatabaseConnection, sql: &str) -> i64 {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, sql))
        .await
        .expect("query")
        .expect("a row");
    row.try_get::<i64>("", "n").expect("a count")
}

/// Waits until `sql` counts `n` (a separate process does the work).
pub(crate) async fn wait_count(db: &sea_orm::DatabaseConnection, sql: &str, n: i64, what: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while count(db, sql).await < n {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A process restarted on the address its crashed predecessor listened on
/// takes that predecessor's unfinished work at once: only one process can
/// listen there, so the old instance's row is retired, not waited out. The
/// instances' time to live is 10 minutes here, far beyond the test's
/// patience: without the retirement nothing would be clustered in time.
#[actix_web::test]
async fn a_restart_on_the_same_address_takes_over_its_crashed_predecessors_work_at_once() {
    let db_url = fresh_database().await;
    let client = awc::Client::default();
    let long_ttl = ("CLUSTERD__RECOVERY__INSTANCE_TTL_MS", "600000");
    let (mut daemon, port) = start_daemon(
        &db_url,
        &[long_ttl, ("CLUSTERD__EMBEDDER__BATCH_SIZE", "100000"), ("CLUSTERD__EMBEDDER__MAX_WAIT_MS", "3600000")],
    )
    .await;
    wait_ready(&client, port).await;
    for i in 0..10 {
        let body = json!({"creator_id": "creator-heir", "text": format!("question number {i} about refunds")});
        let response =
            client.post(format!("http://127.0.0.1:{port}/v1/messages")).send_json(&body).await.expect("an answer");
        assert_eq!(response.status(), 202);
    }
    daemon.child.kill().expect("SIGKILL");
    daemon.child.wait().expect("the daemon exits");
    let db = sea_orm::Database::connect(&db_url).await.expect("connect");
    assert_eq!(count(&db, "SELECT count(*) AS n FROM messages WHERE status = 'pending'").await, 10);
    assert_eq!(count(&db, "SELECT count(*) AS n FROM instances WHERE alive_until > now()").await, 1, "still alive");

    let (mut heir, _) = start_daemon_at(&db_url, &format!("127.0.0.1:{port}"), &[long_ttl]).await;
    wait_ready(&client, port).await;
    let clustered = "SELECT count(*) AS n FROM messages WHERE status = 'clustered'";
    wait_count(&db, clustered, 10, "the predecessor's work was not taken over at once").await;
    assert_eq!(count(&db, "SELECT count(*) AS n FROM instances").await, 1, "the predecessor's row is retired");
    heir.child.kill().expect("SIGKILL");
    heir.child.wait().expect("the daemon exits");
}
