//! Every class of bad input gets its error and stores nothing.

use actix_web::http::StatusCode;
use awc::ws;
use futures_util::SinkExt;
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app};

async fn assert_refused(app: &TestApp, body: Value, status: StatusCode, code: &str) {
    let (got, answer) = app.post("/v1/messages", &body).await;
    assert_eq!(got, status, "{body} -> {answer}");
    assert_eq!(answer["error"]["code"], code, "{body} -> {answer}");
    assert!(answer["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[actix_web::test]
async fn bad_messages_are_refused_and_nothing_is_stored() {
    let app = spawn_app().await;
    let bad = StatusCode::BAD_REQUEST;
    let cases = [
        (json!({"text": "no creator"}), bad, "invalid_request"),
        (json!({"creator_id": "c1"}), bad, "invalid_request"),
        (json!({"creator_id": 5, "text": "wrong type"}), bad, "invalid_request"),
        (json!({"creator_id": "c1", "text": ["wrong", "type"]}), bad, "invalid_request"),
        (json!({"creator_id": "c1", "text": ""}), bad, "invalid_request"),
        (json!({"creator_id": "c1", "text": "   "}), bad, "invalid_request"),
        (json!({"creator_id": "c1", "text": "nul\u{0}byte"}), bad, "invalid_request"),
        (json!({"creator_id": "c1", "text": "x".repeat(4001)}), StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        (json!({"creator_id": "", "text": "hi"}), bad, "invalid_request"),
        (json!({"creator_id": "has space", "text": "hi"}), bad, "invalid_request"),
        (json!({"creator_id": "x".repeat(129), "text": "hi"}), bad, "invalid_request"),
        (json!({"creator_id": "c1", "text": "hi", "extrnal_id": "typo"}), bad, "invalid_request"),
        (json!({"creator_id": "c1", "text": "hi", "external_id": ""}), bad, "invalid_request"),
        (json!({"creator_id": "c1", "text": "hi", "sent_at": "yesterday"}), bad, "invalid_request"),
        (json!({"creator_id": "c1", "text": "hi", "visitor": {"nick": "x"}}), bad, "invalid_request"),
        (json!({"creator_id": "c1", "text": "hi", "raw_payload": {"k": "nul\u{0}"}}), bad, "invalid_request"),
        (json!(["not", "an", "object"]), bad, "invalid_request"),
    ];
    for (body, status, code) in cases {
        assert_refused(&app, body, status, code).await;
    }
    // Exactly at the limit is fine (characters, not bytes).
    let (status, _) = app.post("/v1/messages", &json!({"creator_id": "ok", "text": "é".repeat(4000)})).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    for raw in ["{not json", "", "{\"creator_id\": \"c1\", \"text\": \"hi\"", "\u{0}"] {
        let (status, answer) = app.post_raw("/v1/messages", raw).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{raw:?} -> {answer}");
        assert_eq!(answer["error"]["code"], "invalid_request");
    }
    let invalid_utf8 = b"{\"creator_id\": \"c1\", \"text\": \"\xff\xfe\"}".to_vec();
    let (status, _) = app.post_raw("/v1/messages", invalid_utf8).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let huge = format!("{{\"creator_id\": \"c1\", \"text\": \"{}\"}}", "x".repeat(17 << 20));
    let (status, answer) = app.post_raw("/v1/messages", huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");

    assert_eq!(app.count("messages", "creator_id <> 'ok'").await, 0, "nothing refused was stored");
}

#[actix_web::test]
async fn unknown_ids_and_routes_are_404_and_bad_parameters_400() {
    let app = spawn_app().await;
    for path in [
        "/v1/messages/not-a-uuid",
        "/v1/messages/0190b5a0-0000-7000-8000-000000000000",
        "/v1/clusters/nope",
        "/v1/clusters/0190b5a0-0000-7000-8000-000000000000",
        "/v1/nothing-here",
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body["error"]["code"], "not_found", "{path}");
    }
    for path in [
        "/v1/creators/bad%20id/clusters",
        "/v1/creators/c1/clusters?status=closed",
        "/v1/creators/c1/clusters?sort=alpha",
        "/v1/creators/c1/clusters?limit=0",
        "/v1/creators/c1/clusters?limit=abc",
        "/v1/creators/c1/clusters?cursor=garbage",
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{path}");
    }
    let (status, body) =
        app.post("/v1/clusters/0190b5a0-0000-7000-8000-000000000000/action", &json!({"response_text": "hi"})).await;
    assert_eq!((status, body["error"]["code"].clone()), (StatusCode::NOT_FOUND, json!("not_found")));
}

#[actix_web::test]
async fn bad_websocket_frames_get_error_frames_and_the_connection_stays_open() {
    let app = spawn_app().await;
    let mut ws = app.connect_ws().await;
    let cases = [
        ("{oops".to_owned(), None),
        (json!({"id": 1}).to_string(), Some(json!(1))),
        (json!({"type": "dance", "id": "x"}).to_string(), Some(json!("x"))),
        (json!({"type": "subscribe", "id": 2}).to_string(), Some(json!(2))),
        (json!({"type": "subscribe", "creator_id": "bad id", "id": 3}).to_string(), Some(json!(3))),
        (json!({"type": "subscribe", "creator_id": "ok", "since": "zero", "id": 4}).to_string(), Some(json!(4))),
        (json!({"type": "ingest", "id": 5, "message": {"creator_id": "c1"}}).to_string(), Some(json!(5))),
        (
            json!({"type": "ingest", "id": 6, "message": {"creator_id": "c1", "text": "a\u{0}b"}}).to_string(),
            Some(json!(6)),
        ),
    ];
    for (text, id) in cases {
        ws.send_text(text.clone()).await;
        let reply = ws.next_json().await;
        assert_eq!(reply["type"], "error", "{text} -> {reply}");
        assert_eq!(reply["error"]["code"], "invalid_request", "{text} -> {reply}");
        assert_eq!(reply.get("id").cloned(), id, "{text} -> {reply}");
    }
    ws.framed.send(ws::Message::Binary(vec![1, 2, 3].into())).await.expect("sent");
    let reply = ws.next_json().await;
    assert_eq!(reply["error"]["code"], "invalid_request");

    ws.send(&json!({"type": "ping"})).await;
    assert_eq!(ws.next_json().await["type"], "pong", "still open after bad frames");
    assert_eq!(app.count("messages", "true").await, 0);

    // An oversized frame closes the connection with 1009.
    let big = json!({"type": "ingest", "message": {"creator_id": "c1", "text": "x".repeat(70_000)}});
    ws.send(&big).await;
    match ws.next_frame().await {
        ws::Frame::Close(Some(reason)) => assert_eq!(u16::from(reason.code), 1009),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert_eq!(app.count("messages", "true").await, 0);
}

#[actix_web::test]
async fn fragmented_frames_are_reassembled_and_bounded_and_invalid_utf8_closes_with_1007() {
    use actix_ws::Item;
    let app = spawn_app().await;

    // A message in fragments is one frame.
    let mut ws = app.connect_ws().await;
    let ping = json!({"type": "ping", "id": "fragments"}).to_string().into_bytes();
    let (a, b) = ping.split_at(10);
    let (b, c) = b.split_at(10);
    for item in [Item::FirstText(a.to_vec().into()), Item::Continue(b.to_vec().into()), Item::Last(c.to_vec().into())] {
        ws.framed.send(ws::Message::Continuation(item)).await.expect("sent");
    }
    assert_eq!(ws.next_json().await, json!({"type": "pong", "id": "fragments"}));

    // Fragments each under the frame limit, together over it: 1009.
    let chunk = vec![b' '; 40_000];
    ws.framed.send(ws::Message::Continuation(Item::FirstText(chunk.clone().into()))).await.expect("sent");
    ws.framed.send(ws::Message::Continuation(Item::Last(chunk.into()))).await.expect("sent");
    assert_eq!(close_code(ws.next_frame().await), 1009);

    // A text message that is not UTF-8 breaks the protocol: 1007.
    let mut ws = app.connect_ws().await;
    ws.framed
        .send(ws::Message::Continuation(Item::FirstText(b"{\"type\": \"\xff".to_vec().into())))
        .await
        .expect("sent");
    ws.framed.send(ws::Message::Continuation(Item::Last(b"\"}".to_vec().into()))).await.expect("sent");
    assert_eq!(close_code(ws.next_frame().await), 1007);
    assert_eq!(app.count("messages", "true").await, 0);
}

fn close_code(frame: ws::Frame) -> u16 {
    match frame {
        ws::Frame::Close(Some(reason)) => u16::from(reason.code),
        other => panic!("expected a close frame with a code, got {other:?}"),
    }
}

/// A stored state this build does not know (a hand edit, a newer version's
/// value) is an internal error wherever it is read, never taken for another
/// state.
#[actix_web::test]
async fn an_unknown_stored_state_is_an_internal_error_not_a_default() {
    use sea_orm::ConnectionTrait;

    let app = spawn_app().await;
    let id = app.post_message("c1", "is the shop open on sunday?").await;
    let cluster = app.wait_clustered(&id).await["cluster_id"].as_str().expect("a cluster").to_owned();
    app.db
        .execute_unprepared(&format!(
            "ALTER TABLE messages DROP CONSTRAINT messages_status_check;
             ALTER TABLE clusters DROP CONSTRAINT clusters_status_check;
             UPDATE messages SET status = 'archived' WHERE id = '{id}';
             UPDATE clusters SET status = 'archived' WHERE id = '{cluster}';"
        ))
        .await
        .expect("the test database takes the hand edit");
    for path in
        [format!("/v1/messages/{id}"), format!("/v1/clusters/{cluster}"), "/v1/creators/c1/clusters?status=all".into()]
    {
        let (status, answer) = app.get(&path).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (StatusCode::INTERNAL_SERVER_ERROR, Some("internal")),
            "{path}: {answer}"
        );
    }
}
