//! The clustering decision, for a group of embedded messages in one
//! transaction: exact normalised text, then trigram, then vector, then a new
//! cluster, among the creator's open clusters only.

use std::collections::BTreeMap;

use chrono::Utc;
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr, FromQueryResult, TransactionTrait, prelude::PgVector};
use uuid::Uuid;

use super::{
    RepoError, Repository,
    clusters::{CLUSTER_COLUMNS, ClusterRow},
    events::{self, Draft, StoredEvent},
    lock_creators,
    messages::MessageRow,
    stmt, uuid_array,
};
use crate::protocol::EventKind;

/// The thresholds of the decision.
#[derive(Debug, Clone, Copy)]
pub struct ClusterParams {
    /// pg_trgm similarity at or above which a trigram match joins.
    pub trigram_threshold: f32,
    /// Cosine similarity to a centroid at or above which a message joins.
    pub vector_threshold: f32,
}

/// The messages of the group that still need a decision, locked.
const LOAD: &str = r#"
SELECT id, creator_id, external_id, text, norm_key, visitor, status, cluster_id, sent_at,
       received_at, error, embedding
FROM messages
WHERE id = ANY($1) AND status = 'embedded' AND cluster_id IS NULL
ORDER BY id
FOR UPDATE
"#;

/// One round trip for all three candidate kinds. `open` is the creator's
/// open clusters (partial btree index); exact matches come through the
/// (creator_id, norm_key) index, trigram candidates are the members of open
/// clusters (through messages_by_cluster), and the vector candidate is the
/// nearest open centroid by an exact distance sort: a creator's open
/// clusters are few, and measured faster so than any filtered ANN scan.
pub const DECIDE: &str = r#"
WITH open AS MATERIALIZED (
    SELECT id, centroid FROM clusters WHERE creator_id = $1 AND status = 'open'
)
SELECT
    (SELECT m.cluster_id FROM messages m JOIN open o ON o.id = m.cluster_id
      WHERE m.creator_id = $1 AND m.norm_key = $2
      LIMIT 1) AS exact_id,
    t.cluster_id AS trigram_id,
    v.id AS vector_id,
    v.similarity AS vector_similarity
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT m.cluster_id, similarity(m.text, $3) AS similarity
    FROM open o JOIN messages m ON m.cluster_id = o.id
    WHERE similarity(m.text, $3) >= $4
    ORDER BY similarity DESC, m.id
    LIMIT 1
) AS t ON true
LEFT JOIN LATERAL (
    SELECT id, (1 - (centroid <=> $5))::real AS similarity
    FROM open
    ORDER BY centroid <=> $5
    LIMIT 1
) AS v ON true
"#;

#[derive(Debug, FromQueryResult)]
struct Candidates {
    exact_id: Option<Uuid>,
    trigram_id: Option<Uuid>,
    vector_id: Option<Uuid>,
    vector_similarity: Option<f32>,
}

#[derive(Debug, FromQueryResult)]
struct LoadedMessage {
    #[sea_orm(nested)]
    row: MessageRow,
    norm_key: Vec<u8>,
    embedding: Option<PgVector>,
}

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Decision {
    Join(Uuid),
    Create,
}

impl Candidates {
    fn decide(&self, params: &ClusterParams) -> Decision {
        if let Some(id) = self.exact_id.or(self.trigram_id) {
            return Decision::Join(id);
        }
        match (self.vector_id, self.vector_similarity) {
            (Some(id), Some(sim)) if sim >= params.vector_threshold => Decision::Join(id),
            _ => Decision::Create,
        }
    }
}

impl Repository {
    /// Clusters the given messages (those still `embedded`; others are
    /// skipped: another worker got there first), in arrival order, in one
    /// transaction holding the advisory locks of their creators. Returns
    /// the events to publish once committed.
    #[tracing::instrument(skip_all, fields(n = messages.len()))]
    pub async fn cluster_messages(
        &self,
        messages: &[(Uuid, String)],
        params: ClusterParams,
    ) -> Result<Vec<StoredEvent>, RepoError> {
        let tx = self.db.begin().await?;
        lock_creators(&tx, messages.iter().map(|(_, c)| c.as_str())).await?;
        let loaded = LoadedMessage::find_by_statement(stmt(LOAD, [uuid_array(messages.iter().map(|(id, _)| *id))]))
            .all(&tx)
            .await?;

        let now = Utc::now();
        let mut drafts: BTreeMap<String, Vec<Draft>> = BTreeMap::new();
        let mut assignments = Vec::with_capacity(loaded.len());
        for message in loaded {
            let Some(embedding) = message.embedding else {
                return Err(RepoError::Db(DbErr::Custom(format!(
                    "embedded message {} has no embedding",
                    message.row.id
                ))));
            };
            let embedding = embedding.to_vec();
            let draft = decide_one(&tx, message.row, &message.norm_key, embedding, params, now).await?;
            assignments.push((draft.message.as_ref().map(|m| m.id), draft.cluster.id));
            drafts.entry(draft.cluster.creator_id.clone()).or_default().push(draft);
        }
        if !assignments.is_empty() {
            tx.execute_raw(stmt(
                "UPDATE messages m SET status = 'clustered', cluster_id = a.cluster_id
                 FROM unnest($1::uuid[], $2::uuid[]) AS a(id, cluster_id) WHERE m.id = a.id",
                [
                    uuid_array(assignments.iter().filter_map(|(m, _)| *m)),
                    uuid_array(assignments.iter().map(|(_, c)| *c)),
                ],
            ))
            .await?;
        }
        let published = events::append(&tx, drafts, now).await?;
        tx.commit().await?;
        Ok(published)
    }
}

/// Decides one message and applies the cluster side of the decision; the
/// message row itself is updated by the caller, for the whole group at once.
async fn decide_one(
    tx: &DatabaseTransaction,
    row: MessageRow,
    norm_key: &[u8],
    embedding: Vec<f32>,
    params: ClusterParams,
    now: chrono::DateTime<Utc>,
) -> Result<Draft, DbErr> {
    let candidates = Candidates::find_by_statement(stmt(
        DECIDE,
        [
            row.creator_id.clone().into(),
            norm_key.to_vec().into(),
            row.text.clone().into(),
            params.trigram_threshold.into(),
            PgVector::from(embedding.clone()).into(),
        ],
    ))
    .one(tx)
    .await?
    .ok_or_else(|| DbErr::Custom("the decision query returned no row".into()))?;

    let (kind, cluster) = match candidates.decide(&params) {
        Decision::Join(cluster_id) => {
            let sql = format!(
                "UPDATE clusters SET size = size + 1, centroid = centroid + $2, updated_at = $3
                 WHERE id = $1 RETURNING {CLUSTER_COLUMNS}"
            );
            let cluster = ClusterRow::find_by_statement(stmt(
                &sql,
                [cluster_id.into(), PgVector::from(embedding).into(), now.into()],
            ))
            .one(tx)
            .await?
            .ok_or_else(|| DbErr::Custom(format!("cluster {cluster_id} vanished under its creator's lock")))?;
            (EventKind::ClusterUpdated, cluster)
        }
        Decision::Create => {
            let sql = format!(
                "INSERT INTO clusters (id, creator_id, status, size, label, centroid, created_at, updated_at)
                 VALUES ($1, $2, 'open', 1, $3, $4, $5, $5) RETURNING {CLUSTER_COLUMNS}"
            );
            let cluster = ClusterRow::find_by_statement(stmt(
                &sql,
                [
                    Uuid::now_v7().into(),
                    row.creator_id.clone().into(),
                    row.text.clone().into(),
                    PgVector::from(embedding).into(),
                    now.into(),
                ],
            ))
            .one(tx)
            .await?
            .ok_or_else(|| DbErr::Custom("cluster insert returned no row".into()))?;
            (EventKind::ClusterCreated, cluster)
        }
    };
    let cluster = cluster.view();
    let mut message = row.view();
    message.status = crate::protocol::MessageStatus::Clustered;
    message.cluster_id = Some(cluster.id);
    Ok(Draft { message: Some(message), ..Draft::new(kind, cluster) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ClusterParams {
        ClusterParams { trigram_threshold: 0.5, vector_threshold: 0.8 }
    }

    #[test]
    fn exact_beats_trigram_beats_vector() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let all =
            Candidates { exact_id: Some(a), trigram_id: Some(b), vector_id: Some(c), vector_similarity: Some(0.99) };
        assert_eq!(all.decide(&params()), Decision::Join(a));
        let no_exact = Candidates { exact_id: None, ..all };
        assert_eq!(no_exact.decide(&params()), Decision::Join(b));
        let vector_only = Candidates { trigram_id: None, ..no_exact };
        assert_eq!(vector_only.decide(&params()), Decision::Join(c));
    }

    #[test]
    fn vector_below_threshold_creates() {
        let c = Candidates {
            exact_id: None,
            trigram_id: None,
            vector_id: Some(Uuid::now_v7()),
            vector_similarity: Some(0.79),
        };
        assert_eq!(c.decide(&params()), Decision::Create);
        let none = Candidates { exact_id: None, trigram_id: None, vector_id: None, vector_similarity: None };
        assert_eq!(none.decide(&params()), Decision::Create);
    }
}
