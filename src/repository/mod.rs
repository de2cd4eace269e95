//! All database access. Handlers and actors call these functions with a
//! [`Repository`]; no SQL lives anywhere else.
//!
//! Writes that change a creator's clusters take the creator's advisory
//! transaction lock first, so that clustering decisions and creator
//! operations are serialised per creator across every instance sharing the
//! database, and event ids increase by exactly one.

mod clustering;
mod clusters;
mod events;
pub mod messages;
pub mod schema;
mod tokens;

use sea_orm::{DatabaseConnection, DbBackend, DbErr, RuntimeErr, Statement, Value, sqlx};

pub use clustering::{
    CreatorState, GroupRows, LOAD as LOAD_GROUP_SQL, LOAD_OPEN as LOAD_OPEN_SQL, SUGGEST as SUGGEST_SQL, StoredOpen,
};
pub use clusters::{ClusterFilter, ClusterSort, ListQuery};
pub use events::StoredEvent;
pub use messages::{InsertOutcome, UNFINISHED as UNFINISHED_SQL, Unfinished};
pub use tokens::TokenInfo;

/// Handle to the database; cheap to clone (a pool inside).
#[derive(Clone, Debug)]
pub struct Repository {
    db: DatabaseConnection,
    /// Clusters up to this size get their label recomputed exactly on
    /// every change (`clustering.label_exact_max`).
    label_exact_max: i64,
    /// The decision's parameters, which the creator operations learn with
    /// (`None`: they learn nothing; a repository of the command line).
    params: Option<crate::clustering::Params>,
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The database cannot be reached or refuses work for now; retry later.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] DbErr),
    #[error("not found")]
    NotFound,
    /// One of several things a request names does not exist; the message
    /// says which (where a bare `NotFound` would leave the client guessing).
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Conflict(String),
    /// A parameter that cannot apply (a cursor from elsewhere, say).
    #[error("{0}")]
    Invalid(String),
    /// Stored data breaks an invariant the schema and the transactions
    /// keep: a bug or a hand edit, never the client's fault.
    #[error("broken invariant: {0}")]
    Invariant(#[from] Invariant),
    #[error("database error: {0}")]
    Db(#[source] DbErr),
}

/// What a broken invariant is (see [`RepoError::Invariant`]).
#[derive(Debug, thiserror::Error)]
pub enum Invariant {
    #[error("message {0} has no embedding")]
    NoEmbedding(uuid::Uuid),
    #[error("message {0} has no membership")]
    NoMembership(uuid::Uuid),
    #[error("cluster {0} vanished under its creator's lock")]
    ClusterVanished(uuid::Uuid),
    #[error("cluster {0} has a centroid of another dimension")]
    Dimensions(uuid::Uuid),
    /// A message of a creator the clustering decision holds no index of.
    #[error("no index for creator {0}")]
    NoIndex(String),
    /// A statement that always returns a row returned none.
    #[error("{0} returned no row")]
    NoRow(&'static str),
    /// A stored enumeration value this build does not know.
    #[error("unknown {what} {value:?} in the database")]
    UnknownValue { what: &'static str, value: String },
}

impl From<DbErr> for RepoError {
    fn from(err: DbErr) -> Self {
        if is_unavailable(&err) { Self::Unavailable(err) } else { Self::Db(err) }
    }
}

/// Whether an error means "the database is not there right now" (connection
/// lost, pool exhausted, server shutting down) rather than a bad query.
pub fn is_unavailable(err: &DbErr) -> bool {
    let runtime = match err {
        DbErr::ConnectionAcquire(_) => return true,
        DbErr::Conn(e) | DbErr::Exec(e) | DbErr::Query(e) => e,
        _ => return false,
    };
    let RuntimeErr::SqlxError(e) = runtime else { return false };
    match e.as_ref() {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 57P0x: shutdown / cannot connect
            // now; 53300: too many connections; 40001/40P01: retryable.
            code.starts_with("08") || code.starts_with("57P0") || matches!(code.as_ref(), "53300" | "40001" | "40P01")
        }),
        _ => false,
    }
}

impl Repository {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db, label_exact_max: 1000, params: None }
    }

    /// Sets `clustering.label_exact_max`.
    pub fn with_label_exact_max(mut self, max_members: i64) -> Self {
        self.label_exact_max = max_members;
        self
    }

    /// Sets the parameters the creator operations learn with.
    pub fn with_params(mut self, params: crate::clustering::Params) -> Self {
        self.params = Some(params);
        self
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Whether the database answers a trivial query (readiness).
    pub async fn ping(&self) -> Result<(), RepoError> {
        use sea_orm::ConnectionTrait;
        self.db.execute_unprepared("SELECT 1").await?;
        Ok(())
    }
}

/// A raw PostgreSQL statement with its bound values.
fn stmt(sql: &str, values: impl IntoIterator<Item = Value>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

/// The key of a creator's advisory lock: the first 8 bytes of the SHA-256
/// of its id (collisions only serialise two creators a little more).
fn creator_lock_key(creator_id: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(creator_id.as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

/// Takes the advisory transaction locks of `creators` in a global order, so
/// that two transactions locking overlapping sets cannot deadlock: one
/// statement, locking in the order its sorted subquery yields the keys.
async fn lock_creators<'a>(
    tx: &sea_orm::DatabaseTransaction,
    creators: impl IntoIterator<Item = &'a str>,
) -> Result<(), DbErr> {
    use sea_orm::ConnectionTrait;
    let mut keys: Vec<i64> = creators.into_iter().map(creator_lock_key).collect();
    keys.sort_unstable();
    keys.dedup();
    let keys = Value::Array(
        sea_orm::sea_query::ArrayType::BigInt,
        Some(Box::new(keys.into_iter().map(|k| Value::BigInt(Some(k))).collect())),
    );
    tx.execute_raw(stmt(
        "SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT k FROM unnest($1::bigint[]) AS k ORDER BY k) AS sorted",
        [keys],
    ))
    .await?;
    Ok(())
}

/// Values of a `uuid[]` parameter.
fn uuid_array(ids: impl IntoIterator<Item = uuid::Uuid>) -> Value {
    Value::Array(
        sea_orm::sea_query::ArrayType::Uuid,
        Some(Box::new(ids.into_iter().map(|id| Value::Uuid(Some(id))).collect())),
    )
}

/// Values of a `text[]` parameter.
fn text_array<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Value {
    Value::Array(
        sea_orm::sea_query::ArrayType::String,
        Some(Box::new(items.into_iter().map(|s| Value::String(Some(s.into()))).collect())),
    )
}
