//! Live events across instances: Redis pub/sub carries what one instance
//! commits to the subscribers of every other; the event log in PostgreSQL
//! stays the source of truth.
//!
//! Channels: a fixed set of [`CHANNELS`] per deployment,
//! `clusterd:events:<namespace>:<n>` with `n` a stable hash of the creator
//! id, and every instance subscribes to all of them on one dedicated
//! connection at start. Simpler and safer than one channel per subscribed
//! creator: nothing to subscribe when a session subscribes, so no window in
//! which a session has read where the log stands but its instance's Redis
//! subscription is not live yet (an event published then would reach it
//! only with the next one). The price is that every instance receives every
//! event and drops those nobody subscribed to here (one map lookup). The
//! fixed set shards cleanly should Redis Cluster's sharded pub/sub carry it.
//!
//! Exactly once, in order: an instance hands the events it commits to its
//! own sessions at once (the broadcaster) and ignores them when they come
//! back from Redis (the payload names its origin); what other instances
//! commit arrives over Redis. Events of one creator can arrive out of order
//! (two instances committed consecutive ones and published them on two
//! connections) or not at all (a lost connection): each session keeps the
//! last event id it delivered per creator, drops what it already has, and
//! fills a gap before a newer event from the log. So it is enough that
//! some event at or above the newest reaches the session; which is why a
//! full outbox may keep only each creator's newest event, and why the
//! fallback poll delivers only the newest event of each creator.
//!
//! Redis away: the subscription is lost (connection closed, or a ping
//! unanswered within `fanout.timeout_ms`), and until it is back the
//! instance reads, every `fanout.fallback_poll_ms`, the newest event of
//! each creator subscribed to here whose log moved past what its sessions
//! delivered ([`Poller`]). It resubscribes by itself with back-off, then
//! polls once more (what was published while it was not subscribed reached
//! no one here) and stops polling. Unpublished events wait in the
//! [`Outbox`] and go out once Redis answers again.
//!
//! The payload ([`encode`]): one line of JSON header (`v`, the wire
//! version, the origin instance, creator id, event id and commit time),
//! then the stored frame exactly as subscribers receive it. Readers ignore
//! unknown header fields; a change they could not read bumps `v`, and a
//! message with another `v` is counted and dropped (its subscribers fill it
//! from the log with the next event).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use actix::ArbiterHandle;
use chrono::{DateTime, Utc};
use deadpool_redis::redis::{self, aio::MultiplexedConnection};
use futures_util::StreamExt;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use super::subscriptions::{DeliveryPath, Subscriptions};
use crate::{
    metrics::Metrics,
    repository::{Repository, StoredEvent},
    settings::{DatabaseSettings, FanoutSettings},
};

/// Event channels per deployment; every instance publishes on and
/// subscribes to the same set, so changing it is a new wire version.
pub const CHANNELS: u64 = 16;
/// The payload's format ([`encode`]).
const WIRE_VERSION: u32 = 1;
/// Most events published in one pipelined round trip.
const PUBLISH_BATCH: usize = 512;

/// The deployment's event channel names.
#[derive(Debug, Clone)]
struct Channels {
    prefix: String,
}

impl Channels {
    fn new(namespace: &str) -> Self {
        Self { prefix: format!("clusterd:events:{namespace}:") }
    }

    /// The channel that carries `creator_id`'s events.
    fn of(&self, creator_id: &str) -> String {
        format!("{}{}", self.prefix, shard(creator_id))
    }

    fn all(&self) -> Vec<String> {
        (0..CHANNELS).map(|n| format!("{}{n}", self.prefix)).collect()
    }
}

/// FNV-1a of the creator id, mod [`CHANNELS`]: the same on every build and
/// platform (std's hasher is seeded per process).
fn shard(creator_id: &str) -> u64 {
    let hash =
        creator_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    hash % CHANNELS
}

/// The payload's first line.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    v: u32,
    /// The instance that committed the event.
    origin: Uuid,
    creator_id: String,
    event_id: i64,
    at: DateTime<Utc>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("no header line")]
    NoHeader,
    #[error("unreadable header: {0}")]
    Header(String),
    #[error("wire version {0}, this instance reads {WIRE_VERSION}")]
    Version(u32),
}

/// The payload of `event`, committed by instance `origin`.
fn encode(origin: Uuid, event: &StoredEvent) -> String {
    let header = Header {
        v: WIRE_VERSION,
        origin,
        creator_id: event.creator_id.to_string(),
        event_id: event.event_id,
        at: event.at,
    };
    // A struct of plain fields always serialises; compact JSON has no newline.
    let mut payload = serde_json::to_string(&header).expect("the header serialises");
    payload.push('\n');
    payload.push_str(&event.frame);
    payload
}

/// The origin and event of a payload.
fn decode(payload: &str) -> Result<(Uuid, StoredEvent), WireError> {
    let (header, frame) = payload.split_once('\n').ok_or(WireError::NoHeader)?;
    // The version first: a later version may change the rest.
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let Version { v } = serde_json::from_str(header).map_err(|e| WireError::Header(e.to_string()))?;
    if v != WIRE_VERSION {
        return Err(WireError::Version(v));
    }
    let header: Header = serde_json::from_str(header).map_err(|e| WireError::Header(e.to_string()))?;
    let event = StoredEvent {
        creator_id: header.creator_id.into(),
        event_id: header.event_id,
        frame: frame.into(),
        at: header.at,
    };
    Ok((header.origin, event))
}

/// Events committed here and not yet published; cheap to clone. Bounded:
/// past `fanout.outbox_capacity` it keeps only each creator's newest event
/// (see the module's docs), so it holds at most one event per creator
/// beyond that.
#[derive(Clone)]
pub struct Outbox(Arc<OutboxInner>);

struct OutboxInner {
    queue: Mutex<VecDeque<StoredEvent>>,
    ready: Notify,
    capacity: usize,
    metrics: Arc<Metrics>,
}

impl Outbox {
    fn new(capacity: usize, metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(OutboxInner { queue: Mutex::default(), ready: Notify::new(), capacity, metrics }))
    }

    /// Queues committed events for publishing; never waits.
    pub fn push(&self, events: impl IntoIterator<Item = StoredEvent>) {
        let mut queue = self.0.queue.lock().expect("the outbox lock is never held across a panic");
        queue.extend(events);
        self.0.bound(&mut queue);
        drop(queue);
        self.0.ready.notify_one();
    }

    /// Takes up to [`PUBLISH_BATCH`] events, oldest first.
    fn take(&self) -> Vec<StoredEvent> {
        let mut queue = self.0.queue.lock().expect("the outbox lock is never held across a panic");
        let n = queue.len().min(PUBLISH_BATCH);
        queue.drain(..n).collect()
    }

    /// Puts back events that could not be published, before the rest.
    fn put_back(&self, events: Vec<StoredEvent>) {
        let mut queue = self.0.queue.lock().expect("the outbox lock is never held across a panic");
        for event in events.into_iter().rev() {
            queue.push_front(event);
        }
        self.0.bound(&mut queue);
    }
}

impl OutboxInner {
    fn bound(&self, queue: &mut VecDeque<StoredEvent>) {
        if queue.len() > self.capacity {
            let before = queue.len();
            keep_newest_per_creator(queue);
            self.metrics.fanout_coalesced.inc_by((before - queue.len()) as u64);
        }
    }
}

/// Keeps each creator's newest event only, in order.
fn keep_newest_per_creator(queue: &mut VecDeque<StoredEvent>) {
    let mut newest: HashMap<Arc<str>, i64> = HashMap::new();
    for event in queue.iter() {
        let id = newest.entry(event.creator_id.clone()).or_insert(event.event_id);
        *id = (*id).max(event.event_id);
    }
    queue.retain(|event| newest.get(&event.creator_id) == Some(&event.event_id));
}

/// The fallback: reads the log for the creators subscribed to here.
#[derive(Clone)]
struct Poller {
    repo: Repository,
    subscriptions: Subscriptions,
    metrics: Arc<Metrics>,
}

impl Poller {
    /// Delivers the newest event of each creator whose log moved past what
    /// one of its sessions here delivered; the sessions fill the rest.
    async fn poll(&self) {
        let positions = self.subscriptions.positions();
        if positions.is_empty() {
            return;
        }
        self.metrics.fanout_polls.inc();
        match self.repo.newest_events_after(&positions).await {
            Ok(events) => self.subscriptions.deliver(events, DeliveryPath::Log),
            Err(error) => tracing::warn!(%error, "the fallback read of the event log failed; trying again"),
        }
    }
}

/// Doubling delays from `reconnect_min_ms` to `reconnect_max_ms`.
struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(settings: &FanoutSettings) -> Self {
        let min = Duration::from_millis(settings.reconnect_min_ms);
        Self { next: min, min, max: Duration::from_millis(settings.reconnect_max_ms) }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    fn next(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// The channel namespace: `fanout.namespace`, else the database's name.
fn namespace(settings: &FanoutSettings, database: &DatabaseSettings) -> String {
    if !settings.namespace.is_empty() {
        return settings.namespace.clone();
    }
    url::Url::parse(database.url.expose_secret())
        .ok()
        .map(|url| url.path().trim_start_matches('/').to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "clusterd".to_owned())
}

/// Starts publishing, subscribing and the fallback poll on `arbiter`
/// (they stop with it); returns the outbox the [`super::Publisher`] fills.
/// Err: `redis_url` is no Redis URL.
pub fn start(
    arbiter: &ArbiterHandle,
    redis_url: &str,
    settings: &FanoutSettings,
    database: &DatabaseSettings,
    repo: Repository,
    subscriptions: Subscriptions,
    metrics: Arc<Metrics>,
) -> Result<Outbox, redis::RedisError> {
    let client = redis::Client::open(redis_url)?;
    let channels = Channels::new(&namespace(settings, database));
    let origin = Uuid::now_v7();
    tracing::info!(channels = %channels.prefix, %origin, "live events cross instances over Redis pub/sub");
    let outbox = Outbox::new(settings.outbox_capacity, metrics.clone());
    let (healthy, watching) = watch::channel(false);
    let poller = Poller { repo, subscriptions: subscriptions.clone(), metrics: metrics.clone() };
    let receiver = Receiver {
        client: client.clone(),
        channels: channels.clone(),
        origin,
        subscriptions,
        poller: poller.clone(),
        healthy,
        settings: settings.clone(),
        metrics: metrics.clone(),
    };
    let sender = Sender { client, channels, origin, outbox: outbox.clone(), settings: settings.clone(), metrics };
    arbiter.spawn(sender.run());
    arbiter.spawn(receiver.run());
    arbiter.spawn(poll_while_down(poller, watching, settings.fallback_poll()));
    Ok(outbox)
}

/// Publishes the outbox, in order, on one multiplexed connection.
struct Sender {
    client: redis::Client,
    channels: Channels,
    origin: Uuid,
    outbox: Outbox,
    settings: FanoutSettings,
    metrics: Arc<Metrics>,
}

impl Sender {
    async fn run(self) {
        let mut connection: Option<MultiplexedConnection> = None;
        let mut backoff = Backoff::new(&self.settings);
        let mut failing = false;
        loop {
            let batch = self.outbox.take();
            if batch.is_empty() {
                // A push since `take` left a permit: this returns at once.
                self.outbox.0.ready.notified().await;
                continue;
            }
            match self.publish(&mut connection, &batch).await {
                Ok(()) => {
                    self.metrics.fanout_published.inc_by(batch.len() as u64);
                    if failing {
                        tracing::info!("publishing events on Redis again");
                        failing = false;
                    }
                    backoff.reset();
                }
                Err(error) => {
                    self.metrics.fanout_publish_errors.inc();
                    if !failing {
                        tracing::warn!(%error, "cannot publish events on Redis; other instances read them from the log meanwhile");
                        failing = true;
                    }
                    connection = None;
                    self.outbox.put_back(batch);
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        }
    }

    async fn publish(
        &self,
        connection: &mut Option<MultiplexedConnection>,
        batch: &[StoredEvent],
    ) -> Result<(), String> {
        let timeout = self.settings.timeout();
        let connection = match connection {
            Some(connection) => connection,
            None => connection.insert(
                tokio::time::timeout(timeout, self.client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| "connect timed out".to_owned())?
                    .map_err(|e| e.to_string())?,
            ),
        };
        let mut pipe = redis::pipe();
        for event in batch {
            pipe.cmd("PUBLISH").arg(self.channels.of(&event.creator_id)).arg(encode(self.origin, event)).ignore();
        }
        tokio::time::timeout(timeout, pipe.query_async::<()>(connection))
            .await
            .map_err(|_| "publish timed out".to_owned())?
            .map_err(|e| e.to_string())
    }
}

/// Keeps one subscription to every channel and delivers what other
/// instances committed.
struct Receiver {
    client: redis::Client,
    channels: Channels,
    origin: Uuid,
    subscriptions: Subscriptions,
    poller: Poller,
    /// True while subscribed: the fallback poll waits for false.
    healthy: watch::Sender<bool>,
    settings: FanoutSettings,
    metrics: Arc<Metrics>,
}

impl Receiver {
    async fn run(self) {
        let mut backoff = Backoff::new(&self.settings);
        let mut failing = false;
        loop {
            match self.subscribe().await {
                Ok(pubsub) => {
                    backoff.reset();
                    self.healthy.send_replace(true);
                    self.metrics.fanout_subscribed.set(1);
                    tracing::info!("subscribed to the event channels on Redis");
                    failing = false;
                    // Events published while this instance was not
                    // subscribed reached no one here.
                    self.poller.poll().await;
                    let lost = self.receive(pubsub).await;
                    self.healthy.send_replace(false);
                    self.metrics.fanout_subscribed.set(0);
                    tracing::warn!(
                        reason = lost,
                        "lost the Redis event subscription; reading the log every fanout.fallback_poll_ms until it is back"
                    );
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(%error, "cannot subscribe to the event channels on Redis; retrying with back-off");
                        failing = true;
                    }
                }
            }
            tokio::time::sleep(backoff.next()).await;
        }
    }

    async fn subscribe(&self) -> Result<redis::aio::PubSub, String> {
        let subscribing = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(self.channels.all()).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        tokio::time::timeout(self.settings.timeout(), subscribing)
            .await
            .map_err(|_| "subscribe timed out".to_owned())?
            .map_err(|e| e.to_string())
    }

    /// Delivers until the subscription is lost; says why.
    async fn receive(&self, pubsub: redis::aio::PubSub) -> &'static str {
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval(self.settings.ping_interval());
        ping.tick().await; // the first tick is immediate
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    None => return "connection closed",
                    Some(message) => self.on_message(message.get_payload_bytes()),
                },
                _ = ping.tick() => {
                    let pong = tokio::time::timeout(self.settings.timeout(), sink.ping::<redis::Value>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        return "ping unanswered";
                    }
                }
            }
        }
    }

    fn on_message(&self, payload: &[u8]) {
        let decoded = std::str::from_utf8(payload).map_err(|e| WireError::Header(e.to_string())).and_then(decode);
        match decoded {
            Ok((origin, _)) if origin == self.origin => {} // delivered here at commit
            Ok((_, event)) => {
                self.metrics.fanout_received.inc();
                if self.subscriptions.has_subscribers(&event.creator_id) {
                    self.subscriptions.deliver(vec![event], DeliveryPath::Redis);
                }
            }
            Err(error) => {
                self.metrics.fanout_invalid.inc();
                tracing::debug!(%error, "ignored a message on an event channel");
            }
        }
    }
}

/// Polls the log every `every` while the subscription is down.
async fn poll_while_down(poller: Poller, mut healthy: watch::Receiver<bool>, every: Duration) {
    loop {
        // Err: the receiver task is gone (the arbiter is stopping).
        if healthy.wait_for(|up| !*up).await.is_err() {
            return;
        }
        poller.poll().await;
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(creator: &str, event_id: i64) -> StoredEvent {
        StoredEvent {
            creator_id: creator.into(),
            event_id,
            frame: format!(r#"{{"type":"event","event_id":{event_id},"text":"a\nb \"q\""}}"#).into(),
            at: Utc::now(),
        }
    }

    #[test]
    fn a_payload_carries_the_event_and_its_origin_unchanged() {
        let origin = Uuid::now_v7();
        let sent = event("alice:shop-1", 42);
        let payload = encode(origin, &sent);
        assert_eq!(payload.lines().count(), 2, "one header line, then the frame: {payload}");
        assert!(payload.ends_with(&*sent.frame), "the frame as stored, not re-encoded");
        assert_eq!(decode(&payload), Ok((origin, sent)));
    }

    #[test]
    fn other_versions_and_garbage_are_refused_not_misread() {
        assert_eq!(decode("no newline"), Err(WireError::NoHeader));
        assert!(matches!(decode("{not json\n{}"), Err(WireError::Header(_))));
        assert!(matches!(decode("{\"v\":1}\n{}"), Err(WireError::Header(_))), "a v1 header lacking fields");
        let v2 = r#"{"v":2,"something":"else"}"#;
        assert_eq!(decode(&format!("{v2}\n{{}}")), Err(WireError::Version(2)));
        // Unknown fields of v1 are ignored: a later v1 may add some.
        let origin = Uuid::now_v7();
        let payload = encode(origin, &event("a", 1)).replacen("{\"v\":1,", "{\"v\":1,\"new\":[1],", 1);
        assert_eq!(decode(&payload).map(|(o, e)| (o, e.event_id)), Ok((origin, 1)));
    }

    #[test]
    fn channels_are_stable_and_spread_creators() {
        let channels = Channels::new("prod");
        assert_eq!(channels.all().len() as u64, CHANNELS);
        // Pinned: instances of different builds must agree.
        assert_eq!(shard(""), 0xcbf2_9ce4_8422_2325 % CHANNELS);
        assert_eq!(channels.of("alice"), channels.of("alice"));
        let used: std::collections::HashSet<String> = (0..200).map(|i| channels.of(&format!("creator-{i}"))).collect();
        assert_eq!(used.len() as u64, CHANNELS, "200 creators use every channel");
        assert!(used.iter().all(|c| c.starts_with("clusterd:events:prod:")));
    }

    #[test]
    fn a_full_outbox_keeps_each_creators_newest_event_in_order() {
        let metrics = Arc::new(Metrics::new());
        let outbox = Outbox::new(4, metrics.clone());
        outbox.push([event("a", 1), event("b", 1), event("a", 2)]);
        assert_eq!(metrics.fanout_coalesced.get(), 0, "within capacity: every event kept");
        outbox.push([event("c", 1), event("a", 3)]);
        let kept: Vec<(String, i64)> = outbox.take().iter().map(|e| (e.creator_id.to_string(), e.event_id)).collect();
        assert_eq!(kept, [("b".into(), 1), ("c".into(), 1), ("a".into(), 3)]);
        assert_eq!(metrics.fanout_coalesced.get(), 2);

        outbox.push([event("d", 1)]);
        outbox.put_back(vec![event("a", 4)]);
        let order: Vec<i64> = outbox.take().iter().map(|e| e.event_id).collect();
        assert_eq!(order, [4, 1], "what could not be published goes out first");
    }

    #[test]
    fn the_namespace_is_the_database_unless_set() {
        let settings = crate::settings::Settings::load_files(std::path::Path::new("config"), None).expect("defaults");
        let mut database = settings.database.clone();
        database.url = "postgres://u:secret@db:5432/clusterd_prod?sslmode=require".to_owned().into();
        assert_eq!(namespace(&settings.fanout, &database), "clusterd_prod");
        let mut fanout = settings.fanout.clone();
        fanout.namespace = "blue".into();
        assert_eq!(namespace(&fanout, &database), "blue");
    }
}
