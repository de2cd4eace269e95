//! The clustering decision for a group of embedded messages, in one
//! transaction under the advisory locks of their creators.
//!
//! The decision itself runs in memory, on each creator's [`CreatorIndex`]
//! of open clusters (see `crate::clustering`); the transaction keeps the
//! index and the database in step:
//! 1. lock the creators, load the group's messages (each with the open
//!    cluster that already holds its exact normalised text, if any);
//! 2. read each creator's last event id: every change to a creator's
//!    clusters appends an event, so an index built at that id is current,
//!    and any other (an operation, another instance) is rebuilt from the
//!    database, with the creator's background and bar offset;
//! 3. decide every message in arrival order, updating the index as it
//!    goes;
//! 4. write the outcome with a fixed number of statements, whatever the
//!    group's size: new clusters (with their suggested response), joined
//!    clusters' sizes and core centroids, the messages (with their
//!    membership and similarity), the creators' backgrounds, the labels,
//!    the events.
//!
//! On any error the caller drops the group's indexes: they may hold
//! decisions that were rolled back.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use lru::LruCache;
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbErr, FromQueryResult, TransactionTrait, Value, prelude::PgVector,
    sea_query::ArrayType,
};
use uuid::Uuid;

use super::{
    RepoError, Repository,
    clusters::{CLUSTER_COLUMNS, ClusterRow, refresh_labels},
    events::{self, Draft, StoredEvent},
    lock_creators,
    messages::MessageRow,
    stmt, text_array, uuid_array,
};
use crate::{
    clustering::{Background, CreatorIndex, OpenCluster, Params, Reason, trigram::Trigrams, unit},
    protocol::{ClusterView, EventKind, Membership, MessageStatus},
};

/// What the decision needs besides the rule's parameters.
#[derive(Debug, Clone, Copy)]
pub struct DecideConfig {
    pub params: Params,
    /// Cosine similarity to an actioned cluster from which a new cluster
    /// carries that cluster's response as `suggested_response`.
    pub suggest_threshold: f32,
}

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

/// What a group's transaction did, for the metrics.
#[derive(Debug, Default)]
pub struct Clustered {
    /// The events to publish, in order.
    pub events: Vec<StoredEvent>,
    /// Per message: the step that placed it, and the seconds the in-memory
    /// decision took.
    pub decisions: Vec<(Reason, f64)>,
    /// Creator indexes built from the database.
    pub rebuilt: usize,
}

/// A cluster this group creates.
struct NewCluster {
    id: Uuid,
    creator_id: String,
    label: String,
    /// Members from this group, and the sum of the core members'
    /// embeddings.
    growth: Growth,
    suggested_response: Option<String>,
}

/// Members a group adds to one cluster.
#[derive(Debug, Clone)]
struct Growth {
    size: i32,
    core_size: i32,
    /// Sum of the added core members' embeddings.
    core_sum: Vec<f32>,
}

impl Growth {
    fn empty(dimensions: usize) -> Self {
        Self { size: 0, core_size: 0, core_sum: vec![0.0; dimensions] }
    }

    fn add(&mut self, embedding: &[f32], membership: Membership) {
        self.size += 1;
        if membership == Membership::Core {
            self.core_size += 1;
            self.core_sum.iter_mut().zip(embedding).for_each(|(s, x)| *s += x);
        }
    }
}

/// One message's outcome, in arrival order.
struct Outcome {
    message: MessageRow,
    cluster_id: Uuid,
    membership: Membership,
    similarity: f32,
    created: bool,
}

impl Repository {
    /// Clusters the given messages (those still `embedded`; others are
    /// skipped: another worker got there first), in arrival order, using
    /// and updating `indexes`. Returns the events to publish once
    /// committed. On error, `indexes` may hold rolled-back decisions: the
    /// caller must drop the entries of the group's creators.
    #[tracing::instrument(skip_all, fields(n = messages.len()))]
    pub async fn cluster_messages(
        &self,
        messages: &[(Uuid, String)],
        indexes: &mut LruCache<String, CreatorIndex>,
        config: &DecideConfig,
    ) -> Result<Clustered, RepoError> {
        let tx = self.db.begin().await?;
        lock_creators(&tx, messages.iter().map(|(_, c)| c.as_str())).await?;
        let loaded = LoadedMessage::find_by_statement(stmt(LOAD, [uuid_array(messages.iter().map(|(id, _)| *id))]))
            .all(&tx)
            .await?;
        if loaded.is_empty() {
            return Ok(Clustered::default());
        }
        let mut dimensions: HashMap<String, usize> = HashMap::new();
        for m in &loaded {
            let Some(embedding) = &m.embedding else {
                return Err(RepoError::Db(DbErr::Custom(format!("embedded message {} has no embedding", m.row.id))));
            };
            dimensions.entry(m.row.creator_id.clone()).or_insert(embedding.as_slice().len());
        }
        let rebuilt = sync_indexes(&tx, &dimensions, indexes, &config.params).await?;

        let now = Utc::now();
        let params = &config.params;
        let mut outcomes = Vec::with_capacity(loaded.len());
        let mut decisions = Vec::with_capacity(loaded.len());
        let mut created: Vec<NewCluster> = Vec::new();
        // Joins per existing cluster.
        let mut joined: BTreeMap<Uuid, Growth> = BTreeMap::new();
        // What the group adds to each creator's background.
        let mut backgrounds: BTreeMap<String, Background> = BTreeMap::new();
        // Exact texts decided in this group (the database knows the rest).
        let mut group_texts: HashMap<(String, Vec<u8>), Uuid> = HashMap::new();
        for message in loaded {
            let embedding = message.embedding.map(|e| e.to_vec()).unwrap_or_default();
            let creator = message.row.creator_id.clone();
            let index = indexes
                .get_mut(&creator)
                .ok_or_else(|| RepoError::Db(DbErr::Custom(format!("no index for creator {creator}"))))?;
            let trigrams = if params.trigram_enabled() { Trigrams::of(&message.row.text) } else { Trigrams::default() };
            let text_key = (creator.clone(), message.norm_key);
            let exact = group_texts.get(&text_key).copied().or(message.exact_id);
            let started = std::time::Instant::now();
            let decision = index.decide(exact, &trigrams, &embedding, params);
            decisions.push((decision.reason, started.elapsed().as_secs_f64()));
            let unit = unit(&embedding);
            index.background.observe(&unit);
            backgrounds.entry(creator.clone()).or_default().observe(&unit);
            let membership = decision.membership;
            let cluster_id = match decision.cluster {
                Some(id) => {
                    index.join(id, &embedding, trigrams, membership, params.trigram_members);
                    match created.iter_mut().find(|c| c.id == id) {
                        Some(new) => new.growth.add(&embedding, membership),
                        None => joined
                            .entry(id)
                            .or_insert_with(|| Growth::empty(embedding.len()))
                            .add(&embedding, membership),
                    }
                    id
                }
                None => {
                    let mut cluster = OpenCluster::new(Uuid::now_v7(), embedding.clone(), 1, 1);
                    cluster.remember(trigrams, params.trigram_members);
                    let id = cluster.id;
                    index.insert(cluster);
                    let mut growth = Growth::empty(embedding.len());
                    growth.add(&embedding, Membership::Core);
                    created.push(NewCluster {
                        id,
                        creator_id: creator,
                        label: message.row.text.clone(),
                        growth,
                        suggested_response: None,
                    });
                    id
                }
            };
            tracing::trace!(message_id = %message.row.id, %cluster_id, reason = ?decision.reason, "decided");
            // Only a core member's text is an exact match for later messages.
            if membership == Membership::Core {
                group_texts.entry(text_key).or_insert(cluster_id);
            }
            outcomes.push(Outcome {
                message: message.row,
                cluster_id,
                membership,
                similarity: decision.similarity,
                created: decision.reason == Reason::New,
            });
        }

        suggest(&tx, &mut created, config.suggest_threshold).await?;
        write_clusters(&tx, &created, &joined, now).await?;
        let touched: Vec<Uuid> = created.iter().map(|c| c.id).chain(joined.keys().copied()).collect();
        tx.execute_raw(stmt(
            "UPDATE messages m SET status = 'clustered', cluster_id = a.cluster_id, membership = a.membership,
                                   similarity = a.similarity
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::real[]) AS a(id, cluster_id, membership, similarity)
             WHERE m.id = a.id",
            [
                uuid_array(outcomes.iter().map(|o| o.message.id)),
                uuid_array(outcomes.iter().map(|o| o.cluster_id)),
                text_array(outcomes.iter().map(|o| o.membership.as_str())),
                real_array(outcomes.iter().map(|o| o.similarity)),
            ],
        ))
        .await?;
        add_backgrounds(&tx, &backgrounds).await?;
        refresh_labels(&tx, &touched, self.label_exact_max).await?;
        let sql = format!("SELECT {CLUSTER_COLUMNS} FROM clusters WHERE id = ANY($1)");
        let rows: HashMap<Uuid, ClusterView> = ClusterRow::find_by_statement(stmt(&sql, [uuid_array(touched)]))
            .all(&tx)
            .await?
            .into_iter()
            .map(|row| (row.id, row.view()))
            .collect();

        let published = events::append(&tx, drafts(outcomes, &rows)?, now).await?;
        tx.commit().await?;
        for event in &published {
            if let Some(index) = indexes.peek_mut(event.creator_id.as_ref()) {
                index.version = index.version.max(event.event_id);
            }
        }
        Ok(Clustered { events: published, decisions, rebuilt })
    }
}

/// Makes the index of every creator in `dimensions` current: those cached
/// at the creator's last event id are kept, the others rebuilt. Returns how
/// many were rebuilt.
async fn sync_indexes(
    tx: &DatabaseTransaction,
    dimensions: &HashMap<String, usize>,
    indexes: &mut LruCache<String, CreatorIndex>,
    params: &Params,
) -> Result<usize, DbErr> {
    let creators: Vec<&String> = dimensions.keys().collect();
    let mut rows: HashMap<String, CreatorRow> = CreatorRow::find_by_statement(stmt(
        "SELECT creator_id, last_event_id, background_sum, background_count, bar_offset
         FROM creators WHERE creator_id = ANY($1)",
        [text_array(creators.iter().map(|c| c.as_str()))],
    ))
    .all(tx)
    .await?
    .into_iter()
    .map(|row| (row.creator_id.clone(), row))
    .collect();
    let mut stale: Vec<&str> = Vec::new();
    for creator in creators {
        let row = rows.remove(creator.as_str());
        let version = row.as_ref().map_or(0, |r| r.last_event_id);
        if indexes.get(creator).is_none_or(|index| index.version != version) {
            let mut index = CreatorIndex::new(version, dimensions[creator]);
            if let Some(row) = row {
                index.bar_offset = row.bar_offset;
                index.background = Background {
                    sum: row.background_sum.map(|v| v.to_vec()).unwrap_or_default(),
                    count: row.background_count,
                };
            }
            indexes.put(creator.clone(), index);
            stale.push(creator);
        }
    }
    if stale.is_empty() {
        return Ok(0);
    }
    let open = OpenRow::find_by_statement(stmt(LOAD_OPEN, [text_array(stale.iter().copied())])).all(tx).await?;
    let mut recent: HashMap<Uuid, Vec<Trigrams>> = HashMap::new();
    if params.trigram_enabled() && !open.is_empty() {
        let rows = tx
            .query_all_raw(stmt(
                LOAD_RECENT,
                [uuid_array(open.iter().map(|c| c.id)), (params.trigram_members as i64).into()],
            ))
            .await?;
        for row in rows {
            let (id, text): (Uuid, String) = (row.try_get("", "cluster_id")?, row.try_get("", "text")?);
            recent.entry(id).or_default().push(Trigrams::of(&text));
        }
    }
    for row in open {
        let Some(index) = indexes.get_mut(&row.creator_id) else { continue };
        let mut cluster =
            OpenCluster::new(row.id, row.centroid.to_vec(), i64::from(row.core_size), i64::from(row.size));
        // Newest first from the database; remembered oldest first.
        for trigrams in recent.remove(&row.id).unwrap_or_default().into_iter().rev() {
            cluster.remember(trigrams, params.trigram_members);
        }
        if cluster.sum.len() != index.dimensions() {
            return Err(DbErr::Custom(format!("cluster {} has a centroid of another dimension", row.id)));
        }
        index.insert(cluster);
    }
    Ok(stale.len())
}

/// Fills `suggested_response` of the new clusters: one query for all.
async fn suggest(tx: &DatabaseTransaction, created: &mut [NewCluster], threshold: f32) -> Result<(), DbErr> {
    if created.is_empty() {
        return Ok(());
    }
    let rows = tx
        .query_all_raw(stmt(
            SUGGEST,
            [
                text_array(created.iter().map(|c| c.creator_id.clone())),
                text_array(created.iter().map(|c| vector_literal(&c.growth.core_sum))),
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
    created: &[NewCluster],
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
                uuid_array(created.iter().map(|c| c.id)),
                text_array(created.iter().map(|c| c.creator_id.clone())),
                int_array(created.iter().map(|c| c.growth.size)),
                int_array(created.iter().map(|c| c.growth.core_size)),
                text_array(created.iter().map(|c| c.label.clone())),
                text_array(created.iter().map(|c| vector_literal(&c.growth.core_sum))),
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
                int_array(joined.values().map(|g| g.size)),
                int_array(joined.values().map(|g| g.core_size)),
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
fn drafts(outcomes: Vec<Outcome>, rows: &HashMap<Uuid, ClusterView>) -> Result<BTreeMap<String, Vec<Draft>>, DbErr> {
    let mut remaining: HashMap<Uuid, i32> = HashMap::new();
    for o in &outcomes {
        *remaining.entry(o.cluster_id).or_default() += 1;
    }
    let mut drafts: BTreeMap<String, Vec<Draft>> = BTreeMap::new();
    for o in outcomes {
        let mut cluster = rows
            .get(&o.cluster_id)
            .cloned()
            .ok_or_else(|| DbErr::Custom(format!("cluster {} vanished under its creator's lock", o.cluster_id)))?;
        let left = remaining.get_mut(&o.cluster_id).expect("counted above");
        *left -= 1;
        cluster.size -= *left;
        let mut message = o.message.view();
        message.status = MessageStatus::Clustered;
        message.cluster_id = Some(o.cluster_id);
        message.membership = Some(o.membership);
        message.similarity = Some(o.similarity);
        let kind = if o.created { EventKind::ClusterCreated } else { EventKind::ClusterUpdated };
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

fn int_array(items: impl IntoIterator<Item = i32>) -> Value {
    Value::Array(ArrayType::Int, Some(Box::new(items.into_iter().map(|i| Value::Int(Some(i))).collect())))
}

fn bigint_array(items: impl IntoIterator<Item = i64>) -> Value {
    Value::Array(ArrayType::BigInt, Some(Box::new(items.into_iter().map(|i| Value::BigInt(Some(i))).collect())))
}

fn real_array(items: impl IntoIterator<Item = f32>) -> Value {
    Value::Array(ArrayType::Float, Some(Box::new(items.into_iter().map(|x| Value::Float(Some(x))).collect())))
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
