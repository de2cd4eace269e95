//! `GET /v1/ws`: one task per connection.
//!
//! The task selects over the client's frames, the replies of its in-flight
//! ingests and creator operations (kept in frame order), its bounded channel
//! of live events from the broadcaster, and a heartbeat tick. It only
//! parses, validates, forwards and serialises; ordering per creator is kept
//! by remembering the last event id delivered and filling any gap from the
//! durable log, so a subscriber sees every event exactly once, in order.
//!
//! Creator operations (`action`, `remove`, `merge`, `move`) call the same
//! functions as their HTTP endpoints and run one after another in frame
//! order (each waits for the one before it), so a client that merges and
//! then actions a cluster gets exactly that; the session keeps reading and
//! answering other frames meanwhile.

use std::{collections::HashMap, future::Future, sync::Arc, sync::atomic::Ordering, time::Instant};

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};
use futures_util::{StreamExt, future::LocalBoxFuture, stream::FuturesOrdered};
use tokio::sync::{mpsc, oneshot};

use super::{ApiError, ApiState, clusters, messages};
use crate::{
    actors::broadcaster::{Disconnect, SessionId, Subscribe, Unsubscribe},
    domain::validate,
    protocol::{self, ClientFrame, ErrorBody, FrameError, Operation, ServerFrame},
    repository::StoredEvent,
};

/// Events read from the log per query while replaying or filling a gap.
const REPLAY_PAGE: u64 = 500;

pub async fn connect(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, actix_web::Error> {
    let (response, out, stream) = actix_ws::handle(&req, body)?;
    let max_frame = state.settings.limits.max_frame_bytes;
    let stream = stream.max_frame_size(max_frame).aggregate_continuations().max_continuation_size(max_frame);
    let id = state.next_session.fetch_add(1, Ordering::Relaxed);
    let session = WsSession {
        id,
        state: state.into_inner(),
        out,
        subscriptions: HashMap::new(),
        events: None,
        replies: FuturesOrdered::new(),
        last_op: None,
    };
    actix_web::rt::spawn(session.run(stream));
    Ok(response)
}

/// Why a session ends.
enum End {
    /// The client closed, or the connection broke.
    Gone,
    /// The server closes with this code and reason.
    Close(CloseCode, &'static str),
}

struct WsSession {
    id: SessionId,
    state: Arc<ApiState>,
    out: actix_ws::Session,
    /// Subscribed creators and the last event id delivered for each.
    subscriptions: HashMap<Arc<str>, i64>,
    /// Live events of every subscribed creator; `None` without any.
    events: Option<mpsc::Receiver<StoredEvent>>,
    /// Replies to ingest and operation frames, in frame order.
    replies: FuturesOrdered<LocalBoxFuture<'static, String>>,
    /// Resolves when the latest queued operation has finished (its sender
    /// is dropped then); the next operation waits for it.
    last_op: Option<oneshot::Receiver<()>>,
}

impl WsSession {
    async fn run(mut self, mut stream: actix_ws::AggregatedMessageStream) {
        self.state.metrics.ws_connections.inc();
        let ws = self.state.settings.ws.clone();
        let mut heartbeat = tokio::time::interval(ws.heartbeat_interval());
        heartbeat.tick().await; // the first tick is immediate
        let mut last_heard = Instant::now();

        let end = loop {
            let reading = self.replies.len() < ws.max_inflight_ingest;
            let step = tokio::select! {
                frame = stream.next(), if reading => {
                    last_heard = Instant::now();
                    self.on_frame(frame).await
                }
                Some(reply) = self.replies.next(), if !self.replies.is_empty() => self.send(reply).await,
                event = next_event(&mut self.events) => match event {
                    Some(event) => self.deliver(event).await,
                    None => Err(End::Close(CloseCode::Again, "subscriber too slow; resubscribe with since")),
                },
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > ws.client_timeout() {
                        Err(End::Close(CloseCode::Away, "heartbeat timeout"))
                    } else {
                        self.out.ping(b"").await.map_err(|_| End::Gone)
                    }
                }
            };
            if let Err(end) = step {
                break end;
            }
        };

        self.state.pipeline.broadcaster.do_send(Disconnect { session: self.id });
        self.state.metrics.ws_connections.dec();
        if let End::Close(code, description) = end {
            let reason = CloseReason { code, description: Some(description.to_owned()) };
            let _ = self.out.close(Some(reason)).await;
        }
    }

    async fn send(&mut self, text: String) -> Result<(), End> {
        self.out.text(text).await.map_err(|_| End::Gone)
    }

    async fn reply(&mut self, frame: ServerFrame) -> Result<(), End> {
        self.send(serde_json::to_string(&frame).expect("server frames serialise")).await
    }

    async fn on_frame(&mut self, frame: Option<Result<AggregatedMessage, ProtocolError>>) -> Result<(), End> {
        match frame {
            None => Err(End::Gone),
            Some(Ok(AggregatedMessage::Text(text))) => self.on_text(&text).await,
            Some(Ok(AggregatedMessage::Binary(_))) => {
                let error = ApiError::InvalidRequest("binary frames are not supported; send JSON text frames".into());
                self.reply(error_frame(None, &error)).await
            }
            Some(Ok(AggregatedMessage::Ping(bytes))) => self.out.pong(&bytes).await.map_err(|_| End::Gone),
            Some(Ok(AggregatedMessage::Pong(_))) => Ok(()),
            Some(Ok(AggregatedMessage::Close(_))) => Err(End::Close(CloseCode::Normal, "bye")),
            Some(Err(ProtocolError::Overflow)) => Err(End::Close(CloseCode::Size, "frame too large")),
            // actix-ws reports a text message that is not UTF-8, and a
            // fragmented message beyond the limit, as I/O errors.
            Some(Err(ProtocolError::Io(e))) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(End::Close(CloseCode::Invalid, "text frames must be UTF-8"))
            }
            Some(Err(ProtocolError::Io(e))) if e.to_string().contains("maximum continuation size") => {
                Err(End::Close(CloseCode::Size, "message too large"))
            }
            Some(Err(_)) => Err(End::Close(CloseCode::Protocol, "protocol error")),
        }
    }

    async fn on_text(&mut self, text: &str) -> Result<(), End> {
        let frame = match protocol::parse_client_frame(text) {
            Ok(frame) => frame,
            Err(FrameError { id, message }) => {
                return self.reply(error_frame(id, &ApiError::InvalidRequest(message))).await;
            }
        };
        match frame {
            ClientFrame::Ping { id } => self.reply(ServerFrame::Pong { id }).await,
            ClientFrame::Ingest { id, message } => {
                let state = self.state.clone();
                self.replies.push_back(Box::pin(async move {
                    let frame = match messages::ingest_one(&state, message).await {
                        Ok(r) => ServerFrame::Ack {
                            id,
                            message_id: r.message_id,
                            status: r.status,
                            cluster_id: r.cluster_id,
                            duplicate: r.duplicate,
                        },
                        Err(error) => error_frame(id, &error),
                    };
                    serde_json::to_string(&frame).expect("server frames serialise")
                }));
                Ok(())
            }
            ClientFrame::Action { id, cluster_id, response_text } => {
                let state = self.state.clone();
                self.queue_op(id, Operation::Action, async move {
                    clusters::action(&state, &cluster_id, &response_text).await
                });
                Ok(())
            }
            ClientFrame::Remove { id, cluster_id, message_id } => {
                let state = self.state.clone();
                self.queue_op(id, Operation::Remove, async move {
                    clusters::remove(&state, &cluster_id, &message_id).await
                });
                Ok(())
            }
            ClientFrame::Merge { id, cluster_id, cluster_ids } => {
                let state = self.state.clone();
                self.queue_op(
                    id,
                    Operation::Merge,
                    async move { clusters::merge(&state, &cluster_id, &cluster_ids).await },
                );
                Ok(())
            }
            ClientFrame::Move { id, message_id, cluster_id } => {
                let state = self.state.clone();
                self.queue_op(id, Operation::Move, async move {
                    clusters::move_message(&state, &message_id, &cluster_id).await
                });
                Ok(())
            }
            ClientFrame::Subscribe { id, creator_id, since } => match self.subscribe(&creator_id, since).await {
                Ok(last_event_id) => {
                    self.reply(ServerFrame::Subscribed { id, creator_id: creator_id.clone(), last_event_id }).await?;
                    self.replay(&creator_id, since, last_event_id).await
                }
                Err(error) => self.reply(error_frame(id, &error)).await,
            },
            ClientFrame::Unsubscribe { id, creator_id } => {
                if let Some((creator, _)) = self.subscriptions.remove_entry(creator_id.as_str()) {
                    self.state.pipeline.broadcaster.do_send(Unsubscribe { session: self.id, creator_id: creator });
                    if self.subscriptions.is_empty() {
                        // The broadcaster drops its sender now; without
                        // this, the closed channel would read as "too slow".
                        self.events = None;
                    }
                }
                self.reply(ServerFrame::Unsubscribed { id, creator_id }).await
            }
        }
    }

    /// Queues a creator operation: it starts once the previous one has
    /// finished, and its `result` (or error) frame takes its place among
    /// the replies.
    fn queue_op<T, F>(&mut self, id: Option<serde_json::Value>, op: Operation, run: F)
    where
        T: serde::Serialize,
        F: Future<Output = Result<T, ApiError>> + 'static,
    {
        let (done, finished) = oneshot::channel::<()>();
        let previous = self.last_op.replace(finished);
        self.replies.push_back(Box::pin(async move {
            if let Some(previous) = previous {
                // Err only means "finished": its sender was dropped.
                let _ = previous.await;
            }
            let frame = match run.await {
                Ok(body) => ServerFrame::Result {
                    id,
                    op,
                    result: serde_json::to_value(body).expect("operation results serialise"),
                },
                Err(error) => error_frame(id, &error),
            };
            drop(done);
            serde_json::to_string(&frame).expect("server frames serialise")
        }));
    }

    /// Registers for live events, then reads where the log stands: every
    /// event after that id will arrive live (or be filled from the log).
    async fn subscribe(&mut self, creator_id: &str, since: Option<i64>) -> Result<i64, ApiError> {
        validate::creator_id(creator_id)?;
        if since.is_some_and(|s| s < 0) {
            return Err(ApiError::InvalidRequest("since must be a non-negative event id".into()));
        }
        if self.subscriptions.contains_key(creator_id) {
            return Err(ApiError::Conflict(format!("already subscribed to {creator_id}")));
        }
        let creator: Arc<str> = creator_id.into();
        let sink = match self.events {
            Some(_) => None,
            None => {
                let (tx, rx) = mpsc::channel(self.state.settings.ws.subscriber_buffer);
                self.events = Some(rx);
                Some(tx)
            }
        };
        let registered = self
            .state
            .pipeline
            .broadcaster
            .send(Subscribe { session: self.id, creator_id: creator.clone(), sink })
            .await;
        let last = match registered {
            Ok(()) => self.state.repo.last_event_id(creator_id).await.map_err(ApiError::from),
            Err(_) => Err(ApiError::Unavailable("the broadcaster is restarting; retry".into())),
        };
        match last {
            Ok(last) => {
                self.subscriptions.insert(creator, last);
                Ok(last)
            }
            Err(error) => {
                self.state.pipeline.broadcaster.do_send(Unsubscribe { session: self.id, creator_id: creator });
                if self.subscriptions.is_empty() {
                    self.events = None;
                }
                Err(error)
            }
        }
    }

    /// Sends the logged events `since < id <= upto`.
    async fn replay(&mut self, creator_id: &str, since: Option<i64>, upto: i64) -> Result<(), End> {
        let Some(mut after) = since else { return Ok(()) };
        while after < upto {
            let page = match self.state.repo.events(creator_id, after, upto, REPLAY_PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "replay failed");
                    return Err(End::Close(CloseCode::Again, "replay failed; resubscribe with since"));
                }
            };
            let Some(last) = page.last().map(|e| e.event_id) else { break };
            for event in page {
                self.send(event.frame.to_string()).await?;
            }
            after = last;
        }
        Ok(())
    }

    /// Delivers a live event, after any events the channel skipped.
    async fn deliver(&mut self, event: StoredEvent) -> Result<(), End> {
        let Some(&last) = self.subscriptions.get(&event.creator_id) else { return Ok(()) };
        if event.event_id <= last {
            return Ok(()); // already sent by a replay or a gap fill
        }
        if event.event_id > last + 1 {
            let creator = event.creator_id.clone();
            self.replay(&creator, Some(last), event.event_id - 1).await?;
        }
        self.send(event.frame.to_string()).await?;
        self.subscriptions.insert(event.creator_id, event.event_id);
        Ok(())
    }
}

/// The next live event, or never when there are no subscriptions.
async fn next_event(events: &mut Option<mpsc::Receiver<StoredEvent>>) -> Option<StoredEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn error_frame(id: Option<serde_json::Value>, error: &ApiError) -> ServerFrame {
    let ErrorBody { code, message } = error.body();
    ServerFrame::Error { id, error: ErrorBody { code, message } }
}
