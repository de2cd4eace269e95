//! Creator operations (action, remove, merge, move; confirm is in
//! `membership`) over HTTP and
//! WebSocket: their answers, their errors, their one event each, that a
//! message they move stays where they put it, and that a random sequence of
//! them keeps every cluster true to its members.

use std::collections::{HashMap, HashSet};

use actix_web::http::StatusCode;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait, Value as SqlValue};
use serde_json::{Value, json};

use crate::helpers::{TestApp, WsClient, spawn_app};

#[actix_web::test]
async fn action_answers_200_then_409_and_new_messages_open_a_new_cluster() {
    let app = spawn_app().await;
    let creator = "creator-action";
    let first = app.post_message(creator, "what time does the show start").await;
    let first = app.wait_clustered(&first).await;
    let cluster_id = first["cluster_id"].as_str().expect("a cluster");

    let path = format!("/v1/clusters/{cluster_id}/action");
    let (status, cluster) = app.post(&path, &json!({"response_text": "Doors at 7, show at 8!"})).await;
    assert_eq!(status, StatusCode::OK, "{cluster}");
    assert_eq!(cluster["status"], "actioned");
    assert_eq!(cluster["response_text"], "Doors at 7, show at 8!");
    assert!(cluster["actioned_at"].is_string());

    let (status, again) = app.post(&path, &json!({"response_text": "again"})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(again["error"]["code"], "conflict");

    let (status, bad) = app.post(&path, &json!({"response_text": ""})).await;
    assert_eq!((status, bad["error"]["code"].clone()), (StatusCode::BAD_REQUEST, json!("invalid_request")));

    // The same question later goes to a new open cluster.
    let later = app.post_message(creator, "what time does the show start").await;
    let later = app.wait_clustered(&later).await;
    assert_ne!(later["cluster_id"], first["cluster_id"]);
    let (_, detail) = app.get(&format!("/v1/clusters/{cluster_id}")).await;
    assert_eq!(detail["size"], 1);
    assert_eq!(detail["status"], "actioned");
}

#[actix_web::test]
async fn removing_a_message_moves_it_to_a_new_singleton_cluster() {
    let app = spawn_app().await;
    let creator = "creator-remove";
    let a = app.post_message(creator, "how much is the vip ticket").await;
    let b = app.post_message(creator, "how much is the vip ticket?").await;
    let c = app.post_message(creator, "how much is the vip ticket??").await;
    let a = app.wait_clustered(&a).await;
    let b = app.wait_clustered(&b).await;
    let c = app.wait_clustered(&c).await;
    let cluster_id = a["cluster_id"].as_str().expect("a cluster").to_owned();
    assert_eq!(b["cluster_id"], a["cluster_id"]);
    assert_eq!(c["cluster_id"], a["cluster_id"]);

    let b_id = b["id"].as_str().expect("an id");
    let (status, body) = app.delete(&format!("/v1/clusters/{cluster_id}/messages/{b_id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["cluster"]["id"], cluster_id.as_str());
    assert_eq!(body["cluster"]["size"], 2);
    assert_eq!(body["message"]["id"], b_id);
    let singleton = body["message"]["cluster_id"].as_str().expect("a new cluster").to_owned();
    assert_ne!(singleton, cluster_id);

    let (_, detail) = app.get(&format!("/v1/clusters/{singleton}")).await;
    assert_eq!(detail["size"], 1);
    assert_eq!(detail["status"], "open");
    assert_eq!(detail["label"], "how much is the vip ticket?");
    assert_eq!(detail["messages"][0]["id"], b_id);
    let (_, left) = app.get(&format!("/v1/clusters/{cluster_id}")).await;
    let members: Vec<_> = left["messages"].as_array().expect("messages").iter().map(|m| m["id"].clone()).collect();
    assert_eq!(members, vec![a["id"].clone(), c["id"].clone()]);

    // Not in that cluster (any more): 404. The last message: 409.
    let (status, _) = app.delete(&format!("/v1/clusters/{cluster_id}/messages/{b_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = app.delete(&format!("/v1/clusters/{singleton}/messages/{b_id}")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _) = app.delete(&format!("/v1/clusters/{cluster_id}/messages/not-an-id")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[actix_web::test]
async fn a_removal_relabels_the_cluster_with_its_most_representative_member() {
    let app = spawn_app().await;
    let creator = "creator-relabel";
    // The first message labels the cluster. Of the three that stay, the
    // last two are near twins, so the centroid leans their way and one of
    // them, not the oldest remaining member, represents the cluster.
    let first = post_clustered(&app, creator, "refund for my ticket please").await;
    let cluster_id = first["cluster_id"].as_str().expect("a cluster").to_owned();
    for text in ["can i get a refund for my ticket", "refund for my ticket please!", "refund for my ticket please?"] {
        let m = post_clustered(&app, creator, text).await;
        assert_eq!(m["cluster_id"], cluster_id.as_str(), "{text} joins");
    }
    let first_id = first["id"].as_str().expect("an id");
    let (status, body) = app.delete(&format!("/v1/clusters/{cluster_id}/messages/{first_id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["cluster"]["label"], nearest_member_text(&app, &cluster_id).await);
    assert!(body["cluster"]["label"].as_str().is_some_and(|l| l.starts_with("refund for my ticket please")), "{body}");
}

#[actix_web::test]
async fn merge_moves_every_message_into_the_target_and_deletes_the_sources() {
    for via in [Via::Http, Via::Ws] {
        let app = spawn_app().await;
        let creator = "creator-merge";
        let mut ops = app.connect_ws().await;
        let target = post_clustered(&app, creator, "how much is the vip ticket").await;
        post_clustered(&app, creator, "how much is the vip ticket?").await;
        let price = post_clustered(&app, creator, "what does the premium pass cost").await;
        let shipping = post_clustered(&app, creator, "do you ship merch to brazil").await;
        post_clustered(&app, creator, "can you ship merch to brazil").await;
        let [target, price, shipping] =
            [&target, &price, &shipping].map(|m| m["cluster_id"].as_str().expect("a cluster").to_owned());
        assert_eq!(HashSet::from([&target, &price, &shipping]).len(), 3, "three clusters to begin with");
        let events_before = app.count("events", &format!("creator_id = '{creator}'")).await;

        let (status, merged) = op(&app, &mut ops, via, merge_frame(&target, &[&price, &shipping])).await;
        assert_eq!(status, StatusCode::OK, "{via:?}: {merged}");
        assert_eq!(merged["id"], target.as_str());
        assert_eq!(merged["size"], 5);
        assert_eq!(merged["status"], "open");
        assert_eq!(merged["label"], nearest_member_text(&app, &target).await);
        assert!(merged["updated_at"].as_str() > merged["created_at"].as_str());
        assert!(merged.get("sample_messages").is_none());

        let (_, detail) = app.get(&format!("/v1/clusters/{target}")).await;
        assert_eq!(detail["messages"].as_array().map(Vec::len), Some(5));
        assert_eq!(detail["size"], 5);
        for source in [&price, &shipping] {
            let (status, _) = app.get(&format!("/v1/clusters/{source}")).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{via:?}: a merged cluster is gone");
        }
        assert_eq!(app.count("clusters", &format!("creator_id = '{creator}'")).await, 1);
        assert_eq!(app.count("events", &format!("creator_id = '{creator}'")).await, events_before + 1);
        check_invariants(&app, creator).await;
    }
}

#[actix_web::test]
async fn merge_refuses_bad_lists_unknown_foreign_and_actioned_clusters_and_changes_nothing() {
    for via in [Via::Http, Via::Ws] {
        let app = spawn_app().await;
        let creator = "creator-merge-errors";
        let mut ops = app.connect_ws().await;
        let [a, b, closed] = clusters_of(
            &app,
            creator,
            ["when does the show start", "do you ship merch to brazil", "what camera do you use"],
        )
        .await;
        let foreign = post_clustered(&app, "creator-other", "do you ship merch to brazil").await;
        let foreign = foreign["cluster_id"].as_str().expect("a cluster").to_owned();
        let (status, _) = op(&app, &mut ops, via, action_frame(&closed, "Sony.")).await;
        assert_eq!(status, StatusCode::OK);
        let unknown = uuid::Uuid::now_v7().to_string();
        let too_many: Vec<String> = (0..101).map(|_| uuid::Uuid::now_v7().to_string()).collect();
        let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
        let before = state_of(&app, creator).await;

        let cases: Vec<(Value, StatusCode)> = vec![
            (merge_frame(&a, &[]), StatusCode::BAD_REQUEST),
            (merge_frame(&a, &too_many), StatusCode::BAD_REQUEST),
            (merge_frame(&a, &[&b, &b]), StatusCode::BAD_REQUEST),
            (merge_frame(&a, &[&b, &b.to_uppercase()]), StatusCode::BAD_REQUEST),
            (merge_frame(&a, &[&b, &a]), StatusCode::BAD_REQUEST),
            (json!({"type": "merge", "cluster_id": a, "cluster_ids": [1, 2]}), StatusCode::BAD_REQUEST),
            (merge_frame("not-an-id", &[&b]), StatusCode::NOT_FOUND),
            (merge_frame(&unknown, &[&b]), StatusCode::NOT_FOUND),
            (merge_frame(&a, &[&b, "not-an-id"]), StatusCode::NOT_FOUND),
            (merge_frame(&a, &[&b, &unknown]), StatusCode::NOT_FOUND),
            (merge_frame(&a, &[&b, &foreign]), StatusCode::NOT_FOUND),
            (merge_frame(&foreign, &[&a]), StatusCode::NOT_FOUND),
            (merge_frame(&a, &[&b, &closed]), StatusCode::CONFLICT),
            (merge_frame(&closed, &[&a]), StatusCode::CONFLICT),
        ];
        for (frame, expected) in cases {
            let (status, body) = op(&app, &mut ops, via, frame.clone()).await;
            assert_eq!(status, expected, "{via:?} {frame}: {body}");
            assert_eq!(body["error"]["code"], code_of(expected), "{body}");
        }
        if via == Via::Http {
            let (status, body) =
                app.post(&format!("/v1/clusters/{a}/merge"), &json!({"cluster_ids": [b], "extra": 1})).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
            let (status, _) = app.post(&format!("/v1/clusters/{a}/merge"), &json!([[b]])).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "a positional body is refused");
        }
        assert_eq!(state_of(&app, creator).await, before, "{via:?}: a refused merge changes nothing");
    }
}

#[actix_web::test]
async fn move_takes_a_message_to_another_open_cluster_and_deletes_an_emptied_one() {
    for via in [Via::Http, Via::Ws] {
        let app = spawn_app().await;
        let creator = "creator-move";
        let mut ops = app.connect_ws().await;
        let first = post_clustered(&app, creator, "is there a student discount").await;
        let second = post_clustered(&app, creator, "is there a student discount?").await;
        let lone = post_clustered(&app, creator, "what camera do you use for your videos").await;
        let other = post_clustered(&app, creator, "do you ship merch to brazil").await;
        let from = first["cluster_id"].as_str().expect("a cluster").to_owned();
        assert_eq!(second["cluster_id"], from.as_str());
        let to = other["cluster_id"].as_str().expect("a cluster").to_owned();
        let second_id = second["id"].as_str().expect("an id");

        let (status, body) = op(&app, &mut ops, via, move_frame(second_id, &to)).await;
        assert_eq!(status, StatusCode::OK, "{via:?}: {body}");
        assert_eq!(body["cluster"]["id"], to.as_str());
        assert_eq!(body["cluster"]["size"], 2);
        assert_eq!(body["cluster"]["label"], nearest_member_text(&app, &to).await);
        assert_eq!(body["from_cluster"]["id"], from.as_str());
        assert_eq!(body["from_cluster"]["size"], 1);
        assert_eq!(body["from_cluster"]["label"], "is there a student discount");
        assert_eq!(body["message"]["id"], second_id);
        assert_eq!(body["message"]["cluster_id"], to.as_str());
        assert_eq!(app.get(&format!("/v1/messages/{second_id}")).await.1["cluster_id"], to.as_str());

        // The only message of a cluster may move: the emptied cluster goes.
        let lone_cluster = lone["cluster_id"].as_str().expect("a cluster").to_owned();
        let lone_id = lone["id"].as_str().expect("an id");
        let (status, body) = op(&app, &mut ops, via, move_frame(lone_id, &to)).await;
        assert_eq!(status, StatusCode::OK, "{via:?}: {body}");
        assert_eq!(body["cluster"]["size"], 3);
        assert_eq!(body["from_cluster"], Value::Null);
        let (status, _) = app.get(&format!("/v1/clusters/{lone_cluster}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        check_invariants(&app, creator).await;
    }
}

#[actix_web::test]
async fn move_refuses_unknown_foreign_unclustered_and_actioned_and_changes_nothing() {
    for via in [Via::Http, Via::Ws] {
        let app = spawn_app().await;
        let creator = "creator-move-errors";
        let mut ops = app.connect_ws().await;
        let m = post_clustered(&app, creator, "when does the show start").await;
        post_clustered(&app, creator, "when does the show start?").await;
        let m_id = m["id"].as_str().expect("an id").to_owned();
        let home = m["cluster_id"].as_str().expect("a cluster").to_owned();
        let [open, closed] =
            clusters_of(&app, creator, ["do you ship merch to brazil", "what camera do you use"]).await;
        let (status, _) = op(&app, &mut ops, via, action_frame(&closed, "Sony.")).await;
        assert_eq!(status, StatusCode::OK);
        let answered = post_clustered(&app, creator, "can i get a refund for my ticket").await;
        let answered_id = answered["id"].as_str().expect("an id").to_owned();
        let answered_cluster = answered["cluster_id"].as_str().expect("a cluster").to_owned();
        let (status, _) = op(&app, &mut ops, via, action_frame(&answered_cluster, "No refunds, sorry.")).await;
        assert_eq!(status, StatusCode::OK);
        let foreign = post_clustered(&app, "creator-other", "do you ship merch to brazil").await;
        let foreign_cluster = foreign["cluster_id"].as_str().expect("a cluster").to_owned();
        let failed = insert_failed_message(&app, creator, "anyone there?").await;
        let unknown = uuid::Uuid::now_v7().to_string();
        let before = state_of(&app, creator).await;

        let cases: Vec<(Value, StatusCode)> = vec![
            (move_frame("not-an-id", &open), StatusCode::NOT_FOUND),
            (move_frame(&unknown, &open), StatusCode::NOT_FOUND),
            (move_frame(&m_id, "not-an-id"), StatusCode::NOT_FOUND),
            (move_frame(&m_id, &unknown), StatusCode::NOT_FOUND),
            (move_frame(&m_id, &foreign_cluster), StatusCode::NOT_FOUND),
            (move_frame(&m_id, &home), StatusCode::CONFLICT),
            (move_frame(&m_id, &closed), StatusCode::CONFLICT),
            (move_frame(&answered_id, &open), StatusCode::CONFLICT),
            (move_frame(&failed, &open), StatusCode::CONFLICT),
            (json!({"type": "move", "message_id": m_id}), StatusCode::BAD_REQUEST),
        ];
        for (frame, expected) in cases {
            let (status, body) = op(&app, &mut ops, via, frame.clone()).await;
            assert_eq!(status, expected, "{via:?} {frame}: {body}");
            assert_eq!(body["error"]["code"], code_of(expected), "{body}");
        }
        assert_eq!(state_of(&app, creator).await, before, "{via:?}: a refused move changes nothing");
    }
}

#[actix_web::test]
async fn every_operation_over_websocket_answers_with_its_http_body_and_echoes_the_id() {
    let app = spawn_app().await;
    let creator = "creator-ws-ops";
    let mut ws = app.connect_ws().await;
    let a = post_clustered(&app, creator, "how much is the vip ticket").await;
    let b = post_clustered(&app, creator, "how much is the vip ticket?").await;
    let cluster = a["cluster_id"].as_str().expect("a cluster").to_owned();
    let [other, third] = clusters_of(&app, creator, ["do you ship merch to brazil", "what camera do you use"]).await;
    let b_id = b["id"].as_str().expect("an id").to_owned();

    // Several operations in flight at once: they run in frame order, and
    // their replies come back in that order, each with its id.
    let frames = [
        json!({"type": "remove", "id": "r", "cluster_id": cluster, "message_id": b_id}),
        json!({"type": "move", "id": 7, "message_id": b_id, "cluster_id": other}),
        json!({"type": "merge", "id": "m", "cluster_id": other, "cluster_ids": [third]}),
        json!({"type": "action", "id": "a", "cluster_id": other, "response_text": "Yes, worldwide."}),
        json!({"type": "action", "id": "again", "cluster_id": other, "response_text": "twice"}),
    ];
    for frame in &frames {
        ws.send(frame).await;
    }
    let mut replies = Vec::new();
    for _ in &frames {
        replies.push(ws.next_json().await);
    }
    let ops: Vec<_> = replies.iter().map(|r| (r["type"].clone(), r["id"].clone(), r["op"].clone())).collect();
    assert_eq!(
        ops,
        vec![
            (json!("result"), json!("r"), json!("remove")),
            (json!("result"), json!(7), json!("move")),
            (json!("result"), json!("m"), json!("merge")),
            (json!("result"), json!("a"), json!("action")),
            (json!("error"), json!("again"), Value::Null),
        ],
        "{replies:#?}"
    );
    assert_eq!(replies[0]["result"]["cluster"]["size"], 1);
    assert_eq!(replies[1]["result"]["message"]["cluster_id"], other.as_str());
    assert_eq!(replies[2]["result"]["size"], 3);
    assert_eq!(replies[3]["result"]["status"], "actioned");
    assert_eq!(replies[4]["error"]["code"], "conflict");

    // The result is the HTTP body: the same cluster object as a GET shows.
    let (_, detail) = app.get(&format!("/v1/clusters/{other}")).await;
    for field in ["id", "status", "size", "label", "response_text", "updated_at", "actioned_at"] {
        assert_eq!(replies[3]["result"][field], detail[field], "{field}");
    }

    // Bad frames get error frames with the client's id; the session lives.
    ws.send(&json!({"type": "action", "id": 1, "cluster_id": cluster})).await;
    let bad = ws.next_json().await;
    assert_eq!((bad["type"].clone(), bad["id"].clone()), (json!("error"), json!(1)));
    assert_eq!(bad["error"]["code"], "invalid_request");
    ws.send(&json!({"type": "action", "id": 2, "cluster_id": cluster, "response_text": "x".repeat(4001)})).await;
    assert_eq!(ws.next_json().await["error"]["code"], "payload_too_large");
    ws.send(&json!({"type": "remove", "id": 3, "cluster_id": "nope", "message_id": b_id})).await;
    assert_eq!(ws.next_json().await["error"]["code"], "not_found");
    ws.send(&json!({"type": "ping", "id": 4})).await;
    assert_eq!(ws.next_json().await, json!({"type": "pong", "id": 4}));
}

#[actix_web::test]
async fn a_websocket_session_answers_other_frames_while_an_operation_waits() {
    let app = spawn_app().await;
    let creator = "creator-ws-waits";
    let m = post_clustered(&app, creator, "when does the show start").await;
    let cluster = m["cluster_id"].as_str().expect("a cluster").to_owned();
    let mut ws = app.connect_ws().await;

    // Hold the creator's lock, as a long clustering transaction would.
    let blocker = app.db.begin().await.expect("a transaction");
    blocker
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock(('x' || left(encode(sha256(convert_to($1, 'UTF8')), 'hex'), 16))::bit(64)::bigint)",
            [creator.into()],
        ))
        .await
        .expect("the creator's lock");
    ws.send(&json!({"type": "action", "id": "op", "cluster_id": cluster, "response_text": "At 8."})).await;
    ws.send(&json!({"type": "ping", "id": "p"})).await;
    assert_eq!(ws.next_json().await, json!({"type": "pong", "id": "p"}), "answered while the operation waits");
    ws.send(&json!({"type": "subscribe", "id": "s", "creator_id": creator})).await;
    assert_eq!(ws.next_json().await["type"], "subscribed");
    assert_eq!(app.get(&format!("/v1/clusters/{cluster}")).await.1["status"], "open", "not actioned yet");

    blocker.commit().await.expect("release the lock");
    let mut frames = vec![ws.next_json().await, ws.next_json().await];
    frames.sort_by_key(|f| f["type"].as_str().map(str::to_owned));
    assert_eq!(frames[0]["event"], "cluster.actioned", "{frames:?}");
    assert_eq!((frames[1]["type"].clone(), frames[1]["id"].clone()), (json!("result"), json!("op")));
}

#[actix_web::test]
async fn each_operation_publishes_exactly_one_event_with_its_fields() {
    let app = spawn_app().await;
    let creator = "creator-op-events";
    let mut sub = app.connect_ws().await;
    sub.subscribe(creator, None).await;
    let mut ops = app.connect_ws().await;

    let a = app.post_message(creator, "can you sign my poster").await;
    let b = app.post_message(creator, "can you sign my poster please").await;
    let c = app.post_message(creator, "do you ship merch to brazil").await;
    let d = app.post_message(creator, "what camera do you use").await;
    let created = sub.events(4).await;
    let poster = created[0]["cluster"]["id"].as_str().expect("a cluster").to_owned();
    let shipping = created[2]["cluster"]["id"].as_str().expect("a cluster").to_owned();
    let camera = created[3]["cluster"]["id"].as_str().expect("a cluster").to_owned();
    assert_eq!(created[1]["cluster"]["id"], poster.as_str());
    let _ = (b, c, d);

    // remove (HTTP)
    let (status, removed_body) = op(&app, &mut ops, Via::Http, remove_frame(&poster, &a)).await;
    assert_eq!(status, StatusCode::OK);
    let removed = next_event(&mut sub, 5).await;
    assert_eq!(removed["event"], "message.removed");
    assert_eq!(removed["cluster"], removed_body["cluster"]);
    assert_eq!(removed["message"], removed_body["message"]);
    assert_eq!(removed["new_cluster"]["id"], removed["message"]["cluster_id"]);
    let singleton = removed["new_cluster"]["id"].as_str().expect("a cluster").to_owned();

    // move (WS): the only member of the singleton, so that cluster goes.
    let (status, moved_body) = op(&app, &mut ops, Via::Ws, move_frame(&a, &shipping)).await;
    assert_eq!(status, StatusCode::OK);
    let moved = next_event(&mut sub, 6).await;
    assert_eq!(moved["event"], "cluster.updated");
    assert_eq!(moved["cluster"], moved_body["cluster"]);
    assert_eq!(moved["cluster"]["id"], shipping.as_str());
    assert_eq!(moved["message"], moved_body["message"]);
    assert_eq!(moved["from_cluster_id"], singleton.as_str());
    assert!(moved.get("from_cluster").is_none(), "the emptied cluster was deleted: {moved}");

    // move (HTTP) out of a cluster that stays: from_cluster is there.
    let (status, moved_body) = op(&app, &mut ops, Via::Http, move_frame(&a, &camera)).await;
    assert_eq!(status, StatusCode::OK);
    let moved = next_event(&mut sub, 7).await;
    assert_eq!(moved["from_cluster_id"], shipping.as_str());
    assert_eq!(moved["from_cluster"], moved_body["from_cluster"]);
    assert_eq!(moved["from_cluster"]["size"], 1);

    // merge (WS)
    let (status, merged_body) = op(&app, &mut ops, Via::Ws, merge_frame(&poster, &[&shipping, &camera])).await;
    assert_eq!(status, StatusCode::OK);
    let merged = next_event(&mut sub, 8).await;
    assert_eq!(merged["event"], "cluster.merged");
    assert_eq!(merged["cluster"], merged_body);
    assert_eq!(merged["cluster"]["size"], 4);
    assert_eq!(merged["merged_cluster_ids"], json!([shipping, camera]));
    assert!(merged.get("message").is_none());

    // action (WS), then a refused one: no event.
    let (status, actioned_body) = op(&app, &mut ops, Via::Ws, action_frame(&poster, "Sure!")).await;
    assert_eq!(status, StatusCode::OK);
    let actioned = next_event(&mut sub, 9).await;
    assert_eq!(actioned["event"], "cluster.actioned");
    assert_eq!(actioned["cluster"], without(&actioned_body, &["answered", "held_back"]));
    assert_eq!(actioned_body["answered"].as_array().map(Vec::len), Some(4));
    assert_eq!(actioned_body["held_back"], json!([]));
    let (status, _) = op(&app, &mut ops, Via::Http, action_frame(&poster, "Again")).await;
    assert_eq!(status, StatusCode::CONFLICT);

    // Exactly one event per operation: the log holds nine, the
    // subscriber got nothing more.
    assert_eq!(app.count("events", &format!("creator_id = '{creator}'")).await, 9);
    sub.send(&json!({"type": "ping", "id": "end"})).await;
    assert_eq!(sub.next_json().await, json!({"type": "pong", "id": "end"}));
    // A replay gives the same frames the live subscriber saw.
    let mut replay = app.connect_ws().await;
    replay.subscribe(creator, Some(4)).await;
    let replayed = replay.events(5).await;
    assert_eq!(replayed[4], actioned);
}

#[actix_web::test]
async fn removed_and_moved_messages_are_never_pulled_back_into_the_cluster_they_left() {
    let app = spawn_app().await;
    let creator = "creator-never-back";
    let texts = ["how much is the vip ticket", "how much is the vip ticket?", "vip ticket how much"];
    let mut members = Vec::new();
    for text in texts {
        members.push(post_clustered(&app, creator, text).await);
    }
    let home = members[0]["cluster_id"].as_str().expect("a cluster").to_owned();
    assert!(members.iter().all(|m| m["cluster_id"] == home.as_str()), "{members:?}");
    let elsewhere = post_clustered(&app, creator, "do you ship merch to brazil").await;
    let elsewhere = elsewhere["cluster_id"].as_str().expect("a cluster").to_owned();

    let removed = members[1]["id"].as_str().expect("an id").to_owned();
    let (status, body) = app.delete(&format!("/v1/clusters/{home}/messages/{removed}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let singleton = body["message"]["cluster_id"].as_str().expect("a cluster").to_owned();
    let moved = members[2]["id"].as_str().expect("an id").to_owned();
    let (status, body) = app.post(&format!("/v1/messages/{moved}/move"), &json!({"cluster_id": elsewhere})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Many more messages like the cluster they left, the same texts among
    // them, through the whole pipeline.
    for round in 0..3 {
        for text in texts {
            post_clustered(&app, creator, &format!("{text}{}", "?".repeat(round))).await;
        }
    }
    let (_, removed_now) = app.get(&format!("/v1/messages/{removed}")).await;
    assert_eq!(removed_now["cluster_id"], singleton.as_str(), "the removed message stays in its own cluster");
    let (_, moved_now) = app.get(&format!("/v1/messages/{moved}")).await;
    assert_eq!(moved_now["cluster_id"], elsewhere.as_str(), "the moved message stays where it was put");
    let (_, home_now) = app.get(&format!("/v1/clusters/{home}?limit=500")).await;
    let home_members: Vec<&str> =
        home_now["messages"].as_array().expect("messages").iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(!home_members.contains(&removed.as_str()) && !home_members.contains(&moved.as_str()));
    check_invariants(&app, creator).await;
}

/// A seeded random sequence of ingests (some not waited for, so that
/// operations race with clustering) and operations over both transports,
/// with the invariants checked along the way and at the end. Set
/// `OPS_SEED` to replay another sequence.
#[actix_web::test]
async fn random_operations_keep_every_cluster_true_to_its_members() {
    let seed = std::env::var("OPS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261126u64);
    let mut rng = StdRng::seed_from_u64(seed);
    let app = spawn_app().await;
    let creator = "creator-random";
    let mut ops = app.connect_ws().await;
    let mut sub = app.connect_ws().await;
    sub.subscribe(creator, Some(0)).await;
    let mut counts: HashMap<&str, usize> = HashMap::new();

    for step in 0..60 {
        let via = if rng.random_bool(0.5) { Via::Http } else { Via::Ws };
        let state = state_of(&app, creator).await;
        let open: Vec<&ClusterState> = state.clusters.iter().filter(|c| c.status == "open").collect();
        let roll = rng.random_range(0..100);
        let context = format!("seed {seed} step {step} {via:?}");
        if roll < 35 || state.clusters.len() < 3 {
            for _ in 0..rng.random_range(1..=4) {
                let text = random_text(&mut rng);
                let id = app.post_message(creator, &text).await;
                if rng.random_bool(0.5) {
                    app.wait_clustered(&id).await;
                }
            }
            *counts.entry("ingest").or_default() += 1;
        } else if roll < 45 {
            let Some(cluster) = open.choose(&mut rng) else { continue };
            let (status, body) = op(&app, &mut ops, via, action_frame(&cluster.id, "Thanks, answered!")).await;
            assert_eq!(status, StatusCode::OK, "{context}: action {body}");
            *counts.entry("action").or_default() += 1;
        } else if roll < 62 {
            // Mostly an open cluster with a message to spare; sometimes a
            // singleton or an actioned cluster, which must be refused.
            let splittable: Vec<&ClusterState> =
                state.clusters.iter().filter(|c| c.size >= 2 && c.status == "open").collect();
            let pool = if rng.random_bool(0.8) && !splittable.is_empty() {
                splittable
            } else {
                state.clusters.iter().collect()
            };
            let Some(cluster) = pool.choose(&mut rng) else { continue };
            let members = state.members(&cluster.id);
            let Some(message) = members.choose(&mut rng) else { continue };
            let (status, body) = op(&app, &mut ops, via, remove_frame(&cluster.id, message)).await;
            // Clustering may have grown a singleton meanwhile, never shrunk one.
            if cluster.status != "open" {
                assert_eq!(status, StatusCode::CONFLICT, "{context}: remove from an actioned cluster {body}");
            } else if cluster.size >= 2 {
                assert_eq!(status, StatusCode::OK, "{context}: remove {body}");
                assert_ne!(body["message"]["cluster_id"], cluster.id.as_str());
            } else {
                assert!([StatusCode::OK, StatusCode::CONFLICT].contains(&status), "{context}: remove {body}");
            }
            *counts.entry(if status == StatusCode::OK { "remove" } else { "remove refused" }).or_default() += 1;
        } else if roll < 78 {
            if open.len() < 2 {
                continue;
            }
            let n = rng.random_range(2..=open.len().min(4));
            let picked: Vec<&&ClusterState> = open.choose_multiple(&mut rng, n).collect();
            let sources: Vec<&str> = picked[1..].iter().map(|c| c.id.as_str()).collect();
            let (status, body) = op(&app, &mut ops, via, merge_frame(&picked[0].id, &sources)).await;
            assert_eq!(status, StatusCode::OK, "{context}: merge {body}");
            let at_least: i64 = picked.iter().map(|c| c.size).sum();
            assert!(body["size"].as_i64().expect("a size") >= at_least, "{context}: merge {body}");
            *counts.entry("merge").or_default() += 1;
        } else if roll < 95 {
            let Some(target) = open.choose(&mut rng) else { continue };
            let movable: Vec<&(String, Option<String>)> = state
                .messages
                .iter()
                .filter(|(_, c)| c.as_ref().is_some_and(|c| c != &target.id && state.is_open(c)))
                .collect();
            let Some((message, _)) = movable.choose(&mut rng) else { continue };
            let (status, body) = op(&app, &mut ops, via, move_frame(message, &target.id)).await;
            assert_eq!(status, StatusCode::OK, "{context}: move {body}");
            assert_eq!(body["message"]["cluster_id"], target.id.as_str());
            *counts.entry("move").or_default() += 1;
        } else {
            // Operations that must be refused, and change nothing.
            if let Some(closed) = state.clusters.iter().find(|c| c.status == "actioned")
                && let Some(open) = open.first()
            {
                let (status, body) = op(&app, &mut ops, via, merge_frame(&open.id, &[&closed.id])).await;
                assert_eq!(status, StatusCode::CONFLICT, "{context}: {body}");
                if let Some(m) = state.members(&open.id).first() {
                    let (status, body) = op(&app, &mut ops, via, move_frame(m, &closed.id)).await;
                    assert_eq!(status, StatusCode::CONFLICT, "{context}: {body}");
                }
                *counts.entry("refused").or_default() += 1;
            }
        }
        if step % 10 == 9 {
            check_invariants(&app, creator).await;
        }
    }
    check_invariants(&app, creator).await;
    eprintln!("seed {seed}: {counts:?}, {} clusters", state_of(&app, creator).await.clusters.len());
    for kind in ["ingest", "action", "remove", "merge", "move"] {
        assert!(counts.get(kind).copied().unwrap_or(0) > 0, "seed {seed}: no {kind} in {counts:?}");
    }

    // The subscriber got the whole log, in order, as stored.
    let last = app.count("events", &format!("creator_id = '{creator}'")).await as usize;
    let live = sub.events(last).await;
    let logged = event_log(&app, creator).await;
    assert_eq!(live, logged, "seed {seed}: the live stream is the log");
}

// ---------------------------------------------------------------------------
// Operations over either transport
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    Http,
    Ws,
}

pub(crate) fn action_frame(cluster_id: &str, response_text: &str) -> Value {
    json!({"type": "action", "cluster_id": cluster_id, "response_text": response_text})
}

fn remove_frame(cluster_id: &str, message_id: &str) -> Value {
    json!({"type": "remove", "cluster_id": cluster_id, "message_id": message_id})
}

fn merge_frame(cluster_id: &str, cluster_ids: &[&str]) -> Value {
    json!({"type": "merge", "cluster_id": cluster_id, "cluster_ids": cluster_ids})
}

fn move_frame(message_id: &str, cluster_id: &str) -> Value {
    json!({"type": "move", "message_id": message_id, "cluster_id": cluster_id})
}

pub(crate) fn confirm_frame(cluster_id: &str, message_id: &str) -> Value {
    json!({"type": "confirm", "cluster_id": cluster_id, "message_id": message_id})
}

/// Runs an operation, written as its WebSocket frame, over `via`; returns
/// the HTTP status (for WebSocket, the status its error code stands for)
/// and the body (for WebSocket, the `result`, or `{"error": ...}`).
pub(crate) async fn op(app: &TestApp, ws: &mut WsClient, via: Via, frame: Value) -> (StatusCode, Value) {
    let s = |field: &str| frame[field].as_str().map(str::to_owned).unwrap_or_default();
    match via {
        Via::Http => {
            let mut body = frame.clone();
            let body = body.as_object_mut().expect("a frame is an object");
            body.remove("type");
            match frame["type"].as_str() {
                Some("action") => {
                    body.remove("cluster_id");
                    app.post(&format!("/v1/clusters/{}/action", s("cluster_id")), &Value::Object(body.clone())).await
                }
                Some("remove") => {
                    app.delete(&format!("/v1/clusters/{}/messages/{}", s("cluster_id"), s("message_id"))).await
                }
                Some("merge") => {
                    body.remove("cluster_id");
                    app.post(&format!("/v1/clusters/{}/merge", s("cluster_id")), &Value::Object(body.clone())).await
                }
                Some("move") => {
                    body.remove("message_id");
                    app.post(&format!("/v1/messages/{}/move", s("message_id")), &Value::Object(body.clone())).await
                }
                Some("confirm") => {
                    let path = format!("/v1/clusters/{}/messages/{}/confirm", s("cluster_id"), s("message_id"));
                    app.post(&path, &json!({})).await
                }
                other => panic!("not an operation: {other:?}"),
            }
        }
        Via::Ws => {
            let id = uuid::Uuid::now_v7().to_string();
            let mut frame = frame.clone();
            frame["id"] = json!(id);
            ws.send(&frame).await;
            let reply = ws.next_json().await;
            assert_eq!(reply["id"], json!(id), "the reply echoes the id: {reply}");
            match reply["type"].as_str() {
                Some("result") => {
                    assert_eq!(reply["op"], frame["type"], "{reply}");
                    (StatusCode::OK, reply["result"].clone())
                }
                Some("error") => {
                    let status = match reply["error"]["code"].as_str() {
                        Some("invalid_request") => StatusCode::BAD_REQUEST,
                        Some("not_found") => StatusCode::NOT_FOUND,
                        Some("conflict") => StatusCode::CONFLICT,
                        Some("payload_too_large") => StatusCode::PAYLOAD_TOO_LARGE,
                        other => panic!("unexpected error code {other:?}: {reply}"),
                    };
                    (status, json!({"error": reply["error"]}))
                }
                _ => panic!("unexpected reply {reply}"),
            }
        }
    }
}

fn code_of(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "invalid_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::CONFLICT => "conflict",
        _ => panic!("no code for {status}"),
    }
}

/// The next event frame, which must have `event_id`.
async fn next_event(sub: &mut WsClient, event_id: i64) -> Value {
    let event = sub.events(1).await.remove(0);
    assert_eq!(event["event_id"], event_id, "{event}");
    event
}

// ---------------------------------------------------------------------------
// Set-up
// ---------------------------------------------------------------------------

/// Posts a message and waits until it is clustered.
pub(crate) async fn post_clustered(app: &TestApp, creator: &str, text: &str) -> Value {
    let id = app.post_message(creator, text).await;
    app.wait_clustered(&id).await
}

/// Posts unrelated texts; returns the clusters they opened.
async fn clusters_of<const N: usize>(app: &TestApp, creator: &str, texts: [&str; N]) -> [String; N] {
    let mut ids = Vec::with_capacity(N);
    for text in texts {
        let m = post_clustered(app, creator, text).await;
        ids.push(m["cluster_id"].as_str().expect("a cluster").to_owned());
    }
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), N, "unrelated texts open their own clusters");
    ids.try_into().expect("N ids")
}

/// Stores a message whose embedding failed (never clustered).
async fn insert_failed_message(app: &TestApp, creator: &str, text: &str) -> String {
    let id = uuid::Uuid::now_v7();
    sql(
        app,
        "INSERT INTO messages (id, creator_id, text, norm_key, sent_at, received_at, status, error)
               VALUES ($1, $2, $3, '\\x00', now(), now(), 'failed', 'test: provider down')",
        [id.into(), creator.into(), text.into()],
    )
    .await;
    id.to_string()
}

/// A text like one of a few questions (so it may join their cluster), or,
/// one time in four, an unrelated one.
fn random_text(rng: &mut StdRng) -> String {
    const TOPICS: &[&[&str]] = &[
        &["how much is the vip ticket", "what does the vip ticket cost", "vip ticket price please"],
        &["when does the show start", "what time does the show start", "show start time"],
        &["do you ship merch to brazil", "can you ship merch to brazil", "shipping merch to brazil"],
        &["can i get a refund for my ticket", "refund for my ticket please", "ticket refund how"],
        &["what camera do you use", "which camera do you use for videos", "what camera is that"],
        &["is there a student discount", "student discount available", "do you have a student discount"],
    ];
    const SYLLABLES: &[&str] =
        &["zor", "blat", "quem", "fis", "van", "drok", "pli", "mur", "tess", "gand", "ulo", "wix"];
    if rng.random_bool(0.25) {
        let word = |rng: &mut StdRng| (0..3).map(|_| *SYLLABLES.choose(rng).expect("syllables")).collect::<String>();
        return (0..4).map(|_| word(rng)).collect::<Vec<_>>().join(" ");
    }
    let topic = TOPICS.choose(rng).expect("topics");
    let text = topic.choose(rng).expect("phrasings");
    format!("{text}{}", ["", "?", "??", "!"].choose(rng).expect("endings"))
}

// ---------------------------------------------------------------------------
// State and invariants, read with SQL from the test's database
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct ClusterState {
    id: String,
    status: String,
    size: i64,
    label: String,
    updated_at: String,
}

/// A creator's clusters and messages (id, cluster id), ordered by id.
#[derive(Debug, PartialEq)]
struct State {
    clusters: Vec<ClusterState>,
    messages: Vec<(String, Option<String>)>,
}

impl State {
    fn members(&self, cluster_id: &str) -> Vec<String> {
        self.messages.iter().filter(|(_, c)| c.as_deref() == Some(cluster_id)).map(|(m, _)| m.clone()).collect()
    }

    fn is_open(&self, cluster_id: &str) -> bool {
        self.clusters.iter().any(|c| c.id == cluster_id && c.status == "open")
    }
}

pub(crate) async fn sql(
    app: &TestApp,
    query: &str,
    values: impl IntoIterator<Item = SqlValue>,
) -> Vec<sea_orm::QueryResult> {
    app.db
        .query_all_raw(Statement::from_sql_and_values(DbBackend::Postgres, query, values))
        .await
        .unwrap_or_else(|e| panic!("{query}: {e}"))
}

pub(crate) fn get<T: sea_orm::TryGetable>(row: &sea_orm::QueryResult, column: &str) -> T {
    row.try_get("", column).unwrap_or_else(|e| panic!("column {column}: {e:?}"))
}

async fn state_of(app: &TestApp, creator: &str) -> State {
    let clusters = sql(
        app,
        "SELECT id::text AS id, status, size::bigint AS size, label, updated_at::text AS updated_at
         FROM clusters WHERE creator_id = $1 ORDER BY id",
        [creator.into()],
    )
    .await
    .iter()
    .map(|r| ClusterState {
        id: get(r, "id"),
        status: get(r, "status"),
        size: get(r, "size"),
        label: get(r, "label"),
        updated_at: get(r, "updated_at"),
    })
    .collect();
    let messages = sql(
        app,
        "SELECT id::text AS id, cluster_id::text AS cluster_id FROM messages WHERE creator_id = $1 ORDER BY id",
        [creator.into()],
    )
    .await
    .iter()
    .map(|r| (get(r, "id"), get(r, "cluster_id")))
    .collect();
    State { clusters, messages }
}

/// The text of the core member whose embedding is nearest the (core)
/// centroid.
async fn nearest_member_text(app: &TestApp, cluster_id: &str) -> String {
    let rows = sql(
        app,
        "SELECT m.text FROM clusters c JOIN messages m ON m.cluster_id = c.id AND m.membership = 'core'
         WHERE c.id = $1::uuid ORDER BY m.embedding <=> c.centroid, m.id LIMIT 1",
        [cluster_id.into()],
    )
    .await;
    get(rows.first().expect("a member"), "text")
}

/// The creator's event log, oldest first, as stored.
pub(crate) async fn event_log(app: &TestApp, creator: &str) -> Vec<Value> {
    sql(app, "SELECT payload::text AS payload FROM events WHERE creator_id = $1 ORDER BY event_id", [creator.into()])
        .await
        .iter()
        .map(|r| serde_json::from_str(&get::<String>(r, "payload")).expect("a JSON payload"))
        .collect()
}

/// Flushes the pipeline, checks that every message of the creator is
/// clustered, then that every cluster is true to its members and that the
/// event log tells the same story as the tables.
async fn check_invariants(app: &TestApp, creator: &str) {
    app.flush().await;
    assert_eq!(
        app.count("messages", &format!("creator_id = '{creator}' AND status <> 'clustered'")).await,
        0,
        "messages of {creator} not clustered"
    );
    let creator_value = || SqlValue::from(creator);

    // Size = members; no empty cluster; core size = core members, never
    // none; centroid = sum of the core members' embeddings.
    let rows = sql(
        app,
        "SELECT c.id::text AS id, c.size::bigint AS size, c.core_size::bigint AS core_size,
                count(m.id) AS members, count(m.id) FILTER (WHERE m.membership = 'core') AS core,
                COALESCE((c.centroid <-> sum(m.embedding) FILTER (WHERE m.membership = 'core'))::float8, 1e9)
                    AS centroid_error
         FROM clusters c LEFT JOIN messages m ON m.cluster_id = c.id
         WHERE c.creator_id = $1 GROUP BY c.id",
        [creator_value()],
    )
    .await;
    assert!(!rows.is_empty(), "{creator} has clusters");
    for r in &rows {
        let (id, size, members, error) =
            (get::<String>(r, "id"), get::<i64>(r, "size"), get::<i64>(r, "members"), get::<f64>(r, "centroid_error"));
        let (core_size, core) = (get::<i64>(r, "core_size"), get::<i64>(r, "core"));
        assert_eq!(size, members, "cluster {id}: size is its member count");
        assert!(size >= 1, "cluster {id} is empty");
        assert_eq!(core_size, core, "cluster {id}: core size is its core member count");
        assert!(core >= 1, "cluster {id} has no core");
        assert!(error < 1e-3, "cluster {id}: centroid is {error} away from the sum of its core members");
    }

    // Timestamps and the fields of each status.
    let bad = sql(
        app,
        "SELECT id::text AS id FROM clusters WHERE creator_id = $1 AND NOT (
             created_at <= updated_at AND CASE status
                 WHEN 'actioned' THEN response_text IS NOT NULL AND actioned_at IS NOT NULL
                                      AND actioned_at <= updated_at
                 ELSE response_text IS NULL AND actioned_at IS NULL END)",
        [creator_value()],
    )
    .await;
    assert!(bad.is_empty(), "clusters with inconsistent timestamps or status fields: {:?}", ids(&bad));

    // Every clustered message is in an existing cluster of its creator;
    // every other one in none.
    let bad = sql(
        app,
        "SELECT m.id::text AS id FROM messages m LEFT JOIN clusters c ON c.id = m.cluster_id
         WHERE m.creator_id = $1 AND ((m.status = 'clustered') <> (m.cluster_id IS NOT NULL)
               OR (m.cluster_id IS NOT NULL AND (c.id IS NULL OR c.creator_id <> m.creator_id)))",
        [creator_value()],
    )
    .await;
    assert!(bad.is_empty(), "messages outside their creator's clusters: {:?}", ids(&bad));

    // Event ids 1..=n without gaps, and the counter at n.
    let log = event_log(app, creator).await;
    let event_ids: Vec<i64> = log.iter().map(|e| e["event_id"].as_i64().expect("an event id")).collect();
    assert_eq!(event_ids, (1..=log.len() as i64).collect::<Vec<_>>(), "event ids without gaps");
    let counter = sql(app, "SELECT last_event_id FROM creators WHERE creator_id = $1", [creator_value()]).await;
    assert_eq!(get::<i64>(&counter[0], "last_event_id"), log.len() as i64);

    // The log tells the same story: the newest snapshot of each cluster in
    // it is the cluster as stored, and a cluster that is gone was merged
    // away or emptied by a move.
    let mut latest: HashMap<String, Value> = HashMap::new();
    let mut gone: HashSet<String> = HashSet::new();
    for event in &log {
        let id_of = |v: &Value| v["id"].as_str().expect("a cluster id").to_owned();
        let cluster = id_of(&event["cluster"]);
        latest.insert(cluster, event["cluster"].clone());
        for field in ["new_cluster", "from_cluster"] {
            if let Some(other) = event.get(field) {
                latest.insert(id_of(other), other.clone());
            }
        }
        if let (Some(from), None) = (event["from_cluster_id"].as_str(), event.get("from_cluster")) {
            gone.insert(from.to_owned());
        }
        for merged in event["merged_cluster_ids"].as_array().into_iter().flatten() {
            gone.insert(merged.as_str().expect("an id").to_owned());
        }
    }
    let state = state_of(app, creator).await;
    let stored: HashSet<&str> = state.clusters.iter().map(|c| c.id.as_str()).collect();
    for (id, snapshot) in &latest {
        if !stored.contains(id.as_str()) {
            assert!(gone.contains(id), "cluster {id} vanished without a merge or a move saying so");
            continue;
        }
        assert!(!gone.contains(id), "cluster {id} was reported gone but exists");
        let (_, detail) = app.get(&format!("/v1/clusters/{id}?limit=1")).await;
        for field in ["status", "size", "core_size", "label", "response_text", "updated_at", "actioned_at"] {
            assert_eq!(snapshot[field], detail[field], "cluster {id}: {field} in its latest event and stored");
        }
    }
    assert_eq!(
        latest.keys().filter(|id| stored.contains(id.as_str())).count(),
        stored.len(),
        "every cluster has events"
    );
    // Every label is the member nearest the centroid (clusters here are far
    // below clustering.label_exact_max).
    for cluster in &state.clusters {
        assert_eq!(cluster.label, nearest_member_text(app, &cluster.id).await, "cluster {} label", cluster.id);
    }
    // And the shared checks, whose replay of the log must end in the
    // memberships stored.
    app.assert_cluster_invariants(creator).await;
}

/// `value` without the named fields.
fn without(value: &Value, fields: &[&str]) -> Value {
    let mut value = value.clone();
    if let Some(object) = value.as_object_mut() {
        fields.iter().for_each(|f| _ = object.remove(*f));
    }
    value
}

fn ids(rows: &[sea_orm::QueryResult]) -> Vec<String> {
    rows.iter().map(|r| get(r, "id")).collect()
}
