//! Several instances on one database: decisions for a creator are
//! serialised across them, so concurrent similar messages still end in one
//! cluster; and with one Redis, a subscriber on any instance receives every
//! event of its creator, whichever instance committed it, live, once and in
//! order, also through a Redis outage (later, from the log).

use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::{
    faults::ScratchRedis,
    helpers::{
        Daemon, PATIENCE, TestApp, WsClient, clusterd_command, flush_all, fresh_database, redis_url, spawn_app_on,
    },
};

/// Three instances on one fresh database and the Redis at `redis`, each
/// subscribed to its event channels.
async fn three_instances(redis: &str) -> [TestApp; 3] {
    let db_url = fresh_database().await;
    let mut apps = Vec::new();
    for _ in 0..3 {
        let redis = redis.to_owned();
        apps.push(
            spawn_app_on(&db_url, move |s| {
                s.redis.url = Some(redis.into());
                s.fanout.reconnect_max_ms = 500;
            })
            .await,
        );
    }
    for app in &apps {
        wait_metric(app, "clusterd_fanout_subscribed", |v| v == 1.0).await;
    }
    apps.try_into().unwrap_or_else(|_| unreachable!("three apps"))
}

/// Waits until the instance's `sample` satisfies `ok`; returns its value.
async fn wait_metric(app: &TestApp, sample: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let value = app.metric(sample).await;
        if ok(value) {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "{sample} stayed at {value} on {}", app.address);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Posts `n` messages (numbered from `from`) for `creator`, round-robin
/// over `apps`, all at once; asserts each is acknowledged.
async fn burst(apps: &[TestApp], creator: &str, from: usize, n: usize) {
    let topics = ["ticket price", "refund", "shipping to Brazil", "backstage pass", "set list"];
    let posts = (from..from + n).map(|i| {
        let app = &apps[i % apps.len()];
        let body =
            json!({"creator_id": creator, "text": format!("question {i} about the {}", topics[i % topics.len()])});
        async move { app.post("/v1/messages", &body).await }
    });
    for (status, ack) in join_all(posts).await {
        assert_eq!(status, 202, "{ack}");
    }
}

/// Subscribers, one per instance, that must all see the same events.
async fn subscribe_everywhere(apps: &[TestApp], creator: &str) -> Vec<WsClient> {
    let mut subscribers = Vec::new();
    for app in apps {
        let mut ws = app.connect_ws().await;
        assert_eq!(ws.subscribe(creator, None).await["last_event_id"], 0);
        subscribers.push(ws);
    }
    subscribers
}

/// Receives the next `n` events on every subscriber; asserts they are the
/// events `from..from + n` in order, identical everywhere; returns them.
async fn receive_everywhere(subscribers: &mut [WsClient], from: i64, n: usize) -> Vec<Value> {
    let mut first: Option<Vec<Value>> = None;
    for (i, ws) in subscribers.iter_mut().enumerate() {
        let events = ws.events(n).await;
        let ids: Vec<i64> = events.iter().map(|e| e["event_id"].as_i64().expect("an event id")).collect();
        assert_eq!(ids, (from..from + n as i64).collect::<Vec<_>>(), "subscriber {i}: every event once, in order");
        match &first {
            None => first = Some(events),
            Some(first) => assert_eq!(&events, first, "subscriber {i} saw what subscriber 0 saw"),
        }
    }
    first.unwrap_or_default()
}

/// Asserts that no further event frame is waiting on any subscriber.
async fn assert_nothing_more(subscribers: &mut [WsClient]) {
    for ws in subscribers {
        ws.send(&json!({"type": "ping", "id": "end"})).await;
        assert_eq!(ws.next_json().await, json!({"type": "pong", "id": "end"}), "no extra event frames");
    }
}

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

#[actix_web::test]
async fn a_burst_over_three_instances_reaches_every_subscriber_once_in_order_and_operations_reach_them_live() {
    let apps = three_instances(&redis_url()).await;
    let creator = "creator-three-instances";
    let mut subscribers = subscribe_everywhere(&apps, creator).await;

    let n = 60;
    burst(&apps, creator, 0, n).await;
    let seen = receive_everywhere(&mut subscribers, 1, n).await;
    let log = apps[0].all_events(creator).await;
    assert_eq!(seen, log, "what every subscriber saw is the log, frame for frame");
    for app in &apps {
        assert!(app.metric("clusterd_fanout_received_total").await > 0.0, "{} heard the others", app.address);
    }

    // An operation on one instance reaches the other two live: nothing
    // else happens afterwards that could have made them look at the log.
    let polls: Vec<f64> = join_all(apps.iter().map(|a| a.metric("clusterd_fanout_polls_total"))).await;
    let cluster_id = log[0]["cluster"]["id"].as_str().expect("a cluster id").to_owned();
    let (status, body) =
        apps[1].post(&format!("/v1/clusters/{cluster_id}/action"), &json!({"response_text": "See the FAQ"})).await;
    assert_eq!(status, 200, "{body}");
    let actioned = receive_everywhere(&mut subscribers, n as i64 + 1, 1).await;
    assert_eq!(actioned[0]["event"], "cluster.actioned");
    assert_eq!(actioned[0]["cluster"]["response_text"], "See the FAQ");
    let polls_after: Vec<f64> = join_all(apps.iter().map(|a| a.metric("clusterd_fanout_polls_total"))).await;
    assert_eq!(polls, polls_after, "delivered over Redis, not by the fallback poll");
    assert_nothing_more(&mut subscribers).await;
    for app in &apps {
        assert!(app.metric("clusterd_event_delivery_seconds_count{path=\"redis\"}").await > 0.0);
        assert!(app.metric("clusterd_event_delivery_seconds_count{path=\"local\"}").await > 0.0);
    }
}

#[actix_web::test]
async fn with_redis_killed_mid_stream_every_event_still_arrives_and_the_live_path_returns_by_itself() {
    let mut redis = ScratchRedis::start();
    let apps = three_instances(&redis.url()).await;
    let creator = "creator-redis-killed";
    let mut subscribers = subscribe_everywhere(&apps, creator).await;

    burst(&apps, creator, 0, 20).await;
    // Killed while those events may still be on their way.
    redis.kill();
    for app in &apps {
        wait_metric(app, "clusterd_fanout_subscribed", |v| v == 0.0).await;
    }
    burst(&apps, creator, 20, 20).await;
    receive_everywhere(&mut subscribers, 1, 40).await;
    let polls: Vec<f64> = join_all(apps.iter().map(|a| a.metric("clusterd_fanout_polls_total"))).await;
    assert!(polls.iter().sum::<f64>() > 0.0, "the instances read the log: {polls:?}");
    // The newest event reached the instances that did not commit it from
    // there: nothing came after it.
    let from_log: Vec<f64> =
        join_all(apps.iter().map(|a| a.metric("clusterd_event_delivery_seconds_count{path=\"log\"}"))).await;
    assert!(from_log.iter().sum::<f64>() > 0.0, "events delivered from the log: {from_log:?}");

    // Back on its port: every instance resubscribes by itself and events
    // come over Redis again.
    let received: Vec<f64> = join_all(apps.iter().map(|a| a.metric("clusterd_fanout_received_total"))).await;
    redis.up();
    for app in &apps {
        wait_metric(app, "clusterd_fanout_subscribed", |v| v == 1.0).await;
    }
    burst(&apps, creator, 40, 30).await;
    receive_everywhere(&mut subscribers, 41, 30).await;
    for (app, before) in apps.iter().zip(received) {
        wait_metric(app, "clusterd_fanout_received_total", |v| v > before).await;
    }
    assert_nothing_more(&mut subscribers).await;
    let replayed = apps[0].assert_cluster_invariants(creator).await;
    assert_eq!(replayed.events.len(), 70, "one event per message");
}

/// The daemon's warnings at start, with or without `redis.url`.
async fn start_log(redis: Option<String>) -> String {
    let db_url = fresh_database().await;
    let mut command = clusterd_command(&db_url);
    if let Some(url) = redis {
        command.env("CLUSTERD__REDIS__URL", url);
    }
    command.env("RUST_LOG", "warn").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    let mut daemon = Daemon::start(command);
    daemon.port().await; // bound: the pipeline, and its warning, came first
    daemon.child.kill().expect("stop the daemon");
    daemon.child.wait().expect("the daemon exits");
    let mut log = String::new();
    let mut stderr = daemon.child.stderr.take().expect("a piped stderr");
    std::io::Read::read_to_string(&mut stderr, &mut log).expect("the daemon's log");
    log
}

#[actix_web::test]
async fn without_redis_the_daemon_says_at_start_that_live_events_stay_on_this_instance() {
    let warning = "no redis.url: live events reach only this instance's subscribers";
    let alone = start_log(None).await;
    assert!(alone.contains("WARN") && alone.contains(warning), "{alone}");
    let shared = start_log(Some(redis_url())).await;
    assert!(!shared.contains(warning), "{shared}");
}
