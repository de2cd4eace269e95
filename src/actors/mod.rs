//! The pipeline's actors and their wiring.
//!
//! ```text
//!  HTTP / WS ──IngestMessages──▶ ingest ──EmbedMessages──▶ embedder ──ClusterMessages──▶ clustering shard (by creator)
//!                                                                                              │ Publisher::publish
//!  WS sessions ◀──── bounded channels (Subscriptions) ◀──── broadcaster ◀──────────────────────┤
//!                                                             creator operations (HTTP / WS) ──┘ Publisher::publish
//!  recovery ── at start and periodically: unfinished messages ──▶ embedder / clustering
//! ```
//!
//! With `redis.url`, the broadcaster's fan-out also publishes every event
//! to the other instances and delivers theirs here
//! ([`broadcaster::fanout`]).
//!
//! Every actor runs under an actix `Supervisor` on one dedicated arbiter:
//! if one stops, it is restarted with fresh state, and whatever it held in
//! memory is still in the database for the recovery sweep.
//!
//! [`Pipeline::flush`] waits until everything accepted before it went
//! through (see [`flush`]): tests wait on it, and graceful shutdown drains
//! the pipeline with it.

pub mod broadcaster;
pub mod clustering;
pub mod embedder;
pub mod flush;
pub mod ingest;
pub mod recovery;

use std::sync::Arc;

use actix::{Addr, Arbiter, MailboxError, Supervisor};
use deadpool_redis::redis::RedisError;
use secrecy::ExposeSecret;

use crate::{metrics::Metrics, repository::Repository, settings::Settings};

use self::{
    broadcaster::{Publisher, Subscriptions},
    clustering::{ClusteringPool, ClusteringShard},
    embedder::{Embedder, Resolver},
    flush::Flush,
    ingest::Ingest,
    recovery::Recovery,
};

/// Addresses of the running pipeline, handed to the API.
#[derive(Clone)]
pub struct Pipeline {
    pub ingest: Addr<Ingest>,
    pub embedder: Addr<Embedder>,
    /// The one path committed events take to the subscribers.
    pub publisher: Publisher,
    /// Who is subscribed to what, shared by the sessions and the broadcaster.
    pub subscriptions: Subscriptions,
    pub recovery: Addr<Recovery>,
}

impl Pipeline {
    /// Starts every actor, supervised, on `arbiter`, and with `redis.url`
    /// the fan-out of events across instances. Err: `redis.url` is no
    /// Redis URL.
    pub fn start(
        arbiter: &Arbiter,
        settings: &Settings,
        repo: Repository,
        resolver: Arc<Resolver>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RedisError> {
        let handle = arbiter.handle();
        let subscriptions = Subscriptions::new(metrics.clone());
        let outbox = match &settings.redis.url {
            Some(url) => Some(broadcaster::fanout::start(
                &handle,
                url.expose_secret(),
                &settings.fanout,
                &settings.database,
                repo.clone(),
                subscriptions.clone(),
                metrics.clone(),
            )?),
            None => {
                tracing::warn!("no redis.url: live events reach only this instance's subscribers");
                None
            }
        };
        let publisher = Publisher::start(&handle, subscriptions.clone(), outbox, metrics.clone());
        let shards = (0..settings.clustering.shards)
            .map(|_| {
                let (repo, publisher, metrics) = (repo.clone(), publisher.clone(), metrics.clone());
                let cfg = settings.clustering.clone();
                Supervisor::start_in_arbiter(&handle, move |_| ClusteringShard::new(repo, publisher, cfg, metrics))
            })
            .collect();
        let clustering = ClusteringPool::new(shards);
        let embedder = {
            let (repo, clustering, metrics) = (repo.clone(), clustering.clone(), metrics.clone());
            let cfg = settings.embedder.clone();
            Supervisor::start_in_arbiter(&handle, move |_| Embedder::new(repo, resolver, clustering, cfg, metrics))
        };
        let ingest = {
            let (repo, embedder, metrics) = (repo.clone(), embedder.clone(), metrics.clone());
            let cfg = settings.ingest.clone();
            Supervisor::start_in_arbiter(&handle, move |_| Ingest::new(repo, embedder, cfg, metrics))
        };
        let recovery = {
            let cfg = settings.recovery.clone();
            let embedder = embedder.clone();
            Supervisor::start_in_arbiter(&handle, move |_| Recovery::new(repo, embedder, clustering, cfg, metrics))
        };
        Ok(Self { ingest, embedder, publisher, subscriptions, recovery })
    }

    /// Resolves once every message accepted before it is stored, embedded,
    /// decided and its events handed to the broadcaster, or failed, or
    /// deferred to the recovery sweep (which this does not wait for; see
    /// [`flush`]). Err: the pipeline is stopped.
    pub async fn flush(&self) -> Result<(), MailboxError> {
        self.ingest.send(Flush).await
    }
}
