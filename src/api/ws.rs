//! `GET /v1/ws`: one task per connection.
//!
//! The task selects over the client's frames, the replies of its in-flight
//! ingests and creator operations (kept in frame order), its bounded channel
//! of live events from the broadcaster, and a heartbeat tick. It only
//! parses, validates, forwards and serialises; ordering per creator is kept
//! by remembering the last event id delivered and filling any gap from the
//! durable log, so a subscriber sees every event exactly once, in order.
//!
//! Pressure: the broadcaster never waits for a session; one that cannot
//! keep up has its channel dropped and closes with 1013. A client that
//! sends nothing (pongs included) for `ws.client_timeout_ms` is closed, and
//! one that takes no frame for as long (it stopped reading) is dropped, so
//! a session's memory is bounded by its channel and actix-ws's buffer.
//! Sessions beyond `ws.max_connections` are refused with 503. On shutdown
//! a session stops reading, sends the replies still in flight, and closes
//! with 1001.
//!
//! Ingest and the creator operations (`action`, `remove`, `confirm`,
//! `merge`, `move`) go to [`crate::operations`], as their HTTP endpoints
//! do. Operations run one after another in frame order (each waits for the
//! one before it), so a client that merges and then actions a cluster gets
//! exactly that; the session keeps reading and answering other frames
//! meanwhile. Subscriptions, and the last event id delivered of each, live
//! in the registry the session shares with the broadcaster
//! ([`Subscriptions`]).

use std::{
    future::Future,
    sync::Arc,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};
use bytestring::ByteString;
use futures_util::{StreamExt, future::LocalBoxFuture, stream::FuturesOrdered};
use tokio::sync::{mpsc, oneshot, watch};

use super::{ApiError, ApiState, auth::Principal};
use crate::{
    actors::broadcaster::{SessionId, Subscriptions},
    domain::validate,
    operations::OperationRequest,
    protocol::{self, ClientFrame, ErrorBody, FrameError, MessageInput, ServerFrame},
    repository::StoredEvent,
};

/// Events read from the log per query while replaying or filling a gap.
const REPLAY_PAGE: u64 = 500;

pub async fn connect(
    principal: Principal,
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, actix_web::Error> {
    if *state.shutdown.borrow() {
        return Err(ApiError::Unavailable("the server is shutting down; reconnect later".into()).into());
    }
    let slot = Slot::take(state.clone().into_inner())?;
    let (response, out, stream) = actix_ws::handle(&req, body)?;
    let max_frame = state.settings.limits.max_frame_bytes;
    let stream = stream.max_frame_size(max_frame).aggregate_continuations().max_continuation_size(max_frame);
    let id = state.next_session.fetch_add(1, Ordering::Relaxed);
    let session = WsSession {
        id,
        principal,
        _slot: slot,
        stall_limit: state.settings.ws.client_timeout(),
        subscriptions: state.pipeline.subscriptions.clone(),
        state: state.into_inner(),
        out,
        events: None,
        replies: FuturesOrdered::new(),
        last_op: None,
    };
    actix_web::rt::spawn(session.run(stream));
    Ok(response)
}

/// One of the `ws.max_connections` session slots, given back on drop.
struct Slot(Arc<ApiState>);

impl Slot {
    fn take(state: Arc<ApiState>) -> Result<Self, ApiError> {
        let max = state.settings.ws.max_connections;
        if state.ws_sessions.fetch_add(1, Ordering::AcqRel) >= max {
            state.ws_sessions.fetch_sub(1, Ordering::AcqRel);
            state.metrics.ws_refused.inc();
            return Err(ApiError::Unavailable(format!("too many WebSocket connections (at most {max}); retry later")));
        }
        Ok(Self(state))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.ws_sessions.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a session ends.
enum End {
    /// The client closed, or the connection broke.
    Gone,
    /// The client took no frame for `stall_limit`: its buffers are full,
    /// so not even a close frame would reach it.
    Stalled,
    /// The server closes with this code and reason.
    Close(CloseCode, &'static str),
}

struct WsSession {
    id: SessionId,
    /// Whose token opened the connection; every frame is checked against it.
    principal: Principal,
    _slot: Slot,
    /// How long a frame may wait for room in the client's buffers.
    stall_limit: Duration,
    state: Arc<ApiState>,
    out: actix_ws::Session,
    /// This session's subscribed creators, and the last event id delivered
    /// for each, are kept here under its `id`.
    subscriptions: Subscriptions,
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
        let mut shutdown = self.state.shutdown.clone();

        let end = loop {
            let reading = self.replies.len() < ws.max_inflight_ingest;
            let step = tokio::select! {
                () = stopping(&mut shutdown) => match self.finish_replies().await {
                    Ok(()) => Err(End::Close(CloseCode::Away, "server shutting down")),
                    Err(end) => Err(end),
                },
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
                    } else if let Err(ApiError::Unauthorized(_)) = self.state.auth.revalidate(&self.principal).await {
                        // A database that cannot answer now is no reason to
                        // drop the stream; a revoked token is.
                        Err(End::Close(CloseCode::Policy, "token revoked"))
                    } else {
                        sent(self.stall_limit, self.out.ping(b"")).await
                    }
                }
            };
            if let Err(end) = step {
                break end;
            }
        };

        self.subscriptions.remove_session(self.id);
        self.state.metrics.ws_connections.dec();
        match end {
            End::Close(code, description) => {
                let reason = CloseReason { code, description: Some(description.to_owned()) };
                // Err: gone or stalled meanwhile; the socket closes anyway.
                let _ = tokio::time::timeout(self.stall_limit, self.out.close(Some(reason))).await;
            }
            End::Stalled => {
                self.state.metrics.ws_stalled.inc();
                tracing::debug!(session = self.id, "dropped a client that stopped reading");
            }
            End::Gone => {}
        }
    }

    async fn send(&mut self, text: impl Into<ByteString>) -> Result<(), End> {
        sent(self.stall_limit, self.out.text(text)).await
    }

    /// Sends the replies of every frame already read, in order.
    async fn finish_replies(&mut self) -> Result<(), End> {
        while let Some(reply) = self.replies.next().await {
            self.send(reply).await?;
        }
        Ok(())
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
            Some(Ok(AggregatedMessage::Ping(bytes))) => sent(self.stall_limit, self.out.pong(&bytes)).await,
            Some(Ok(AggregatedMessage::Pong(_))) => Ok(()),
            Some(Ok(AggregatedMessage::Close(_))) => Err(End::Close(CloseCode::Normal, "bye")),
            Some(Err(error)) => Err(protocol_close(&error)),
        }
    }

    async fn on_text(&mut self, text: &str) -> Result<(), End> {
        let parsed = protocol::parse_client_frame(text);
        let id = match &parsed {
            Ok(frame) => frame.id().cloned(),
            Err(error) => error.id.clone(),
        };
        // Every frame, well-formed or not, spends the token's rate limit.
        if let Err(ApiError::Unauthorized(_)) = self.state.auth.revalidate(&self.principal).await {
            return Err(End::Close(CloseCode::Policy, "token revoked"));
        }
        if let Err(error) = self.state.auth.charge(&self.principal, 1).await {
            self.state.metrics.auth_refused.with_label_values(&[error.code()]).inc();
            return self.reply(error_frame(id, &error)).await;
        }
        let frame = match parsed {
            Ok(frame) => frame,
            Err(FrameError { id, message }) => {
                return self.reply(error_frame(id, &ApiError::InvalidRequest(message))).await;
            }
        };
        let (id, request) = split(frame);
        match request {
            Request::Ping => self.reply(ServerFrame::Pong { id }).await,
            Request::Ingest(message) => {
                if let Err(error) = self.principal.may_ingest() {
                    return self.reply(error_frame(id, &error)).await;
                }
                let (state, principal) = (self.state.clone(), self.principal.clone());
                self.replies.push_back(Box::pin(async move {
                    let frame = match state.operations.ingest_one(&principal, message).await {
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
            Request::Operation(request) => {
                self.queue_op(id, request);
                Ok(())
            }
            Request::Subscribe { creator_id, since } => match self.subscribe(&creator_id, since).await {
                Ok(last_event_id) => {
                    self.reply(ServerFrame::Subscribed { id, creator_id: creator_id.clone(), last_event_id }).await?;
                    self.replay(&creator_id, since, last_event_id).await
                }
                Err(error) => self.reply(error_frame(id, &error)).await,
            },
            Request::Unsubscribe { creator_id } => {
                if self.subscriptions.unsubscribe(self.id, &creator_id) {
                    self.events = None;
                }
                self.reply(ServerFrame::Unsubscribed { id, creator_id }).await
            }
        }
    }

    /// Queues a creator operation: it starts once the previous one has
    /// finished, and its `result` (or error) frame takes its place among
    /// the replies.
    fn queue_op(&mut self, id: Option<serde_json::Value>, request: OperationRequest) {
        let (state, principal) = (self.state.clone(), self.principal.clone());
        let (done, finished) = oneshot::channel::<()>();
        let previous = self.last_op.replace(finished);
        self.replies.push_back(Box::pin(async move {
            if let Some(previous) = previous {
                // Err only means "finished": its sender was dropped.
                let _ = previous.await;
            }
            let op = request.op();
            let frame = match state.operations.run(&principal, request).await {
                Ok(result) => ServerFrame::Result { id, op, result },
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
        self.principal.may_act_for(creator_id)?;
        if since.is_some_and(|s| s < 0) {
            return Err(ApiError::InvalidRequest("since must be a non-negative event id".into()));
        }
        if self.subscriptions.contains(self.id, creator_id) {
            return Err(ApiError::Conflict(format!("already subscribed to {creator_id}")));
        }
        let sink = match self.events {
            Some(_) => None,
            None => {
                let (tx, rx) = mpsc::channel(self.state.settings.ws.subscriber_buffer);
                self.events = Some(rx);
                Some(tx)
            }
        };
        self.subscriptions.subscribe(self.id, creator_id.into(), sink);
        match self.state.repo.last_event_id(creator_id).await {
            Ok(last) => {
                self.subscriptions.set_delivered(self.id, creator_id, last);
                Ok(last)
            }
            Err(error) => {
                if self.subscriptions.unsubscribe(self.id, creator_id) {
                    self.events = None;
                }
                Err(error.into())
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
                self.send(event.frame).await?;
            }
            after = last;
        }
        Ok(())
    }

    /// Delivers a live event, after any events the channel skipped.
    async fn deliver(&mut self, event: StoredEvent) -> Result<(), End> {
        let Some(last) = self.subscriptions.delivered(self.id, &event.creator_id) else { return Ok(()) };
        if event.event_id <= last {
            return Ok(()); // already sent by a replay or a gap fill
        }
        if event.event_id > last + 1 {
            let creator = event.creator_id.clone();
            self.replay(&creator, Some(last), event.event_id - 1).await?;
        }
        self.send(event.frame).await?;
        self.subscriptions.set_delivered(self.id, &event.creator_id, event.event_id);
        Ok(())
    }
}

/// Waits up to `limit` for a frame to be taken by actix-ws's bounded
/// buffer (full when the client does not read).
async fn sent(limit: Duration, sending: impl Future<Output = Result<(), actix_ws::Closed>>) -> Result<(), End> {
    match tokio::time::timeout(limit, sending).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(actix_ws::Closed)) => Err(End::Gone),
        Err(_elapsed) => Err(End::Stalled),
    }
}

/// Resolves once the server is shutting down (or gone).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    // Err: the application dropped its sender, which is a shutdown too.
    let _ = shutdown.wait_for(|&stop| stop).await;
}

/// The close code for a frame the protocol layer refused (RFC 6455 §7.4.1).
fn protocol_close(error: &ProtocolError) -> End {
    match error {
        ProtocolError::Overflow => End::Close(CloseCode::Size, "frame too large"),
        // actix-ws reports a fragmented message over max_continuation_size
        // only by this text (pinned by a test).
        ProtocolError::Io(e) if e.to_string().contains("maximum continuation size") => {
            End::Close(CloseCode::Size, "message too large")
        }
        ProtocolError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            End::Close(CloseCode::Invalid, "text frame is not valid UTF-8")
        }
        _ => End::Close(CloseCode::Protocol, "protocol error"),
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

/// What a client frame asks for, its `id` set apart.
enum Request {
    Ping,
    Ingest(MessageInput),
    Operation(OperationRequest),
    Subscribe { creator_id: String, since: Option<i64> },
    Unsubscribe { creator_id: String },
}

/// Sets a frame's `id` apart from what it asks, so that one arm of
/// [`WsSession::on_text`] serves every creator operation.
fn split(frame: ClientFrame) -> (Option<serde_json::Value>, Request) {
    use OperationRequest as Op;
    match frame {
        ClientFrame::Ping { id } => (id, Request::Ping),
        ClientFrame::Ingest { id, message } => (id, Request::Ingest(message)),
        ClientFrame::Subscribe { id, creator_id, since } => (id, Request::Subscribe { creator_id, since }),
        ClientFrame::Unsubscribe { id, creator_id } => (id, Request::Unsubscribe { creator_id }),
        ClientFrame::Action { id, cluster_id, response_text, include_review } => {
            (id, Request::Operation(Op::Action { cluster_id, response_text, include_review }))
        }
        ClientFrame::Remove { id, cluster_id, message_id } => {
            (id, Request::Operation(Op::Remove { cluster_id, message_id }))
        }
        ClientFrame::Confirm { id, cluster_id, message_id } => {
            (id, Request::Operation(Op::Confirm { cluster_id, message_id }))
        }
        ClientFrame::Merge { id, cluster_id, cluster_ids } => {
            (id, Request::Operation(Op::Merge { cluster_id, cluster_ids }))
        }
        ClientFrame::Move { id, message_id, cluster_id } => {
            (id, Request::Operation(Op::Move { message_id, cluster_id }))
        }
    }
}
