//! The clustering actors: one shard per `clustering.shards`, each creator
//! always on the same shard, so that one instance decides a creator's
//! messages one transaction at a time and in arrival order. Across
//! instances the creator's advisory lock (taken in the transaction)
//! serialises decisions.
//!
//! A shard owns a [`Decider`], which holds the in-memory indexes of its
//! creators' open clusters (`crate::clustering`), at most
//! `clustering.cached_creators` of them, least recently used first out.
//! The shard decides everything queued (up to `clustering.max_group`) in
//! one transaction (see [`decider`]), then publishes the resulting events
//! to the broadcaster.
//! When a group fails for a reason other than the database being away, its
//! messages are decided one by one, and a message that fails alone is
//! marked `failed` with the error: one bad message never holds up others.
//! A [`Flush`] resolves once every message queued before it is decided and
//! published, or marked failed, or deferred to the recovery sweep (the
//! database unavailable).

pub mod decider;

use std::{
    collections::VecDeque,
    hash::{Hash, Hasher},
    sync::Arc,
    time::Instant,
};

use actix::prelude::*;
use futures_util::future::join_all;
use uuid::Uuid;

use self::decider::{Decided, Decider};
use crate::{
    actors::{
        broadcaster::Publisher,
        flush::{Flush, Waiting},
    },
    metrics::Metrics,
    repository::{RepoError, Repository, StoredEvent},
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

    /// Flushes every shard (after the messages this pool sent them).
    pub async fn flush(&self) {
        for result in join_all(self.shards.iter().map(|shard| shard.send(Flush))).await {
            if let Err(error) = result {
                tracing::warn!(%error, "a clustering shard did not take the flush");
            }
        }
    }
}

pub struct ClusteringShard {
    repo: Repository,
    broadcaster: Publisher,
    settings: ClusteringSettings,
    metrics: Arc<Metrics>,
    queue: VecDeque<ClusterItem>,
    /// Messages of a failed group, to be decided one per transaction.
    isolated: VecDeque<ClusterItem>,
    /// Out of the actor while it decides a group (`busy`), then back.
    decider: Option<Decider>,
    busy: bool,
    /// This shard's share of the queue gauge, which all shards add to.
    reported_queue: i64,
    /// This shard's share of the indexed-creators gauge.
    reported_indexes: i64,
    /// Messages queued so far, and those done with (decided, failed or
    /// deferred): always the first `done` of the `queued`, since a failed
    /// group is isolated before anything queued after it is decided.
    queued: u64,
    done: u64,
    /// Failed messages being marked `failed`.
    marking: usize,
    flushes: Waiting,
}

impl ClusteringShard {
    pub fn new(repo: Repository, broadcaster: Publisher, settings: ClusteringSettings, metrics: Arc<Metrics>) -> Self {
        let decider = Decider::new(repo.clone(), (&settings).into());
        Self {
            repo,
            broadcaster,
            settings,
            metrics,
            queue: VecDeque::new(),
            isolated: VecDeque::new(),
            decider: Some(decider),
            busy: false,
            reported_queue: 0,
            reported_indexes: 0,
            queued: 0,
            done: 0,
            marking: 0,
            flushes: Waiting::default(),
        }
    }

    fn new_decider(&self) -> Decider {
        Decider::new(self.repo.clone(), (&self.settings).into())
    }

    /// Counts `n` more messages done, and resolves the flushes that waited
    /// for them.
    fn finished(&mut self, n: usize) {
        self.done += n as u64;
        let (done, marking) = (self.done, self.marking);
        self.flushes.resolve(|target| done >= target && marking == 0);
    }

    fn decide_queued(&mut self, ctx: &mut Context<Self>) {
        let queued = (self.queue.len() + self.isolated.len()) as i64;
        self.metrics.cluster_queue.add(queued - self.reported_queue);
        self.reported_queue = queued;
        if self.busy {
            return;
        }
        let group: Vec<ClusterItem> = match self.isolated.pop_front() {
            Some(item) => vec![item],
            None => {
                let n = self.queue.len().min(self.settings.max_group);
                self.queue.drain(..n).collect()
            }
        };
        if group.is_empty() {
            return;
        }
        self.busy = true;
        // Some whenever not busy; a fresh one (empty indexes) is only slower.
        let mut decider = self.decider.take().unwrap_or_else(|| self.new_decider());
        let started = Instant::now();
        let ids: Vec<(Uuid, String)> = group.iter().map(|i| (i.id, i.creator_id.clone())).collect();
        let work = async move {
            let result = decider.decide(&ids).await;
            (decider, result)
        };
        ctx.spawn(work.into_actor(self).map(move |(decider, result), act, ctx| {
            act.busy = false;
            let indexed = decider.indexed() as i64;
            act.metrics.cluster_indexed_creators.add(indexed - act.reported_indexes);
            act.reported_indexes = indexed;
            act.decider = Some(decider);
            act.metrics.cluster_commit_seconds.observe(started.elapsed().as_secs_f64());
            match result {
                Ok(decided) => {
                    act.decided(decided);
                    act.finished(group.len());
                }
                Err(RepoError::Unavailable(error)) => {
                    // The group stays `embedded`; the recovery sweep retries it.
                    act.metrics.pipeline_errors.with_label_values(&["cluster"]).inc();
                    tracing::warn!(%error, "clustering deferred: database unavailable");
                    act.finished(group.len());
                }
                Err(error) if group.len() > 1 => {
                    tracing::warn!(%error, n = group.len(), "clustering group failed; deciding its messages one by one");
                    act.isolated.extend(group);
                }
                Err(error) => {
                    act.fail(ctx, &group[0], error.to_string());
                    act.finished(1);
                }
            }
            act.decide_queued(ctx);
        }));
    }

    fn decided(&mut self, decided: Decided) {
        let Decided { events, decisions, rebuilt } = decided;
        self.metrics.messages_clustered.inc_by(events.len() as u64);
        self.metrics.cluster_index_rebuilds.inc_by(rebuilt as u64);
        for (reason, seconds) in decisions {
            self.metrics.cluster_decisions.with_label_values(&[reason.step()]).inc();
            self.metrics.cluster_decide_seconds.observe(seconds);
        }
        if !events.is_empty() {
            self.publish(events);
        }
    }

    /// Hands committed events to the subscribers.
    fn publish(&self, events: Vec<StoredEvent>) {
        self.broadcaster.publish(events);
    }

    /// Marks a message that cannot be clustered as `failed`, with the error.
    fn fail(&mut self, ctx: &mut Context<Self>, item: &ClusterItem, error: String) {
        tracing::error!(message_id = %item.id, %error, "message cannot be clustered; marking it failed");
        self.metrics.pipeline_errors.with_label_values(&["cluster"]).inc();
        let (repo, id) = (self.repo.clone(), item.id);
        self.marking += 1;
        let mark = async move {
            if let Err(e) = repo.mark_failed(id, &error).await {
                tracing::warn!(message_id = %id, error = %e, "could not mark the message failed; the sweep retries it");
            }
        };
        ctx.spawn(mark.into_actor(self).map(|(), act, _ctx| {
            act.marking -= 1;
            act.finished(0);
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
        self.isolated.clear();
        self.decider = Some(self.new_decider());
        self.busy = false;
        (self.queued, self.done, self.marking) = (0, 0, 0);
        self.flushes.clear();
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
        let taken = msg.items.len().min(room);
        self.queued += taken as u64;
        self.queue.extend(msg.items.into_iter().take(room));
        self.decide_queued(ctx);
    }
}

impl Handler<Flush> for ClusteringShard {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Flush, _ctx: &mut Self::Context) -> Self::Result {
        let flushed = self.flushes.wait(self.queued);
        self.finished(0);
        Box::pin(async move {
            // Err: the shard restarted, and its queue went to the sweep.
            let _ = flushed.await;
        })
    }
}
