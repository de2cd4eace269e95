//! The HTTP server under pressure: connections that never finish their
//! request, requests over their time limit, and the per-worker connection
//! limit.

use std::time::Duration;

use actix_web::http::StatusCode;
use awc::ws;
use futures_util::SinkExt;
use sea_orm::{ConnectionTrait, TransactionTrait};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

use crate::helpers::{PATIENCE, TestApp, spawn_app_with};

/// A plain TCP connection to the app.
async fn tcp(app: &TestApp) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket.connect(([127, 0, 0, 1], app.port).into()).await.expect("the server accepts")
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_to_eof(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut received))
        .await
        .expect("the server closes the connection in time")
        .expect("a clean read");
    received
}

#[actix_web::test]
async fn connections_that_never_finish_their_request_are_closed() {
    let app = spawn_app_with(|s| {
        s.server.client_request_timeout_ms = 300;
        s.server.request_timeout_ms = 500;
    })
    .await;

    // Connects and sends nothing, or part of a request head: 408, then
    // the server closes the connection.
    let mut silent = tcp(&app).await;
    let mut slow_head = tcp(&app).await;
    slow_head.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n").await.expect("sent");
    for stream in [&mut silent, &mut slow_head] {
        let answer = String::from_utf8(read_to_eof(stream).await).expect("an HTTP answer");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }

    // A whole head, part of the body, then nothing: the request's time
    // limit answers 503 `unavailable` with Retry-After; nothing is stored.
    let app = spawn_app_with(|s| s.server.request_timeout_ms = 500).await;
    let mut slow_body = tcp(&app).await;
    slow_body
        .write_all(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"creator_id\": \"c1\",")
        .await
        .expect("sent");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("}}") {
        let n =
            tokio::time::timeout(PATIENCE, slow_body.read(&mut buf)).await.expect("an answer in time").expect("read");
        assert!(n > 0, "closed without an answer: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8(answer).expect("an HTTP answer").to_lowercase();
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("\r\nretry-after: "), "{answer}");
    assert!(answer.contains(r#""code":"unavailable""#), "{answer}");
    assert_eq!(app.count("messages", "true").await, 0);

    // The server still serves.
    assert_eq!(app.get("/healthz").await.0, StatusCode::OK);
}

#[actix_web::test]
async fn a_request_over_its_time_limit_answers_503_and_its_retry_is_a_duplicate() {
    let app = spawn_app_with(|s| s.server.request_timeout_ms = 500).await;
    let message =
        json!({"creator_id": "creator-timeout", "text": "is the vinyl back in stock?", "external_id": "tg:1"});

    // Commits wait behind a lock held by the test, past the time limit.
    let lock = app.db.begin().await.expect("a transaction");
    lock.execute_unprepared("LOCK TABLE messages IN SHARE MODE").await.expect("the lock");
    let mut response =
        app.client.post(format!("{}/v1/messages", app.address)).send_json(&message).await.expect("an answer");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    lock.rollback().await.expect("the lock is released");

    // The ingest had been handed over before the time ran out: it commits,
    // and retrying with the same external_id finds it.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while app.count("messages", "external_id = 'tg:1'").await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the timed-out ingest was not stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, retry) = app.post("/v1/messages", &message).await;
    assert_eq!(status, StatusCode::OK, "{retry}");
    assert_eq!(retry["duplicate"], true, "{retry}");
    app.wait_clustered(retry["message_id"].as_str().expect("an id")).await;
    assert_eq!(app.count("messages", "true").await, 1, "stored once");
}

#[actix_web::test]
async fn a_worker_at_its_connection_limit_serves_the_next_connection_once_one_closes() {
    let app = spawn_app_with(|s| {
        s.server.workers = 1;
        s.server.max_connections = 2;
    })
    .await;
    let mut first = app.connect_ws().await;
    let _second = app.connect_ws().await;

    // A third connection waits in the listen backlog, unanswered...
    let third = app.with_own_connection();
    let waiting = actix_web::rt::spawn(async move { third.get("/healthz").await.0 });
    first.send(&json!({"type": "ping"})).await;
    assert_eq!(first.next_json().await["type"], "pong", "the open connections are served");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "no connection beyond server.max_connections is served");

    // ...and is served as soon as one of the two closes.
    first.framed.send(ws::Message::Close(None)).await.expect("a close frame");
    assert!(matches!(first.next_frame().await, ws::Frame::Close(_)));
    drop(first);
    let status = tokio::time::timeout(PATIENCE, waiting).await.expect("served in time").expect("the request task");
    assert_eq!(status, StatusCode::OK);
}
