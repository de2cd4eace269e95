//! Ingest over HTTP and WebSocket: acks, idempotency, batches.

use actix_web::http::StatusCode;
use serde_json::json;

use crate::helpers::spawn_app;

#[actix_web::test]
async fn ack_is_202_pending_and_the_message_is_stored_as_sent() {
    let app = spawn_app().await;
    let body = json!({
        "creator_id": "creator-1",
        "text": "  Hello, how much is the VIP pass? 🎟️  ",
        "visitor": {"id": "v-1", "name": "Ana", "avatar_url": "https://example.com/a.png"},
        "raw_payload": {"source": "chat", "nested": {"n": [1, 2, 3]}},
        "sent_at": "2026-11-25T10:00:00Z"
    });
    let (status, ack) = app.post("/v1/messages", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(ack["status"], "pending");
    assert_eq!(ack["cluster_id"], json!(null));
    assert_eq!(ack["duplicate"], false);

    let id = ack["message_id"].as_str().expect("an id");
    let message = app.wait_clustered(id).await;
    assert_eq!(message["text"], body["text"], "text is stored exactly as sent");
    assert_eq!(message["visitor"], body["visitor"]);
    assert_eq!(message["sent_at"], "2026-11-25T10:00:00Z");
    assert!(message["cluster_id"].is_string());
    assert_eq!(
        app.count("messages", "raw_payload = '{\"source\": \"chat\", \"nested\": {\"n\": [1, 2, 3]}}'::jsonb").await,
        1
    );
}

#[actix_web::test]
async fn a_repeated_external_id_is_a_duplicate_not_a_second_message() {
    let app = spawn_app().await;
    let body = json!({"creator_id": "creator-1", "text": "first", "external_id": "chat-42"});
    let (status, first) = app.post("/v1/messages", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = first["message_id"].as_str().expect("an id").to_owned();
    app.wait_clustered(&id).await;

    let again = json!({"creator_id": "creator-1", "text": "a retry with other text", "external_id": "chat-42"});
    let (status, second) = app.post("/v1/messages", &again).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(second["message_id"], first["message_id"]);
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["status"], "clustered", "the first message's current state");
    assert!(second["cluster_id"].is_string());

    // The same external id under another creator is another message.
    let other = json!({"creator_id": "creator-2", "text": "first", "external_id": "chat-42"});
    let (status, _) = app.post("/v1/messages", &other).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(app.count("messages", "external_id = 'chat-42'").await, 2);
}

#[actix_web::test]
async fn batch_answers_each_item_in_order() {
    let app = spawn_app().await;
    let batch = json!({"messages": [
        {"creator_id": "c1", "text": "one", "external_id": "e1"},
        {"creator_id": "c1", "text": ""},
        {"creator_id": "c1", "text": "three", "external_id": "e1"},
        {"creator_id": "bad id", "text": "four"},
        {"creator_id": "c1", "text": "five", "unknown": 1},
        {"creator_id": "c1", "text": "six"}
    ]});
    let (status, body) = app.post("/v1/messages/batch", &batch).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 6);
    assert_eq!(results[0]["duplicate"], false);
    assert_eq!(results[1]["error"]["code"], "invalid_request");
    assert_eq!(results[2]["duplicate"], true, "same external id within the batch");
    assert_eq!(results[2]["message_id"], results[0]["message_id"]);
    assert_eq!(results[3]["error"]["code"], "invalid_request");
    assert_eq!(results[4]["error"]["code"], "invalid_request");
    assert_eq!(results[5]["status"], "pending");
    assert_eq!(app.count("messages", "creator_id = 'c1'").await, 2);

    let (status, body) = app.post("/v1/messages/batch", &json!({"messages": []})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let too_many: Vec<_> = (0..1001).map(|i| json!({"creator_id": "c2", "text": format!("m{i}")})).collect();
    let (status, body) = app.post("/v1/messages/batch", &json!({"messages": too_many})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(app.count("messages", "creator_id = 'c2'").await, 0);
}

#[actix_web::test]
async fn websocket_ingest_acks_in_frame_order() {
    let app = spawn_app().await;
    let mut ws = app.connect_ws().await;
    for i in 0..20 {
        ws.send(&json!({"type": "ingest", "id": i, "message": {"creator_id": "c-ws", "text": format!("message number {i}")}}))
            .await;
    }
    ws.send(&json!({"type": "ingest", "id": "bad", "message": {"creator_id": "c-ws", "text": ""}})).await;
    for i in 0..20 {
        let ack = ws.next_json().await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["id"], i);
        assert_eq!(ack["status"], "pending");
        assert_eq!(ack["duplicate"], false);
    }
    let error = ws.next_json().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["id"], "bad");
    assert_eq!(error["error"]["code"], "invalid_request");
    assert_eq!(app.count("messages", "creator_id = 'c-ws'").await, 20);

    ws.send(&json!({"type": "ping", "id": 7})).await;
    assert_eq!(ws.next_json().await, json!({"type": "pong", "id": 7}));
}

#[actix_web::test]
async fn health_readiness_and_metrics() {
    let app = spawn_app().await;
    let (status, body) = app.get("/healthz").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    let (status, body) = app.get("/readyz").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ready"})));
    let id = app.post_message("c-metrics", "hello metrics").await;
    app.wait_clustered(&id).await;
    let mut response = app.client.get(format!("{}/metrics", app.address)).send().await.expect("an answer");
    let text = String::from_utf8(response.body().await.expect("a body").to_vec()).expect("UTF-8");
    assert!(text.contains("clusterd_messages_ingested_total 1"), "{text}");
    assert!(text.contains("clusterd_messages_clustered_total 1"), "{text}");
    assert!(text.contains("clusterd_http_requests_total{route=\"/v1/messages\",status=\"202\"} 1"), "{text}");
}
