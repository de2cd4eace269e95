//! The embedder actor: batches texts, finds each batch's vectors (cache,
//! de-duplication, then one provider call for the rest), stores them, and
//! hands the messages to clustering.
//!
//! The local model runs on its own inference threads (see
//! [`crate::embedding::InferencePool`]) and the OpenAI provider is async, so
//! this actor's thread never waits for a model. A batch whose provider call
//! fails after every attempt is marked `failed` with the error (visible
//! through the API; `POST /v1/admin/messages/retry` puts it back); a batch
//! that cannot be stored stays `pending` for the recovery sweep.
//!
//! A batch leaves when it holds `embedder.batch_size` texts or when its
//! oldest text has waited `embedder.max_wait_ms`, whichever comes first; up
//! to `embedder.pool_size` batches are in flight at once, and their results
//! go on to clustering in the order the batches left, so that a creator's
//! messages are decided in arrival order. Work beyond
//! `embedder.queue_capacity` is not queued: it stays `pending` in the
//! database, where the recovery sweep finds it.
//!
//! A [`Flush`] sends what is queued before it at once (partial batches,
//! without waiting for `max_wait_ms`), waits until those batches are
//! embedded (or marked failed, or left `pending` for the sweep) and handed
//! to clustering, then flushes every clustering shard.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Instant,
};

use actix::prelude::*;
use uuid::Uuid;

use crate::{
    actors::{
        clustering::{ClusterItem, ClusteringPool},
        flush::{Flush, Waiting},
    },
    embedding::{
        EmbedCache, EmbedError, Provider,
        cache::{self, Key},
    },
    metrics::Metrics,
    repository::{Repository, messages::EmbeddedRow},
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
    resolver: Arc<Resolver>,
    clustering: ClusteringPool,
    settings: EmbedderSettings,
    metrics: Arc<Metrics>,
    queue: VecDeque<EmbedItem>,
    /// Ids queued or in a batch in flight: the recovery sweep may offer a
    /// message again while it is still here, and it is then skipped.
    held: HashSet<Uuid>,
    batches_in_flight: usize,
    /// The max-wait timer of the oldest queued text, when one is running.
    timer: Option<SpawnHandle>,
    /// The oldest queued text has waited long enough: send a partial batch.
    due: bool,
    /// Sequence number of the next batch to leave.
    next_batch: u64,
    /// Sequence number of the next batch to hand to clustering.
    next_release: u64,
    /// Finished batches waiting for an earlier one to finish, with the
    /// number of items each left with.
    finished: BTreeMap<u64, (usize, Vec<ClusterItem>)>,
    /// Items queued so far, those that left in a batch, and those whose
    /// batch was handed to clustering (in queue order).
    queued: u64,
    sent: u64,
    released: u64,
    /// Until `sent` reaches this, partial batches leave at once: a flush
    /// waits for them.
    flush_upto: u64,
    flushes: Waiting,
}

impl Embedder {
    pub fn new(
        repo: Repository,
        resolver: Arc<Resolver>,
        clustering: ClusteringPool,
        settings: EmbedderSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            repo,
            resolver,
            clustering,
            settings,
            metrics,
            queue: VecDeque::new(),
            held: HashSet::new(),
            batches_in_flight: 0,
            timer: None,
            due: false,
            next_batch: 0,
            next_release: 0,
            finished: BTreeMap::new(),
            queued: 0,
            sent: 0,
            released: 0,
            flush_upto: 0,
            flushes: Waiting::default(),
        }
    }

    /// Hands finished batches to clustering, in the order they left.
    fn release(&mut self, seq: u64, left: usize, items: Vec<ClusterItem>) {
        self.finished.insert(seq, (left, items));
        while let Some((left, items)) = self.finished.remove(&self.next_release) {
            self.next_release += 1;
            self.released += left as u64;
            if !items.is_empty() {
                self.clustering.cluster(items);
            }
        }
        let released = self.released;
        self.flushes.resolve(|target| released >= target);
    }

    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        while self.batches_in_flight < self.settings.pool_size
            && (self.queue.len() >= self.settings.batch_size
                || ((self.due || self.sent < self.flush_upto) && !self.queue.is_empty()))
        {
            let n = self.queue.len().min(self.settings.batch_size);
            let batch: Vec<EmbedItem> = self.queue.drain(..n).collect();
            self.sent += n as u64;
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
        let left = batch.len();
        let resolver = self.resolver.clone();
        let repo = self.repo.clone();
        let ids: Vec<Uuid> = batch.iter().map(|i| i.id).collect();
        let held = ids.clone();
        let work = async move {
            match resolver.vectors(&batch).await {
                Ok(vectors) => {
                    repo.mark_embedded(&ids, &vectors).await.map(Outcome::Embedded).map_err(|e| e.to_string())
                }
                // The daemon is stopping: the batch stays `pending`.
                Err(EmbedError::Stopped) => Err(EmbedError::Stopped.to_string()),
                Err(error) => {
                    let error = error.to_string();
                    repo.mark_failed_many(&ids, &error)
                        .await
                        .map(|n| Outcome::Failed(n, error))
                        .map_err(|e| e.to_string())
                }
            }
        };
        ctx.spawn(work.into_actor(self).map(move |result, act, ctx| {
            act.batches_in_flight -= 1;
            for id in &held {
                act.held.remove(id);
            }
            let items = match result {
                Ok(Outcome::Embedded(embedded)) => {
                    act.metrics.messages_embedded.inc_by(embedded.len() as u64);
                    embedded.into_iter().map(|r| ClusterItem { id: r.id, creator_id: r.creator_id }).collect()
                }
                Ok(Outcome::Failed(n, error)) => {
                    act.metrics.messages_failed.inc_by(n);
                    tracing::warn!(%error, messages = n, "embedding failed after every attempt; messages marked failed");
                    Vec::new()
                }
                Err(error) => {
                    // The batch stays `pending`; the recovery sweep retries it.
                    act.metrics.pipeline_errors.with_label_values(&["embed"]).inc();
                    tracing::warn!(%error, "embedding batch not stored; it will be retried");
                    Vec::new()
                }
            };
            act.release(seq, left, items);
            act.dispatch(ctx);
        }));
    }
}

/// How a batch ended.
enum Outcome {
    Embedded(Vec<EmbeddedRow>),
    /// The provider failed after every attempt: this many messages are now
    /// `failed` with this error.
    Failed(u64, String),
}

/// Finds the vectors of a batch: each distinct text once, from the
/// in-process cache, then Redis, then one provider call for the rest.
pub struct Resolver {
    provider: Arc<Provider>,
    cache: Arc<EmbedCache>,
    metrics: Arc<Metrics>,
    dimensions: usize,
    /// US dollars per 1,000 tokens (0 for providers that cost nothing).
    price_per_1k_tokens: f64,
}

impl Resolver {
    pub fn new(
        provider: Arc<Provider>,
        cache: Arc<EmbedCache>,
        metrics: Arc<Metrics>,
        settings: &EmbedderSettings,
    ) -> Self {
        let price_per_1k_tokens =
            if matches!(*provider, Provider::OpenAi(_)) { settings.openai.price_per_1k_tokens } else { 0.0 };
        Self { provider, cache, metrics, dimensions: settings.dimensions, price_per_1k_tokens }
    }

    /// One vector per item, in order.
    pub async fn vectors(&self, batch: &[EmbedItem]) -> Result<Vec<Arc<[f32]>>, EmbedError> {
        let model = self.provider.model();
        // Distinct keys in first-seen order; `slots[i]` is item i's key.
        let mut index: HashMap<Key, usize> = HashMap::with_capacity(batch.len());
        let mut distinct: Vec<(Key, &str)> = Vec::with_capacity(batch.len());
        let slots: Vec<usize> = batch
            .iter()
            .map(|item| {
                let key = cache::key(model, &item.text);
                *index.entry(key).or_insert_with(|| {
                    distinct.push((key, &item.text));
                    distinct.len() - 1
                })
            })
            .collect();
        self.metrics.embed_deduplicated.inc_by((batch.len() - distinct.len()) as u64);

        let keys: Vec<Key> = distinct.iter().map(|(k, _)| *k).collect();
        let mut found = self.cache.get_memory(&keys);
        self.count_hits("memory", &found);
        if self.cache.has_redis() {
            self.fill_from_redis(&keys, &mut found).await;
        }

        let missing: Vec<usize> = (0..found.len()).filter(|&i| found[i].is_none()).collect();
        self.metrics.embed_cache_misses.inc_by(missing.len() as u64);
        if !missing.is_empty() {
            let texts = missing.iter().map(|&i| distinct[i].1.to_owned()).collect();
            let vectors = self.call_provider(texts).await?;
            let fresh: Vec<(Key, Arc<[f32]>)> = missing.iter().map(|&i| keys[i]).zip(vectors).collect();
            self.cache.put_memory(&fresh);
            if self.cache.has_redis()
                && let Err(error) = self.cache.put_redis(&fresh).await
            {
                self.metrics.embed_cache_errors.inc();
                tracing::debug!(%error, "redis cache write skipped");
            }
            for (&i, (_, vector)) in missing.iter().zip(fresh) {
                found[i] = Some(vector);
            }
        }
        found
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .map(|vectors| slots.iter().map(|&s| vectors[s].clone()).collect())
            .ok_or(EmbedError::Count { expected: distinct.len(), got: 0 })
    }

    fn count_hits(&self, tier: &str, found: &[Option<Arc<[f32]>>]) {
        let hits = found.iter().filter(|v| v.is_some()).count();
        self.metrics.embed_cache_hits.with_label_values(&[tier]).inc_by(hits as u64);
    }

    /// Fills the misses of `found` from Redis; a Redis problem leaves them
    /// missing.
    async fn fill_from_redis(&self, keys: &[Key], found: &mut [Option<Arc<[f32]>>]) {
        let missing: Vec<usize> = (0..found.len()).filter(|&i| found[i].is_none()).collect();
        if missing.is_empty() {
            return;
        }
        let wanted: Vec<Key> = missing.iter().map(|&i| keys[i]).collect();
        match self.cache.get_redis(&wanted, self.dimensions).await {
            Ok(values) => {
                self.count_hits("redis", &values);
                let hits: Vec<(Key, Arc<[f32]>)> =
                    wanted.iter().zip(&values).filter_map(|(k, v)| v.clone().map(|v| (*k, v))).collect();
                self.cache.put_memory(&hits);
                for (&i, value) in missing.iter().zip(values) {
                    found[i] = value;
                }
            }
            Err(error) => {
                self.metrics.embed_cache_errors.inc();
                tracing::debug!(%error, "redis cache read skipped");
            }
        }
    }

    async fn call_provider(&self, texts: Vec<String>) -> Result<Vec<Arc<[f32]>>, EmbedError> {
        let n = texts.len();
        let started = Instant::now();
        self.metrics.embed_provider_calls.with_label_values(&[self.provider.kind()]).inc();
        let result = self.provider.embed(texts).await;
        self.metrics.embed_seconds.observe(started.elapsed().as_secs_f64());
        let embeddings = result.inspect_err(|_| self.metrics.embed_provider_errors.inc())?;
        self.metrics.embed_provider_texts.inc_by(n as u64);
        self.metrics.embed_provider_tokens.inc_by(embeddings.tokens);
        self.metrics.embed_cost_usd.inc_by(embeddings.tokens as f64 / 1000.0 * self.price_per_1k_tokens);
        if let Some(v) = embeddings.vectors.iter().find(|v| v.len() != self.dimensions) {
            return Err(EmbedError::Dimensions { expected: self.dimensions, got: v.len() });
        }
        Ok(embeddings.vectors.into_iter().map(Arc::from).collect())
    }
}

impl Actor for Embedder {
    type Context = Context<Self>;
}

impl Supervised for Embedder {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // Queued messages are `pending` in the database: the sweep finds them.
        self.queue.clear();
        self.held.clear();
        self.batches_in_flight = 0;
        self.timer = None;
        self.due = false;
        self.next_batch = 0;
        self.next_release = 0;
        self.finished.clear();
        (self.queued, self.sent, self.released, self.flush_upto) = (0, 0, 0, 0);
        self.flushes.clear();
    }
}

impl Handler<EmbedMessages> for Embedder {
    type Result = ();

    fn handle(&mut self, msg: EmbedMessages, ctx: &mut Self::Context) {
        let mut deferred = 0;
        for item in msg.items {
            if self.held.contains(&item.id) {
                continue;
            }
            if self.queue.len() >= self.settings.queue_capacity {
                deferred += 1;
                continue;
            }
            self.held.insert(item.id);
            self.queue.push_back(item);
            self.queued += 1;
        }
        if deferred > 0 {
            self.metrics.pipeline_dropped.with_label_values(&["embed"]).inc_by(deferred as u64);
        }
        self.dispatch(ctx);
    }
}

impl Handler<Flush> for Embedder {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Flush, ctx: &mut Self::Context) -> Self::Result {
        let target = self.queued;
        self.flush_upto = self.flush_upto.max(target);
        let embedded = self.flushes.wait(target);
        let released = self.released;
        self.flushes.resolve(|target| released >= target);
        self.dispatch(ctx);
        let clustering = self.clustering.clone();
        Box::pin(async move {
            // Err: the embedder restarted, and its queue went to the sweep.
            let _ = embedded.await;
            clustering.flush().await;
        })
    }
}
