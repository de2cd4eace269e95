//! Two instances on one database: decisions for a creator are serialised
//! across them, so concurrent similar messages still end in one cluster.

use futures_util::future::join_all;
use serde_json::json;

use crate::helpers::{flush_all, fresh_database, spawn_app_on};

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
    // Half the messages went through `two`: its pipeline decides them.
    flush_all(&[&one, &two]).await;
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

/// Each instance decides from an in-memory index of the creator's open
/// clusters; a change made through the other instance (an action, a merge)
/// must be seen before its next decision.
#[actix_web::test]
async fn an_instance_sees_operations_made_through_the_other() {
    let db_url = fresh_database().await;
    let one = spawn_app_on(&db_url, |_| {}).await;
    let two = spawn_app_on(&db_url, |_| {}).await;
    let creator = "creator-two-views";
    let price = "What's the price of the VIP ticket?";

    // `one` builds its index of the creator.
    let a = one.post_message(creator, price).await;
    let a = one.wait_clustered(&a).await;
    let first = a["cluster_id"].as_str().expect("a cluster").to_owned();

    // Actioned through `two`: `one` must not add to it.
    let (status, _) = two.post(&format!("/v1/clusters/{first}/action"), &json!({"response_text": "99"})).await;
    assert_eq!(status, 200);
    let b = one.post_message(creator, price).await;
    let b = one.wait_clustered(&b).await;
    let second = b["cluster_id"].as_str().expect("a cluster").to_owned();
    assert_ne!(second, first, "joined a cluster actioned through the other instance");

    // A cluster merged away through `two`: `one` must join the target.
    let c = one.post_message(creator, "Do you ship merch to Brazil").await;
    let c = one.wait_clustered(&c).await;
    let shipping = c["cluster_id"].as_str().expect("a cluster").to_owned();
    let (status, body) =
        two.post(&format!("/v1/clusters/{shipping}/merge"), &json!({"cluster_ids": [second.clone()]})).await;
    assert_eq!(status, 200, "{body}");
    let d = one.post_message(creator, price).await;
    let d = one.wait_clustered(&d).await;
    assert_eq!(d["cluster_id"], shipping.as_str(), "the merged-away cluster is gone; its messages are in the target");
    let (_, target) = one.get(&format!("/v1/clusters/{shipping}")).await;
    assert_eq!(target["size"], 3, "{target}");
}
