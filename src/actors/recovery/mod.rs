//! The recovery sweep: finds messages whose pipeline did not finish
//! (`pending` or `embedded`) and feeds them to the embedder or clustering
//! again, at start and every `recovery.sweep_interval_ms`.
//!
//! Work is shared with the other instances on the same database through
//! claims. Each instance has a row in `instances` (registered before it
//! serves, renewed here every third of `recovery.instance_ttl_ms`, removed
//! at a graceful stop), and every unfinished message names the instance
//! holding it (`claimed_by`: the one that ingested it or put it back to
//! `pending`, or the sweep that claimed it). A sweep claims, in one
//! statement with `FOR UPDATE SKIP LOCKED`:
//! - messages nobody alive holds, whatever their age: unclaimed ones, and
//!   those of an instance that stopped or crashed (once its row expired);
//! - its own that it has held for longer than `recovery.stale_after_ms`
//!   (work deferred by a full queue or a failed step).
//!
//! So a message is only ever in one live instance's pipeline: N instances
//! sweeping one backlog embed each message once. The exception is a crash,
//! or an instance that could not renew its row for a whole TTL (the
//! database away): its work is then taken over and may be done twice.
//! Within one instance each step is idempotent (the embedding write and the
//! clustering load only take messages still in the state they expect), so
//! a message fed twice is stored once.

use std::sync::Arc;

use actix::prelude::*;

use crate::{
    actors::{
        clustering::{ClusterItem, ClusteringPool},
        embedder::{EmbedItem, EmbedMessages, Embedder},
    },
    metrics::Metrics,
    protocol::MessageStatus,
    repository::Repository,
    settings::RecoverySettings,
};

/// Claims unfinished work now and feeds it to the pipeline.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Sweep;

/// Renews this instance's row in `instances`, which keeps its claims.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Renew;

pub struct Recovery {
    repo: Repository,
    embedder: Addr<Embedder>,
    clustering: ClusteringPool,
    settings: RecoverySettings,
    metrics: Arc<Metrics>,
    sweeping: bool,
}

impl Recovery {
    pub fn new(
        repo: Repository,
        embedder: Addr<Embedder>,
        clustering: ClusteringPool,
        settings: RecoverySettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { repo, embedder, clustering, settings, metrics, sweeping: false }
    }
}

impl Actor for Recovery {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.notify(Sweep);
        ctx.run_interval(self.settings.sweep_interval(), |_, ctx| ctx.notify(Sweep));
        ctx.run_interval(self.settings.instance_ttl() / 3, |_, ctx| ctx.notify(Renew));
    }
}

impl Supervised for Recovery {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.sweeping = false;
    }
}

impl Handler<Sweep> for Recovery {
    type Result = ();

    fn handle(&mut self, _: Sweep, ctx: &mut Self::Context) {
        if self.sweeping {
            return;
        }
        self.sweeping = true;
        let repo = self.repo.clone();
        let (stale_after, limit) = (self.settings.stale_after(), self.settings.batch);
        let work = async move { repo.claim_unfinished(stale_after, limit).await };
        ctx.spawn(work.into_actor(self).map(|result, act, _ctx| {
            act.sweeping = false;
            let found = match result {
                Ok(found) => found,
                Err(error) => {
                    tracing::warn!(%error, "recovery sweep failed; retrying at the next interval");
                    return;
                }
            };
            if found.is_empty() {
                return;
            }
            tracing::info!(count = found.len(), "resuming unfinished messages");
            act.metrics.messages_recovered.inc_by(found.len() as u64);
            let (mut to_embed, mut to_cluster) = (Vec::new(), Vec::new());
            for m in found {
                if m.status == MessageStatus::Pending {
                    to_embed.push(EmbedItem { id: m.id, creator_id: m.creator_id, text: m.text });
                } else {
                    to_cluster.push(ClusterItem { id: m.id, creator_id: m.creator_id });
                }
            }
            if !to_embed.is_empty() {
                act.embedder.do_send(EmbedMessages { items: to_embed });
            }
            act.clustering.cluster(to_cluster);
        }));
    }
}

impl Handler<Renew> for Recovery {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Renew, _ctx: &mut Self::Context) -> Self::Result {
        let repo = self.repo.clone();
        let ttl = self.settings.instance_ttl();
        Box::pin(
            async move {
                if let Err(error) = repo.renew_instance(ttl).await {
                    tracing::warn!(%error, "could not renew this instance's claims; retrying");
                }
            }
            .into_actor(self),
        )
    }
}
