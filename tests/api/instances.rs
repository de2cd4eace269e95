//! Two instances on one database: decisions for a creator are serialised
//! across them, so concurrent similar messages still end in one cluster.

use futures_util::future::join_all;
use serde_json::json;

use crate::helpers::{fresh_database, spawn_app_on};

#[actix_web::test]
async fn concurrent_similar_messages_through_two_instances_end_in_one_cluster() {
    let db_url = fresh_database().await;
    let one = spawn_app_on(&db_url, |_| {}).await;
    let two = spawn_app_on(&db_url, |_| {}).await;
    let creator = "creator-race";

    let posts = (0..30).map(|i| {
        let app = if i % 2 == 0 { &one } else { &two };
        let body = json!({"creator_id": creator, "text": "What's the price of the VIP ticket?"});
        async move { app.post("/v1/messages", &body).await }
    });
    let mut ids = Vec::new();
    for (status, ack) in join_all(posts).await {
        assert_eq!(status, 202, "{ack}");
        ids.push(ack["message_id"].as_str().expect("an id").to_owned());
    }
    let mut clusters = std::collections::HashSet::new();
    for id in &ids {
        clusters.insert(one.wait_clustered(id).await["cluster_id"].clone());
    }
    assert_eq!(clusters.len(), 1, "all 30 messages in one cluster: {clusters:?}");
    assert_eq!(one.count("events", &format!("creator_id = '{creator}'")).await, 30);
    assert_eq!(
        one.count("events", &format!("creator_id = '{creator}' AND event_id BETWEEN 1 AND 30")).await,
        30,
        "event ids 1..30, no gap, no duplicate"
    );
    let (_, list) = two.get(&format!("/v1/creators/{creator}/clusters")).await;
    assert_eq!(list["clusters"][0]["size"], 30, "{list}");
}
