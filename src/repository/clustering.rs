//! The clustering decision's reads and writes, each inside the transaction
//! the clustering actor hands it (`actors::clustering::decider`), which
//! takes the decision itself in memory (`crate::clustering::group`):
//! 1. lock the group's creators and load its messages (each with the open
//!    cluster that already holds its exact normalised text, if any);
//! 2. read the creators' states (last event id, background, bar offset),
//!    and the open clusters of those whose index must be rebuilt;
//! 3. write the outcome with a fixed number of statements, whatever the
//!    group's size: new clusters (with their suggested response), joined
//!    clusters' sizes and core centroids, the messages (with their
//!    membership and similarity), the creators' backgrounds, the labels;
//! 4. append one event per message.
//!
//! Stored data that breaks an invariant (an `embedded` message without an
//! embedding, a cluster gone under its creator's lock) is a
//! [`RepoError::Invariant`].

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr, FromQueryResult, prelude::PgVector};
use uuid::Uuid;

use super::{
    Invariant, RepoError, Repository,
    bind::{array, bigint_array, text_array, uuid_array},
    clusters::{CLUSTER_COLUMNS, ClusterRow, refresh_labels},
    events::{self, Draft, StoredEvent},
    lock_creators,
    messages::MessageRow,
    stmt,
};
use crate::{
    clustering::{
        Background, OpenCluster,
        group::{GroupMessage, GroupOutcome, Growth, NewCluster, Placement},
        trigram::Trigrams,
    },
    protocol::{ClusterView, EventKind, MessageStatus},
};

/// The messages of the group that still need a decision, locked, each with
/// an open cluster of its creator whose core holds the same normalised text.
pub const LOAD: &str = r#"
SELECT m.id, m.creator_id, m.external_id, m.text, m.visitor, m.status, m.cluster_id, m.membership,
       m.similarity, m.sent_at, m.received_at, m.error, m.norm_key, m.embedding,
       (SELECT e.cluster_id FROM messages e JOIN clusters c ON c.id = e.cluster_id AND c.status = 'open'
         WHERE e.creator_id = m.creator_id AND e.norm_key = m.norm_key AND e.membership = 'core'
         ORDER BY e.id LIMIT 1) AS exact_id
FROM messages m
WHERE m.id = ANY($1) AND m.status = 'embedded' AND m.cluster_id IS NULL
ORDER BY m.id
FOR UPDATE OF m
"#;

/// A creator's open clusters, to rebuild its index.
pub const LOAD_OPEN: &str = r#"
SELECT id, creator_id, centroid, size, core_size FROM clusters
WHERE creator_id = ANY($1) AND status = 'open'
ORDER BY creator_id, id
"#;

/// The most recent core members' texts of the given clusters, newest first.
const LOAD_RECENT: &str = r#"
SELECT c.id AS cluster_id, r.text
FROM unnest($1::uuid[]) AS c(id)
CROSS JOIN LATERAL (SELECT text, id FROM messages WHERE cluster_id = c.id AND membership = 'core'
                    ORDER BY id DESC LIMIT $2) AS r
ORDER BY c.id, r.id DESC
"#;

/// For each new cluster, the response of its creator's most similar
/// actioned cluster, if similar enough. The centroids arrive as text and
/// are parsed once each, in the `unnest`: a cast inside the lateral
/// subquery would parse the vector again for every actioned cluster
/// compared (measured at 500 messages per creator: 7.6 ms instead of
/// 0.3 ms per new cluster; BENCHMARKS.md, "Clustering decision at scale").
pub const SUGGEST: &str = r#"
SELECT n.i AS position, s.response_text
FROM unnest($1::text[], $2::text[]::vector[]) WITH ORDINALITY AS n(creator_id, v, i)
CROSS JOIN LATERAL (
    SELECT response_text, centroid <=> n.v AS distance
    FROM clusters
    WHERE creator_id = n.creator_id AND status = 'actioned' AND response_text IS NOT NULL
    ORDER BY centroid <=> n.v, id
    LIMIT 1
) AS s
WHERE 1 - s.distance >= $3
"#;

#[derive(Debug, FromQueryResult)]
struct LoadedMessage {
    #[sea_orm(nested)]
    row: MessageRow,
    norm_key: Vec<u8>,
    embedding: Option<PgVector>,
    exact_id: Option<Uuid>,
}

#[derive(Debug, FromQueryResult)]
struct OpenRow {
    id: Uuid,
    creator_id: String,
    centroid: PgVector,
    size: i32,
    core_size: i32,
}

#[derive(Debug, FromQueryResult)]
struct CreatorRow {
    creator_id: String,
    last_event_id: i64,
    background_sum: Option<PgVector>,
    background_count: i64,
    bar_offset: f32,
}

/// A creator as its index starts: at its last event id, with its
/// background and learned bar offset. A creator without a row yet (no
/// message decided) starts at 0 with an empty background.
#[derive(Debug, Clone, Default)]
pub struct CreatorState {
    pub last_event_id: i64,
    pub background: Background,
    pub bar_offset: f32,
}

/// An open cluster as stored, for a creator's index.
#[derive(Debug)]
pub struct StoredOpen {
    pub creator_id: String,
    pub cluster: OpenCluster,
}

/// The loaded messages' rows, handed back to [`Repository::append_decisions`]
/// for the events' message objects.
#[derive(Debug)]
pub struct GroupRows(Vec<MessageRow>);

/// A cluster the group creates, with the response suggested for it.
struct Insert<'a> {
    cluster: &'a NewCluster,
    suggested_response: Option<String>,
}

impl Repository {
    /// Begins the transaction a group is decided in.
    pub async fn begin(&self) -> Result<DatabaseTransaction, RepoError> {
        Ok(self.begin_tx().await?)
    }

    /// Takes the creators' advisory locks, then loads those of `messages`
    /// that still need a decision (`embedded` and in no cluster; others
    /// are skipped: another worker got there first), locked, in arrival
    /// order.
    #[tracing::instrument(skip_all, fields(n = messages.len()))]
    pub async fn lock_and_load_group(
        &self,
        tx: &DatabaseTransaction,
        messages: &[(Uuid, String)],
    ) -> Result<(Vec<GroupMessage>, GroupRows), RepoError> {
        lock_creators(tx, messages.iter().map(|(_, c)| c.as_str())).await?;
        let loaded = LoadedMessage::find_by_statement(stmt(LOAD, [uuid_array(messages.iter().map(|(id, _)| *id))]))
            .all(tx)
            .await?;
        let mut group = Vec::with_capacity(loaded.len());
        let mut rows = Vec::with_capacity(loaded.len());
        for m in loaded {
            let embedding = m.embedding.ok_or(Invariant::NoEmbedding(m.row.id))?.to_vec();
            group.push(GroupMessage {
                id: m.row.id,
                creator_id: m.row.creator_id.clone(),
                text: m.row.text.clone(),
                norm_key: m.norm_key,
                embedding,
                exact: m.exact_id,
            });
            rows.push(m.row);
        }
        Ok((group, GroupRows(rows)))
    }

    /// The state of each of `creators` that has a row.
    pub async fn creator_states(
        &self,
        tx: &DatabaseTransaction,
        creators: &[&str],
    ) -> Result<HashMap<String, CreatorState>, RepoError> {
        let rows = CreatorRow::find_by_statement(stmt(
            "SELECT creator_id, last_event_id, background_sum, background_count, bar_offset
             FROM creators WHERE creator_id = ANY($1)",
            [text_array(creators.iter().copied())],
        ))
        .all(tx)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let state = CreatorState {
                    last_event_id: row.last_event_id,
                    background: Background {
                        sum: row.background_sum.map(|v| v.to_vec()).unwrap_or_default(),
                        count: row.background_count,
                    },
                    bar_offset: row.bar_offset,
                };
                (row.creator_id, state)
            })
            .collect())
    }

    /// The open clusters of `creators`, each remembering the trigrams of
    /// its `trigram_members` most recent core members (none asked: no
    /// second query).
    pub async fn open_clusters(
        &self,
        tx: &DatabaseTransaction,
        creators: &[&str],
        trigram_members: usize,
    ) -> Result<Vec<StoredOpen>, RepoError> {
        let open = OpenRow::find_by_statement(stmt(LOAD_OPEN, [text_array(creators.iter().copied())])).all(tx).await?;
        let mut recent: HashMap<Uuid, Vec<Trigrams>> = HashMap::new();
        if trigram_members > 0 && !open.is_empty() {
            let rows = tx
                .query_all_raw(stmt(
                    LOAD_RECENT,
                    [uuid_array(open.iter().map(|c| c.id)), (trigram_members as i64).into()],
                ))
                .await?;
            for row in rows {
                let (id, text): (Uuid, String) = (row.try_get("", "cluster_id")?, row.try_get("", "text")?);
                recent.entry(id).or_default().push(Trigrams::of(&text));
            }
        }
        Ok(open
            .into_iter()
            .map(|row| {
                let mut cluster =
                    OpenCluster::new(row.id, row.centroid.to_vec(), i64::from(row.core_size), i64::from(row.size));
                // Newest first from the database; remembered oldest first.
                for trigrams in recent.remove(&row.id).unwrap_or_default().into_iter().rev() {
                    cluster.remember(trigrams, trigram_members);
                }
                StoredOpen { creator_id: row.creator_id, cluster }
            })
            .collect())
    }

    /// Writes a group's outcome: the new clusters (with the response of
    /// their creator's most similar actioned cluster, from
    /// `suggest_threshold`), the joins, the messages' memberships, the
    /// backgrounds and the labels. Returns the touched clusters as the
    /// transaction leaves them.
    #[tracing::instrument(skip_all, fields(n = outcome.placements.len()))]
    pub async fn apply_outcome(
        &self,
        tx: &DatabaseTransaction,
        outcome: &GroupOutcome,
        suggest_threshold: f32,
        now: DateTime<Utc>,
    ) -> Result<HashMap<Uuid, ClusterView>, RepoError> {
        let mut created: Vec<Insert> =
            outcome.created.iter().map(|cluster| Insert { cluster, suggested_response: None }).collect();
        suggest(tx, &mut created, suggest_threshold).await?;
        write_clusters(tx, &created, &outcome.joined, now).await?;
        let placements = &outcome.placements;
        tx.execute_raw(stmt(
            "UPDATE messages m SET status = 'clustered', cluster_id = a.cluster_id, membership = a.membership,
                                   similarity = a.similarity
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::real[]) AS a(id, cluster_id, membership, similarity)
             WHERE m.id = a.id",
            [
                uuid_array(placements.iter().map(|p| p.message_id)),
                uuid_array(placements.iter().map(|p| p.cluster_id)),
                text_array(placements.iter().map(|p| <&str>::from(p.membership))),
                array(placements.iter().map(|p| p.similarity)),
            ],
        ))
        .await?;
        add_backgrounds(tx, &outcome.backgrounds).await?;
        let touched = outcome.touched();
        refresh_labels(tx, &touched, self.label_exact_max).await?;
        let sql = format!("SELECT {CLUSTER_COLUMNS} FROM clusters WHERE id = ANY($1)");
        Ok(ClusterRow::find_by_statement(stmt(&sql, [uuid_array(touched)]))
            .all(tx)
            .await?
            .into_iter()
            .map(|row| (row.id, row.view()))
            .collect())
    }

    /// Appends one event per message, in arrival order: each carries its
    /// cluster as `clusters` (from [`Self::apply_outcome`]) shows it, with
    /// the size it had right after that message joined. Returns the events
    /// to publish once committed.
    pub async fn append_decisions(
        &self,
        tx: &DatabaseTransaction,
        rows: GroupRows,
        placements: &[Placement],
        clusters: &HashMap<Uuid, ClusterView>,
        now: DateTime<Utc>,
    ) -> Result<Vec<StoredEvent>, RepoError> {
        events::append(tx, drafts(rows, placements, clusters)?, now).await
    }
}

/// Fills `suggested_response` of the new clusters: one query for all.
async fn suggest(tx: &DatabaseTransaction, created: &mut [Insert<'_>], threshold: f32) -> Result<(), DbErr> {
    if created.is_empty() {
        return Ok(());
    }
    let rows = tx
        .query_all_raw(stmt(
            SUGGEST,
            [
                text_array(created.iter().map(|c| c.cluster.creator_id.clone())),
                text_array(created.iter().map(|c| vector_literal(&c.cluster.growth.core_sum))),
                threshold.into(),
            ],
        ))
        .await?;
    for row in rows {
        let position: i64 = row.try_get("", "position")?;
        let response: String = row.try_get("", "response_text")?;
        if let Some(cluster) = usize::try_from(position - 1).ok().and_then(|i| created.get_mut(i)) {
            cluster.suggested_response = Some(response);
        }
    }
    Ok(())
}

/// Inserts the new clusters and adds the joins to existing ones.
async fn write_clusters(
    tx: &DatabaseTransaction,
    created: &[Insert<'_>],
    joined: &BTreeMap<Uuid, Growth>,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    if !created.is_empty() {
        tx.execute_raw(stmt(
            "INSERT INTO clusters (id, creator_id, status, size, core_size, label, centroid, suggested_response,
                                   created_at, updated_at)
             SELECT n.id, n.creator_id, 'open', n.size, n.core_size, n.label, n.centroid::vector,
                    NULLIF(n.suggested, ''), $8, $8
             FROM unnest($1::uuid[], $2::text[], $3::int[], $4::int[], $5::text[], $6::text[], $7::text[])
                  AS n(id, creator_id, size, core_size, label, centroid, suggested)",
            [
                uuid_array(created.iter().map(|c| c.cluster.id)),
                text_array(created.iter().map(|c| c.cluster.creator_id.clone())),
                array(created.iter().map(|c| c.cluster.growth.size)),
                array(created.iter().map(|c| c.cluster.growth.core_size)),
                text_array(created.iter().map(|c| c.cluster.label.clone())),
                text_array(created.iter().map(|c| vector_literal(&c.cluster.growth.core_sum))),
                // '' for none (a response is never empty); sea-query
                // cannot bind NULL elements of an array.
                text_array(created.iter().map(|c| c.suggested_response.clone().unwrap_or_default())),
                now.into(),
            ],
        ))
        .await?;
    }
    if !joined.is_empty() {
        tx.execute_raw(stmt(
            "UPDATE clusters c SET size = c.size + a.n, core_size = c.core_size + a.core_n,
                                   centroid = c.centroid + a.delta::vector, updated_at = $5
             FROM unnest($1::uuid[], $2::int[], $3::int[], $4::text[]) AS a(id, n, core_n, delta)
             WHERE c.id = a.id",
            [
                uuid_array(joined.keys().copied()),
                array(joined.values().map(|g| g.size)),
                array(joined.values().map(|g| g.core_size)),
                text_array(joined.values().map(|g| vector_literal(&g.core_sum))),
                now.into(),
            ],
        ))
        .await?;
    }
    Ok(())
}

/// Adds the group's messages to their creators' backgrounds.
async fn add_backgrounds(tx: &DatabaseTransaction, backgrounds: &BTreeMap<String, Background>) -> Result<(), DbErr> {
    if backgrounds.is_empty() {
        return Ok(());
    }
    tx.execute_raw(stmt(
        "UPDATE creators c SET background_sum = COALESCE(c.background_sum + a.delta::vector, a.delta::vector),
                               background_count = c.background_count + a.n
         FROM unnest($1::text[], $2::text[], $3::bigint[]) AS a(creator_id, delta, n)
         WHERE c.creator_id = a.creator_id",
        [
            text_array(backgrounds.keys().cloned()),
            text_array(backgrounds.values().map(|b| vector_literal(&b.sum))),
            bigint_array(backgrounds.values().map(|b| b.count)),
        ],
    ))
    .await?;
    Ok(())
}

/// One event per message, in arrival order. Each carries the cluster as
/// the transaction leaves it, with the size it had right after that
/// message joined.
fn drafts(
    rows: GroupRows,
    placements: &[Placement],
    clusters: &HashMap<Uuid, ClusterView>,
) -> Result<BTreeMap<String, Vec<Draft>>, Invariant> {
    let mut remaining: HashMap<Uuid, i32> = HashMap::new();
    for p in placements {
        *remaining.entry(p.cluster_id).or_default() += 1;
    }
    let mut drafts: BTreeMap<String, Vec<Draft>> = BTreeMap::new();
    for (row, p) in rows.0.into_iter().zip(placements) {
        let mut cluster = clusters.get(&p.cluster_id).cloned().ok_or(Invariant::ClusterVanished(p.cluster_id))?;
        let left = remaining.get_mut(&p.cluster_id).expect("counted above");
        *left -= 1;
        cluster.size -= *left;
        let mut message = row.view();
        message.status = MessageStatus::Clustered;
        message.cluster_id = Some(p.cluster_id);
        message.membership = Some(p.membership);
        message.similarity = Some(p.similarity);
        let kind = if p.created() { EventKind::ClusterCreated } else { EventKind::ClusterUpdated };
        drafts
            .entry(cluster.creator_id.clone())
            .or_default()
            .push(Draft { message: Some(message), ..Draft::new(kind, cluster) });
    }
    Ok(drafts)
}

/// pgvector's text form, `[x,y,...]` (shortest round-trip digits).
fn vector_literal(v: &[f32]) -> String {
    let mut out = String::with_capacity(v.len() * 12 + 2);
    out.push('[');
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&x.to_string());
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_literals_round_trip() {
        let v = [0.1f32, -2.5, 1e-7, 3.0];
        let text = vector_literal(&v);
        assert_eq!(text, "[0.1,-2.5,0.0000001,3]");
        let parsed: Vec<f32> = text.trim_matches(['[', ']']).split(',').map(|x| x.parse().expect("a float")).collect();
        assert_eq!(parsed, v);
    }
}
