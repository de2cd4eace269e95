//! The per-creator event log: appending (inside the transaction that made
//! the change, under the creator's lock) and reading ranges for replay.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr, FromQueryResult, Value, sea_query::ArrayType};

use super::{RepoError, Repository, stmt, text_array};
use crate::protocol::{ClusterView, EventFrame, EventKind, EventTag, MessageView};

/// An event as it leaves the log: its position and the frame text that
/// subscribers receive, serialised once for all of them.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub creator_id: Arc<str>,
    pub event_id: i64,
    pub kind: EventKind,
    pub frame: Arc<str>,
}

/// An event about to be appended; it gets its id in [`append`].
#[derive(Debug)]
pub(super) struct Draft {
    pub kind: EventKind,
    pub cluster: ClusterView,
    pub message: Option<MessageView>,
    pub new_cluster: Option<ClusterView>,
}

/// Appends one creator's drafts, in order, with consecutive ids. Must run
/// inside a transaction that holds the creator's advisory lock.
pub(super) async fn append(
    tx: &DatabaseTransaction,
    creator_id: &str,
    drafts: Vec<Draft>,
    at: DateTime<Utc>,
) -> Result<Vec<StoredEvent>, DbErr> {
    if drafts.is_empty() {
        return Ok(Vec::new());
    }
    let n = drafts.len() as i64;
    let last: i64 = tx
        .query_one_raw(stmt(
            "INSERT INTO creators (creator_id, last_event_id) VALUES ($1, $2)
             ON CONFLICT (creator_id) DO UPDATE SET last_event_id = creators.last_event_id + EXCLUDED.last_event_id
             RETURNING last_event_id",
            [creator_id.into(), n.into()],
        ))
        .await?
        .ok_or_else(|| DbErr::Custom("the event counter upsert returned no row".into()))?
        .try_get("", "last_event_id")?;
    let first = last - n + 1;

    let creator: Arc<str> = creator_id.into();
    let mut events = Vec::with_capacity(drafts.len());
    let mut kinds = Vec::with_capacity(drafts.len());
    let mut payloads = Vec::with_capacity(drafts.len());
    for (event_id, draft) in (first..).zip(drafts) {
        let draft_kind = draft.kind;
        let frame = EventFrame {
            frame_type: EventTag::Event,
            event_id,
            creator_id: creator_id.to_owned(),
            event: draft.kind,
            cluster: draft.cluster,
            message: draft.message,
            new_cluster: draft.new_cluster,
            at,
        };
        let json = serde_json::to_value(&frame).map_err(|e| DbErr::Json(e.to_string()))?;
        kinds.push(draft.kind.as_str());
        events.push(StoredEvent {
            creator_id: creator.clone(),
            event_id,
            kind: draft_kind,
            frame: json.to_string().into(),
        });
        payloads.push(Value::Json(Some(Box::new(json))));
    }
    tx.execute_raw(stmt(
        "INSERT INTO events (creator_id, event_id, kind, payload, created_at)
         SELECT $1, $2 + k.ord - 1, k.kind, k.payload, $5
         FROM unnest($3::text[], $4::jsonb[]) WITH ORDINALITY AS k(kind, payload, ord)",
        [
            creator_id.into(),
            first.into(),
            text_array(kinds),
            Value::Array(ArrayType::Json, Some(Box::new(payloads))),
            at.into(),
        ],
    ))
    .await?;
    Ok(events)
}

#[derive(Debug, FromQueryResult)]
struct EventRow {
    event_id: i64,
    kind: String,
    payload: String,
}

impl Repository {
    /// The id of the creator's newest event; 0 when it has none.
    #[tracing::instrument(skip(self))]
    pub async fn last_event_id(&self, creator_id: &str) -> Result<i64, RepoError> {
        let row = self
            .db
            .query_one_raw(stmt("SELECT last_event_id FROM creators WHERE creator_id = $1", [creator_id.into()]))
            .await?;
        Ok(match row {
            Some(row) => row.try_get("", "last_event_id")?,
            None => 0,
        })
    }

    /// Events with `after < event_id <= upto`, oldest first, at most `limit`.
    #[tracing::instrument(skip(self))]
    pub async fn events(
        &self,
        creator_id: &str,
        after: i64,
        upto: i64,
        limit: u64,
    ) -> Result<Vec<StoredEvent>, RepoError> {
        let rows = EventRow::find_by_statement(stmt(
            "SELECT event_id, kind, payload::text AS payload FROM events
             WHERE creator_id = $1 AND event_id > $2 AND event_id <= $3
             ORDER BY event_id LIMIT $4",
            [creator_id.into(), after.into(), upto.into(), (limit as i64).into()],
        ))
        .all(&self.db)
        .await?;
        let creator: Arc<str> = creator_id.into();
        rows.into_iter()
            .map(|r| {
                let kind = EventKind::parse(&r.kind).ok_or_else(|| {
                    RepoError::Db(DbErr::Custom(format!("unknown event kind {:?} in the log", r.kind)))
                })?;
                Ok(StoredEvent { creator_id: creator.clone(), event_id: r.event_id, kind, frame: r.payload.into() })
            })
            .collect()
    }
}
