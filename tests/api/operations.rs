//! Creator operations: action and remove.

use actix_web::http::StatusCode;
use serde_json::json;

use crate::helpers::spawn_app;

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
