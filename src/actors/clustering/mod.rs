//! The clustering actors: one shard per `clustering.shards`, each creator
//! always on the same shard, so that one instance decides a creator's
//! messages one transaction at a time and in arrival order. Across
//! instances the creator's advisory lock (taken in the transaction)
//! serialises decisions.
//!
//! A shard decides everything queued (up to `clustering.max_group`) in one
//! transaction, then publishes the resulting events to the broadcaster.

use std::{
    collections::VecDeque,
    hash::{Hash, Hasher},
    sync::Arc,
    time::Instant,
};

use actix::prelude::*;
use uuid::Uuid;

use crate::{
    actors::broadcaster::{Broadcaster, Publish},
    metrics::Metrics,
    protocol::EventKind,
    repository::{ClusterParams, Repository},
    settings::ClusteringSettings,
};

/// An embedded message waiting for its clustering decision.
#[derive(Debug, Clone)]
pub struct ClusterItem {
    pub id: Uuid,
    pub creator_id: String,
}

/// Queues messages of this shard's creators for a decision.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ClusterMessages {
    pub items: Vec<ClusterItem>,
}

/// The shards, and the routing of a creator to its shard.
#[derive(Clone)]
pub struct ClusteringPool {
    shards: Arc<[Addr<ClusteringShard>]>,
}

impl ClusteringPool {
    pub fn new(shards: Vec<Addr<ClusteringShard>>) -> Self {
        Self { shards: shards.into() }
    }

    fn shard_of(&self, creator_id: &str) -> usize {
        let mut hasher = std::hash::DefaultHasher::new();
        creator_id.hash(&mut hasher);
        (hasher.finish() % self.shards.len() as u64) as usize
    }

    /// Sends each message to its creator's shard.
    pub fn cluster(&self, items: Vec<ClusterItem>) {
        let mut per_shard: Vec<Vec<ClusterItem>> = vec![Vec::new(); self.shards.len()];
        for item in items {
            per_shard[self.shard_of(&item.creator_id)].push(item);
        }
        for (shard, items) in self.shards.iter().zip(per_shard) {
            if !items.is_empty() {
                shard.do_send(ClusterMessages { items });
            }
        }
    }
}

pub struct ClusteringShard {
    repo: Repository,
    broadcaster: Addr<Broadcaster>,
    settings: ClusteringSettings,
    metrics: Arc<Metrics>,
    queue: VecDeque<ClusterItem>,
    busy: bool,
}

impl ClusteringShard {
    pub fn new(
        repo: Repository,
        broadcaster: Addr<Broadcaster>,
        settings: ClusteringSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { repo, broadcaster, settings, metrics, queue: VecDeque::new(), busy: false }
    }

    fn decide_queued(&mut self, ctx: &mut Context<Self>) {
        self.metrics.cluster_queue.set(self.queue.len() as i64);
        if self.busy || self.queue.is_empty() {
            return;
        }
        self.busy = true;
        let n = self.queue.len().min(self.settings.max_group);
        let group: Vec<(Uuid, String)> = self.queue.drain(..n).map(|i| (i.id, i.creator_id)).collect();
        let params = ClusterParams {
            trigram_threshold: self.settings.trigram_threshold,
            vector_threshold: self.settings.vector_threshold,
        };
        let repo = self.repo.clone();
        let started = Instant::now();
        let work = async move { repo.cluster_messages(&group, params).await };
        ctx.spawn(work.into_actor(self).map(move |result, act, ctx| {
            act.busy = false;
            act.metrics.cluster_commit_seconds.observe(started.elapsed().as_secs_f64());
            match result {
                Ok(events) => {
                    act.metrics.messages_clustered.inc_by(events.len() as u64);
                    for event in &events {
                        let outcome = if event.kind == EventKind::ClusterCreated { "created" } else { "joined" };
                        act.metrics.cluster_decisions.with_label_values(&[outcome]).inc();
                    }
                    if !events.is_empty() {
                        act.broadcaster.do_send(Publish { events });
                    }
                }
                Err(error) => {
                    // The group stays `embedded`; the recovery sweep retries it.
                    act.metrics.pipeline_errors.with_label_values(&["cluster"]).inc();
                    tracing::warn!(%error, "clustering transaction failed; it will be retried");
                }
            }
            act.decide_queued(ctx);
        }));
    }
}

impl Actor for ClusteringShard {
    type Context = Context<Self>;
}

impl Supervised for ClusteringShard {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // Queued messages are `embedded` in the database: the sweep finds them.
        self.queue.clear();
        self.busy = false;
    }
}

impl Handler<ClusterMessages> for ClusteringShard {
    type Result = ();

    fn handle(&mut self, msg: ClusterMessages, ctx: &mut Self::Context) {
        let room = self.settings.queue_capacity.saturating_sub(self.queue.len());
        let deferred = msg.items.len().saturating_sub(room);
        if deferred > 0 {
            self.metrics.pipeline_dropped.with_label_values(&["cluster"]).inc_by(deferred as u64);
        }
        self.queue.extend(msg.items.into_iter().take(room));
        self.decide_queued(ctx);
    }
}
