//! The one registry of live subscriptions, shared by the WebSocket sessions
//! (which subscribe, record what they delivered, and leave) and those who
//! deliver: the broadcaster (this instance's events) and the fan-out (other
//! instances' events, and the log while Redis is away).
//!
//! A session has one bounded channel for all its creators, registered with
//! its first subscription and dropped with its last. Delivery never waits: a
//! session whose channel is full is dropped from the registry, which drops
//! its sender, so the session reads a closed channel and closes with 1013.
//!
//! Two indexes, kept by this type alone: by session (its channel and, per
//! creator, the last event id it delivered) and by creator (who to deliver
//! to, with a clone of each session's sender, so that delivering an event
//! reads the creator's entry alone, however many sessions it has). A method
//! that touches both takes the session's entry first and never holds a
//! creator's entry while it takes a session's, so concurrent callers cannot
//! deadlock; [`Subscriptions::remove_session`] is the one
//! cleanup (a session closing, a slow one dropped, a broadcaster restart).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use dashmap::{DashMap, mapref::entry::Entry};
use tokio::sync::mpsc;

use crate::{metrics::Metrics, repository::StoredEvent};

/// Identifies one WebSocket session.
pub type SessionId = u64;

/// How an event reached this instance's registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryPath {
    /// Committed by this instance.
    Local,
    /// From another instance, over Redis pub/sub.
    Redis,
    /// Read from the log by the fallback poll (Redis away).
    Log,
}

impl DeliveryPath {
    fn label(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Redis => "redis",
            Self::Log => "log",
        }
    }
}

/// Who is subscribed to what; cheap to clone, every clone is the same
/// registry.
#[derive(Clone)]
pub struct Subscriptions(Arc<Registry>);

struct Registry {
    sessions: DashMap<SessionId, Session>,
    /// Per creator, its sessions and each one's sender (a clone of the
    /// session's own).
    subscribers: DashMap<Arc<str>, HashMap<SessionId, mpsc::Sender<StoredEvent>>>,
    metrics: Arc<Metrics>,
}

struct Session {
    sink: mpsc::Sender<StoredEvent>,
    /// Subscribed creators and the last event id delivered for each; `None`
    /// until the session has read where the log stands.
    creators: HashMap<Arc<str>, Option<i64>>,
}

impl Subscriptions {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(Registry { sessions: DashMap::new(), subscribers: DashMap::new(), metrics }))
    }

    /// Whether `session` is subscribed to `creator_id`.
    pub fn contains(&self, session: SessionId, creator_id: &str) -> bool {
        self.0.sessions.get(&session).is_some_and(|s| s.creators.contains_key(creator_id))
    }

    /// Registers `session` for `creator_id`'s events from now on. A session
    /// passes `sink` with its first subscription and `None` with the later
    /// ones; one dropped as too slow a moment ago (its channel is closed and
    /// it is closing with 1013) is not registered again.
    pub fn subscribe(&self, session: SessionId, creator_id: Arc<str>, sink: Option<mpsc::Sender<StoredEvent>>) {
        let registry = &self.0;
        let mut entry = match (registry.sessions.entry(session), sink) {
            (Entry::Occupied(mut entry), Some(sink)) => {
                // A new channel: its creators deliver to it from now on.
                for creator in entry.get().creators.keys() {
                    if let Some(mut sessions) = registry.subscribers.get_mut(creator) {
                        sessions.insert(session, sink.clone());
                    }
                }
                entry.get_mut().sink = sink;
                entry.into_ref()
            }
            (Entry::Occupied(entry), None) => entry.into_ref(),
            (Entry::Vacant(entry), Some(sink)) => entry.insert(Session { sink, creators: HashMap::new() }),
            (Entry::Vacant(_), None) => return,
        };
        if entry.creators.insert(creator_id.clone(), None).is_none() {
            registry.metrics.ws_subscriptions.inc();
        }
        let sink = entry.sink.clone();
        registry.subscribers.entry(creator_id).or_default().insert(session, sink);
    }

    /// The last event id `session` delivered of `creator_id`'s; `None` when
    /// it is not (or not yet) subscribed.
    pub fn delivered(&self, session: SessionId, creator_id: &str) -> Option<i64> {
        self.0.sessions.get(&session).and_then(|s| s.creators.get(creator_id).copied().flatten())
    }

    /// Records that `session` delivered `creator_id`'s events up to
    /// `event_id` (or, just subscribed, that the log stood there).
    pub fn set_delivered(&self, session: SessionId, creator_id: &str, event_id: i64) {
        if let Some(mut s) = self.0.sessions.get_mut(&session)
            && let Some(last) = s.creators.get_mut(creator_id)
        {
            *last = Some(event_id);
        }
    }

    /// Stops delivering `creator_id`'s events to `session`. True when that
    /// was its last subscription: its sender is dropped now, and the session
    /// drops its receiver too (else the closed channel would read as "too
    /// slow").
    pub fn unsubscribe(&self, session: SessionId, creator_id: &str) -> bool {
        let registry = &self.0;
        let Some(mut entry) = registry.sessions.get_mut(&session) else { return false };
        if entry.creators.remove(creator_id).is_some() {
            registry.metrics.ws_subscriptions.dec();
            registry.unlink(creator_id, session);
        }
        let now_empty = entry.creators.is_empty();
        drop(entry);
        now_empty && registry.sessions.remove_if(&session, |_, s| s.creators.is_empty()).is_some()
    }

    /// Forgets `session` entirely and drops its sender.
    pub fn remove_session(&self, session: SessionId) {
        let registry = &self.0;
        if let Some((_, removed)) = registry.sessions.remove(&session) {
            for creator in removed.creators.keys() {
                registry.metrics.ws_subscriptions.dec();
                registry.unlink(creator, session);
            }
        }
    }

    /// Drops every session: each closes with 1013 and resumes with `since`.
    pub fn remove_all(&self) {
        let sessions: Vec<SessionId> = self.0.sessions.iter().map(|s| *s.key()).collect();
        for session in sessions {
            self.remove_session(session);
        }
    }

    /// Whether anyone is subscribed to `creator_id` here.
    pub fn has_subscribers(&self, creator_id: &str) -> bool {
        self.0.subscribers.contains_key(creator_id)
    }

    /// For each creator with subscribers here, the lowest last event id its
    /// sessions delivered (sessions still reading where the log stands are
    /// left out: they read it themselves). An event of the log above it is
    /// one some session here has not had.
    pub fn positions(&self) -> Vec<(Arc<str>, i64)> {
        let creators: Vec<(Arc<str>, Vec<SessionId>)> = self
            .0
            .subscribers
            .iter()
            .map(|entry| (entry.key().clone(), entry.value().keys().copied().collect()))
            .collect();
        // No creator's entry is held from here on (see the module's docs).
        creators
            .into_iter()
            .filter_map(|(creator, sessions)| {
                let lowest = sessions.into_iter().filter_map(|session| self.delivered(session, &creator)).min()?;
                Some((creator, lowest))
            })
            .collect()
    }

    /// Hands each event to its creator's subscribers, in order, without
    /// waiting; a session whose channel is full (or closed) is dropped and
    /// gets none of the later events, which it would have to skip. `path`
    /// says how the event got here, for the delivery latency histogram
    /// (from the event's commit to its hand-over to the sessions).
    pub fn deliver(&self, events: Vec<StoredEvent>, path: DeliveryPath) {
        let registry = &self.0;
        let mut too_slow = HashSet::new();
        let latency = registry.metrics.event_delivery_seconds.with_label_values(&[path.label()]);
        for event in events {
            // Held while handing out (`try_send` never waits); no session's
            // entry is taken meanwhile (see the module's docs).
            let Some(sessions) = registry.subscribers.get(&event.creator_id) else { continue };
            let mut handed = false;
            for (&session, sink) in sessions.iter() {
                if !too_slow.is_empty() && too_slow.contains(&session) {
                    continue;
                }
                match sink.try_send(event.clone()) {
                    Ok(()) => handed = true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        registry.metrics.ws_slow_closed.inc();
                        too_slow.insert(session);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        too_slow.insert(session);
                    }
                }
            }
            drop(sessions);
            if handed {
                // A clock behind the committing instance's reads as 0.
                let elapsed = (chrono::Utc::now() - event.at).to_std().unwrap_or_default();
                latency.observe(elapsed.as_secs_f64());
            }
        }
        for session in too_slow {
            self.remove_session(session);
        }
    }
}

impl Registry {
    fn unlink(&self, creator_id: &str, session: SessionId) {
        if let Some(mut sessions) = self.subscribers.get_mut(creator_id) {
            sessions.remove(&session);
        } // the guard goes before the next call: both may lock the same shard
        self.subscribers.remove_if(creator_id, |_, set| set.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc::error::TryRecvError;

    use super::*;

    fn registry() -> (Subscriptions, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        (Subscriptions::new(metrics.clone()), metrics)
    }

    /// Session 1, subscribed to creators `a` and `b` on one channel.
    fn subscribed_to_a_and_b() -> (Subscriptions, Arc<Metrics>, mpsc::Receiver<StoredEvent>) {
        let (subscriptions, metrics) = registry();
        let (tx, rx) = mpsc::channel(4);
        subscriptions.subscribe(1, "a".into(), Some(tx));
        subscriptions.subscribe(1, "b".into(), None);
        (subscriptions, metrics, rx)
    }

    #[test]
    fn a_session_has_one_channel_for_its_creators_closed_with_the_last_of_them() {
        let (subscriptions, metrics, mut rx) = subscribed_to_a_and_b();
        assert_eq!(metrics.ws_subscriptions.get(), 2);
        assert!(subscriptions.contains(1, "a") && subscriptions.contains(1, "b"));
        assert!(!subscriptions.contains(2, "a"), "another session subscribed to nothing");
        assert_eq!(subscriptions.delivered(1, "a"), None, "no position until the session read the log's");
        subscriptions.set_delivered(1, "a", 7);
        assert_eq!(subscriptions.delivered(1, "a"), Some(7));

        assert!(!subscriptions.unsubscribe(1, "a"), "b is still subscribed");
        assert!(!subscriptions.contains(1, "a"));
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty, "the channel stays open for b");
        assert!(subscriptions.unsubscribe(1, "b"), "b was the last");
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Disconnected);
        assert_eq!(metrics.ws_subscriptions.get(), 0);
        assert!(subscriptions.0.sessions.is_empty() && subscriptions.0.subscribers.is_empty());
    }

    #[test]
    fn a_dropped_session_is_closed_and_not_registered_again_on_its_old_channel() {
        let (subscriptions, metrics, mut rx) = subscribed_to_a_and_b();
        subscriptions.remove_session(1);
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Disconnected, "the session closes with 1013");
        assert_eq!(metrics.ws_subscriptions.get(), 0);

        subscriptions.subscribe(1, "c".into(), None);
        assert!(!subscriptions.contains(1, "c"), "it is closing: no subscription without a channel");
        assert!(!subscriptions.unsubscribe(1, "a"), "keeps its receiver, to read the close");
        assert_eq!(metrics.ws_subscriptions.get(), 0);
        assert!(subscriptions.0.sessions.is_empty() && subscriptions.0.subscribers.is_empty());
    }

    #[test]
    fn a_full_channel_drops_its_session_alone_and_every_other_gets_the_same_frame() {
        let (subscriptions, metrics) = registry();
        let (fast_tx, mut fast) = mpsc::channel(8);
        let (slow_tx, mut slow) = mpsc::channel(1);
        subscriptions.subscribe(1, "a".into(), Some(fast_tx));
        subscriptions.subscribe(2, "a".into(), Some(slow_tx));
        let at = chrono::Utc::now();
        let events = (1..=3)
            .map(|event_id| StoredEvent {
                creator_id: "a".into(),
                event_id,
                frame: format!("{{\"n\":{event_id}}}").into(),
                at,
            })
            .collect();
        subscriptions.deliver(events, DeliveryPath::Local);

        let first = fast.try_recv().expect("the fast session has event 1");
        let ids: Vec<i64> = std::iter::from_fn(|| fast.try_recv().ok()).map(|e| e.event_id).collect();
        assert_eq!(ids, [2, 3], "the fast session has every event");
        let slow_first = slow.try_recv().expect("the slow session had room for one");
        assert_eq!(slow_first.frame.as_ptr(), first.frame.as_ptr(), "one serialised frame, shared, not copied");
        assert_eq!(slow.try_recv().unwrap_err(), TryRecvError::Disconnected, "then it was dropped: 1013");
        assert_eq!(metrics.ws_slow_closed.get(), 1);
        assert!(subscriptions.contains(1, "a") && !subscriptions.contains(2, "a"));
        assert_eq!(metrics.ws_subscriptions.get(), 1);
    }

    #[test]
    fn removing_every_session_closes_each_channel_and_zeroes_the_gauge() {
        let (subscriptions, metrics) = registry();
        let receivers: Vec<_> = (1..=3)
            .map(|session| {
                let (tx, rx) = mpsc::channel(4);
                subscriptions.subscribe(session, "a".into(), Some(tx));
                subscriptions.subscribe(session, format!("own-{session}").into(), None);
                rx
            })
            .collect();
        assert_eq!(metrics.ws_subscriptions.get(), 6);
        subscriptions.remove_all();
        assert_eq!(metrics.ws_subscriptions.get(), 0);
        for mut rx in receivers {
            assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Disconnected);
        }
        assert!(subscriptions.0.sessions.is_empty() && subscriptions.0.subscribers.is_empty());
    }
}
