//! Event subscribers: one WebSocket per [`CREATORS_PER_EVENT_SOCKET`]
//! creators, subscribed before ingest starts. Each `cluster.created` /
//! `cluster.updated` event settles its message's ingest-to-event latency.
//!
//! A subscriber the server drops (e.g. closed with 1013 as too slow)
//! reconnects and resumes every creator with `since`, so no event is lost;
//! the replayed ones simply arrive late, and count as such.
//!
//! [`CREATORS_PER_EVENT_SOCKET`]: crate::cli::CREATORS_PER_EVENT_SOCKET

use std::{collections::HashMap, rc::Rc, time::Duration};

use anyhow::{Context, bail};
use awc::ws;
use clusterd::protocol::{ClientFrame, EventFrame, EventKind, ServerFrame};
use futures_util::StreamExt;

use crate::{
    run::Run,
    socket::{self, Socket},
};

/// Time allowed for all subscriptions of a socket to be confirmed.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before reconnecting a dropped subscriber.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

pub struct Subscriber {
    index: usize,
    url: String,
    creators: Vec<String>,
    /// The last event id seen per creator: where to resume from.
    last: HashMap<String, i64>,
}

impl Subscriber {
    /// Connects and subscribes to `creators`; returns once every
    /// subscription is confirmed, so no event of the run can be missed.
    pub async fn connect(run: &Run, index: usize, url: &str, creators: &[String]) -> anyhow::Result<(Self, Socket)> {
        let mut subscriber = Self { index, url: url.to_owned(), creators: creators.to_vec(), last: HashMap::new() };
        let socket = subscriber.subscribe(run).await?;
        Ok((subscriber, socket))
    }

    /// Receives events until aborted, reconnecting whenever dropped.
    pub async fn listen(mut self, run: Rc<Run>, mut socket: Socket) {
        loop {
            let why = self.pump(&run, &mut socket).await;
            eprintln!("loadtest: event socket {} dropped ({why:#}); resuming with since", self.index);
            run.stats.borrow_mut().event_reconnects += 1;
            socket = loop {
                tokio::time::sleep(RECONNECT_PAUSE).await;
                match self.subscribe(&run).await {
                    Ok(socket) => break socket,
                    Err(e) => eprintln!("loadtest: event socket {}: {e:#}", self.index),
                }
            };
        }
    }

    /// A new socket subscribed to every creator, from where we left off.
    async fn subscribe(&mut self, run: &Run) -> anyhow::Result<Socket> {
        let mut socket = socket::connect(&self.url).await?;
        for (k, creator) in self.creators.iter().enumerate() {
            let since = self.last.get(creator).copied();
            let frame = ClientFrame::Subscribe { id: Some(k.into()), creator_id: creator.clone(), since };
            socket::send_text(&mut socket, serde_json::to_string(&frame)?).await?;
        }
        let mut unconfirmed = self.creators.len();
        let deadline = tokio::time::Instant::now() + SUBSCRIBE_TIMEOUT;
        while unconfirmed > 0 {
            let frame = tokio::time::timeout_at(deadline, socket.next())
                .await
                .context("subscriptions not confirmed in time")?;
            if let Some(Subscribed { creator_id, last_event_id }) = self.on_frame(run, &mut socket, frame).await? {
                self.last.entry(creator_id).or_insert(last_event_id);
                unconfirmed -= 1;
            }
        }
        Ok(socket)
    }

    /// Handles frames until the connection ends; returns why it ended.
    async fn pump(&mut self, run: &Run, socket: &mut Socket) -> anyhow::Error {
        loop {
            let frame = socket.next().await;
            if let Err(e) = self.on_frame(run, socket, frame).await {
                return e;
            }
        }
    }

    async fn on_frame(
        &mut self,
        run: &Run,
        socket: &mut Socket,
        frame: Option<Result<ws::Frame, awc::error::WsProtocolError>>,
    ) -> anyhow::Result<Option<Subscribed>> {
        match frame.context("connection closed")?.context("WebSocket protocol error")? {
            ws::Frame::Text(bytes) => self.on_text(run, &bytes),
            ws::Frame::Ping(payload) => socket::pong(socket, payload).await.map(|()| None),
            ws::Frame::Pong(_) => Ok(None),
            ws::Frame::Close(reason) => bail!("closed by the server: {}", socket::describe_close(reason.as_ref())),
            other => bail!("unexpected frame: {other:?}"),
        }
    }

    fn on_text(&mut self, run: &Run, bytes: &[u8]) -> anyhow::Result<Option<Subscribed>> {
        // Events are by far the most frequent frame: try them first. A
        // reply fails fast, at its `type`.
        if let Ok(event) = serde_json::from_slice::<EventFrame>(bytes) {
            self.on_event(run, event);
            return Ok(None);
        }
        let reply: ServerFrame = serde_json::from_slice(bytes)
            .with_context(|| format!("unexpected frame: {}", String::from_utf8_lossy(bytes)))?;
        match reply {
            ServerFrame::Subscribed { creator_id, last_event_id, .. } => {
                Ok(Some(Subscribed { creator_id, last_event_id }))
            }
            ServerFrame::Error { error, .. } => bail!("error frame: {} ({})", error.code, error.message),
            _ => Ok(None),
        }
    }

    fn on_event(&mut self, run: &Run, event: EventFrame) {
        if let Some(previous) = self.last.insert(event.creator_id, event.event_id)
            && event.event_id != previous + 1
        {
            run.stats.borrow_mut().event_id_gaps += 1;
        }
        let created = match event.event {
            EventKind::ClusterCreated => true,
            EventKind::ClusterUpdated => false,
            _ => return,
        };
        if let Some(message) = event.message {
            run.on_event(message.id, created);
        }
    }
}

/// A confirmed subscription.
struct Subscribed {
    creator_id: String,
    last_event_id: i64,
}
