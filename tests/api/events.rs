//! The event stream: order, replay with `since`, and operation events.

use serde_json::json;

use crate::helpers::spawn_app;

#[actix_web::test]
async fn a_subscriber_sees_created_then_updated_with_increasing_ids() {
    let app = spawn_app().await;
    let creator = "creator-events";
    let mut ws = app.connect_ws().await;
    let subscribed = ws.subscribe(creator, None).await;
    assert_eq!(subscribed["last_event_id"], 0);
    assert_eq!(subscribed["creator_id"], creator);

    let first = app.post_message(creator, "Is there a student discount?").await;
    let second = app.post_message(creator, "is there a student discount").await;
    let events = ws.events(2).await;

    assert_eq!(events[0]["event"], "cluster.created");
    assert_eq!(events[0]["event_id"], 1);
    assert_eq!(events[0]["creator_id"], creator);
    assert_eq!(events[0]["message"]["id"], first.as_str());
    assert_eq!(events[0]["message"]["status"], "clustered");
    assert_eq!(events[0]["cluster"]["size"], 1);
    assert!(events[0]["at"].is_string());

    assert_eq!(events[1]["event"], "cluster.updated");
    assert_eq!(events[1]["event_id"], 2);
    assert_eq!(events[1]["message"]["id"], second.as_str());
    assert_eq!(events[1]["cluster"]["id"], events[0]["cluster"]["id"]);
    assert_eq!(events[1]["cluster"]["size"], 2);
    assert_eq!(events[1]["message"]["cluster_id"], events[0]["cluster"]["id"]);
}

#[actix_web::test]
async fn a_subscriber_that_reconnects_with_since_gets_exactly_what_it_missed() {
    let app = spawn_app().await;
    let creator = "creator-replay";
    let mut watcher = app.connect_ws().await;
    watcher.subscribe(creator, None).await;
    let mut flaky = app.connect_ws().await;
    flaky.subscribe(creator, None).await;

    let texts =
        ["refund please", "how do I get a refund", "where is my order", "order not arrived yet", "love the show"];
    for text in &texts[..2] {
        app.post_message(creator, text).await;
    }
    let seen = flaky.events(2).await;
    drop(flaky); // disconnects after event 2
    for text in &texts[2..] {
        app.post_message(creator, text).await;
    }
    let all = watcher.events(5).await;
    let ids: Vec<i64> = all.iter().map(|e| e["event_id"].as_i64().expect("an id")).collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    assert_eq!(seen[..], all[..2]);

    let mut back = app.connect_ws().await;
    let subscribed = back.subscribe(creator, Some(2)).await;
    assert_eq!(subscribed["last_event_id"], 5);
    let missed = back.events(3).await;
    assert_eq!(missed[..], all[2..], "replayed events are the live ones, byte for byte equal JSON");

    // Then live events continue without a gap or a duplicate.
    app.post_message(creator, "one more question").await;
    let live = back.events(1).await;
    assert_eq!(live[0]["event_id"], 6);
    back.send(&json!({"type": "ping", "id": "p"})).await;
    assert_eq!(back.next_json().await, json!({"type": "pong", "id": "p"}), "no extra event frames");

    // since=0 replays everything; subscribing twice is a conflict.
    let mut fresh = app.connect_ws().await;
    fresh.subscribe(creator, Some(0)).await;
    let everything = fresh.events(6).await;
    assert_eq!(everything[..5], all[..]);
    fresh.send(&json!({"type": "subscribe", "creator_id": creator, "id": 9})).await;
    let conflict = fresh.next_json().await;
    assert_eq!(conflict["error"]["code"], "conflict");
    fresh.send(&json!({"type": "unsubscribe", "creator_id": creator})).await;
    assert_eq!(fresh.next_json().await["type"], "unsubscribed");
}

#[actix_web::test]
async fn operations_publish_their_events() {
    let app = spawn_app().await;
    let creator = "creator-op-events";
    let mut ws = app.connect_ws().await;
    ws.subscribe(creator, None).await;
    let a = app.post_message(creator, "can you sign my poster").await;
    app.post_message(creator, "can you sign my poster please").await;
    let created = ws.events(2).await;
    let cluster_id = created[0]["cluster"]["id"].as_str().expect("a cluster").to_owned();

    let (status, _) = app.delete(&format!("/v1/clusters/{cluster_id}/messages/{a}")).await;
    assert_eq!(status, 200);
    let removed = &ws.events(1).await[0];
    assert_eq!(removed["event"], "message.removed");
    assert_eq!(removed["event_id"], 3);
    assert_eq!(removed["cluster"]["id"], cluster_id.as_str());
    assert_eq!(removed["cluster"]["size"], 1);
    assert_eq!(removed["message"]["id"], a.as_str());
    assert_eq!(removed["new_cluster"]["id"], removed["message"]["cluster_id"]);

    let (status, _) = app.post(&format!("/v1/clusters/{cluster_id}/action"), &json!({"response_text": "Yes!"})).await;
    assert_eq!(status, 200);
    let actioned = &ws.events(1).await[0];
    assert_eq!(actioned["event"], "cluster.actioned");
    assert_eq!(actioned["event_id"], 4);
    assert_eq!(actioned["cluster"]["response_text"], "Yes!");
}
