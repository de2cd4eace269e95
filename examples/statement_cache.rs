//! What `database.statement_cache_capacity = 0` costs on a direct
//! connection: the same two reads of the API (a creator's cluster list, a
//! cluster by id) run back to back on one connection, with sqlx's statement
//! cache at 100 (the default) and at 0, alternating, several runs each; it
//! prints each run's mean time per read and the medians, and how many
//! prepared statements the connection's server session holds afterwards.
//!
//!     eval "$(scripts/stack.sh env)"
//!     cargo run --example statement_cache -- [READS_PER_RUN] [RUNS]
//!
//! It creates a database of its own on `CLUSTERD_TEST_DATABASE_URL`'s server
//! (named `clusterd_test_*`, so `make test` drops it) and migrates it. The
//! capacity 0, which the settings refuse (for what this shows), is set past
//! their validation.

use std::time::Instant;

use anyhow::Context;
use clusterd::{
    repository::{ClusterFilter, ClusterSort, ListQuery, Repository, schema},
    settings::Settings,
};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};

async fn fresh_database(admin: &str) -> anyhow::Result<String> {
    let name = format!("clusterd_test_{}", uuid::Uuid::now_v7().simple());
    let conn = Database::connect(admin).await.context("connect to CLUSTERD_TEST_DATABASE_URL")?;
    conn.execute_unprepared(&format!("CREATE DATABASE {name}")).await?;
    conn.close().await?;
    let (base, _) = admin.rsplit_once('/').context("the admin URL names a database")?;
    Ok(format!("{base}/{name}"))
}

/// One connection with the given statement cache.
async fn connect(settings: &Settings, statement_cache_capacity: usize) -> anyhow::Result<DatabaseConnection> {
    let mut database = settings.database.clone();
    database.statement_cache_capacity = statement_cache_capacity;
    database.min_connections = 1;
    database.max_connections = 1;
    Ok(schema::connect(&database, &settings.index).await?)
}

/// Mean microseconds per read over `reads` reads.
async fn run(repo: &Repository, reads: usize) -> anyhow::Result<f64> {
    let missing = uuid::Uuid::now_v7();
    let start = Instant::now();
    for i in 0..reads {
        if i % 2 == 0 {
            let query = ListQuery { filter: ClusterFilter::Open, sort: ClusterSort::Recent, limit: 20, cursor: None };
            repo.list_clusters("creator-bench", query).await?;
        } else {
            // NotFound is the answer; the statement ran all the same.
            let _ = repo.cluster(missing).await;
        }
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / reads as f64)
}

async fn prepared_statements(db: &DatabaseConnection) -> anyhow::Result<i64> {
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, "SELECT count(*) AS n FROM pg_prepared_statements"))
        .await?
        .context("a row")?;
    Ok(row.try_get("", "n")?)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    clusterd::startup::install_tls_provider();
    let mut args = std::env::args().skip(1);
    let reads: usize = args.next().map_or(Ok(4000), |a| a.parse()).context("READS_PER_RUN")?;
    let runs: usize = args.next().map_or(Ok(5), |a| a.parse()).context("RUNS")?;
    let admin =
        std::env::var("CLUSTERD_TEST_DATABASE_URL").context("CLUSTERD_TEST_DATABASE_URL (scripts/stack.sh env)")?;
    let mut settings = Settings::load_files(std::path::Path::new("config"), Some("test"))?;
    settings.database.url = fresh_database(&admin).await?.into();
    schema::migrate(&connect(&settings, 100).await?).await?;

    let mut by_capacity = [(100usize, Vec::new()), (0, Vec::new())];
    for round in 0..runs {
        for (capacity, times) in &mut by_capacity {
            let db = connect(&settings, *capacity).await?;
            let repo = Repository::new(db.clone());
            run(&repo, 100).await?; // warm-up: connection, first plans
            let micros = run(&repo, reads).await?;
            let held = prepared_statements(&db).await?;
            println!(
                "run {round}: statement_cache_capacity {capacity:>3}: {micros:7.1} us/read, {held} prepared statements held"
            );
            times.push(micros);
            db.close().await?;
        }
    }
    for (capacity, times) in by_capacity {
        println!("median, statement_cache_capacity {capacity:>3}: {:.1} us/read", median(times));
    }
    Ok(())
}
