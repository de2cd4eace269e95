//! Messages: group insert with idempotency, reads, the embedding write, and
//! the search for unfinished work.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbErr, DerivePartialModel, EntityTrait, FromQueryResult, Value, prelude::Json};
use uuid::Uuid;

use super::{
    Invariant, RepoError, Repository,
    bind::{array, null_array, text_array, uuid_array},
    stmt,
};
use crate::{
    domain::validate::NewMessage,
    entities::message,
    protocol::{IngestResult, Membership, MessageStatus, MessageView, Visitor},
};

/// The columns of a message as the API shows it (never the embedding).
pub(super) const MESSAGE_COLUMNS: &str = "id, creator_id, external_id, text, visitor, status, cluster_id, membership, similarity, sent_at, received_at, error";

/// A row of [`MESSAGE_COLUMNS`]: read by raw statements (its derived
/// `FromQueryResult`) and through the entity (a partial model).
#[derive(Debug, DerivePartialModel)]
#[sea_orm(entity = "message::Entity")]
pub(super) struct MessageRow {
    pub id: Uuid,
    pub creator_id: String,
    pub external_id: Option<String>,
    pub text: String,
    pub visitor: Option<Json>,
    pub status: MessageStatus,
    pub cluster_id: Option<Uuid>,
    pub membership: Option<Membership>,
    pub similarity: Option<f32>,
    pub sent_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub error: Option<String>,
}

impl MessageRow {
    pub fn view(self) -> MessageView {
        let status = self.status;
        MessageView {
            id: self.id,
            creator_id: self.creator_id,
            external_id: self.external_id,
            text: self.text,
            visitor: self.visitor.and_then(|v| serde_json::from_value::<Visitor>(v).ok()),
            status,
            cluster_id: self.cluster_id,
            membership: self.membership,
            similarity: self.similarity,
            sent_at: self.sent_at,
            received_at: self.received_at,
            error: if status == MessageStatus::Failed { self.error } else { None },
        }
    }
}

/// What became of one message of a group insert.
#[derive(Debug, Clone, PartialEq)]
pub enum InsertOutcome {
    /// Stored now, as `pending`.
    Inserted(IngestResult),
    /// Its `external_id` was already taken: the first message's state.
    Duplicate(IngestResult),
}

impl InsertOutcome {
    pub fn result(&self) -> &IngestResult {
        match self {
            Self::Inserted(r) | Self::Duplicate(r) => r,
        }
    }
}

/// A message whose pipeline did not finish: `pending` or `embedded`.
#[derive(Debug, Clone, FromQueryResult)]
pub struct Unfinished {
    pub id: Uuid,
    pub creator_id: String,
    pub text: String,
    pub status: MessageStatus,
}

/// The group insert: every message of the group in one statement, through
/// a JSON recordset so that the statement text (and its prepared plan) is
/// the same whatever the group size. Conflicting external ids insert
/// nothing; the caller then reads the existing rows. The instance that
/// stores them claims them ($2): its own pipeline takes them on, and no
/// other instance's sweep takes them while it is alive.
const INSERT_GROUP: &str = r#"
INSERT INTO messages (id, creator_id, external_id, text, norm_key, visitor, raw_payload,
                      sent_at, received_at, status, claimed_by, claimed_at)
SELECT x.id, x.creator_id, x.external_id, x.text, decode(x.norm_key, 'hex'), x.visitor,
       x.raw_payload, x.sent_at, x.received_at, 'pending', $2::uuid, now()
FROM jsonb_to_recordset($1::jsonb) AS x(id uuid, creator_id text, external_id text,
     text text, norm_key text, visitor jsonb, raw_payload jsonb, sent_at timestamptz,
     received_at timestamptz, ord bigint)
ORDER BY x.ord
ON CONFLICT (creator_id, external_id) DO NOTHING
RETURNING id
"#;

const SELECT_BY_EXTERNAL_IDS: &str = r#"
SELECT m.id, m.creator_id, m.external_id, m.status, m.cluster_id
FROM unnest($1::text[], $2::text[]) AS k(creator_id, external_id)
JOIN messages m ON m.creator_id = k.creator_id AND m.external_id = k.external_id
"#;

#[derive(Debug, FromQueryResult)]
struct ExistingRow {
    id: Uuid,
    creator_id: String,
    external_id: Option<String>,
    status: MessageStatus,
    cluster_id: Option<Uuid>,
}

/// The embedding write of a batch: vectors travel as one flat `real[]`
/// (row i is the slice [(i-1)*D+1, i*D]); only `pending` rows change, so a
/// message embedded twice (after a restart, say) is written once.
const MARK_EMBEDDED: &str = r#"
UPDATE messages m
SET embedding = (($2::real[])[(v.ord - 1) * $3 + 1 : v.ord * $3])::vector,
    status = 'embedded'
FROM unnest($1::uuid[]) WITH ORDINALITY AS v(id, ord)
WHERE m.id = v.id AND m.status = 'pending'
RETURNING m.id, m.creator_id
"#;

/// The recovery sweep's claim: unfinished messages, oldest first, that
/// nobody alive holds (unclaimed, or claimed by an instance whose row in
/// `instances` expired or is gone), or that this instance ($1) has held
/// for more than $2 ms (its own deferred work: a full queue, a failed
/// step); they become claimed by $1, from now. `FOR UPDATE SKIP LOCKED` lets concurrent sweeps of
/// several instances take disjoint sets; a row another sweep claimed in
/// the meantime is re-checked against its new `claimed_by` (READ
/// COMMITTED re-evaluates the condition on the locked version) and left.
pub const UNFINISHED: &str = r#"
WITH claimable AS (
    SELECT m.id FROM messages m
    WHERE m.status IN ('pending', 'embedded')
      AND CASE WHEN m.claimed_by = $1 THEN m.claimed_at <= now() - make_interval(secs => $2::bigint / 1000.0)
               ELSE m.claimed_by IS NULL
                    OR NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = m.claimed_by AND i.alive_until > now())
          END
    ORDER BY m.received_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE messages m SET claimed_by = $1, claimed_at = now()
FROM claimable c
WHERE m.id = c.id
RETURNING m.id, m.creator_id, m.text, m.status
"#;

/// Registers or renews instance $1 until now() + $2 ms; forgets the
/// instances whose time ran out (their messages are then unclaimed).
const RENEW_INSTANCE: &str = r#"
WITH renewed AS (
    INSERT INTO instances (id, alive_until) VALUES ($1, now() + make_interval(secs => $2::bigint / 1000.0))
    ON CONFLICT (id) DO UPDATE SET alive_until = EXCLUDED.alive_until
    RETURNING id
)
DELETE FROM instances WHERE alive_until < now() AND id NOT IN (SELECT id FROM renewed)
"#;

/// `failed` back to `pending`, optionally for one creator ($1) and/or
/// some ids ($2), claimed by the instance that feeds them again ($3).
const RETRY_FAILED: &str = r#"
UPDATE messages SET status = 'pending', error = NULL, claimed_by = $3, claimed_at = now()
WHERE status = 'failed'
  AND ($1::text IS NULL OR creator_id = $1)
  AND ($2::uuid[] IS NULL OR id = ANY($2))
RETURNING id, creator_id, text, status
"#;

/// A message newly embedded, ready for clustering.
#[derive(Debug, Clone, FromQueryResult)]
pub struct EmbeddedRow {
    pub id: Uuid,
    pub creator_id: String,
}

impl Repository {
    /// Stores a group of validated messages in one transaction (one fsync)
    /// and tells, per message in order, whether it is new or a duplicate.
    #[tracing::instrument(skip_all, fields(n = group.len()))]
    pub async fn insert_messages(&self, group: &[NewMessage]) -> Result<Vec<InsertOutcome>, RepoError> {
        let rows: Vec<serde_json::Value> = group
            .iter()
            .enumerate()
            .map(|(ord, m)| {
                serde_json::json!({
                    "ord": ord,
                    "id": m.id,
                    "creator_id": m.creator_id,
                    "external_id": m.external_id,
                    "text": m.text,
                    "norm_key": hex::encode(m.norm_key),
                    "visitor": m.visitor,
                    "raw_payload": m.raw_payload,
                    "sent_at": m.sent_at,
                    "received_at": m.received_at,
                })
            })
            .collect();
        let tx = self.begin_tx().await?;
        let inserted: std::collections::HashSet<Uuid> = tx
            .query_all_raw(stmt(INSERT_GROUP, [Value::Json(Some(Box::new(rows.into()))), self.instance.into()]))
            .await?
            .iter()
            .map(|row| row.try_get::<Uuid>("", "id"))
            .collect::<Result<_, DbErr>>()?;

        let duplicates: Vec<&NewMessage> = group.iter().filter(|m| !inserted.contains(&m.id)).collect();
        let mut existing = std::collections::HashMap::new();
        if !duplicates.is_empty() {
            let creators = text_array(duplicates.iter().map(|m| m.creator_id.clone()));
            let externals = text_array(
                // Only messages with an external id can conflict.
                duplicates.iter().map(|m| m.external_id.clone().unwrap_or_default()),
            );
            for row in
                ExistingRow::find_by_statement(stmt(SELECT_BY_EXTERNAL_IDS, [creators, externals])).all(&tx).await?
            {
                existing.insert((row.creator_id.clone(), row.external_id.clone()), row);
            }
        }
        tx.commit().await?;

        group
            .iter()
            .map(|m| {
                if inserted.contains(&m.id) {
                    return Ok(InsertOutcome::Inserted(IngestResult {
                        message_id: m.id,
                        status: MessageStatus::Pending,
                        cluster_id: None,
                        duplicate: false,
                    }));
                }
                let row = existing
                    .get(&(m.creator_id.clone(), m.external_id.clone()))
                    .ok_or(Invariant::NeitherInsertedNorFound(m.id))?;
                Ok(InsertOutcome::Duplicate(IngestResult {
                    message_id: row.id,
                    status: row.status,
                    cluster_id: row.cluster_id,
                    duplicate: true,
                }))
            })
            .collect()
    }

    #[tracing::instrument(skip(self))]
    pub async fn message(&self, id: Uuid) -> Result<MessageView, RepoError> {
        message::Entity::find_by_id(id)
            .into_partial_model::<MessageRow>()
            .one(&self.db)
            .await?
            .map(MessageRow::view)
            .ok_or(RepoError::NotFound)
    }

    /// Stores the embeddings of a batch and marks those messages
    /// `embedded`; returns the ones that changed (were still `pending`).
    #[tracing::instrument(skip_all, fields(n = ids.len()))]
    pub async fn mark_embedded<V: AsRef<[f32]>>(
        &self,
        ids: &[Uuid],
        vectors: &[V],
    ) -> Result<Vec<EmbeddedRow>, RepoError> {
        let dimensions = vectors.first().map_or(0, |v| v.as_ref().len());
        let flat = array(vectors.iter().flat_map(|v| v.as_ref()).copied());
        let values = [uuid_array(ids.iter().copied()), flat, (dimensions as i32).into()];
        Ok(EmbeddedRow::find_by_statement(stmt(MARK_EMBEDDED, values)).all(&self.db).await?)
    }

    /// Marks an unfinished message `failed` with the error that stopped it.
    #[tracing::instrument(skip(self))]
    pub async fn mark_failed(&self, id: Uuid, error: &str) -> Result<(), RepoError> {
        self.db
            .execute_raw(stmt(
                "UPDATE messages SET status = 'failed', error = $2 WHERE id = $1 AND status IN ('pending', 'embedded')",
                [id.into(), error.into()],
            ))
            .await?;
        Ok(())
    }

    /// Marks unfinished messages `failed` with the error that stopped them
    /// (an embedding provider that kept failing).
    #[tracing::instrument(skip(self, ids), fields(n = ids.len()))]
    pub async fn mark_failed_many(&self, ids: &[Uuid], error: &str) -> Result<u64, RepoError> {
        let result = self
            .db
            .execute_raw(stmt(
                "UPDATE messages SET status = 'failed', error = $2 \
                 WHERE id = ANY($1) AND status IN ('pending', 'embedded')",
                [uuid_array(ids.iter().copied()), error.into()],
            ))
            .await?;
        Ok(result.rows_affected())
    }

    /// Puts `failed` messages back to `pending` (error cleared) and returns
    /// them, so that the pipeline embeds and clusters them again. With no
    /// filter, every failed message; otherwise those of one creator and/or
    /// with the given ids.
    #[tracing::instrument(skip(self, ids))]
    pub async fn retry_failed(
        &self,
        creator_id: Option<&str>,
        ids: Option<&[Uuid]>,
    ) -> Result<Vec<Unfinished>, RepoError> {
        let values = [
            creator_id.map(str::to_owned).into(),
            ids.map_or_else(null_array::<Uuid>, |ids| uuid_array(ids.iter().copied())),
            self.instance.into(),
        ];
        Ok(Unfinished::find_by_statement(stmt(RETRY_FAILED, values)).all(&self.db).await?)
    }

    /// Claims for this instance, oldest first, up to `limit` unfinished
    /// messages (`pending` or `embedded`) that no live instance holds, and
    /// its own held for longer than `stale_after` (see [`UNFINISHED`]). A
    /// repository without an instance claims only the unheld ones.
    #[tracing::instrument(skip(self))]
    pub async fn claim_unfinished(
        &self,
        stale_after: std::time::Duration,
        limit: usize,
    ) -> Result<Vec<Unfinished>, RepoError> {
        let stale_ms = i64::try_from(stale_after.as_millis()).unwrap_or(i64::MAX);
        let values = [self.instance.into(), stale_ms.into(), (limit as i64).into()];
        Ok(Unfinished::find_by_statement(stmt(UNFINISHED, values)).all(&self.db).await?)
    }

    /// Registers this instance, or renews it, as alive for `ttl` (from the
    /// database's clock); instances past their time are forgotten. Does
    /// nothing for a repository without an instance.
    #[tracing::instrument(skip(self))]
    pub async fn renew_instance(&self, ttl: std::time::Duration) -> Result<(), RepoError> {
        let Some(id) = self.instance else { return Ok(()) };
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.db.execute_raw(stmt(RENEW_INSTANCE, [id.into(), ttl_ms.into()])).await?;
        Ok(())
    }

    /// Names this instance by where it listens, and retires the other rows
    /// of that name: only one process at a time can listen there, so they
    /// are crashed predecessors (a restart after `SIGKILL`), whose work the
    /// next sweep takes at once instead of after their time runs out.
    /// Returns how many were retired.
    #[tracing::instrument(skip(self))]
    pub async fn retire_predecessors(&self, name: &str) -> Result<u64, RepoError> {
        let Some(id) = self.instance else { return Ok(0) };
        let done = self
            .db
            .execute_raw(stmt(
                "WITH named AS (UPDATE instances SET name = $2 WHERE id = $1 RETURNING id)
                 DELETE FROM instances WHERE name = $2 AND id <> $1 AND id NOT IN (SELECT id FROM named)",
                [id.into(), name.into()],
            ))
            .await?;
        Ok(done.rows_affected())
    }

    /// Removes this instance's row (a graceful stop): what it still holds
    /// becomes unclaimed at once, for any instance's next sweep.
    #[tracing::instrument(skip(self))]
    pub async fn leave_instance(&self) -> Result<(), RepoError> {
        let Some(id) = self.instance else { return Ok(()) };
        self.db.execute_raw(stmt("DELETE FROM instances WHERE id = $1", [id.into()])).await?;
        Ok(())
    }
}
