//! The daemon against PgBouncer (Debian's 1.18, transaction pooling, the
//! stack's on `CLUSTERD_TEST_PGBOUNCER_URL`), its test database reached
//! through PgBouncer's wildcard pool: what is true today. Startup options
//! are refused by PgBouncer (`database.startup_options = false` avoids
//! them), and sqlx 0.9's named prepared statements do not survive
//! transaction pooling, with the statement cache on or off: the daemon
//! stops at its start with the reason, never half-works.

use crate::helpers::{fresh_database, test_settings};

/// `db_url` (a database of the stack's PostgreSQL) through the stack's
/// PgBouncer: the same database name, PgBouncer's host and port.
fn through_pgbouncer(db_url: &str) -> String {
    let pgbouncer = std::env::var("CLUSTERD_TEST_PGBOUNCER_URL").expect(
        "CLUSTERD_TEST_PGBOUNCER_URL is unset: run the tests with the stack's settings (scripts/stack.sh env), \
         which starts PgBouncer",
    );
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
/// daemon does not get past its start, and says why, with the statement
/// cache on or off; nothing half-works.
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
    }
}

#[actix_web::test]
async fn startup_options_through_pgbouncer_stop_the_start_with_pgbouncers_reason() {
    let direct = fresh_database().await;
    let mut settings = test_settings(&through_pgbouncer(&direct));
    settings.database.statement_cache_capacity = 0;
    settings.database.startup_options = true;
    settings.database.start_wait_secs = 0;
    let error = match clusterd::startup::Application::build(settings).await {
        Ok(_) => panic!("PgBouncer 1.18 accepted startup options"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("unsupported startup parameter: options"), "{error}");
}
