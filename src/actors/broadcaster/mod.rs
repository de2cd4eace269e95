//! The broadcaster: fans committed cluster events out to the WebSocket
//! sessions subscribed to their creator.
//!
//! Each session registers one bounded channel. Delivery never waits: a
//! session whose channel is full is dropped (its channel closes), and the
//! session closes its socket with 1013 so the client resumes with `since`.
//! Sessions fill gaps from the durable log themselves, so an event that
//! arrives out of order here is harmless.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use actix::prelude::*;
use tokio::sync::mpsc;

use crate::{metrics::Metrics, repository::StoredEvent};

/// Identifies one WebSocket session.
pub type SessionId = u64;

/// Registers `session` for `creator_id`'s events. A session has one
/// channel for all its creators: it passes `sink` with its first
/// subscription and `None` with the later ones.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    pub session: SessionId,
    pub creator_id: Arc<str>,
    pub sink: Option<mpsc::Sender<StoredEvent>>,
}

/// Stops delivering `creator_id`'s events to `session`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    pub session: SessionId,
    pub creator_id: Arc<str>,
}

/// Forgets a closed session entirely.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub session: SessionId,
}

/// Delivers committed events to their creators' subscribers.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Publish {
    pub events: Vec<StoredEvent>,
}

struct SessionEntry {
    sink: mpsc::Sender<StoredEvent>,
    creators: HashSet<Arc<str>>,
}

pub struct Broadcaster {
    metrics: Arc<Metrics>,
    sessions: HashMap<SessionId, SessionEntry>,
    subscribers: HashMap<Arc<str>, HashSet<SessionId>>,
}

impl Broadcaster {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics, sessions: HashMap::new(), subscribers: HashMap::new() }
    }

    fn remove_session(&mut self, session: SessionId) {
        if let Some(entry) = self.sessions.remove(&session) {
            for creator in entry.creators {
                self.metrics.ws_subscriptions.dec();
                self.unlink(&creator, session);
            }
        }
    }

    fn unlink(&mut self, creator: &Arc<str>, session: SessionId) {
        if let Some(set) = self.subscribers.get_mut(creator) {
            set.remove(&session);
            if set.is_empty() {
                self.subscribers.remove(creator);
            }
        }
    }
}

impl Actor for Broadcaster {
    type Context = Context<Self>;
}

impl Supervised for Broadcaster {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // Dropping every sink closes every subscription: clients resume
        // with `since` and miss nothing.
        self.metrics.ws_subscriptions.sub(self.sessions.values().map(|s| s.creators.len() as i64).sum());
        self.sessions.clear();
        self.subscribers.clear();
    }
}

impl Handler<Subscribe> for Broadcaster {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, _ctx: &mut Self::Context) {
        let entry = match (self.sessions.get_mut(&msg.session), msg.sink) {
            (Some(entry), Some(sink)) => {
                entry.sink = sink;
                entry
            }
            (Some(entry), None) => entry,
            (None, Some(sink)) => {
                self.sessions.entry(msg.session).or_insert(SessionEntry { sink, creators: HashSet::new() })
            }
            // Dropped as too slow a moment ago: its channel is closed and the
            // session is closing with 1013.
            (None, None) => return,
        };
        if entry.creators.insert(msg.creator_id.clone()) {
            self.metrics.ws_subscriptions.inc();
        }
        self.subscribers.entry(msg.creator_id).or_default().insert(msg.session);
    }
}

impl Handler<Unsubscribe> for Broadcaster {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _ctx: &mut Self::Context) {
        let Some(entry) = self.sessions.get_mut(&msg.session) else { return };
        if entry.creators.remove(&msg.creator_id) {
            self.metrics.ws_subscriptions.dec();
        }
        let now_empty = entry.creators.is_empty();
        self.unlink(&msg.creator_id, msg.session);
        if now_empty {
            self.sessions.remove(&msg.session);
        }
    }
}

impl Handler<Disconnect> for Broadcaster {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, _ctx: &mut Self::Context) {
        self.remove_session(msg.session);
    }
}

impl Handler<Publish> for Broadcaster {
    type Result = ();

    fn handle(&mut self, msg: Publish, _ctx: &mut Self::Context) {
        let mut too_slow = HashSet::new();
        for event in msg.events {
            self.metrics.events_published.inc();
            let Some(sessions) = self.subscribers.get(&event.creator_id) else { continue };
            for session in sessions {
                if too_slow.contains(session) {
                    continue; // its later events would skip the ones it missed
                }
                let Some(entry) = self.sessions.get(session) else { continue };
                match entry.sink.try_send(event.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        self.metrics.ws_slow_closed.inc();
                        too_slow.insert(*session);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        too_slow.insert(*session);
                    }
                }
            }
        }
        for session in too_slow {
            self.remove_session(session);
        }
    }
}
