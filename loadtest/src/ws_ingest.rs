//! WebSocket transport: each connection pipelines up to `--inflight`
//! `ingest` frames and matches the acks, which come back in frame order.
//! With `--keep-going`, a connection that fails is reopened until the run
//! ends; the frames it had in flight count as errors (never as acks).

use std::{collections::VecDeque, rc::Rc, time::Duration};

use anyhow::{Context, bail};
use awc::{error::WsProtocolError, ws};
use clusterd::protocol::{ClientFrame, MessageInput, ServerFrame};
use futures_util::StreamExt;
use tokio::time::Instant;

use crate::{
    pacer::Pacer,
    run::Run,
    socket::{self, Socket},
    texts::Rng,
};

/// Longest silence tolerated while acks are outstanding.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between attempts to reopen a failed connection (`--keep-going`).
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// An ingest frame awaiting its ack.
struct InFlight {
    seq: u64,
    sent: Instant,
    /// The message, kept for the `--acked-file` only.
    message: Option<MessageInput>,
}

pub struct Connection {
    pub index: usize,
    pub socket: Socket,
    pub inflight: usize,
    /// This connection's share of `--rate` (0 = flat out).
    pub rate: f64,
    /// Reopen the connection when it fails (`--keep-going`).
    pub keep_going: bool,
    /// Where to reopen it.
    pub url: Rc<str>,
}

/// Sends until the plan is exhausted and every ack is in. Outstanding
/// frames of a connection that fails are counted as errors.
pub async fn drive(run: Rc<Run>, mut conn: Connection) {
    let mut rng = run.rng(conn.index);
    let mut pacer = Pacer::new(conn.rate);
    let mut window = VecDeque::with_capacity(conn.inflight);
    loop {
        let Err(e) = pump(&run, &mut conn, &mut window, &mut rng, &mut pacer).await else { break };
        let code = if e.downcast_ref::<Timeout>().is_some() { "timeout" } else { "connection" };
        run.stats.borrow_mut().on_errors(code, window.len() as u64);
        window.clear();
        eprintln!("loadtest: ws connection {}: {e:#}", conn.index);
        if !conn.keep_going || !reconnect(&run, &mut conn).await {
            break;
        }
    }
    socket::close(&mut conn.socket).await;
}

/// Reopens a failed connection, retrying until it works (true) or the run
/// has nothing left to send (false).
async fn reconnect(run: &Run, conn: &mut Connection) -> bool {
    while !run.plan.exhausted() {
        tokio::time::sleep(RECONNECT_PAUSE).await;
        if let Ok(socket) = socket::connect(&conn.url).await {
            conn.socket = socket;
            eprintln!("loadtest: ws connection {} reopened", conn.index);
            return true;
        }
    }
    false
}

#[derive(Debug)]
struct Timeout;

impl std::fmt::Display for Timeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no reply for {} s", ACK_TIMEOUT.as_secs())
    }
}

impl std::error::Error for Timeout {}

async fn pump(
    run: &Run,
    conn: &mut Connection,
    window: &mut VecDeque<InFlight>,
    rng: &mut Rng,
    pacer: &mut Pacer,
) -> anyhow::Result<()> {
    let mut exhausted = false;
    while !(exhausted && window.is_empty()) {
        tokio::select! {
            frame = tokio::time::timeout(ACK_TIMEOUT, conn.socket.next()) => {
                let frame = frame.map_err(|_| Timeout)?;
                on_frame(run, &mut conn.socket, window, frame).await?;
            }
            () = pacer.ready(), if !exhausted && window.len() < conn.inflight => {
                match run.plan.claim() {
                    Some(seq) => send(run, &mut conn.socket, window, seq, rng).await?,
                    None => exhausted = true,
                }
            }
        }
    }
    Ok(())
}

async fn send(
    run: &Run,
    socket: &mut Socket,
    window: &mut VecDeque<InFlight>,
    seq: u64,
    rng: &mut Rng,
) -> anyhow::Result<()> {
    let message = run.message(seq, rng);
    let kept = run.logs_acks().then(|| message.clone());
    let frame = ClientFrame::Ingest { id: Some(seq.into()), message };
    let text = serde_json::to_string(&frame).context("serialising an ingest frame")?;
    window.push_back(InFlight { seq, sent: Instant::now(), message: kept });
    run.stats.borrow_mut().on_sent();
    socket::send_text(socket, text).await
}

type Incoming = Option<Result<ws::Frame, WsProtocolError>>;

async fn on_frame(
    run: &Run,
    socket: &mut Socket,
    window: &mut VecDeque<InFlight>,
    frame: Incoming,
) -> anyhow::Result<()> {
    match frame.context("the server closed the connection")?.context("WebSocket protocol error")? {
        ws::Frame::Text(bytes) => {
            let reply: ServerFrame = serde_json::from_slice(&bytes)
                .with_context(|| format!("unexpected frame: {}", String::from_utf8_lossy(&bytes)))?;
            on_reply(run, window, reply)
        }
        ws::Frame::Ping(payload) => socket::pong(socket, payload).await,
        ws::Frame::Pong(_) => Ok(()),
        ws::Frame::Close(reason) => bail!("closed by the server: {}", socket::describe_close(reason.as_ref())),
        other => bail!("unexpected frame: {other:?}"),
    }
}

/// Matches an ack or error with the oldest frame in flight.
fn on_reply(run: &Run, window: &mut VecDeque<InFlight>, reply: ServerFrame) -> anyhow::Result<()> {
    let (id, outcome) = match reply {
        ServerFrame::Ack { id, message_id, duplicate, .. } => (id, Ok((message_id, duplicate))),
        ServerFrame::Error { id, error } => (id, Err(error.code)),
        other => bail!("unexpected reply: {other:?}"),
    };
    let oldest = window.front().context("a reply with no ingest frame in flight")?;
    if id.as_ref().and_then(serde_json::Value::as_u64) != Some(oldest.seq) {
        bail!("reply for frame {id:?} while frame {} was the oldest in flight", oldest.seq);
    }
    let front = window.pop_front().expect("checked above");
    let mut stats = run.stats.borrow_mut();
    match outcome {
        Ok((message_id, duplicate)) => {
            stats.on_ack(front.sent, message_id, duplicate);
            if let Some(message) = &front.message {
                run.log_ack(message_id, message);
            }
        }
        Err(code) => stats.on_error(&code),
    }
    Ok(())
}
