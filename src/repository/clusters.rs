//! Clusters: listing and detail reads, and the creator operations (action,
//! remove, confirm, merge, move), each one transaction under the creator's
//! lock with its events. Every operation keeps a cluster's size, core size,
//! centroid (the sum of its *core* members' embeddings) and label (its most
//! representative core member, see [`refresh_labels`]) true to its
//! members, and an open cluster's core never empty. Removals, moves,
//! confirmations and merges are corrections: each moves the creator's
//! `bar_offset` ([`learn`]) in the same transaction.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, DbErr, DerivePartialModel, EntityTrait, FromQueryResult,
    QueryFilter, QuerySelect, Select, prelude::PgVector, sea_query::Expr,
};
use uuid::Uuid;

use super::{
    Invariant, RepoError, Repository,
    events::{self, Draft, StoredEvent},
    lock_creators,
    messages::{MESSAGE_COLUMNS, MessageRow},
    stmt, uuid_array,
};
use crate::{
    clustering::{
        self, Background, Params,
        learn::{self, Correction},
    },
    entities::{cluster, creator},
    protocol::{
        ActionResult, ClusterDetail, ClusterList, ClusterStatus, ClusterView, ConfirmResult, EventKind, HeldBack,
        Membership, MessageView, MoveResult, RemoveResult,
    },
};

/// The columns of a cluster as the API shows it (never the centroid).
pub(super) const CLUSTER_COLUMNS: &str = "id, creator_id, status, size, core_size, label, response_text, suggested_response, actioned_at, created_at, updated_at";

/// How many sample messages a listed cluster carries.
const SAMPLES: i64 = 5;

/// A row of [`CLUSTER_COLUMNS`]: read by raw statements (its derived
/// `FromQueryResult`) and through the entity (a partial model).
#[derive(Debug, DerivePartialModel)]
#[sea_orm(entity = "cluster::Entity")]
pub(super) struct ClusterRow {
    pub id: Uuid,
    pub creator_id: String,
    pub status: ClusterStatus,
    pub size: i32,
    pub core_size: i32,
    pub label: String,
    pub response_text: Option<String>,
    pub suggested_response: Option<String>,
    pub actioned_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl ClusterRow {
    pub fn view(self) -> ClusterView {
        ClusterView {
            id: self.id,
            creator_id: self.creator_id,
            status: self.status,
            size: self.size,
            core_size: self.core_size,
            label: self.label,
            response_text: self.response_text,
            suggested_response: self.suggested_response,
            actioned_at: self.actioned_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
            sample_messages: None,
        }
    }
}

/// Which clusters a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterFilter {
    Open,
    Actioned,
    All,
}

/// The order of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterSort {
    /// Most recently updated first.
    Recent,
    /// Largest first.
    Size,
}

#[derive(Debug, Clone)]
pub struct ListQuery {
    pub filter: ClusterFilter,
    pub sort: ClusterSort,
    pub limit: u32,
    pub cursor: Option<String>,
}

/// A keyset position in a listing: the sort key and id of the last row
/// shown, encoded opaquely for clients.
#[derive(Debug, PartialEq)]
enum Cursor {
    Recent(DateTime<Utc>, Uuid),
    Size(i32, Uuid),
    Message(Uuid),
}

impl Cursor {
    fn encode(&self) -> String {
        let raw = match self {
            Self::Recent(at, id) => format!("r|{}|{id}", at.timestamp_micros()),
            Self::Size(size, id) => format!("s|{size}|{id}"),
            Self::Message(id) => format!("m|{id}"),
        };
        URL_SAFE_NO_PAD.encode(raw)
    }

    fn decode(s: &str) -> Option<Self> {
        let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(s).ok()?).ok()?;
        let parts: Vec<&str> = raw.split('|').collect();
        match parts.as_slice() {
            ["r", micros, id] => {
                Some(Self::Recent(DateTime::from_timestamp_micros(micros.parse().ok()?)?, id.parse().ok()?))
            }
            ["s", size, id] => Some(Self::Size(size.parse().ok()?, id.parse().ok()?)),
            ["m", id] => Some(Self::Message(id.parse().ok()?)),
            _ => None,
        }
    }
}

/// Maps `NotFound` to `Missing` naming `what` (one of several things a
/// request names), any other error to itself.
fn missing(what: impl FnOnce() -> String) -> impl FnOnce(RepoError) -> RepoError {
    move |e| match e {
        RepoError::NotFound => RepoError::Missing(format!("{} not found", what())),
        other => other,
    }
}

/// A cursor that does not decode, or belongs to another kind of listing.
fn bad_cursor() -> RepoError {
    RepoError::Invalid("invalid cursor: pass back a next_cursor of the same listing".into())
}

impl Repository {
    /// A page of a creator's clusters, each with up to five sample messages.
    /// Returns `Invalid` for a cursor that does not fit the query.
    #[tracing::instrument(skip(self))]
    pub async fn list_clusters(&self, creator_id: &str, query: ListQuery) -> Result<ClusterList, RepoError> {
        let mut sql = format!("SELECT {CLUSTER_COLUMNS} FROM clusters WHERE creator_id = $1");
        let mut values: Vec<sea_orm::Value> = vec![creator_id.into()];
        match query.filter {
            ClusterFilter::Open => sql.push_str(" AND status = 'open'"),
            ClusterFilter::Actioned => sql.push_str(" AND status = 'actioned'"),
            ClusterFilter::All => {}
        }
        let cursor = match &query.cursor {
            Some(c) => Some(Cursor::decode(c).ok_or_else(bad_cursor)?),
            None => None,
        };
        match (query.sort, cursor) {
            (_, None) => {}
            (ClusterSort::Recent, Some(Cursor::Recent(at, id))) => {
                sql.push_str(" AND (updated_at, id) < ($2, $3)");
                values.extend([at.into(), id.into()]);
            }
            (ClusterSort::Size, Some(Cursor::Size(size, id))) => {
                sql.push_str(" AND (size, id) < ($2, $3)");
                values.extend([size.into(), id.into()]);
            }
            _ => return Err(bad_cursor()),
        }
        sql.push_str(match query.sort {
            ClusterSort::Recent => " ORDER BY updated_at DESC, id DESC",
            ClusterSort::Size => " ORDER BY size DESC, id DESC",
        });
        sql.push_str(&format!(" LIMIT {}", i64::from(query.limit) + 1));

        let mut rows = ClusterRow::find_by_statement(stmt(&sql, values)).all(&self.db).await?;
        let next_cursor = if rows.len() > query.limit as usize {
            rows.truncate(query.limit as usize);
            rows.last().map(|last| match query.sort {
                ClusterSort::Recent => Cursor::Recent(last.updated_at, last.id).encode(),
                ClusterSort::Size => Cursor::Size(last.size, last.id).encode(),
            })
        } else {
            None
        };
        let mut clusters: Vec<ClusterView> = rows.into_iter().map(ClusterRow::view).collect();
        self.attach_samples(&mut clusters).await?;
        Ok(ClusterList { clusters, next_cursor })
    }

    /// Fills `sample_messages` of every cluster with one query.
    async fn attach_samples(&self, clusters: &mut [ClusterView]) -> Result<(), RepoError> {
        if clusters.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "SELECT s.* FROM unnest($1::uuid[]) AS c(id)
             CROSS JOIN LATERAL (SELECT {MESSAGE_COLUMNS} FROM messages
                                 WHERE cluster_id = c.id ORDER BY id LIMIT {SAMPLES}) AS s"
        );
        let rows = MessageRow::find_by_statement(stmt(&sql, [uuid_array(clusters.iter().map(|c| c.id))]))
            .all(&self.db)
            .await?;
        let mut by_cluster: std::collections::HashMap<Uuid, Vec<MessageView>> = Default::default();
        for row in rows {
            let view = row.view();
            if let Some(cluster_id) = view.cluster_id {
                by_cluster.entry(cluster_id).or_default().push(view);
            }
        }
        for cluster in clusters {
            cluster.sample_messages = Some(by_cluster.remove(&cluster.id).unwrap_or_default());
        }
        Ok(())
    }

    /// The creator of cluster `id` and that creator's current
    /// `last_event_id`, in one primary-key read: what a cached detail is
    /// authorised and keyed by. `NotFound` for an unknown cluster.
    #[tracing::instrument(skip(self))]
    pub async fn cluster_generation(&self, id: Uuid) -> Result<(String, i64), RepoError> {
        let row = self
            .db
            .query_one_raw(stmt(
                "SELECT c.creator_id, coalesce(k.last_event_id, 0) AS last_event_id
                 FROM clusters c LEFT JOIN creators k ON k.creator_id = c.creator_id WHERE c.id = $1",
                [id.into()],
            ))
            .await?
            .ok_or(RepoError::NotFound)?;
        Ok((row.try_get("", "creator_id")?, row.try_get("", "last_event_id")?))
    }

    /// What names this database for the query cache, so that deployments
    /// (and test databases) sharing one Redis never share entries: the
    /// cluster's system identifier (shared by its streaming replicas), the
    /// database's oid (a database dropped and created again gets a new
    /// one) and the timeline (a point-in-time restore starts a new one).
    pub async fn cache_namespace(&self) -> Result<String, RepoError> {
        let row = self
            .db
            .query_one_raw(stmt(
                "SELECT s.system_identifier::text || ':' || d.oid::text || ':' || c.timeline_id::text AS ns
                 FROM pg_control_system() s, pg_control_checkpoint() c, pg_database d
                 WHERE d.datname = current_database()",
                [],
            ))
            .await?
            .ok_or(RepoError::NotFound)?;
        Ok(row.try_get("", "ns")?)
    }

    /// A cluster and a page of its messages, oldest first.
    #[tracing::instrument(skip(self))]
    pub async fn cluster_detail(&self, id: Uuid, limit: u32, cursor: Option<&str>) -> Result<ClusterDetail, RepoError> {
        let after = match cursor {
            None => Uuid::nil(),
            Some(c) => match Cursor::decode(c) {
                Some(Cursor::Message(id)) => id,
                _ => return Err(bad_cursor()),
            },
        };
        let cluster = self.cluster(id).await?;
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE cluster_id = $1 AND id > $2 ORDER BY id LIMIT {}",
            i64::from(limit) + 1
        );
        let mut messages: Vec<MessageView> = MessageRow::find_by_statement(stmt(&sql, [id.into(), after.into()]))
            .all(&self.db)
            .await?
            .into_iter()
            .map(MessageRow::view)
            .collect();
        let next_cursor = if messages.len() > limit as usize {
            messages.truncate(limit as usize);
            messages.last().map(|m| Cursor::Message(m.id).encode())
        } else {
            None
        };
        Ok(ClusterDetail { cluster, messages, next_cursor })
    }

    #[tracing::instrument(skip(self))]
    pub async fn cluster(&self, id: Uuid) -> Result<ClusterView, RepoError> {
        one_cluster(&self.db, cluster::Entity::find_by_id(id)).await
    }

    /// Answers a cluster and closes it. The response answers the core
    /// members; each review member leaves first into an open cluster of its
    /// own, with the events of a removal (it is not a correction: the
    /// creator has not looked at it), unless `include_review`, which makes
    /// every member core and answers them all. `Conflict` if the cluster was
    /// already actioned.
    #[tracing::instrument(skip(self, response_text))]
    pub async fn action_cluster(
        &self,
        id: Uuid,
        response_text: &str,
        include_review: bool,
    ) -> Result<(ActionResult, Vec<StoredEvent>), RepoError> {
        let (tx, cluster) = self.begin_on_cluster(id).await?;
        if cluster.status == ClusterStatus::Actioned {
            return Err(RepoError::Conflict(format!("cluster {id} is already actioned")));
        }
        let now = Utc::now();
        let mut drafts = Vec::new();
        let mut held_back = Vec::new();
        if include_review {
            promote_all(&tx, id, now).await?;
            refresh_labels(&tx, &[id], self.label_exact_max).await?;
        } else {
            let sql = format!(
                "SELECT {MESSAGE_COLUMNS}, embedding FROM messages
                 WHERE cluster_id = $1 AND membership = 'review' ORDER BY id FOR UPDATE"
            );
            let reviews = Member::find_by_statement(stmt(&sql, [id.into()])).all(&tx).await?;
            for member in reviews {
                let (message, singleton) = split_off(&tx, &cluster.creator_id, id, member, now).await?;
                let left = one_cluster(&tx, cluster::Entity::find_by_id(id)).await?;
                held_back.push(HeldBack { message_id: message.id, cluster_id: singleton.id });
                drafts.push(removal(left, message, singleton));
            }
        }
        let sql = format!(
            "UPDATE clusters SET status = 'actioned', response_text = $2, actioned_at = $3, updated_at = $3
             WHERE id = $1 RETURNING {CLUSTER_COLUMNS}"
        );
        let cluster = ClusterRow::find_by_statement(stmt(&sql, [id.into(), response_text.into(), now.into()]))
            .one(&tx)
            .await?
            .ok_or(RepoError::NotFound)?
            .view();
        let answered: Vec<Uuid> = tx
            .query_all_raw(stmt("SELECT id FROM messages WHERE cluster_id = $1 ORDER BY id", [id.into()]))
            .await?
            .iter()
            .map(|row| row.try_get("", "id"))
            .collect::<Result<_, DbErr>>()?;
        drafts.push(Draft::new(EventKind::ClusterActioned, cluster.clone()));
        let events = append_all(&tx, &cluster.creator_id, drafts, now).await?;
        tx.commit().await?;
        Ok((ActionResult { cluster, answered, held_back }, events))
    }

    /// Moves a message out of its cluster into a new open singleton cluster
    /// (as its core member). A correction: the message differs from the
    /// cluster's core. `NotFound` if the message is not in that cluster;
    /// `Conflict` if the cluster is actioned (its messages were answered) or
    /// the message is its only one.
    #[tracing::instrument(skip(self))]
    pub async fn remove_message(
        &self,
        cluster_id: Uuid,
        message_id: Uuid,
    ) -> Result<(RemoveResult, StoredEvent), RepoError> {
        let (tx, cluster) = self.begin_on_cluster(cluster_id).await?;
        let member = member_in(&tx, message_id, cluster_id).await?;
        if cluster.status == ClusterStatus::Actioned {
            return Err(RepoError::Conflict(format!(
                "cluster {cluster_id} is actioned: its messages have been answered"
            )));
        }
        if cluster.size <= 1 {
            return Err(RepoError::Conflict(format!(
                "message {message_id} is the only message of cluster {cluster_id}"
            )));
        }
        let mut lessons = self.lessons(&tx, &cluster.creator_id).await?;
        lessons.differ(member_evidence(&tx, cluster_id, &member, &lessons).await?);
        let now = Utc::now();
        let (message, singleton) = split_off(&tx, &cluster.creator_id, cluster_id, member, now).await?;
        refresh_labels(&tx, &[cluster_id], self.label_exact_max).await?;
        let left = one_cluster(&tx, cluster::Entity::find_by_id(cluster_id)).await?;
        lessons.save(&tx, &cluster.creator_id).await?;
        let draft = removal(left.clone(), message.clone(), singleton);
        let event = append_one(&tx, draft, now).await?;
        tx.commit().await?;
        Ok((RemoveResult { cluster: left, message }, event))
    }

    /// Confirms a review member: it becomes core, and the cluster's core
    /// (its centroid, `core_size`) takes it in. A correction: the message
    /// matches the cluster's core. `NotFound` if the message is not in that
    /// cluster; `Conflict` if it is core already or the cluster actioned.
    #[tracing::instrument(skip(self))]
    pub async fn confirm_message(
        &self,
        cluster_id: Uuid,
        message_id: Uuid,
    ) -> Result<(ConfirmResult, StoredEvent), RepoError> {
        let (tx, cluster) = self.begin_on_cluster(cluster_id).await?;
        let member = member_in(&tx, message_id, cluster_id).await?;
        if cluster.status == ClusterStatus::Actioned {
            return Err(RepoError::Conflict(format!(
                "cluster {cluster_id} is actioned: its messages have been answered"
            )));
        }
        if member.membership()? == Membership::Core {
            return Err(RepoError::Conflict(format!(
                "message {message_id} is a core member of cluster {cluster_id} already"
            )));
        }
        let mut lessons = self.lessons(&tx, &cluster.creator_id).await?;
        lessons.matched(member_evidence(&tx, cluster_id, &member, &lessons).await?);
        let now = Utc::now();
        tx.execute_raw(stmt("UPDATE messages SET membership = 'core' WHERE id = $1", [message_id.into()])).await?;
        tx.execute_raw(stmt(
            "UPDATE clusters SET core_size = core_size + 1, centroid = centroid + $2, updated_at = $3 WHERE id = $1",
            [cluster_id.into(), member.embedding()?.into(), now.into()],
        ))
        .await?;
        refresh_labels(&tx, &[cluster_id], self.label_exact_max).await?;
        lessons.save(&tx, &cluster.creator_id).await?;
        let cluster = one_cluster(&tx, cluster::Entity::find_by_id(cluster_id)).await?;
        let mut message = member.row.view();
        message.membership = Some(Membership::Core);
        let draft =
            Draft { message: Some(message.clone()), ..Draft::new(EventKind::MessageConfirmed, cluster.clone()) };
        let event = append_one(&tx, draft, now).await?;
        tx.commit().await?;
        Ok((ConfirmResult { cluster, message }, event))
    }

    /// Merges the open clusters `sources` into the open cluster `target`, all
    /// of one creator: their messages move to the target (each keeping its
    /// membership), whose size, core size and centroid become the sums, and
    /// the sources are deleted. A correction: each source's core matches
    /// the target's. `Missing` if any of them does not exist or belongs to
    /// another creator; `Conflict` if any is actioned. The caller checks
    /// that `sources` is non-empty, without duplicates and without `target`.
    #[tracing::instrument(skip(self))]
    pub async fn merge_clusters(
        &self,
        target: Uuid,
        sources: &[Uuid],
    ) -> Result<(ClusterView, StoredEvent), RepoError> {
        let (tx, cluster) = self.begin_on_cluster(target).await.map_err(missing(|| format!("cluster {target}")))?;
        // Another creator's clusters are not even locked: to this creator
        // they name nothing.
        let sql = format!(
            "SELECT {CLUSTER_COLUMNS} FROM clusters WHERE id = ANY($1) AND creator_id = $2 ORDER BY id FOR UPDATE"
        );
        let found: Vec<ClusterView> = ClusterRow::find_by_statement(stmt(
            &sql,
            [uuid_array(sources.iter().copied()), cluster.creator_id.clone().into()],
        ))
        .all(&tx)
        .await?
        .into_iter()
        .map(ClusterRow::view)
        .collect();
        if let Some(missing) = sources.iter().find(|id| !found.iter().any(|c| c.id == **id)) {
            return Err(RepoError::Missing(format!("cluster {missing} not found")));
        }
        if let Some(closed) = std::iter::once(&cluster).chain(&found).find(|c| c.status == ClusterStatus::Actioned) {
            return Err(RepoError::Conflict(format!("cluster {} is actioned; only open clusters merge", closed.id)));
        }

        let mut lessons = self.lessons(&tx, &cluster.creator_id).await?;
        let into = core_of(&tx, target).await?;
        for source in sources {
            let from = core_of(&tx, *source).await?;
            lessons.matched(learn::linkage(into.sum(), into.size(), from.sum(), from.size(), lessons.mu));
        }
        let now = Utc::now();
        let ids = uuid_array(sources.iter().copied());
        tx.execute_raw(stmt(
            "UPDATE messages SET cluster_id = $1 WHERE cluster_id = ANY($2)",
            [target.into(), ids.clone()],
        ))
        .await?;
        // Centroids are sums of core member embeddings, so the merged
        // centroid is the sum of the centroids (pgvector's `sum` aggregate).
        tx.execute_raw(stmt(
            "UPDATE clusters c SET size = c.size + s.size, core_size = c.core_size + s.core_size,
                    centroid = c.centroid + s.centroid, updated_at = $3
             FROM (SELECT sum(size)::integer AS size, sum(core_size)::integer AS core_size, sum(centroid) AS centroid
                   FROM clusters WHERE id = ANY($2)) AS s
             WHERE c.id = $1",
            [target.into(), ids.clone(), now.into()],
        ))
        .await?;
        tx.execute_raw(stmt("DELETE FROM clusters WHERE id = ANY($1)", [ids])).await?;
        refresh_labels(&tx, &[target], self.label_exact_max).await?;
        lessons.save(&tx, &cluster.creator_id).await?;
        let merged = one_cluster(&tx, cluster::Entity::find_by_id(target)).await?;

        let draft = Draft {
            merged_cluster_ids: Some(sources.to_vec()),
            ..Draft::new(EventKind::ClusterMerged, merged.clone())
        };
        let event = append_one(&tx, draft, now).await?;
        tx.commit().await?;
        Ok((merged, event))
    }

    /// Moves a clustered message into another open cluster of its creator,
    /// as a core member there. The cluster it leaves shrinks, or is deleted
    /// when the message was its only member. Two corrections: the message
    /// differs from the core it left and matches the one it joins.
    /// `Missing` for an unknown message, or a cluster that does not exist
    /// or belongs to another creator; `Conflict` if the message is not
    /// clustered or already in that cluster, or either cluster is actioned.
    #[tracing::instrument(skip(self))]
    pub async fn move_message(
        &self,
        message_id: Uuid,
        cluster_id: Uuid,
    ) -> Result<(MoveResult, StoredEvent), RepoError> {
        let message_missing = || RepoError::Missing(format!("message {message_id} not found"));
        let creator_id = self.message_owner(message_id).await.map_err(missing(|| format!("message {message_id}")))?;
        let tx = self.begin_tx().await?;
        lock_creators(&tx, [creator_id.as_str()]).await?;
        let sql = format!("SELECT {MESSAGE_COLUMNS}, embedding FROM messages WHERE id = $1 FOR UPDATE");
        let member =
            Member::find_by_statement(stmt(&sql, [message_id.into()])).one(&tx).await?.ok_or_else(message_missing)?;
        let target =
            cluster::Entity::find_by_id(cluster_id).filter(cluster::Column::CreatorId.eq(&creator_id)).lock_exclusive();
        let target = one_cluster(&tx, target).await.map_err(missing(|| format!("cluster {cluster_id}")))?;
        let Some(source_id) = member.row.cluster_id else {
            return Err(RepoError::Conflict(format!(
                "message {message_id} is not clustered yet (status {}); only clustered messages move",
                member.row.status
            )));
        };
        if source_id == cluster_id {
            return Err(RepoError::Conflict(format!("message {message_id} is already in cluster {cluster_id}")));
        }
        if target.status == ClusterStatus::Actioned {
            return Err(RepoError::Conflict(format!(
                "cluster {cluster_id} is actioned; messages move to open clusters"
            )));
        }
        let source = one_cluster(&tx, cluster::Entity::find_by_id(source_id).lock_exclusive()).await?;
        if source.status == ClusterStatus::Actioned {
            return Err(RepoError::Conflict(format!(
                "message {message_id} is in actioned cluster {source_id}: it has been answered"
            )));
        }

        let embedding = member.embedding()?;
        let mut lessons = self.lessons(&tx, &creator_id).await?;
        lessons.differ(member_evidence(&tx, source_id, &member, &lessons).await?);
        let joined = core_of(&tx, cluster_id).await?;
        let similarity = learn::average_similarity(joined.sum(), joined.size(), embedding.as_slice(), false);
        lessons.matched(similarity.map(|s| clustering::relative(s, lessons.mu)));
        let similarity = similarity.unwrap_or(0.0);

        let now = Utc::now();
        tx.execute_raw(stmt(
            "UPDATE messages SET cluster_id = $2, membership = 'core', similarity = $3 WHERE id = $1",
            [message_id.into(), cluster_id.into(), similarity.into()],
        ))
        .await?;
        tx.execute_raw(stmt(
            "UPDATE clusters SET size = size + 1, core_size = core_size + 1, centroid = centroid + $2, updated_at = $3
             WHERE id = $1",
            [cluster_id.into(), embedding.clone().into(), now.into()],
        ))
        .await?;
        let emptied = source.size <= 1;
        if emptied {
            // A cluster without members has no centroid or label to show.
            tx.execute_raw(stmt("DELETE FROM clusters WHERE id = $1", [source_id.into()])).await?;
            refresh_labels(&tx, &[cluster_id], self.label_exact_max).await?;
        } else {
            leave(&tx, source_id, &member, now).await?;
            refresh_labels(&tx, &[cluster_id, source_id], self.label_exact_max).await?;
        }
        lessons.save(&tx, &creator_id).await?;
        let cluster = one_cluster(&tx, cluster::Entity::find_by_id(cluster_id)).await?;
        let from_cluster =
            if emptied { None } else { Some(one_cluster(&tx, cluster::Entity::find_by_id(source_id)).await?) };
        let mut message = member.row.view();
        message.cluster_id = Some(cluster_id);
        message.membership = Some(Membership::Core);
        message.similarity = Some(similarity);

        let draft = Draft {
            message: Some(message.clone()),
            from_cluster_id: Some(source_id),
            from_cluster: from_cluster.clone(),
            ..Draft::new(EventKind::ClusterUpdated, cluster.clone())
        };
        let event = append_one(&tx, draft, now).await?;
        tx.commit().await?;
        Ok((MoveResult { cluster, from_cluster, message }, event))
    }

    /// What the creator's corrections in this transaction start from: its
    /// background and learned offset, read under the creator's lock.
    async fn lessons(&self, tx: &DatabaseTransaction, creator_id: &str) -> Result<Lessons, RepoError> {
        let row = creator::Entity::find_by_id(creator_id).one(tx).await?;
        let (background, offset) = match row {
            Some(row) => (
                Background {
                    sum: row.background_sum.map(|v| v.to_vec()).unwrap_or_default(),
                    count: row.background_count,
                },
                row.bar_offset,
            ),
            None => (Background::default(), 0.0),
        };
        let mu = self.params.as_ref().map_or(0.0, |p| background.mean_similarity(p));
        Ok(Lessons { params: self.params, mu, start: offset, offset })
    }

    /// Opens a transaction on a cluster: finds its creator, takes the
    /// creator's lock, then reads the cluster again under it.
    async fn begin_on_cluster(&self, id: Uuid) -> Result<(DatabaseTransaction, ClusterView), RepoError> {
        let creator_id = self.cluster_owner(id).await?;
        let tx = self.begin_tx().await?;
        lock_creators(&tx, [creator_id.as_str()]).await?;
        let cluster = one_cluster(&tx, cluster::Entity::find_by_id(id).lock_exclusive()).await?;
        Ok((tx, cluster))
    }
}

/// A message with its embedding, as an operation reads it.
#[derive(FromQueryResult)]
struct Member {
    #[sea_orm(nested)]
    row: MessageRow,
    embedding: Option<PgVector>,
}

impl Member {
    /// The embedding of a clustered message (it has one by construction).
    fn embedding(&self) -> Result<PgVector, Invariant> {
        self.embedding.clone().ok_or(Invariant::NoEmbedding(self.row.id))
    }

    /// How a clustered message belongs (it has a membership by construction).
    fn membership(&self) -> Result<Membership, Invariant> {
        self.row.membership.ok_or(Invariant::NoMembership(self.row.id))
    }
}

/// The message `message_id` of cluster `cluster_id`, row-locked; `NotFound`
/// if it is not in that cluster.
async fn member_in(tx: &DatabaseTransaction, message_id: Uuid, cluster_id: Uuid) -> Result<Member, RepoError> {
    let sql = format!("SELECT {MESSAGE_COLUMNS}, embedding FROM messages WHERE id = $1 AND cluster_id = $2 FOR UPDATE");
    Member::find_by_statement(stmt(&sql, [message_id.into(), cluster_id.into()]))
        .one(tx)
        .await?
        .ok_or(RepoError::NotFound)
}

/// The corrections of one operation: each moves the creator's offset from
/// where the one before left it ([`learn::corrected_offset`]); the result
/// is stored with the operation. Without clustering parameters (a
/// repository made for the command line) nothing is learned.
struct Lessons {
    params: Option<Params>,
    /// The creator's background similarity.
    mu: f32,
    start: f32,
    offset: f32,
}

impl Lessons {
    fn learn(&mut self, correction: Correction) {
        if let Some(params) = &self.params {
            self.offset = learn::corrected_offset(self.offset, params.core_threshold, correction, &params.learning);
        }
    }

    /// The creator separated a message (or cluster) scoring `z`.
    fn differ(&mut self, z: Option<f32>) {
        if let Some(z) = z {
            self.learn(Correction::Differ { z });
        }
    }

    /// The creator put together a message (or cluster) scoring `z`.
    fn matched(&mut self, z: Option<f32>) {
        if let Some(z) = z {
            self.learn(Correction::Match { z });
        }
    }

    async fn save(&self, tx: &DatabaseTransaction, creator_id: &str) -> Result<(), DbErr> {
        if self.offset != self.start {
            creator::Entity::update_many()
                .col_expr(creator::Column::BarOffset, Expr::value(self.offset))
                .filter(creator::Column::CreatorId.eq(creator_id))
                .exec(tx)
                .await?;
        }
        Ok(())
    }
}

/// A cluster's core: the sum of its core members' embeddings and their
/// count.
#[derive(DerivePartialModel)]
#[sea_orm(entity = "cluster::Entity")]
struct CoreRow {
    centroid: PgVector,
    core_size: i32,
}

impl CoreRow {
    fn sum(&self) -> &[f32] {
        self.centroid.as_slice()
    }

    fn size(&self) -> i64 {
        i64::from(self.core_size)
    }
}

async fn core_of(tx: &DatabaseTransaction, id: Uuid) -> Result<CoreRow, RepoError> {
    cluster::Entity::find_by_id(id).into_partial_model::<CoreRow>().one(tx).await?.ok_or(RepoError::NotFound)
}

/// The evidence of a member against the core of its cluster (itself left
/// out when it is core).
async fn member_evidence(
    tx: &DatabaseTransaction,
    cluster_id: Uuid,
    member: &Member,
    lessons: &Lessons,
) -> Result<Option<f32>, RepoError> {
    let core = core_of(tx, cluster_id).await?;
    let exclude = member.membership()? == Membership::Core;
    Ok(learn::score(core.sum(), core.size(), member.embedding()?.as_slice(), exclude, lessons.mu))
}

/// Takes `member` out of cluster `cluster_id` (open, with other members)
/// into a new open cluster of its own, as its core member. Returns the
/// message and the new cluster.
async fn split_off(
    tx: &DatabaseTransaction,
    creator_id: &str,
    cluster_id: Uuid,
    member: Member,
    now: DateTime<Utc>,
) -> Result<(MessageView, ClusterView), RepoError> {
    let embedding = member.embedding()?;
    leave(tx, cluster_id, &member, now).await?;
    let sql = format!(
        "INSERT INTO clusters (id, creator_id, status, size, core_size, label, centroid, created_at, updated_at)
         VALUES ($1, $2, 'open', 1, 1, $3, $4, $5, $5) RETURNING {CLUSTER_COLUMNS}"
    );
    let singleton = ClusterRow::find_by_statement(stmt(
        &sql,
        [Uuid::now_v7().into(), creator_id.into(), member.row.text.clone().into(), embedding.into(), now.into()],
    ))
    .one(tx)
    .await?
    .ok_or(Invariant::NoRow("the cluster insert"))?
    .view();
    tx.execute_raw(stmt(
        "UPDATE messages SET cluster_id = $2, membership = 'core', similarity = 1 WHERE id = $1",
        [member.row.id.into(), singleton.id.into()],
    ))
    .await?;
    let mut message = member.row.view();
    message.cluster_id = Some(singleton.id);
    message.membership = Some(Membership::Core);
    message.similarity = Some(1.0);
    Ok((message, singleton))
}

/// The event of a message leaving `left` into `singleton`.
fn removal(left: ClusterView, message: MessageView, singleton: ClusterView) -> Draft {
    Draft { message: Some(message), new_cluster: Some(singleton), ..Draft::new(EventKind::MessageRemoved, left) }
}

/// Makes every member of a cluster core: its centroid becomes the sum of
/// all of them.
async fn promote_all(tx: &DatabaseTransaction, cluster_id: Uuid, now: DateTime<Utc>) -> Result<(), DbErr> {
    tx.execute_raw(stmt(
        "UPDATE messages SET membership = 'core' WHERE cluster_id = $1 AND membership = 'review'",
        [cluster_id.into()],
    ))
    .await?;
    tx.execute_raw(stmt(
        "UPDATE clusters SET core_size = size, updated_at = $2,
                centroid = (SELECT sum(embedding) FROM messages WHERE cluster_id = $1)
         WHERE id = $1 AND core_size < size",
        [cluster_id.into(), now.into()],
    ))
    .await?;
    Ok(())
}

/// Gives each of `cluster_ids` the label its members make it: the text of
/// its most representative core member, the one whose embedding is nearest
/// the (core) centroid by cosine distance (ties: the oldest). One statement for every
/// cluster; a cluster with more than `max_members` members keeps its label,
/// since finding the nearest reads every member's embedding.
#[tracing::instrument(skip(tx))]
pub(super) async fn refresh_labels(
    tx: &DatabaseTransaction,
    cluster_ids: &[Uuid],
    max_members: i64,
) -> Result<(), DbErr> {
    if cluster_ids.is_empty() {
        return Ok(());
    }
    // `k` is the same row as `c`: an UPDATE's own table cannot be named in
    // a LATERAL subquery of its FROM list.
    tx.execute_raw(stmt(
        "UPDATE clusters c SET label = best.text
         FROM clusters k
         CROSS JOIN LATERAL (
             SELECT m.text FROM messages m WHERE m.cluster_id = k.id AND m.membership = 'core'
             ORDER BY m.embedding <=> k.centroid, m.id
             LIMIT 1
         ) AS best
         WHERE k.id = ANY($1) AND k.size <= $2 AND c.id = k.id AND c.label IS DISTINCT FROM best.text",
        [uuid_array(cluster_ids.iter().copied()), max_members.into()],
    ))
    .await?;
    Ok(())
}

/// The cluster side of a member leaving: one member fewer, and a core
/// member's embedding out of the centroid. A cluster left with review
/// members only makes them its core (an open cluster always has one). The
/// label is the caller's to refresh.
async fn leave(
    tx: &DatabaseTransaction,
    cluster_id: Uuid,
    member: &Member,
    now: DateTime<Utc>,
) -> Result<(), RepoError> {
    let core = member.membership()? == Membership::Core;
    let left = tx
        .query_one_raw(stmt(
            "UPDATE clusters SET size = size - 1, core_size = core_size - CASE WHEN $3 THEN 1 ELSE 0 END,
                    centroid = CASE WHEN $3 THEN centroid - $2 ELSE centroid END, updated_at = $4
             WHERE id = $1 RETURNING core_size = 0 AND size > 0 AS orphaned",
            [cluster_id.into(), member.embedding()?.into(), core.into(), now.into()],
        ))
        .await?
        .ok_or(RepoError::NotFound)?;
    if left.try_get::<bool>("", "orphaned")? {
        promote_all(tx, cluster_id, now).await?;
    }
    Ok(())
}

/// The one cluster `select` finds, as `conn` (the pool or a transaction)
/// sees it; `NotFound` if none. The operations' single-cluster reads: by
/// id, row-locked (`lock_exclusive`) or not, or also by creator.
async fn one_cluster(conn: &impl ConnectionTrait, select: Select<cluster::Entity>) -> Result<ClusterView, RepoError> {
    Ok(select.into_partial_model::<ClusterRow>().one(conn).await?.ok_or(RepoError::NotFound)?.view())
}

/// Appends the events of an operation, in order, under the creator's lock.
async fn append_all(
    tx: &DatabaseTransaction,
    creator_id: &str,
    drafts: Vec<Draft>,
    at: DateTime<Utc>,
) -> Result<Vec<StoredEvent>, RepoError> {
    events::append(tx, [(creator_id.to_owned(), drafts)].into(), at).await
}

/// Appends the one event of an operation, under the creator's lock.
async fn append_one(tx: &DatabaseTransaction, draft: Draft, at: DateTime<Utc>) -> Result<StoredEvent, RepoError> {
    let creator_id = draft.cluster.creator_id.clone();
    single(events::append(tx, [(creator_id, vec![draft])].into(), at).await?)
}

fn single(mut events: Vec<StoredEvent>) -> Result<StoredEvent, RepoError> {
    Ok(events.pop().ok_or(Invariant::NoRow("an event append"))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let id = Uuid::now_v7();
        let at = DateTime::from_timestamp_micros(1_764_000_000_123_456).expect("valid timestamp");
        for c in [Cursor::Recent(at, id), Cursor::Size(42, id), Cursor::Message(id)] {
            assert_eq!(Cursor::decode(&c.encode()), Some(c));
        }
        assert_eq!(Cursor::decode("not a cursor"), None);
        assert_eq!(Cursor::decode(&URL_SAFE_NO_PAD.encode("s|x|y")), None);
    }
}

/// The partial models select what the raw statements' column lists do,
/// so one row type reads both.
#[cfg(test)]
mod entity_tests {
    use sea_orm::{DbBackend, EntityTrait, PartialModelTrait, QueryTrait};

    use super::*;
    use crate::entities::message;

    fn sql<E: EntityTrait, M: PartialModelTrait>(select: Select<E>) -> String {
        M::select_cols(select.select_only()).build(DbBackend::Postgres).to_string()
    }

    fn assert_selects(sql: &str, table: &str, columns: &str) {
        let columns: Vec<&str> = columns.split(", ").collect();
        for c in &columns {
            assert!(sql.contains(&format!(r#""{table}"."{c}" AS "{c}""#)), "{c} missing from {sql}");
        }
        assert_eq!(sql.matches(" AS ").count(), columns.len(), "{sql}");
    }

    #[test]
    fn partial_models_select_the_view_columns_and_lock_when_asked() {
        let id = Uuid::nil();
        let plain = sql::<_, ClusterRow>(cluster::Entity::find_by_id(id));
        assert_selects(&plain, "clusters", CLUSTER_COLUMNS);
        assert!(!plain.contains("FOR UPDATE"), "{plain}");
        let locked = sql::<_, ClusterRow>(cluster::Entity::find_by_id(id).lock_exclusive());
        assert!(locked.ends_with(" FOR UPDATE"), "{locked}");
        assert_selects(&sql::<_, MessageRow>(message::Entity::find_by_id(id)), "messages", MESSAGE_COLUMNS);
        assert_selects(&sql::<_, CoreRow>(cluster::Entity::find_by_id(id)), "clusters", "centroid, core_size");
    }
}
