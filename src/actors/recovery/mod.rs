//! The recovery sweep: finds messages whose pipeline did not finish
//! (`pending` or `embedded`) and feeds them to the embedder or clustering
//! again. At start it takes every unfinished message (work a crash or
//! restart interrupted); then, every `recovery.sweep_interval_ms`, the ones
//! older than `recovery.stale_after_ms` (work deferred by a full queue or a
//! failed step). Each step is idempotent, so a message fed twice is
//! processed once.

use std::sync::Arc;

use actix::prelude::*;
use chrono::Utc;

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

/// Sweeps now; `everything` ignores the staleness delay (used at start).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Sweep {
    pub everything: bool,
}

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
        ctx.notify(Sweep { everything: true });
        ctx.run_interval(self.settings.sweep_interval(), |_, ctx| ctx.notify(Sweep { everything: false }));
    }
}

impl Supervised for Recovery {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.sweeping = false;
    }
}

impl Handler<Sweep> for Recovery {
    type Result = ();

    fn handle(&mut self, msg: Sweep, ctx: &mut Self::Context) {
        if self.sweeping {
            return;
        }
        self.sweeping = true;
        let cutoff = if msg.everything {
            Utc::now()
        } else {
            Utc::now() - chrono::Duration::from_std(self.settings.stale_after()).unwrap_or_default()
        };
        let repo = self.repo.clone();
        let limit = self.settings.batch;
        let work = async move { repo.unfinished(cutoff, limit).await };
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
