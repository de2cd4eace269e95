//! The ingest actor: durable group commit of validated messages.
//!
//! Messages queue here; up to `ingest.pool_size` commits run at once, each
//! taking everything queued (up to `ingest.max_group`) into one
//! transaction. Messages that arrive while commits are in flight wait for
//! the next one, so under load one fsync acknowledges many messages without
//! any artificial delay when idle. A message is acknowledged only after its
//! transaction committed; then it is handed to the embedder. A commit that
//! takes longer than `ingest.commit_timeout_ms` (a database that hangs) is
//! abandoned: its clients get `Unavailable`, and its slot is free again.
//!
//! A [`Flush`] waits until every message queued before it is committed (or
//! refused) and handed to the embedder, then flushes the embedder, which
//! flushes clustering: it resolves when the whole pipeline is done with
//! what was accepted before it (but for work deferred to the recovery
//! sweep; see `actors::flush`).

use std::{
    collections::{BTreeSet, VecDeque},
    sync::Arc,
    time::Instant,
};

use actix::prelude::*;
use futures_util::future::try_join_all;
use tokio::sync::oneshot;

use crate::{
    actors::{
        embedder::{EmbedItem, EmbedMessages, Embedder},
        flush::{Flush, Waiting},
    },
    domain::validate::NewMessage,
    metrics::Metrics,
    repository::{InsertOutcome, RepoError, Repository},
    settings::IngestSettings,
};

#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    /// Too much is waiting already: the client should retry later.
    #[error("ingest queue is full")]
    Overloaded,
    #[error("database unavailable")]
    Unavailable,
    #[error("storing failed: {0}")]
    Failed(String),
}

/// Stores messages durably; resolves, per message in order, once committed.
#[derive(Message)]
#[rtype(result = "Result<Vec<InsertOutcome>, IngestError>")]
pub struct IngestMessages {
    pub messages: Vec<NewMessage>,
}

struct Queued {
    message: NewMessage,
    reply: oneshot::Sender<Result<InsertOutcome, IngestError>>,
}

pub struct Ingest {
    repo: Repository,
    embedder: Addr<Embedder>,
    settings: IngestSettings,
    metrics: Arc<Metrics>,
    queue: VecDeque<Queued>,
    commits_in_flight: usize,
    /// Messages queued so far, and those drawn into a commit; the commits
    /// in flight, by the position of their first message (they finish in
    /// any order).
    queued: u64,
    drawn: u64,
    in_flight: BTreeSet<u64>,
    flushes: Waiting,
}

impl Ingest {
    pub fn new(repo: Repository, embedder: Addr<Embedder>, settings: IngestSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            repo,
            embedder,
            settings,
            metrics,
            queue: VecDeque::new(),
            commits_in_flight: 0,
            queued: 0,
            drawn: 0,
            in_flight: BTreeSet::new(),
            flushes: Waiting::default(),
        }
    }

    /// Resolves the flushes whose messages are all committed and handed on.
    fn resolve_flushes(&mut self) {
        let (drawn, oldest) = (self.drawn, self.in_flight.first().copied());
        self.flushes.resolve(|target| drawn >= target && oldest.is_none_or(|first| first >= target));
    }

    /// Starts commits while there is queued work and a free slot.
    fn commit_queued(&mut self, ctx: &mut Context<Self>) {
        while self.commits_in_flight < self.settings.pool_size && !self.queue.is_empty() {
            let n = self.queue.len().min(self.settings.max_group);
            let group: Vec<Queued> = self.queue.drain(..n).collect();
            self.commits_in_flight += 1;
            let first = self.drawn;
            self.drawn += n as u64;
            self.in_flight.insert(first);
            let repo = self.repo.clone();
            let messages: Vec<NewMessage> = group.iter().map(|w| w.message.clone()).collect();
            let started = Instant::now();
            let timeout = self.settings.commit_timeout();
            let commit = async move {
                tokio::time::timeout(timeout, repo.insert_messages(&messages))
                    .await
                    .unwrap_or(Err(RepoError::TimedOut(timeout)))
            };
            ctx.spawn(commit.into_actor(self).map(move |result, act, ctx| {
                act.commits_in_flight -= 1;
                act.metrics.ingest_commit_seconds.observe(started.elapsed().as_secs_f64());
                act.metrics.ingest_group_size.observe(group.len() as f64);
                act.answer(group, result);
                act.in_flight.remove(&first);
                act.resolve_flushes();
                act.commit_queued(ctx);
            }));
        }
    }

    /// Acknowledges a committed group, then hands its new messages on.
    fn answer(&mut self, group: Vec<Queued>, result: Result<Vec<InsertOutcome>, RepoError>) {
        let outcomes = match result {
            Ok(outcomes) => outcomes,
            Err(err) => {
                let err = match err {
                    RepoError::Unavailable(_) | RepoError::TimedOut(_) => {
                        tracing::warn!(error = %err, "group commit failed: database unavailable");
                        IngestError::Unavailable
                    }
                    other => {
                        tracing::error!(error = %other, "group commit failed");
                        IngestError::Failed(other.to_string())
                    }
                };
                self.metrics.ingest_rejected.with_label_values(&["storage"]).inc_by(group.len() as u64);
                for waiting in group {
                    let _ = waiting.reply.send(Err(err.clone()));
                }
                return;
            }
        };
        let mut fresh = Vec::with_capacity(group.len());
        for (waiting, outcome) in group.into_iter().zip(outcomes) {
            match &outcome {
                InsertOutcome::Inserted(_) => {
                    self.metrics.messages_ingested.inc();
                    fresh.push(EmbedItem {
                        id: waiting.message.id,
                        creator_id: waiting.message.creator_id.clone(),
                        text: waiting.message.text.clone(),
                    });
                }
                InsertOutcome::Duplicate(_) => self.metrics.messages_duplicate.inc(),
            }
            // The client may have gone; the message is stored regardless.
            let _ = waiting.reply.send(Ok(outcome));
        }
        if !fresh.is_empty() {
            self.embedder.do_send(EmbedMessages { items: fresh });
        }
    }
}

impl Actor for Ingest {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.settings.queue_capacity.max(16));
    }
}

impl Supervised for Ingest {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // Waiting clients see their reply channel close (an error, no ack);
        // nothing they sent was acknowledged, so nothing is lost.
        self.queue.clear();
        self.commits_in_flight = 0;
        (self.queued, self.drawn) = (0, 0);
        self.in_flight.clear();
        self.flushes.clear();
    }
}

impl Handler<IngestMessages> for Ingest {
    type Result = ResponseFuture<Result<Vec<InsertOutcome>, IngestError>>;

    fn handle(&mut self, msg: IngestMessages, ctx: &mut Self::Context) -> Self::Result {
        if self.queue.len() + msg.messages.len() > self.settings.queue_capacity {
            self.metrics.ingest_rejected.with_label_values(&["overloaded"]).inc_by(msg.messages.len() as u64);
            return Box::pin(async { Err(IngestError::Overloaded) });
        }
        let mut replies = Vec::with_capacity(msg.messages.len());
        for message in msg.messages {
            let (reply, rx) = oneshot::channel();
            self.queue.push_back(Queued { message, reply });
            replies.push(rx);
        }
        self.queued += replies.len() as u64;
        self.commit_queued(ctx);
        Box::pin(async move {
            let results = try_join_all(replies).await.map_err(|_| IngestError::Unavailable)?;
            results.into_iter().collect()
        })
    }
}

impl Handler<Flush> for Ingest {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Flush, _ctx: &mut Self::Context) -> Self::Result {
        let committed = self.flushes.wait(self.queued);
        self.resolve_flushes();
        let embedder = self.embedder.clone();
        Box::pin(async move {
            // Err: ingest restarted; its clients were not acknowledged.
            let _ = committed.await;
            if let Err(error) = embedder.send(Flush).await {
                tracing::warn!(%error, "the embedder did not take the flush");
            }
        })
    }
}
