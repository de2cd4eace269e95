//! Connecting, migrating, and the parts of the schema that depend on
//! configuration: the embedding dimension and the optional HNSW index.

use std::time::Duration;

use clusterd_migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr, TransactionTrait};
use secrecy::ExposeSecret;

use super::stmt;
use crate::settings::{DatabaseSettings, IndexSettings};

/// Key of the advisory lock that serialises migrations of instances
/// starting together.
const MIGRATION_LOCK: i64 = 0x636c_7573_7465_7264; // "clusterd"

/// Why the schema cannot take the configured embedding dimension.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("messages.embedding is missing: run migrations first")]
    NotMigrated,
    #[error(
        "the database stores {stored}-dimensional embeddings but embedder.dimensions is {configured}; \
         use the same dimension or another database"
    )]
    OtherDimension { stored: i32, configured: usize },
    #[error(transparent)]
    Db(#[from] DbErr),
}

/// Opens the connection pool with the configured limits and statement
/// cache. With `database.startup_options` every connection gets the
/// statement timeout and the HNSW search breadth at its start; without
/// (behind PgBouncer, which refuses them) the [`super::Repository`] sets
/// them in each transaction ([`super::LocalSettings`]). Nothing else is
/// session state: `extra_float_digits`, which sqlx would send and PgBouncer
/// refuses too, is left at the server's default (exact output since
/// PostgreSQL 12).
pub async fn connect(settings: &DatabaseSettings, index: &IndexSettings) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(settings.url.expose_secret().to_owned());
    let statement_timeout = settings.statement_timeout_ms.to_string();
    let ef_search = index.hnsw_ef_search.to_string();
    let startup_options = settings.startup_options;
    let statement_cache = settings.statement_cache_capacity;
    options
        .min_connections(settings.min_connections)
        .max_connections(settings.max_connections)
        .idle_timeout(Duration::from_secs(settings.idle_timeout_secs))
        .connect_timeout(Duration::from_secs(settings.connect_timeout_secs))
        .acquire_timeout(Duration::from_secs(settings.connect_timeout_secs))
        .sqlx_logging(false)
        .map_sqlx_postgres_opts(move |opts| {
            let opts =
                opts.application_name("clusterd").statement_cache_capacity(statement_cache).extra_float_digits(None);
            if startup_options {
                opts.options([
                    ("statement_timeout", statement_timeout.as_str()),
                    ("hnsw.ef_search", ef_search.as_str()),
                ])
            } else {
                opts
            }
        });
    Database::connect(options).await
}

/// Applies pending migrations, one instance at a time.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    let tx = db.begin().await?;
    tx.execute_raw(stmt("SELECT pg_advisory_xact_lock($1)", [MIGRATION_LOCK.into()])).await?;
    Migrator::up(&tx, None).await?;
    tx.commit().await
}

/// Pins the embedding columns to `vector(dimensions)`. A fresh schema has
/// unconstrained columns and gets the dimension now; a schema already
/// pinned to another dimension is refused with an explanation.
pub async fn pin_dimension(db: &DatabaseConnection, dimensions: usize) -> Result<(), SchemaError> {
    let row = db
        .query_one_raw(stmt(
            "SELECT atttypmod FROM pg_attribute WHERE attrelid = 'messages'::regclass AND attname = 'embedding'",
            [],
        ))
        .await?
        .ok_or(SchemaError::NotMigrated)?;
    let current: i32 = row.try_get("", "atttypmod")?;
    if current == dimensions as i32 {
        return Ok(());
    }
    if current > 0 {
        return Err(SchemaError::OtherDimension { stored: current, configured: dimensions });
    }
    let tx = db.begin().await?;
    tx.execute_raw(stmt("SELECT pg_advisory_xact_lock($1)", [MIGRATION_LOCK.into()])).await?;
    tx.execute_unprepared(&format!(
        "ALTER TABLE messages ALTER COLUMN embedding TYPE vector({dimensions});
         ALTER TABLE clusters ALTER COLUMN centroid TYPE vector({dimensions});"
    ))
    .await?;
    Ok(tx.commit().await?)
}

/// Creates the HNSW index on open-cluster centroids with the configured
/// parameters when enabled (its name carries them, so a change rebuilds
/// it), and drops any other one.
pub async fn sync_hnsw(db: &DatabaseConnection, index: &IndexSettings) -> Result<(), DbErr> {
    let wanted = format!("clusters_centroid_hnsw_m{}_ef{}", index.hnsw_m, index.hnsw_ef_construction);
    let existing: Vec<String> = db
        .query_all_raw(stmt(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'clusters' AND indexname LIKE 'clusters_centroid_hnsw%'",
            [],
        ))
        .await?
        .iter()
        .map(|row| row.try_get("", "indexname"))
        .collect::<Result<_, _>>()?;
    for name in existing.iter().filter(|n| !index.hnsw_enabled || **n != wanted) {
        db.execute_unprepared(&format!("DROP INDEX IF EXISTS {name}")).await?;
    }
    if index.hnsw_enabled && !existing.contains(&wanted) {
        tracing::info!(index = %wanted, "building the HNSW index on open-cluster centroids");
        db.execute_unprepared(&format!(
            "CREATE INDEX IF NOT EXISTS {wanted} ON clusters USING hnsw (centroid vector_cosine_ops)
             WITH (m = {}, ef_construction = {}) WHERE status = 'open'",
            index.hnsw_m, index.hnsw_ef_construction
        ))
        .await?;
    }
    Ok(())
}
