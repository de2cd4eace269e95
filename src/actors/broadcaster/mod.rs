//! The broadcaster: fans committed cluster events out to the WebSocket
//! sessions subscribed to their creator.
//!
//! [`Publisher`] is the one path a committed change takes to the
//! subscribers, whoever committed it (a clustering shard's decisions, a
//! creator operation): `publish(events)` queues them on the broadcaster,
//! which delivers them in the order it received them through the
//! [`Subscriptions`] registry it shares with the sessions. Sessions fill
//! gaps from the durable log themselves, so an event that arrives out of
//! order here is harmless.
//!
//! With Redis (`redis.url`) the same events also go to the other instances,
//! and theirs come here ([`fanout`]); without it, live events reach only
//! this instance's subscribers.

pub mod fanout;
mod subscriptions;

use std::sync::Arc;

use actix::prelude::*;

use crate::{metrics::Metrics, repository::StoredEvent};

pub use self::subscriptions::{DeliveryPath, SessionId, Subscriptions};

/// Delivers committed events to their creators' subscribers.
#[derive(Message)]
#[rtype(result = "()")]
struct Publish {
    events: Vec<StoredEvent>,
}

pub struct Broadcaster {
    subscriptions: Subscriptions,
}

impl Actor for Broadcaster {
    type Context = Context<Self>;
}

impl Supervised for Broadcaster {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // What was being delivered when it stopped is unknown: dropping
        // every subscription closes each with 1013, and clients resume with
        // `since` and miss nothing.
        self.subscriptions.remove_all();
    }
}

impl Handler<Publish> for Broadcaster {
    type Result = ();

    fn handle(&mut self, msg: Publish, _ctx: &mut Self::Context) {
        self.subscriptions.deliver(msg.events, DeliveryPath::Local);
    }
}

/// The handle every committed change is published through; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    broadcaster: Addr<Broadcaster>,
    /// To the other instances; `None` without Redis.
    outbox: Option<fanout::Outbox>,
    metrics: Arc<Metrics>,
}

impl Publisher {
    /// Starts the broadcaster, supervised, on `arbiter`, delivering through
    /// `subscriptions`; with an `outbox` ([`fanout::start`]) every event is
    /// also published to the other instances.
    pub fn start(
        arbiter: &ArbiterHandle,
        subscriptions: Subscriptions,
        outbox: Option<fanout::Outbox>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let broadcaster = Supervisor::start_in_arbiter(arbiter, move |_| Broadcaster { subscriptions });
        Self { broadcaster, outbox, metrics }
    }

    /// Hands committed events to their creators' subscribers, here at once
    /// and on every other instance through Redis, in order. Never waits: a
    /// subscriber that cannot keep up is dropped.
    pub fn publish(&self, events: Vec<StoredEvent>) {
        self.metrics.events_published.inc_by(events.len() as u64);
        if let Some(outbox) = &self.outbox {
            outbox.push(events.iter().cloned());
        }
        self.broadcaster.do_send(Publish { events });
    }
}
