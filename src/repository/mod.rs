//! All database access. Handlers and actors call these functions with a
//! [`Repository`]; no SQL lives anywhere else.
//!
//! sea-orm is the way in for every statement; which form a statement takes
//! is decided per query:
//! - Plain CRUD goes through the entities of `crate::entities` and their
//!   `ActiveModel`s: tokens (create, list, revoke, look up by hash), a
//!   message by id, the owner of a cluster or a message, a single cluster
//!   (row-locked or not) and a cluster's core, a creator's counter, bar and
//!   background. The row types that raw statements also fill
//!   (`MessageRow`, `ClusterRow`) are partial models of those entities, so
//!   one type reads both ways.
//! - The hot and set-based statements stay SQL, bound through sea-orm's
//!   `Statement` ([`bind`] for their arrays): the group insert and the
//!   `unnest` writes (one statement per batch whatever its size), advisory
//!   locks, pgvector arithmetic (centroids as sums, `<=>` orderings; the
//!   clustering actor reaches pgvector this way, with sea-orm's
//!   `PgVector`), `LATERAL` listings, keyset pages, the event log (appended
//!   in bulk, read back as the exact frame text).
//!
//! Stored states (`status`, `membership`) decode straight into their enums
//! (see `crate::protocol`); a text this build does not know is an
//! [`Invariant::UnknownValue`], never a default.
//!
//! Writes that change a creator's clusters take the creator's advisory
//! transaction lock first, so that clustering decisions and creator
//! operations are serialised per creator across every instance sharing the
//! database, and event ids increase by exactly one.
//!
//! No session state: advisory locks are transaction-scoped only, and every
//! transaction begins through `Repository::begin_tx`, which sets the
//! statement timeout and the HNSW search breadth with `SET LOCAL` when the
//! connections could not get them as startup options (behind PgBouncer,
//! `database.startup_options = false`).

mod bind;
mod clustering;
mod clusters;
mod events;
pub mod messages;
pub mod schema;
mod tokens;

use sea_orm::{DatabaseConnection, DbBackend, DbErr, RuntimeErr, Statement, Value, sqlx};

use self::bind::{bigint_array, uuid_array};

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
    /// This instance's id in `instances`: the messages it ingests or puts
    /// back to `pending` are claimed by it (`None`: by nobody; a
    /// repository of the command line).
    instance: Option<uuid::Uuid>,
    /// Set in every transaction with `SET LOCAL` (`None`: the connections
    /// got them as startup options).
    local: Option<LocalSettings>,
}

/// The settings each transaction sets for itself when connections cannot
/// carry them (PgBouncer in transaction mode: no startup options, no session
/// state); `SET LOCAL` ends with the transaction, so nothing leaks to the
/// next client of the server connection.
#[derive(Clone, Debug)]
pub struct LocalSettings {
    /// `statement_timeout`, in milliseconds.
    pub statement_timeout_ms: u64,
    /// `hnsw.ef_search`.
    pub hnsw_ef_search: u32,
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
    /// A write that did not commit in time (`ingest.commit_timeout_ms`):
    /// treated as an unavailable database.
    #[error("no commit within {} ms", .0.as_millis())]
    TimedOut(std::time::Duration),
    #[error("database error: {0}")]
    Db(#[source] DbErr),
}

/// What a broken invariant is (see [`RepoError::Invariant`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
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
    /// A message of a group insert that neither went in nor conflicted
    /// with a stored one.
    #[error("message {0} was neither inserted nor found")]
    NeitherInsertedNorFound(uuid::Uuid),
    /// The counter upsert of an event append left a creator out.
    #[error("no event counter returned for {0}")]
    NoEventCounter(String),
    /// A stored enumeration value this build does not know.
    #[error("unknown {what} {value:?} in the database")]
    UnknownValue { what: &'static str, value: String },
}

impl From<DbErr> for RepoError {
    fn from(err: DbErr) -> Self {
        // A row that did not decode because of a value [`stored`] refused.
        if let DbErr::TryIntoErr { source, .. } = &err
            && let Some(broken) = source.downcast_ref::<Invariant>()
        {
            return Self::Invariant(broken.clone());
        }
        if is_unavailable(&err) { Self::Unavailable(err) } else { Self::Db(err) }
    }
}

/// Reads a stored enumeration from its text (the `from_str` of the
/// `DeriveValueType`s in `crate::protocol`): a text this build does not
/// know is a broken invariant, never a default. sea-orm carries the error
/// out of the row as a `DbErr::TryIntoErr`, which [`RepoError`]'s `From`
/// turns back into [`Invariant::UnknownValue`].
pub(crate) fn stored<T: std::str::FromStr>(value: &str) -> Result<T, Invariant> {
    value.parse().map_err(|_| {
        let name = std::any::type_name::<T>();
        Invariant::UnknownValue { what: name.rsplit("::").next().unwrap_or(name), value: value.to_owned() }
    })
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
        Self { db, label_exact_max: 1000, params: None, instance: None, local: None }
    }

    /// Sets `local`: each transaction sets these with `SET LOCAL`.
    pub fn with_local_settings(mut self, local: Option<LocalSettings>) -> Self {
        self.local = local;
        self
    }

    /// Begins a transaction, with the [`LocalSettings`] if there are any
    /// (one statement more, in the same transaction).
    async fn begin_tx(&self) -> Result<sea_orm::DatabaseTransaction, DbErr> {
        use sea_orm::{ConnectionTrait, TransactionTrait};
        let tx = self.db.begin().await?;
        if let Some(local) = &self.local {
            tx.execute_raw(stmt(
                "SELECT set_config('statement_timeout', $1, true), set_config('hnsw.ef_search', $2, true)",
                [local.statement_timeout_ms.to_string().into(), local.hnsw_ef_search.to_string().into()],
            ))
            .await?;
        }
        Ok(tx)
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

    /// Claims what this repository ingests for the instance `id` (see
    /// `crate::actors::recovery`).
    pub fn with_instance(mut self, id: uuid::Uuid) -> Self {
        self.instance = Some(id);
        self
    }

    /// Whether the database answers a trivial query (readiness).
    pub async fn ping(&self) -> Result<(), RepoError> {
        use sea_orm::ConnectionTrait;
        self.db.execute_unprepared("SELECT 1").await?;
        Ok(())
    }
}

/// One column of the row of `E` with primary key `id` (an owner, a
/// counter), if there is such a row.
async fn column_by_id<E, T>(
    db: &impl sea_orm::ConnectionTrait,
    id: impl Into<<E::PrimaryKey as sea_orm::PrimaryKeyTrait>::ValueType>,
    column: E::Column,
) -> Result<Option<T>, DbErr>
where
    E: sea_orm::EntityTrait,
    T: sea_orm::TryGetableMany,
{
    use sea_orm::QuerySelect;
    E::find_by_id(id).select_only().column(column).into_tuple().one(db).await
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
    tx.execute_raw(stmt(
        "SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT k FROM unnest($1::bigint[]) AS k ORDER BY k) AS sorted",
        [bigint_array(keys)],
    ))
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::protocol::{ClusterStatus, EventKind, Membership, MessageStatus};

    /// The text a state is stored as is the text the API shows (strum's and
    /// serde's derives agree), and reads back as the same state.
    fn round_trips<T>(states: &[T])
    where
        T: Copy + std::fmt::Debug + PartialEq + std::fmt::Display + std::str::FromStr + serde::Serialize,
    {
        for &state in states {
            let text = state.to_string();
            assert_eq!(serde_json::to_value(state).expect("a unit variant serialises"), text.as_str());
            assert_eq!(stored::<T>(&text), Ok(state));
        }
    }

    #[test]
    fn stored_states_are_their_wire_texts() {
        use MessageStatus::*;
        round_trips(&[Pending, Embedded, Clustered, Failed]);
        round_trips(&[ClusterStatus::Open, ClusterStatus::Actioned]);
        round_trips(&[Membership::Core, Membership::Review]);
        let kinds = [
            EventKind::ClusterCreated,
            EventKind::ClusterUpdated,
            EventKind::ClusterActioned,
            EventKind::ClusterMerged,
            EventKind::MessageRemoved,
            EventKind::MessageConfirmed,
        ];
        for kind in kinds {
            assert_eq!(serde_json::to_value(kind).expect("a unit variant serialises"), <&str>::from(kind));
        }
        assert_eq!(<&str>::from(Membership::Review), "review");
    }

    #[test]
    fn an_unknown_stored_state_is_a_broken_invariant() {
        let unknown = Invariant::UnknownValue { what: "MessageStatus", value: "queued".into() };
        assert_eq!(stored::<MessageStatus>("queued"), Err(unknown.clone()));
        assert_eq!(
            stored::<ClusterStatus>("Open"),
            Err(Invariant::UnknownValue { what: "ClusterStatus", value: "Open".into() })
        );
        // As sea-orm's DeriveValueType reports it from a row.
        let decoded = DbErr::TryIntoErr { from: "String", into: "MessageStatus", source: Arc::new(unknown.clone()) };
        assert!(matches!(RepoError::from(decoded), RepoError::Invariant(ref e) if *e == unknown));
        assert!(matches!(RepoError::from(DbErr::Custom("other".into())), RepoError::Db(_)));
    }
}
