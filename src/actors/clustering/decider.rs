//! A shard's decider: it owns the in-memory indexes of its creators' open
//! clusters and decides a group in one transaction, which it begins and
//! hands to the repository's reads and writes
//! (`repository::clustering`):
//! 1. lock the creators and load the group;
//! 2. bring each creator's index up to date: one built at the creator's
//!    last event id is current (every change to a creator's clusters
//!    appends an event), any other (an operation, another instance) is
//!    rebuilt from the open clusters the repository returns;
//! 3. decide, in memory (`crate::clustering::group`);
//! 4. have the repository write the outcome and append the events; commit.
//!
//! The group's indexes leave the cache while it is decided and return only
//! once the transaction committed: a failed group leaves no rolled-back
//! decision in memory (its creators are rebuilt next time).

use std::collections::HashMap;

use chrono::Utc;
use lru::LruCache;
use uuid::Uuid;

use crate::{
    clustering::{
        CreatorIndex, Params, Reason,
        group::{GroupMessage, decide_group},
    },
    repository::{Invariant, RepoError, Repository, StoredEvent},
    settings::ClusteringSettings,
};

/// What the decision needs besides the rule's parameters.
#[derive(Debug, Clone, Copy)]
pub struct DecideConfig {
    pub params: Params,
    /// Cosine similarity to an actioned cluster from which a new cluster
    /// carries that cluster's response as `suggested_response`.
    pub suggest_threshold: f32,
    /// Creator indexes kept, least recently used first out.
    pub cached_creators: usize,
}

impl From<&ClusteringSettings> for DecideConfig {
    fn from(s: &ClusteringSettings) -> Self {
        Self { params: Params::from(s), suggest_threshold: s.suggest_threshold, cached_creators: s.cached_creators }
    }
}

/// What a committed group did, for the metrics and the subscribers.
#[derive(Debug, Default)]
pub struct Decided {
    /// The events to publish, in order.
    pub events: Vec<StoredEvent>,
    /// Per message: the step that placed it, and the seconds the in-memory
    /// decision took.
    pub decisions: Vec<(Reason, f64)>,
    /// Creator indexes built from the database.
    pub rebuilt: usize,
}

/// Decides groups of one shard's messages; see the module documentation.
pub struct Decider {
    repo: Repository,
    config: DecideConfig,
    indexes: LruCache<String, CreatorIndex>,
}

impl Decider {
    pub fn new(repo: Repository, config: DecideConfig) -> Self {
        Self { repo, config, indexes: LruCache::unbounded() }
    }

    /// How many creators' indexes are held.
    pub fn indexed(&self) -> usize {
        self.indexes.len()
    }

    /// Clusters the given messages (those still `embedded`; others are
    /// skipped: another worker got there first), in arrival order. Returns
    /// the committed events to publish.
    #[tracing::instrument(skip_all, fields(n = messages.len()))]
    pub async fn decide(&mut self, messages: &[(Uuid, String)]) -> Result<Decided, RepoError> {
        let tx = self.repo.begin().await?;
        let (group, rows) = self.repo.lock_and_load_group(&tx, messages).await?;
        if group.is_empty() {
            return Ok(Decided::default());
        }
        let (mut indexes, rebuilt) = self.current_indexes(&tx, &group).await?;
        let now = Utc::now();
        let outcome =
            decide_group(group, &mut indexes, &self.config.params).map_err(|missing| Invariant::NoIndex(missing.0))?;
        let clusters = self.repo.apply_outcome(&tx, &outcome, self.config.suggest_threshold, now).await?;
        let events = self.repo.append_decisions(&tx, rows, &outcome.placements, &clusters, now).await?;
        tx.commit().await?;

        // Committed: the indexes now match the database at these events.
        for event in &events {
            if let Some(index) = indexes.get_mut(event.creator_id.as_ref()) {
                index.version = index.version.max(event.event_id);
            }
        }
        for (creator, index) in indexes {
            self.indexes.put(creator, index);
        }
        while self.indexes.len() > self.config.cached_creators {
            self.indexes.pop_lru();
        }
        let decisions = outcome.placements.iter().map(|p| (p.reason, p.seconds)).collect();
        Ok(Decided { events, decisions, rebuilt })
    }

    /// Takes the group's creators' indexes out of the cache, rebuilding
    /// those not at the creator's last event id. Returns them and how many
    /// were rebuilt.
    async fn current_indexes(
        &mut self,
        tx: &sea_orm::DatabaseTransaction,
        group: &[GroupMessage],
    ) -> Result<(HashMap<String, CreatorIndex>, usize), RepoError> {
        // Each creator's dimension, from its first message.
        let mut dimensions: HashMap<&str, usize> = HashMap::new();
        for m in group {
            dimensions.entry(m.creator_id.as_str()).or_insert(m.embedding.len());
        }
        let creators: Vec<&str> = dimensions.keys().copied().collect();
        let mut states = self.repo.creator_states(tx, &creators).await?;
        let mut indexes = HashMap::with_capacity(creators.len());
        let mut stale: Vec<&str> = Vec::new();
        for creator in creators {
            let state = states.remove(creator).unwrap_or_default();
            let index = match self.indexes.pop(creator) {
                Some(index) if index.version == state.last_event_id => index,
                _ => {
                    stale.push(creator);
                    let mut index = CreatorIndex::new(state.last_event_id, dimensions[creator]);
                    index.background = state.background;
                    index.bar_offset = state.bar_offset;
                    index
                }
            };
            indexes.insert(creator.to_owned(), index);
        }
        if stale.is_empty() {
            return Ok((indexes, 0));
        }
        for stored in self.repo.open_clusters(tx, &stale, self.config.params.trigram_members).await? {
            let Some(index) = indexes.get_mut(&stored.creator_id) else { continue };
            if stored.cluster.sum.len() != index.dimensions() {
                return Err(Invariant::Dimensions(stored.cluster.id).into());
            }
            index.insert(stored.cluster);
        }
        Ok((indexes, stale.len()))
    }
}
