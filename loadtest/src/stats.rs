//! What a run records: counters, error codes, and the two latency
//! histograms (ingest ack, ingest-to-event), in microseconds.
//!
//! Everything runs on one thread (actix's runtime), so the recorder is
//! shared as `Rc<RefCell<Stats>>`; borrows never cross an `.await`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use hdrhistogram::Histogram;
use tokio::time::Instant;
use uuid::Uuid;

/// Highest latency the histograms resolve (1 minute, in µs); longer ones
/// are recorded as this value.
const MAX_LATENCY_US: u64 = 60_000_000;

#[derive(Debug)]
pub struct Stats {
    pub sent: u64,
    pub acked: u64,
    pub duplicates: u64,
    /// Failed ingests by error code (`unavailable`, `timeout`, ...).
    pub errors: BTreeMap<String, u64>,
    pub ack_latency: Histogram<u64>,
    pub event_latency: Histogram<u64>,
    pub events_created: u64,
    pub events_updated: u64,
    /// Event-socket reconnects (e.g. closed with 1013 as too slow).
    pub event_reconnects: u64,
    /// Events for a message that already had one (should stay 0).
    pub duplicate_events: u64,
    /// Events whose `event_id` did not follow the creator's previous one
    /// (should stay 0: the API promises no gaps and no duplicates).
    pub event_id_gaps: u64,
    pub last_ack: Option<Instant>,
    /// Whether acks should wait for their event (`--events`).
    track_events: bool,
    /// Acked messages whose event has not arrived: their send time.
    awaiting: HashMap<Uuid, Instant>,
    /// Events that arrived before their message's ack: the event time.
    early: HashMap<Uuid, Instant>,
    /// Messages whose event has been seen.
    settled: HashSet<Uuid>,
}

impl Stats {
    pub fn new(track_events: bool) -> Self {
        Self {
            sent: 0,
            acked: 0,
            duplicates: 0,
            errors: BTreeMap::new(),
            ack_latency: latency_histogram(),
            event_latency: latency_histogram(),
            events_created: 0,
            events_updated: 0,
            event_reconnects: 0,
            duplicate_events: 0,
            event_id_gaps: 0,
            last_ack: None,
            track_events,
            awaiting: HashMap::new(),
            early: HashMap::new(),
            settled: HashSet::new(),
        }
    }

    pub fn on_sent(&mut self) {
        self.sent += 1;
    }

    /// A message was stored (or found to be a duplicate, which produces no
    /// event).
    pub fn on_ack(&mut self, sent: Instant, message_id: Uuid, duplicate: bool) {
        let now = Instant::now();
        self.acked += 1;
        self.last_ack = Some(now);
        self.ack_latency.saturating_record(micros(now - sent));
        if duplicate {
            self.duplicates += 1;
        } else if self.track_events {
            match self.early.remove(&message_id) {
                Some(seen) => self.settle(message_id, seen.saturating_duration_since(sent)),
                None => {
                    self.awaiting.insert(message_id, sent);
                }
            }
        }
    }

    pub fn on_error(&mut self, code: &str) {
        self.on_errors(code, 1);
    }

    pub fn on_errors(&mut self, code: &str, n: u64) {
        if n > 0 {
            *self.errors.entry(code.to_owned()).or_default() += n;
        }
    }

    /// A `cluster.created` / `cluster.updated` event for `message_id`.
    pub fn on_event(&mut self, message_id: Uuid, created: bool) {
        let now = Instant::now();
        if created {
            self.events_created += 1;
        } else {
            self.events_updated += 1;
        }
        if let Some(sent) = self.awaiting.remove(&message_id) {
            self.settle(message_id, now - sent);
        } else if self.settled.contains(&message_id) || self.early.insert(message_id, now).is_some() {
            self.duplicate_events += 1;
        }
    }

    fn settle(&mut self, message_id: Uuid, latency: Duration) {
        self.event_latency.saturating_record(micros(latency));
        self.settled.insert(message_id);
    }

    pub fn tracks_events(&self) -> bool {
        self.track_events
    }

    pub fn events(&self) -> u64 {
        self.events_created + self.events_updated
    }

    pub fn errors(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Acked messages still waiting for their event.
    pub fn awaiting_events(&self) -> usize {
        self.awaiting.len()
    }
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_match_acks_in_either_order() {
        let mut stats = Stats::new(true);
        let sent = Instant::now();
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        stats.on_ack(sent, a, false);
        stats.on_event(a, true);
        stats.on_event(b, false); // before its ack
        stats.on_ack(sent, b, false);
        stats.on_ack(sent, c, false); // never gets an event
        stats.on_ack(sent, Uuid::now_v7(), true); // duplicates get none
        stats.on_event(a, false); // a second event for the same message
        assert_eq!((stats.acked, stats.duplicates, stats.events(), stats.duplicate_events), (4, 1, 3, 1));
        assert_eq!(stats.event_latency.len(), 2);
        assert_eq!(stats.awaiting_events(), 1);
    }
}
