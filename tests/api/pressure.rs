//! The WebSocket and HTTP server under pressure: slow subscribers, many
//! idle connections, half-open and silent clients, and the limits that
//! protect the service (connections, request time).

use std::{cell::RefCell, rc::Rc, time::Duration};

use actix_web::http::StatusCode;
use awc::ws;
use futures_util::{SinkExt, StreamExt, stream};
use sea_orm::{ConnectionTrait, TransactionTrait};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

use crate::helpers::{PATIENCE, TestApp, WsClient, spawn_app_with};

/// A WebSocket upgrade request, as a browser would send it.
const UPGRADE: &str = "GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                       Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// A plain TCP connection to the app, with a small receive buffer if
/// `small_window`, so that a client that stops reading fills it soon.
async fn tcp(app: &TestApp, small_window: bool) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("a socket");
    if small_window {
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    }
    socket.connect(([127, 0, 0, 1], app.port).into()).await.expect("the server accepts")
}

/// Completes a WebSocket handshake by hand on a raw connection.
async fn raw_ws(app: &TestApp, small_window: bool) -> TcpStream {
    let mut stream = tcp(app, small_window).await;
    stream.write_all(UPGRADE.as_bytes()).await.expect("the upgrade is sent");
    // Byte by byte: nothing after the head may be consumed here.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tokio::time::timeout(PATIENCE, stream.read_u8()).await.expect("the head in time").expect("a byte");
        head.push(byte);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    stream
}

/// A WebSocket client with a small receive window, subscribed to `creator`:
/// once it stops reading, its buffers fill soon.
async fn subscribed_with_small_window(app: &TestApp, creator: &str) -> actix_codec::Framed<TcpStream, ws::Codec> {
    let codec = ws::Codec::new().client_mode().max_size(1 << 20);
    let mut client = actix_codec::Framed::new(raw_ws(app, true).await, codec);
    client
        .send(ws::Message::Text(json!({"type": "subscribe", "creator_id": creator}).to_string().into()))
        .await
        .expect("sent");
    match client.next().await.expect("a reply").expect("a frame") {
        ws::Frame::Text(text) => assert_eq!(serde_json::from_slice::<Value>(&text).unwrap()["type"], "subscribed"),
        other => panic!("expected `subscribed`, got {other:?}"),
    }
    client
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

/// Waits until a metric sample reaches `value`.
async fn wait_metric(app: &TestApp, sample: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = app.metric(sample).await;
        if now == value {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{sample} is {now}, not {value}, in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn close_code(frame: &ws::Frame) -> u16 {
    match frame {
        ws::Frame::Close(Some(reason)) => u16::from(reason.code),
        other => panic!("expected a close frame with a code, got {other:?}"),
    }
}

fn event_ids(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["event_id"].as_u64().expect("an event id")).collect()
}

#[actix_web::test]
async fn a_subscriber_that_stops_reading_is_closed_with_1013_and_resumes_without_gaps() {
    let app = spawn_app_with(|s| {
        // Decisions are published in small groups, so a reading subscriber
        // never has more than a few events waiting; the slow one is not
        // timed out while the test keeps it stalled.
        s.clustering.max_group = 8;
        s.ws.subscriber_buffer = 256;
        s.ws.client_timeout_ms = 600_000;
    })
    .await;
    let creator = "creator-slow";

    let mut slow = subscribed_with_small_window(&app, creator).await;
    // From here on `slow` is not read until the server has given up on it.

    let seen: Rc<RefCell<Vec<Value>>> = Rc::default();
    let mut fast = app.connect_ws().await;
    fast.subscribe(creator, None).await;
    let reader = {
        let seen = seen.clone();
        actix_web::rt::spawn(async move {
            loop {
                let frame = fast.next_json().await;
                assert_eq!(frame["type"], "event", "the fast subscriber gets only events: {frame}");
                seen.borrow_mut().push(frame);
            }
        })
    };

    // Large events (two copies of a ~3.9 KB text each) fill the slow
    // client's socket buffers soon; identical texts all join one cluster.
    let text = "why is the merch shipping so slow ".repeat(115);
    let mut posted = 0;
    while app.metric("clusterd_ws_slow_closed_total").await < 1.0 {
        assert!(posted < 20_000, "the slow subscriber was not closed after {posted} events");
        let batch: Vec<Value> = (0..50).map(|_| json!({"creator_id": creator, "text": text})).collect();
        let (status, body) = app.post("/v1/messages/batch", &json!({"messages": batch})).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        posted += 50;
        app.wait_settled(creator, posted).await;
    }
    let total = u64::try_from(posted).expect("a count");
    eprintln!("the slow subscriber was closed after {total} events");

    // The other subscriber got everything, in order, and is still open.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while seen.borrow().len() < posted as usize {
        assert!(tokio::time::Instant::now() < deadline, "the fast subscriber got {} of {total}", seen.borrow().len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reader.abort();
    let all = seen.take();
    assert_eq!(event_ids(&all), (1..=total).collect::<Vec<_>>());
    assert_eq!(app.metric("clusterd_ws_slow_closed_total").await, 1.0, "only the slow subscriber was closed");

    // The slow one reads again: a prefix of the events, then 1013.
    let mut got = Vec::new();
    let close = loop {
        let frame = tokio::time::timeout(PATIENCE, slow.next())
            .await
            .expect("a frame in time")
            .expect("the connection is open")
            .expect("a valid frame");
        match frame {
            ws::Frame::Text(text) => got.push(serde_json::from_slice::<Value>(&text).expect("JSON")),
            ws::Frame::Ping(_) | ws::Frame::Pong(_) => {}
            other => break other,
        }
    };
    assert_eq!(close_code(&close), 1013, "{close:?}");
    let k = u64::try_from(got.len()).expect("a count");
    assert!(k < total, "the slow subscriber was closed before the end of the stream");
    assert_eq!(got[..], all[..got.len()], "what it got is the stream's prefix, in order");

    // It resumes with `since`: exactly what it missed, then nothing more.
    let mut back = app.connect_ws().await;
    let subscribed = back.subscribe(creator, Some(i64::try_from(k).expect("an id"))).await;
    assert_eq!(subscribed["last_event_id"], total);
    let missed = back.events(all.len() - got.len()).await;
    assert_eq!(missed[..], all[got.len()..]);
    back.send(&json!({"type": "ping", "id": "end"})).await;
    assert_eq!(back.next_json().await, json!({"type": "pong", "id": "end"}), "no duplicate after the replay");
}

#[actix_web::test]
async fn a_subscriber_that_stops_reading_is_dropped_after_the_client_timeout() {
    let app = spawn_app_with(|s| {
        s.clustering.max_group = 8;
        s.ws.subscriber_buffer = 64;
        s.ws.heartbeat_interval_ms = 100;
        s.ws.client_timeout_ms = 2000;
    })
    .await;
    let creator = "creator-stalled";
    let mut stalled = subscribed_with_small_window(&app, creator).await;

    // It keeps pinging, so it is not silent, but never reads: once its
    // buffers are full the session cannot send, and must not wait forever.
    let pinger = actix_web::rt::spawn(async move {
        loop {
            // A timeout only leaves the ping in the client's write buffer.
            let _ =
                tokio::time::timeout(Duration::from_millis(50), stalled.send(ws::Message::Ping(Default::default())))
                    .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let text = "where do I send my fan art ".repeat(140);
    let mut posted = 0;
    while app.metric("clusterd_ws_connections").await > 0.0 {
        assert!(posted < 20_000, "a client that stopped reading was still connected after {posted} events");
        let batch: Vec<Value> = (0..50).map(|_| json!({"creator_id": creator, "text": text})).collect();
        let (status, body) = app.post("/v1/messages/batch", &json!({"messages": batch})).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        posted += 50;
        app.wait_settled(creator, posted).await;
    }
    pinger.abort();
    assert_eq!(app.metric("clusterd_ws_stalled_total").await, 1.0, "dropped for not reading");
    assert_eq!(app.metric("clusterd_ws_subscriptions").await, 0.0);
}

/// Raises the soft open-file limit to `needed` if the hard limit allows;
/// returns the soft limit in force.
fn raise_open_files(needed: u64) -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0, "getrlimit");
        if limit.rlim_cur < needed {
            limit.rlim_cur = needed.min(limit.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0, "setrlimit");
        }
    }
    limit.rlim_cur
}

#[actix_web::test]
async fn thousands_of_idle_connections_do_not_stop_a_normal_client() {
    const IDLE: usize = 3000;
    // The test process holds both ends of every connection.
    let limit = raise_open_files(3 * IDLE as u64);
    assert!(limit >= 2 * IDLE as u64 + 500, "the open-file limit ({limit}) is too low for {IDLE} connections");
    let app = spawn_app_with(|_| {}).await;

    // No pool limit: upgraded connections keep their slot.
    let connector = awc::Client::builder().connector(awc::Connector::new().limit(0)).timeout(PATIENCE).finish();
    let url = format!("ws://127.0.0.1:{}/v1/ws", app.port);
    let mut idle: Vec<WsClient> = stream::iter(0..IDLE)
        .map(|_| {
            let request = connector.ws(url.as_str());
            async move {
                let (_, framed) = request.connect().await.expect("an idle connection is accepted");
                WsClient { framed }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    wait_metric(&app, "clusterd_ws_connections", IDLE as f64).await;

    // A normal client subscribes, ingests over HTTP and WebSocket, and sees
    // its events.
    let creator = "creator-crowded";
    let mut dashboard = app.connect_ws().await;
    dashboard.subscribe(creator, None).await;
    let mut chat = app.connect_ws().await;
    let first = chat.ingest(creator, "do you ship to Canada?").await;
    let second = app.post_message(creator, "do you ship to canada").await;
    let events = dashboard.events(2).await;
    assert_eq!(events[0]["message"]["id"], first.as_str());
    assert_eq!(events[1]["message"]["id"], second.as_str());
    assert_eq!(events[1]["cluster"]["size"], 2);

    // Every idle connection is still open and served.
    stream::iter(idle.iter_mut().enumerate())
        .for_each_concurrent(64, |(i, client)| async move {
            client.send(&json!({"type": "ping", "id": i})).await;
            assert_eq!(client.next_json().await, json!({"type": "pong", "id": i}));
        })
        .await;
    assert_eq!(app.metric("clusterd_ws_connections").await, (IDLE + 2) as f64);
}

#[actix_web::test]
async fn silent_and_vanished_websocket_clients_are_reaped() {
    // The alive client below writes every 100 ms: 15 times within the
    // timeout, so that a loaded machine cannot make it look silent.
    let client_timeout = Duration::from_millis(1500);
    let app = spawn_app_with(|s| {
        s.ws.heartbeat_interval_ms = 100;
        s.ws.client_timeout_ms = client_timeout.as_millis() as u64;
    })
    .await;

    // Reads, but never answers the server's pings.
    let mut deaf = app.connect_ws().await;
    // Completed the handshake, then neither reads nor writes (a peer that
    // vanished without closing its TCP connection).
    let mut vanished = raw_ws(&app, false).await;
    // Subscribed, then gone without a close frame.
    let mut dropped = app.connect_ws().await;
    dropped.subscribe("creator-gone", None).await;
    drop(dropped);

    let mut pings = 0;
    let close = loop {
        let frame = tokio::time::timeout(PATIENCE, deaf.framed.next())
            .await
            .expect("a frame in time")
            .expect("the connection is open")
            .expect("a valid frame");
        match frame {
            ws::Frame::Ping(_) => pings += 1,
            other => break other,
        }
    };
    assert!(pings >= 1, "the server pinged before giving up");
    assert_eq!(close_code(&close), 1001, "{close:?}");
    match &close {
        ws::Frame::Close(Some(reason)) => assert_eq!(reason.description.as_deref(), Some("heartbeat timeout")),
        other => panic!("{other:?}"),
    }

    // The server closes the silent TCP connection after a close frame.
    let bytes = read_to_eof(&mut vanished).await;
    assert!(!bytes.is_empty(), "pings and a close frame before the end");

    wait_metric(&app, "clusterd_ws_connections", 0.0).await;
    wait_metric(&app, "clusterd_ws_subscriptions", 0.0).await;

    // A client that answers pings stays, for twice the timeout.
    let mut alive = app.connect_ws().await;
    let start = tokio::time::Instant::now();
    while start.elapsed() < 2 * client_timeout {
        alive.send(&json!({"type": "ping"})).await;
        assert_eq!(alive.next_json().await["type"], "pong");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let mut silent = tcp(&app, false).await;
    let mut slow_head = tcp(&app, false).await;
    slow_head.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n").await.expect("sent");
    for stream in [&mut silent, &mut slow_head] {
        let answer = String::from_utf8(read_to_eof(stream).await).expect("an HTTP answer");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }

    // A whole head, part of the body, then nothing: the request's time
    // limit answers 503 `unavailable` with Retry-After; nothing is stored.
    let app = spawn_app_with(|s| s.server.request_timeout_ms = 500).await;
    let mut slow_body = tcp(&app, false).await;
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
    app.flush().await;
    assert_eq!(app.count("messages", "external_id = 'tg:1'").await, 1, "the timed-out ingest was not stored");
    let (status, retry) = app.post("/v1/messages", &message).await;
    assert_eq!(status, StatusCode::OK, "{retry}");
    assert_eq!(retry["duplicate"], true, "{retry}");
    app.wait_clustered(retry["message_id"].as_str().expect("an id")).await;
    assert_eq!(app.count("messages", "true").await, 1, "stored once");
}

#[actix_web::test]
async fn websocket_sessions_beyond_the_limit_are_refused_with_503() {
    let app = spawn_app_with(|s| s.ws.max_connections = 3).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(app.connect_ws().await);
    }
    let refused = app.client.ws(format!("ws://127.0.0.1:{}/v1/ws", app.port)).connect().await;
    assert!(
        matches!(refused, Err(awc::error::WsClientError::InvalidResponseStatus(StatusCode::SERVICE_UNAVAILABLE))),
        "{:?}",
        refused.map(|_| ())
    );
    let mut response = app
        .client
        .get(format!("{}/v1/ws", app.address))
        .insert_header(("connection", "upgrade"))
        .insert_header(("upgrade", "websocket"))
        .insert_header(("sec-websocket-version", "13"))
        .insert_header(("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="))
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert_eq!(app.metric("clusterd_ws_refused_total").await, 2.0);

    // The open sessions are unaffected; once one closes, a new one fits.
    for client in &mut open {
        client.send(&json!({"type": "ping"})).await;
        assert_eq!(client.next_json().await["type"], "pong");
    }
    let mut leaving = open.pop().expect("a client");
    leaving.framed.send(ws::Message::Close(None)).await.expect("a close frame");
    assert!(matches!(leaving.next_frame().await, ws::Frame::Close(_)));
    wait_metric(&app, "clusterd_ws_connections", 2.0).await;
    let mut newcomer = app.connect_ws().await;
    newcomer.send(&json!({"type": "ping"})).await;
    assert_eq!(newcomer.next_json().await["type"], "pong");
}

/// Connections in the backlog of the app's listening socket: those the
/// kernel completed and the server has not accepted. Linux shows them as
/// the receive queue of the listening socket in `/proc/net/tcp`.
fn listen_backlog(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp is readable");
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .find_map(|line| {
            // sl local_address rem_address st tx_queue:rx_queue ...; 0A: LISTEN.
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A")).then(|| {
                let (_, rx) = fields[4].split_once(':').expect("tx_queue:rx_queue");
                usize::from_str_radix(rx, 16).expect("a hexadecimal queue length")
            })
        })
        .unwrap_or_else(|| panic!("no socket listens on 127.0.0.1:{port}"))
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

    // A third connection reaches the listen backlog (the kernel has
    // completed its handshake) and stays there, unanswered...
    let third = app.with_own_connection();
    let waiting = actix_web::rt::spawn(async move { third.get("/healthz").await.0 });
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while listen_backlog(app.port) == 0 {
        assert!(!waiting.is_finished(), "a connection beyond server.max_connections was served");
        assert!(tokio::time::Instant::now() < deadline, "the third connection never reached the listen backlog");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.send(&json!({"type": "ping"})).await;
    assert_eq!(first.next_json().await["type"], "pong", "the open connections are served");
    // A server with room takes a connection from its backlog as soon as it
    // is there; a second later this one still waits, and was never served.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(listen_backlog(app.port), 1, "no connection beyond server.max_connections is accepted");
    assert!(!waiting.is_finished(), "no connection beyond server.max_connections is served");

    // ...and is served as soon as one of the two closes.
    first.framed.send(ws::Message::Close(None)).await.expect("a close frame");
    assert!(matches!(first.next_frame().await, ws::Frame::Close(_)));
    drop(first);
    let status = tokio::time::timeout(PATIENCE, waiting).await.expect("served in time").expect("the request task");
    assert_eq!(status, StatusCode::OK);
}
