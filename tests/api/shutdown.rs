//! SIGTERM: the daemon stops accepting, finishes the requests in flight,
//! closes WebSockets with 1001 and exits 0. Runs the real binary.

use std::time::Duration;

use actix_web::http::StatusCode;
use awc::ws;
use futures_util::SinkExt;
use sea_orm::{ConnectionTrait, TransactionTrait};
use serde_json::{Value, json};

use crate::{
    helpers::{PATIENCE, WsClient, fresh_database},
    restart::{start_daemon, wait_ready},
};

async fn connect_ws(client: &awc::Client, port: u16) -> WsClient {
    let (_, framed) = client.ws(format!("ws://127.0.0.1:{port}/v1/ws")).connect().await.expect("the handshake");
    WsClient { framed }
}

/// The value of a sample on the daemon's /metrics.
async fn metric(client: &awc::Client, port: u16, sample: &str) -> f64 {
    let mut response = client.get(format!("http://127.0.0.1:{port}/metrics")).send().await.expect("GET /metrics");
    let body = response.body().limit(1 << 24).await.expect("the metrics body");
    let text = std::str::from_utf8(&body).expect("UTF-8");
    text.lines()
        .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |value| value.trim().parse().expect("a number"))
}

async fn scalar(db: &sea_orm::DatabaseConnection, sql: &str) -> i64 {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, sql))
        .await
        .expect("query")
        .expect("a row");
    row.try_get("", "n").expect("a number")
}

/// Waits until `done` holds, polling.
async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn close_code(frame: &ws::Frame) -> u16 {
    match frame {
        ws::Frame::Close(Some(reason)) => u16::from(reason.code),
        other => panic!("expected a close frame with a code, got {other:?}"),
    }
}

#[actix_web::test]
async fn sigterm_finishes_in_flight_work_closes_websockets_with_1001_and_exits_0() {
    let db_url = fresh_database().await;
    let (mut daemon, port) = start_daemon(&db_url, &[]).await;
    let client = awc::Client::builder().timeout(PATIENCE).finish();
    wait_ready(&client, port).await;
    let db = sea_orm::Database::connect(&db_url).await.expect("connect");
    let creator = "creator-sigterm";

    let mut subscribers = Vec::new();
    for _ in 0..2 {
        let mut ws = connect_ws(&client, port).await;
        ws.subscribe(creator, None).await;
        subscribers.push(ws);
    }

    // Commits wait behind a lock held by the test, so that requests are
    // in flight when SIGTERM arrives.
    let lock = db.begin().await.expect("a transaction");
    lock.execute_unprepared("LOCK TABLE messages IN SHARE MODE").await.expect("the lock");
    let mut chat = connect_ws(&client, port).await;
    for i in 0..5 {
        let message =
            json!({"creator_id": creator, "text": format!("websocket question {i}"), "external_id": format!("ws{i}")});
        chat.send(&json!({"type": "ingest", "id": i, "message": message})).await;
    }
    let db_ref = &db;
    wait_until("an ingest commit waits for the lock", || async move {
        let waiting = "SELECT count(*) AS n FROM pg_stat_activity
                       WHERE wait_event_type = 'Lock' AND datname = current_database()";
        scalar(db_ref, waiting).await >= 1
    })
    .await;
    const HTTP: usize = 8;
    let requests: Vec<_> = (0..HTTP)
        .map(|i| {
            let client = awc::Client::builder().timeout(PATIENCE * 2).finish();
            let body =
                json!({"creator_id": creator, "text": format!("http question {i}"), "external_id": format!("http{i}")});
            actix_web::rt::spawn(async move {
                let mut response = client
                    .post(format!("http://127.0.0.1:{port}/v1/messages"))
                    .send_json(&body)
                    .await
                    .expect("an answer");
                let body: Value = response.json().await.expect("a JSON answer");
                (response.status(), body)
            })
        })
        .collect();
    // Every request has reached its handler (the metrics request counts too).
    let client_ref = &client;
    wait_until("the requests are in flight", || async move {
        metric(client_ref, port, "clusterd_http_requests_in_flight").await >= (HTTP + 1) as f64
    })
    .await;

    // SAFETY: kill(2) on our own child's pid.
    let pid = i32::try_from(daemon.child.id()).expect("a pid");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM is sent");

    // Subscribers are told at once, while the requests are still waiting.
    for ws in &mut subscribers {
        let close = ws.next_frame().await;
        assert_eq!(close_code(&close), 1001, "{close:?}");
    }
    assert!(requests.iter().all(|r| !r.is_finished()), "requests still wait for the lock");
    let late = awc::Client::builder().timeout(Duration::from_secs(5)).finish();
    assert!(
        late.ws(format!("ws://127.0.0.1:{port}/v1/ws")).connect().await.is_err(),
        "no new WebSocket session once shutting down"
    );

    // The requests finish once the database lets them.
    lock.rollback().await.expect("the lock is released");
    let mut acked = Vec::new();
    for request in requests {
        let (status, body) = request.await.expect("the request task");
        assert_eq!(status, StatusCode::ACCEPTED, "an in-flight request completes: {body}");
        acked.push(body["message_id"].as_str().expect("an id").to_owned());
    }
    // The WebSocket's acks come before its 1001; frames the session had not
    // read yet get none (their clients retry them).
    let mut ws_acks = 0;
    let close = loop {
        match chat.next_frame().await {
            ws::Frame::Text(text) => {
                let ack: Value = serde_json::from_slice(&text).expect("JSON");
                assert_eq!(ack["type"], "ack", "{ack}");
                assert_eq!(ack["id"], ws_acks, "acks in frame order: {ack}");
                acked.push(ack["message_id"].as_str().expect("an id").to_owned());
                ws_acks += 1;
            }
            other => break other,
        }
    };
    assert_eq!(close_code(&close), 1001, "{close:?}");
    assert!(ws_acks >= 1, "the ingest in flight at SIGTERM was acknowledged");

    let deadline = tokio::time::Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = daemon.child.try_wait().expect("the daemon's status") {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "the daemon did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "the daemon exits with 0: {status:?}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "nothing listens any more");

    for id in &acked {
        let stored = scalar(&db, &format!("SELECT count(*) AS n FROM messages WHERE id = '{id}'::uuid")).await;
        assert_eq!(stored, 1, "acknowledged message {id} is stored");
    }
    assert_eq!(acked.len(), HTTP + ws_acks as usize);
    let _ = chat.framed.close().await;
}
