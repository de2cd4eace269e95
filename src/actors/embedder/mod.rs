//! The embedder actor: batches texts, embeds each batch with one provider
//! call on a blocking thread, stores the vectors, and hands the messages to
//! clustering.
//!
//! A batch leaves when it holds `embedder.batch_size` texts or when its
//! oldest text has waited `embedder.max_wait_ms`, whichever comes first; up
//! to `embedder.pool_size` batches are in flight at once, and their results
//! go on to clustering in the order the batches left, so that a creator's
//! messages are decided in arrival order. Work beyond
//! `embedder.queue_capacity` is not queued: it stays `pending` in the
//! database, where the recovery sweep finds it.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::Instant,
};

use actix::prelude::*;
use uuid::Uuid;

use crate::{
    actors::clustering::{ClusterItem, ClusteringPool},
    embedding::Embed,
    metrics::Metrics,
    repository::Repository,
    settings::EmbedderSettings,
};

/// A stored message waiting for its embedding.
#[derive(Debug, Clone)]
pub struct EmbedItem {
    pub id: Uuid,
    pub creator_id: String,
    pub text: String,
}

/// Queues messages for embedding.
#[derive(Message)]
#[rtype(result = "()")]
pub struct EmbedMessages {
    pub items: Vec<EmbedItem>,
}

pub struct Embedder {
    repo: Repository,
    provider: Arc<dyn Embed>,
    clustering: ClusteringPool,
    settings: EmbedderSettings,
    metrics: Arc<Metrics>,
    queue: VecDeque<EmbedItem>,
    batches_in_flight: usize,
    /// The max-wait timer of the oldest queued text, when one is running.
    timer: Option<SpawnHandle>,
    /// The oldest queued text has waited long enough: send a partial batch.
    due: bool,
    /// Sequence number of the next batch to leave.
    next_batch: u64,
    /// Sequence number of the next batch to hand to clustering.
    next_release: u64,
    /// Finished batches waiting for an earlier one to finish.
    finished: BTreeMap<u64, Vec<ClusterItem>>,
}

impl Embedder {
    pub fn new(
        repo: Repository,
        provider: Arc<dyn Embed>,
        clustering: ClusteringPool,
        settings: EmbedderSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            repo,
            provider,
            clustering,
            settings,
            metrics,
            queue: VecDeque::new(),
            batches_in_flight: 0,
            timer: None,
            due: false,
            next_batch: 0,
            next_release: 0,
            finished: BTreeMap::new(),
        }
    }

    /// Hands finished batches to clustering, in the order they left.
    fn release(&mut self, seq: u64, items: Vec<ClusterItem>) {
        self.finished.insert(seq, items);
        while let Some(items) = self.finished.remove(&self.next_release) {
            self.next_release += 1;
            if !items.is_empty() {
                self.clustering.cluster(items);
            }
        }
    }

    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        while self.batches_in_flight < self.settings.pool_size
            && (self.queue.len() >= self.settings.batch_size || (self.due && !self.queue.is_empty()))
        {
            let n = self.queue.len().min(self.settings.batch_size);
            let batch: Vec<EmbedItem> = self.queue.drain(..n).collect();
            self.embed(batch, ctx);
        }
        if self.queue.is_empty() {
            self.due = false;
        } else if !self.due && self.timer.is_none() {
            self.timer = Some(ctx.run_later(self.settings.max_wait(), |act, ctx| {
                act.timer = None;
                act.due = true;
                act.dispatch(ctx);
            }));
        }
        self.metrics.embed_queue.set(self.queue.len() as i64);
    }

    fn embed(&mut self, batch: Vec<EmbedItem>, ctx: &mut Context<Self>) {
        self.batches_in_flight += 1;
        let seq = self.next_batch;
        self.next_batch += 1;
        self.metrics.embed_batch_size.observe(batch.len() as f64);
        let provider = self.provider.clone();
        let repo = self.repo.clone();
        let metrics = self.metrics.clone();
        let work = async move {
            let texts: Vec<String> = batch.iter().map(|i| i.text.clone()).collect();
            let started = Instant::now();
            let vectors = actix_web::rt::task::spawn_blocking(move || {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                provider.embed(&refs)
            })
            .await
            .map_err(|e| format!("embedding task failed: {e}"))?
            .map_err(|e| e.to_string())?
            .vectors;
            metrics.embed_seconds.observe(started.elapsed().as_secs_f64());
            let ids: Vec<Uuid> = batch.iter().map(|i| i.id).collect();
            repo.mark_embedded(&ids, &vectors).await.map_err(|e| e.to_string())
        };
        ctx.spawn(work.into_actor(self).map(move |result, act, ctx| {
            act.batches_in_flight -= 1;
            let items = match result {
                Ok(embedded) => {
                    act.metrics.messages_embedded.inc_by(embedded.len() as u64);
                    embedded.into_iter().map(|r| ClusterItem { id: r.id, creator_id: r.creator_id }).collect()
                }
                Err(error) => {
                    // The batch stays `pending`; the recovery sweep retries it.
                    act.metrics.pipeline_errors.with_label_values(&["embed"]).inc();
                    tracing::warn!(%error, "embedding batch failed; it will be retried");
                    Vec::new()
                }
            };
            act.release(seq, items);
            act.dispatch(ctx);
        }));
    }
}

impl Actor for Embedder {
    type Context = Context<Self>;
}

impl Supervised for Embedder {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // Queued messages are `pending` in the database: the sweep finds them.
        self.queue.clear();
        self.batches_in_flight = 0;
        self.timer = None;
        self.due = false;
        self.next_batch = 0;
        self.next_release = 0;
        self.finished.clear();
    }
}

impl Handler<EmbedMessages> for Embedder {
    type Result = ();

    fn handle(&mut self, msg: EmbedMessages, ctx: &mut Self::Context) {
        let room = self.settings.queue_capacity.saturating_sub(self.queue.len());
        let deferred = msg.items.len().saturating_sub(room);
        if deferred > 0 {
            self.metrics.pipeline_dropped.with_label_values(&["embed"]).inc_by(deferred as u64);
        }
        self.queue.extend(msg.items.into_iter().take(room));
        self.dispatch(ctx);
    }
}
