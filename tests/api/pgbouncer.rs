//! The daemon through PgBouncer (Debian's 1.18, the stack's), each test's
//! database reached through PgBouncer's wildcard pool. In session mode (the
//! login `CLUSTERD_TEST_PGBOUNCER_SESSION_URL` names) with
//! `database.startup_options = false`: the core paths (ingest over HTTP and
//! WebSocket, clustering, operations, listing, detail, a live subscriber,
//! recovery after SIGKILL), and the settings each transaction sets for
//! itself, ending with it. In transaction mode (`CLUSTERD_TEST_PGBOUNCER_URL`)
//! what is true today: sqlx 0.9's named prepared statements do not survive
//! transaction pooling, cache on or off, and the daemon stops at its start
//! with the reason. Startup options are refused in either mode. Assertions
//! read the database directly.

use actix_web::http::StatusCode;
use serde_json::json;

use crate::{
    helpers::{TestApp, fresh_database, spawn_app_on, test_settings},
    restart::{count, start_daemon, wait_count, wait_ready},
};

/// `db_url` (a database of the stack's PostgreSQL) through the stack's
/// PgBouncer in transaction mode: the same database name, PgBouncer's host
/// and port.
fn through_pgbouncer(db_url: &str) -> String {
    through("CLUSTERD_TEST_PGBOUNCER_URL", db_url)
}

/// `db_url` through the stack's PgBouncer in session mode.
fn through_pgbouncer_sessions(db_url: &str) -> String {
    through("CLUSTERD_TEST_PGBOUNCER_SESSION_URL", db_url)
}

fn through(variable: &str, db_url: &str) -> String {
    let pgbouncer = std::env::var(variable).unwrap_or_else(|_| {
        panic!("{variable} is unset: run the tests with the stack's settings (scripts/stack.sh env), which starts PgBouncer")
    });
    let (base, _) = pgbouncer.rsplit_once('/').expect("the PgBouncer URL names a database");
    let (_, name) = db_url.rsplit_once('/').expect("a database URL names its database");
    format!("{base}/{name}")
}

/// Whether `error` is PostgreSQL losing track of a named prepared statement
/// (26000: does not exist; 42P05: already exists, another client's).
fn is_prepared_statement_error(error: &str) -> bool {
    error.contains("prepared statement \"sqlx_s_")
        && (error.contains("does not exist") || error.contains("already exists"))
}

/// The truth with PgBouncer 1.18 in transaction mode: sqlx 0.9 (under
/// sea-orm 2.0) names every prepared statement (`sqlx_s_N`, numbered per
/// client connection) whether or not it caches them
/// (`statement_cache_capacity` only decides whether it reuses them), and
/// prepares in a round trip of its own before binding. PgBouncer 1.18 keeps
/// no prepared statements across transactions, so a server connection
/// still holds another client's `sqlx_s_1` (or lacks this one's). The
/// daemon does not get past its start, and says why (and names the likely
/// cause), with the statement cache on or off; nothing half-works.
///
/// 0, which the settings refuse for that reason, is set here past the
/// validation to show that turning the cache off would not help.
#[actix_web::test]
async fn through_pgbouncer_1_18_in_transaction_mode_the_start_fails_on_named_prepared_statements() {
    for statement_cache_capacity in [0, 100] {
        let direct = fresh_database().await;
        let mut settings = test_settings(&through_pgbouncer(&direct));
        settings.database.statement_cache_capacity = statement_cache_capacity;
        settings.database.startup_options = false;
        settings.database.start_wait_secs = 0;
        let error = match clusterd::startup::Application::build(settings).await {
            Ok(_) => panic!(
                "the daemon started through PgBouncer 1.18 with statement_cache_capacity {statement_cache_capacity}"
            ),
            Err(error) => format!("{error:#}"),
        };
        assert!(is_prepared_statement_error(&error), "statement_cache_capacity {statement_cache_capacity}: {error}");
        assert!(error.contains("is it PgBouncer in transaction mode?"), "the daemon names the likely cause: {error}");
    }
}

#[actix_web::test]
async fn startup_options_through_pgbouncer_stop_the_start_with_pgbouncers_reason() {
    let direct = fresh_database().await;
    // Session mode, otherwise what works: only the startup options differ.
    let mut settings = test_settings(&through_pgbouncer_sessions(&direct));
    settings.database.startup_options = true;
    settings.database.start_wait_secs = 0;
    let error = match clusterd::startup::Application::build(settings).await {
        Ok(_) => panic!("PgBouncer 1.18 accepted startup options"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("unsupported startup parameter: options"), "{error}");
}

/// An application on a fresh database, connected through PgBouncer in
/// session mode without startup options; its `db` is a direct connection,
/// for assertions.
async fn spawn_behind_pgbouncer() -> TestApp {
    let direct = fresh_database().await;
    let pooled = through_pgbouncer_sessions(&direct);
    spawn_app_on(&direct, |settings| {
        settings.database.url = pooled.into();
        settings.database.startup_options = false;
    })
    .await
}

#[actix_web::test]
async fn the_core_paths_work_through_pgbouncer_in_session_mode() {
    let app = spawn_behind_pgbouncer().await;
    // The daemon's connections are PgBouncer's: only its session-mode
    // login (a role of its own) reaches this database.
    assert!(app.count("pg_stat_activity", "usename = 'clusterd_session' AND datname = current_database()").await > 0);
    let creator = "creator-pgbouncer";
    let mut dashboard = app.connect_ws().await;
    assert_eq!(dashboard.subscribe(creator, None).await["last_event_id"], 0);

    // Ingest over HTTP and over WebSocket; similar questions cluster.
    let first = app.post_message(creator, "how much is the vip ticket").await;
    let mut chat = app.connect_ws().await;
    let second = chat.ingest(creator, "how much is the vip ticket?").await;
    let other = app.post_message(creator, "where do I park my car").await;
    let first = app.wait_clustered(&first).await;
    let second = app.wait_clustered(&second).await;
    let other = app.wait_clustered(&other).await;
    assert_eq!(first["cluster_id"], second["cluster_id"], "similar questions share a cluster");
    assert_ne!(first["cluster_id"], other["cluster_id"]);
    let price = first["cluster_id"].as_str().expect("a cluster").to_owned();
    let parking = other["cluster_id"].as_str().expect("a cluster").to_owned();

    // The subscriber receives the three decisions, in order.
    let decisions = dashboard.events(3).await;
    let ids: Vec<i64> = decisions.iter().map(|e| e["event_id"].as_i64().expect("an id")).collect();
    assert_eq!(ids, [1, 2, 3]);
    assert_eq!(decisions[0]["event"], "cluster.created");

    // Listing and detail.
    let (status, list) = app.get(&format!("/v1/creators/{creator}/clusters")).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let listed: Vec<&str> =
        list["clusters"].as_array().expect("a page").iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(listed.len(), 2, "{list}");
    assert!(listed.contains(&price.as_str()) && listed.contains(&parking.as_str()));
    let (status, detail) = app.get(&format!("/v1/clusters/{price}")).await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    assert_eq!(detail["size"], 2);

    // Operations: a merge over HTTP, then an action over WebSocket.
    let (status, merged) =
        app.post(&format!("/v1/clusters/{price}/merge"), &json!({"cluster_ids": [parking.as_str()]})).await;
    assert_eq!(status, StatusCode::OK, "{merged}");
    assert_eq!(merged["size"], 3);
    chat.send(&json!({"type": "action", "id": "a", "cluster_id": price, "response_text": "VIP is 80 EUR"})).await;
    let answer = chat.next_json().await;
    assert_eq!(answer["result"]["status"], "actioned", "{answer}");
    let operations = dashboard.events(2).await;
    assert_eq!(operations[0]["event"], "cluster.merged");
    assert_eq!(operations[1]["event"], "cluster.actioned");
    assert_eq!(operations[1]["event_id"], 5);

    let (status, detail) = app.get(&format!("/v1/clusters/{price}")).await;
    assert_eq!(
        (status, detail["status"].clone(), detail["size"].clone()),
        (StatusCode::OK, json!("actioned"), json!(3))
    );
    let replayed = app.assert_cluster_invariants(creator).await;
    assert_eq!(replayed.events.len(), 5);
}

#[actix_web::test]
async fn acknowledged_messages_survive_sigkill_and_are_clustered_after_restart_through_pgbouncer() {
    let direct = fresh_database().await;
    let pooled = through_pgbouncer_sessions(&direct);
    let behind_pgbouncer =
        [("CLUSTERD__DATABASE__URL", pooled.as_str()), ("CLUSTERD__DATABASE__STARTUP_OPTIONS", "false")];
    let client = awc::Client::default();
    // First life (which also migrates the fresh database through
    // PgBouncer): the embedder never flushes, so acknowledged messages stay
    // `pending`.
    let mut first_life = behind_pgbouncer.to_vec();
    first_life.extend([("CLUSTERD__EMBEDDER__BATCH_SIZE", "100000"), ("CLUSTERD__EMBEDDER__MAX_WAIT_MS", "3600000")]);
    let (mut daemon, port) = start_daemon(&direct, &first_life).await;
    wait_ready(&client, port).await;
    for i in 0..20 {
        let body = json!({"creator_id": format!("creator-{}", i % 2), "text": format!("question {i} about tickets"), "external_id": format!("e{i}")});
        let response =
            client.post(format!("http://127.0.0.1:{port}/v1/messages")).send_json(&body).await.expect("an answer");
        assert_eq!(response.status(), 202);
    }
    daemon.child.kill().expect("SIGKILL");
    daemon.child.wait().expect("the daemon exits");
    let db = sea_orm::Database::connect(&direct).await.expect("connect directly");
    let count = |sql: &'static str| count(&db, sql);
    assert_eq!(count("SELECT count(*) AS n FROM messages WHERE status = 'pending'").await, 20);

    // Second life, through PgBouncer again: the start-up sweep resumes.
    let (mut daemon, port) = start_daemon(&direct, &behind_pgbouncer).await;
    wait_ready(&client, port).await;
    let clustered = "SELECT count(*) AS n FROM messages WHERE status = 'clustered'";
    wait_count(&db, clustered, 20, "acknowledged messages were not clustered after the restart").await;
    daemon.child.kill().expect("SIGKILL");
    daemon.child.wait().expect("the daemon exits");
    assert_eq!(count("SELECT count(*) AS n FROM messages").await, 20, "stored exactly once");
    assert_eq!(count("SELECT count(*) AS n FROM events").await, 20, "one event per decision");
}

/// Behind PgBouncer the statement timeout and the HNSW search breadth hold
/// inside each of the daemon's transactions, and end with it: the next
/// transaction on the same server connection starts from the server's
/// defaults (nothing is session state).
#[actix_web::test]
async fn behind_pgbouncer_the_timeout_and_search_breadth_are_set_per_transaction_and_end_with_it() {
    use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};
    let direct = fresh_database().await;
    let mut settings = test_settings(&through_pgbouncer_sessions(&direct));
    settings.database.startup_options = false;
    settings.database.min_connections = 1;
    settings.database.max_connections = 1;
    let db = clusterd::repository::schema::connect(&settings.database, &settings.index).await.expect("connect");
    let repo = clusterd::repository::Repository::new(db.clone()).with_local_settings(Some(
        clusterd::repository::LocalSettings { statement_timeout_ms: 4321, hnsw_ef_search: 77 },
    ));
    let show = "SELECT current_setting('statement_timeout') AS timeout, \
                coalesce(current_setting('hnsw.ef_search', true), 'unset') AS ef, pg_backend_pid() AS pid";
    let read = async |conn: &sea_orm::DatabaseTransaction| {
        let row =
            conn.query_one_raw(Statement::from_string(DbBackend::Postgres, show)).await.expect("query").expect("a row");
        let text = |column| row.try_get::<String>("", column).expect("a setting");
        (text("timeout"), text("ef"), row.try_get::<i32>("", "pid").expect("a pid"))
    };
    let tx = repo.begin().await.expect("a transaction");
    let (timeout, ef, inside) = read(&tx).await;
    assert_eq!((timeout.as_str(), ef.as_str()), ("4321ms", "77"));
    tx.commit().await.expect("commit");
    let tx = db.begin().await.expect("a plain transaction");
    let (timeout, ef, after) = read(&tx).await;
    tx.commit().await.expect("commit");
    assert_eq!(after, inside, "the same server connection (one client connection, session mode)");
    assert_eq!(timeout, "0", "the timeout ended with its transaction");
    assert_ne!(ef, "77", "the search breadth ended with its transaction");
}
