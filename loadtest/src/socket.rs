//! WebSocket plumbing shared by the ingest and event connections.

use std::time::Duration;

use actix_web::web::Bytes;
use anyhow::{Context, anyhow};
use awc::{BoxedSocket, ws};
use futures_util::SinkExt;

/// A client WebSocket.
pub type Socket = actix_codec::Framed<BoxedSocket, ws::Codec>;

/// Longest frame accepted from the server (events carry two objects).
const MAX_FRAME: usize = 1 << 20;

/// Time allowed for the TCP connect and the WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn connect(url: &str) -> anyhow::Result<Socket> {
    let client = awc::Client::builder().timeout(CONNECT_TIMEOUT).finish();
    let (_response, socket) = client
        .ws(url)
        .max_frame_size(MAX_FRAME)
        .connect()
        .await
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("WebSocket connect to {url}"))?;
    Ok(socket)
}

pub async fn send_text(socket: &mut Socket, text: String) -> anyhow::Result<()> {
    socket.send(ws::Message::Text(text.into())).await.context("WebSocket send")
}

pub async fn pong(socket: &mut Socket, payload: Bytes) -> anyhow::Result<()> {
    socket.send(ws::Message::Pong(payload)).await.context("WebSocket pong")
}

/// Says goodbye; the server may already be gone, which is fine.
pub async fn close(socket: &mut Socket) {
    let _ = socket.send(ws::Message::Close(Some(ws::CloseCode::Normal.into()))).await;
}

/// `1013 subscriber too slow` from a close frame.
pub fn describe_close(reason: Option<&ws::CloseReason>) -> String {
    match reason {
        Some(reason) => {
            let code = u16::from(reason.code);
            format!("{code} {}", reason.description.as_deref().unwrap_or("")).trim_end().to_owned()
        }
        None => "no reason".to_owned(),
    }
}
