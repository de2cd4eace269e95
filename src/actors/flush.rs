//! The `Flush` message of the batching actors (ingest, embedder, clustering
//! shards), and the waiting flushes each of them keeps.
//!
//! Each actor counts the items it queued and the items it is done with (in
//! the order it queued them); a flush waits for the count queued when it
//! arrived. Done means handed on: ingest committed and handed to the
//! embedder, the embedder embedded (or marked failed) and handed to
//! clustering, a shard decided, committed and handed the events to the
//! broadcaster (or marked the message failed). An actor's flush then
//! flushes the next actor, so that a flush of ingest covers the whole
//! pipeline.
//!
//! Not covered: work deferred to the recovery sweep (a full queue, the
//! database unavailable, a provider that is down): it is in no queue, and
//! the sweep feeds it again on its timer.

use actix::prelude::*;
use tokio::sync::oneshot;

/// Resolves once everything queued before it has been done and handed on
/// (see the module documentation for what that covers, and what not).
#[derive(Message, Debug, Clone, Copy, Default)]
#[rtype(result = "()")]
pub struct Flush;

/// The flushes an actor has not resolved yet, each with the count of items
/// it waits for.
#[derive(Debug, Default)]
pub struct Waiting(Vec<(u64, oneshot::Sender<()>)>);

impl Waiting {
    /// A flush waiting until `target` items are done.
    pub fn wait(&mut self, target: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.0.push((target, tx));
        rx
    }

    /// Resolves the flushes whose target `is_done`.
    pub fn resolve(&mut self, is_done: impl Fn(u64) -> bool) {
        let (done, waiting) = std::mem::take(&mut self.0).into_iter().partition(|(target, _)| is_done(*target));
        self.0 = waiting;
        Self::send(done);
    }

    /// Resolves every flush (the actor restarts: its queue went to the
    /// recovery sweep).
    pub fn clear(&mut self) {
        Self::send(std::mem::take(&mut self.0));
    }

    fn send(done: Vec<(u64, oneshot::Sender<()>)>) {
        for (_, tx) in done {
            // The flusher may have stopped waiting; nothing to tell then.
            let _ = tx.send(());
        }
    }
}
