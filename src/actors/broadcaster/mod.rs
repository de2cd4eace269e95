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

mod subscriptions;

use actix::prelude::*;

use crate::repository::StoredEvent;

pub use self::subscriptions::{SessionId, Subscriptions};

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
        self.subscriptions.deliver(msg.events);
    }
}

/// The handle every committed change is published through; cheap to clone.
#[derive(Clone)]
pub struct Publisher(Addr<Broadcaster>);

impl Publisher {
    /// Starts the broadcaster, supervised, on `arbiter`, delivering through
    /// `subscriptions`.
    pub fn start(arbiter: &ArbiterHandle, subscriptions: Subscriptions) -> Self {
        Self(Supervisor::start_in_arbiter(arbiter, move |_| Broadcaster { subscriptions }))
    }

    /// Hands committed events to their creators' subscribers, in order.
    /// Never waits: a subscriber that cannot keep up is dropped.
    pub fn publish(&self, events: Vec<StoredEvent>) {
        self.0.do_send(Publish { events });
    }
}
