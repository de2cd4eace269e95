//! The per-creator event log: appending (inside the transaction that made
//! the change, under the creator's lock) and reading ranges for replay.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use bytestring::ByteString;
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr, FromQueryResult};
use uuid::Uuid;

use super::{
    Invariant, RepoError, Repository,
    bind::{array, bigint_array, text_array},
    column_by_id, stmt,
};
use crate::{
    entities::creator,
    protocol::{ClusterView, EventFrame, EventKind, EventTag, MessageView},
};

/// An event as it leaves the log: its position and the frame text that
/// subscribers receive, serialised once for all of them and shared (a
/// clone is a reference count, and actix-ws sends it without a copy).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub creator_id: Arc<str>,
    pub event_id: i64,
    pub frame: ByteString,
    /// When it was committed: the frame's `at` (delivery latency is
    /// measured from it).
    pub at: DateTime<Utc>,
}

/// An event about to be appended; it gets its id in [`append`]. The
/// optional parts are those of [`EventFrame`].
#[derive(Debug)]
pub(super) struct Draft {
    pub kind: EventKind,
    pub cluster: ClusterView,
    pub message: Option<MessageView>,
    pub new_cluster: Option<ClusterView>,
    pub merged_cluster_ids: Option<Vec<Uuid>>,
    pub from_cluster_id: Option<Uuid>,
    pub from_cluster: Option<ClusterView>,
}

impl Draft {
    /// An event about `cluster` alone; the optional parts are set by the
    /// caller.
    pub fn new(kind: EventKind, cluster: ClusterView) -> Self {
        Self {
            kind,
            cluster,
            message: None,
            new_cluster: None,
            merged_cluster_ids: None,
            from_cluster_id: None,
            from_cluster: None,
        }
    }
}

/// Appends each creator's drafts, in order, with consecutive ids: one
/// statement for the counters of every creator, one for every event. Must
/// run inside a transaction that holds the creators' advisory locks.
pub(super) async fn append(
    tx: &DatabaseTransaction,
    drafts: BTreeMap<String, Vec<Draft>>,
    at: DateTime<Utc>,
) -> Result<Vec<StoredEvent>, RepoError> {
    let drafts: Vec<(String, Vec<Draft>)> = drafts.into_iter().filter(|(_, d)| !d.is_empty()).collect();
    if drafts.is_empty() {
        return Ok(Vec::new());
    }
    let counters: HashMap<String, i64> = tx
        .query_all_raw(stmt(
            "INSERT INTO creators (creator_id, last_event_id)
             SELECT * FROM unnest($1::text[], $2::bigint[])
             ON CONFLICT (creator_id) DO UPDATE SET last_event_id = creators.last_event_id + EXCLUDED.last_event_id
             RETURNING creator_id, last_event_id",
            [
                text_array(drafts.iter().map(|(c, _)| c.clone())),
                bigint_array(drafts.iter().map(|(_, d)| d.len() as i64)),
            ],
        ))
        .await?
        .iter()
        .map(|row| Ok((row.try_get("", "creator_id")?, row.try_get("", "last_event_id")?)))
        .collect::<Result<_, DbErr>>()?;

    let mut events = Vec::new();
    let (mut creators, mut ids, mut kinds, mut payloads) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (creator_id, drafts) in drafts {
        let last = *counters.get(&creator_id).ok_or_else(|| Invariant::NoEventCounter(creator_id.clone()))?;
        let first = last - drafts.len() as i64 + 1;
        let creator: Arc<str> = creator_id.as_str().into();
        for (event_id, draft) in (first..).zip(drafts) {
            let kind = draft.kind;
            let frame = EventFrame {
                frame_type: EventTag::Event,
                event_id,
                creator_id: creator_id.clone(),
                event: kind,
                cluster: draft.cluster,
                message: draft.message,
                new_cluster: draft.new_cluster,
                merged_cluster_ids: draft.merged_cluster_ids,
                from_cluster_id: draft.from_cluster_id,
                from_cluster: draft.from_cluster,
                at,
            };
            // Plain data with string keys (non-finite floats become null).
            let json = serde_json::to_value(&frame).expect("an event frame always serialises");
            events.push(StoredEvent { creator_id: creator.clone(), event_id, frame: json.to_string().into(), at });
            creators.push(creator_id.clone());
            ids.push(event_id);
            kinds.push(<&str>::from(kind));
            payloads.push(json);
        }
    }
    tx.execute_raw(stmt(
        "INSERT INTO events (creator_id, event_id, kind, payload, created_at)
         SELECT e.creator_id, e.event_id, e.kind, e.payload, $5
         FROM unnest($1::text[], $2::bigint[], $3::text[], $4::jsonb[]) AS e(creator_id, event_id, kind, payload)",
        [text_array(creators), bigint_array(ids), text_array(kinds), array(payloads), at.into()],
    ))
    .await?;
    Ok(events)
}

#[derive(Debug, FromQueryResult)]
struct EventRow {
    creator_id: String,
    event_id: i64,
    payload: String,
    created_at: DateTime<Utc>,
}

impl EventRow {
    fn into_event(self, creator: Option<&Arc<str>>) -> StoredEvent {
        StoredEvent {
            creator_id: creator.cloned().unwrap_or_else(|| self.creator_id.as_str().into()),
            event_id: self.event_id,
            frame: self.payload.into(),
            at: self.created_at,
        }
    }
}

impl Repository {
    /// The id of the creator's newest event; 0 when it has none.
    #[tracing::instrument(skip(self))]
    pub async fn last_event_id(&self, creator_id: &str) -> Result<i64, RepoError> {
        let last = column_by_id::<creator::Entity, _>(&self.db, creator_id, creator::Column::LastEventId).await?;
        Ok(last.unwrap_or(0))
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
            "SELECT creator_id, event_id, payload::text AS payload, created_at FROM events
             WHERE creator_id = $1 AND event_id > $2 AND event_id <= $3
             ORDER BY event_id LIMIT $4",
            [creator_id.into(), after.into(), upto.into(), (limit as i64).into()],
        ))
        .all(&self.db)
        .await?;
        let creator: Arc<str> = creator_id.into();
        Ok(rows.into_iter().map(|r| r.into_event(Some(&creator))).collect())
    }

    /// For each `(creator, after)`, the creator's newest event if its id is
    /// above `after`: what the broadcaster's fallback poll delivers (a
    /// session fills any gap before it from the log itself). One statement
    /// for every creator.
    #[tracing::instrument(skip_all, fields(creators = positions.len()))]
    pub async fn newest_events_after(&self, positions: &[(Arc<str>, i64)]) -> Result<Vec<StoredEvent>, RepoError> {
        if positions.is_empty() {
            return Ok(Vec::new());
        }
        let rows = EventRow::find_by_statement(stmt(
            "SELECT e.creator_id, e.event_id, e.payload::text AS payload, e.created_at
             FROM unnest($1::text[], $2::bigint[]) AS p(creator_id, after)
             JOIN creators c ON c.creator_id = p.creator_id AND c.last_event_id > p.after
             JOIN events e ON e.creator_id = c.creator_id AND e.event_id = c.last_event_id",
            [
                text_array(positions.iter().map(|(c, _)| c.to_string())),
                bigint_array(positions.iter().map(|(_, after)| *after)),
            ],
        ))
        .all(&self.db)
        .await?;
        Ok(rows.into_iter().map(|r| r.into_event(None)).collect())
    }
}
