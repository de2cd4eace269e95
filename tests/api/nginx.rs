//! Through a real load balancer: Debian's nginx, started by
//! `scripts/stack.sh nginx run` (the script `make run-cluster` uses) on a
//! port the test reserves, in front of three `clusterd` processes on one
//! database and one Redis. Requests spread over the instances; a
//! dashboard's WebSocket is proxied; when the instance holding it is
//! SIGKILLed, the dashboard reconnects through nginx to another instance
//! and, resuming with `since`, receives every event once, in order.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use futures_util::{StreamExt, future::join_all};
use sea_orm::Database;
use serde_json::{Value, json};

use crate::{
    helpers::{Daemon, PATIENCE, ReservedPort, WsClient, event_log, fresh_database, redis_url},
    restart::{count, start_daemon, wait_count, wait_ready},
};

/// nginx in the foreground on a reserved port of 127.0.0.1, balancing over
/// the given instances; its config, pid and logs in a folder of its own.
/// Stopped (SIGTERM) and its folder removed when dropped.
struct Nginx {
    child: Child,
    dir: PathBuf,
    port: ReservedPort,
}

impl Nginx {
    async fn start(upstreams: &[u16]) -> Self {
        let port = ReservedPort::new();
        let dir = std::env::temp_dir().join(format!("clusterd-test-nginx-{}", uuid::Uuid::now_v7().simple()));
        let mut command = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack.sh"));
        command.arg("nginx").arg("run").arg(&dir).arg(port.port().to_string());
        command.args(upstreams.iter().map(|p| format!("127.0.0.1:{p}")));
        command.stdout(Stdio::null()).stderr(if std::env::var("TEST_LOG").is_ok() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
        // The script execs nginx: this child is nginx's master process.
        let mut child = command.spawn().expect("scripts/stack.sh nginx runs");
        // Ready once it answers a request through to an instance.
        let client = awc::Client::default();
        let url = format!("http://127.0.0.1:{}/healthz", port.port());
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !client.get(&url).send().await.is_ok_and(|response| response.status() == 200) {
            if let Some(status) = child.try_wait().expect("nginx's status") {
                panic!("nginx exited before it served: {status} (its log: {}/error.log)", dir.display());
            }
            assert!(tokio::time::Instant::now() < deadline, "nginx did not serve in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { child, dir, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port.port())
    }

    async fn connect_ws(&self, client: &awc::Client) -> WsClient {
        let (_response, framed) = client
            .ws(format!("ws://127.0.0.1:{}/v1/ws", self.port.port()))
            .max_frame_size(1 << 20)
            .connect()
            .await
            .expect("the WebSocket handshake through nginx succeeds");
        WsClient { framed }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid. SIGTERM: the master
            // stops its workers too (SIGKILL would leave them running).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three `clusterd` processes on one fresh database (and Redis, when
/// given), ready; with their ports and the database's URL.
async fn three_daemons(redis: Option<&str>) -> (Vec<(Daemon, u16)>, String) {
    let db_url = fresh_database().await;
    let env: Vec<(&str, &str)> = redis.map(|url| ("CLUSTERD__REDIS__URL", url)).into_iter().collect();
    let client = awc::Client::default();
    let mut daemons = Vec::new();
    for _ in 0..3 {
        let (daemon, port) = start_daemon(&db_url, &env).await;
        wait_ready(&client, port).await;
        daemons.push((daemon, port));
    }
    (daemons, db_url)
}

/// One sample of an instance's `/metrics` (auth is off in the tests); 0
/// when absent.
async fn metric(client: &awc::Client, port: u16, sample: &str) -> f64 {
    let mut response =
        client.get(format!("http://127.0.0.1:{port}/metrics")).send().await.expect("the instance answers /metrics");
    let body = response.body().limit(1 << 24).await.expect("the metrics body");
    std::str::from_utf8(&body)
        .expect("metrics are UTF-8")
        .lines()
        .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |value| value.trim().parse().expect("a numeric sample"))
}

/// Posts message `i` of `creator` through nginx, with an external id, as a
/// client written against the SPEC does: a 503 (from nginx: the instance it
/// had sent the request to died before answering, or none answered) is
/// retried with the same external id, and a retry of one that had been
/// stored is answered as a duplicate. Returns the message id.
async fn ingest(client: &awc::Client, nginx: &Nginx, creator: &str, i: usize) -> String {
    let topics = ["ticket price", "refund", "shipping to Brazil", "backstage pass", "set list"];
    let body = json!({
        "creator_id": creator,
        "external_id": format!("m{i}"),
        "text": format!("question {i} about the {}", topics[i % topics.len()]),
    });
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut retried = false;
    loop {
        let mut response = client.post(nginx.url("/v1/messages")).send_json(&body).await.expect("nginx answers");
        let status = response.status().as_u16();
        let answer: Value = response.json().await.expect("a JSON answer");
        match status {
            202 => {
                assert_eq!(answer["duplicate"], false, "{answer}");
                return answer["message_id"].as_str().expect("a message id").to_owned();
            }
            200 if retried => {
                assert_eq!(answer["duplicate"], true, "a retry of a stored message: {answer}");
                return answer["message_id"].as_str().expect("a message id").to_owned();
            }
            503 => {
                assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
                assert!(tokio::time::Instant::now() < deadline, "message {i} was never accepted: {answer}");
                retried = true;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => panic!("message {i}: {status} {answer}"),
        }
    }
}

/// Messages `range` of `creator` through nginx, all at once.
async fn ingest_all(client: &awc::Client, nginx: &Nginx, creator: &str, range: std::ops::Range<usize>) -> Vec<String> {
    join_all(range.map(|i| ingest(client, nginx, creator, i))).await
}

/// The ids of `events`.
fn ids(events: &[Value]) -> Vec<i64> {
    events.iter().map(|e| e["event_id"].as_i64().expect("an event id")).collect()
}

#[actix_web::test]
async fn requests_through_nginx_spread_over_the_instances_and_none_up_answers_503_unavailable() {
    let (mut daemons, db_url) = three_daemons(None).await;
    let ports: Vec<u16> = daemons.iter().map(|(_, port)| *port).collect();
    let nginx = Nginx::start(&ports).await;
    let client = awc::Client::builder().timeout(Duration::from_secs(30)).finish();
    let creator = "creator-nginx-spread";

    // One after the other over one client connection: nginx picks an
    // instance per request, not per connection.
    for i in 0..30 {
        ingest(&client, &nginx, creator, i).await;
    }
    let mut ingested = Vec::new();
    for port in &ports {
        ingested.push(metric(&client, *port, "clusterd_messages_ingested_total").await);
    }
    assert!(ingested.iter().all(|&n| n > 0.0), "every instance took a share: {ingested:?}");
    assert_eq!(ingested.iter().sum::<f64>(), 30.0, "each message stored by one instance: {ingested:?}");
    let db = Database::connect(&db_url).await.expect("connect to the test database");
    let sql = format!("SELECT count(*) AS n FROM messages WHERE creator_id = '{creator}' AND status = 'clustered'");
    wait_count(&db, &sql, 30, "every message clustered").await;
    let mut response = client.get(nginx.url(&format!("/v1/creators/{creator}/clusters"))).send().await.expect("a GET");
    assert_eq!(response.status(), 200);
    let list: Value = response.json().await.expect("a JSON list");
    let sizes: u64 =
        list["clusters"].as_array().expect("clusters").iter().map(|c| c["size"].as_u64().expect("a size")).sum();
    assert_eq!(sizes, 30, "{list}");

    // No instance left: nginx answers in clusterd's error shape, 503
    // `unavailable` with Retry-After, reads and writes alike.
    for (daemon, _) in &mut daemons {
        daemon.child.kill().expect("SIGKILL an instance");
        daemon.child.wait().expect("it exits");
    }
    let read = client.get(nginx.url("/v1/creators/x/clusters")).send().await;
    let write = client.post(nginx.url("/v1/messages")).send_json(&json!({"creator_id": "x", "text": "anyone?"})).await;
    for response in [read, write] {
        let mut response = response.expect("nginx answers");
        assert_eq!(response.status(), 503);
        assert!(response.headers().contains_key("retry-after"), "{:?}", response.headers());
        let body: Value = response.json().await.expect("a JSON error");
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
    }
}

#[actix_web::test]
async fn a_dashboard_behind_nginx_whose_instance_is_killed_reconnects_and_misses_nothing() {
    let redis = redis_url();
    let (mut daemons, db_url) = three_daemons(Some(&redis)).await;
    let client = awc::Client::builder().timeout(Duration::from_secs(30)).finish();
    for (_, port) in &daemons {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while metric(&client, *port, "clusterd_fanout_subscribed").await != 1.0 {
            assert!(tokio::time::Instant::now() < deadline, "instance {port} did not subscribe to Redis");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let ports: Vec<u16> = daemons.iter().map(|(_, port)| *port).collect();
    let nginx = Nginx::start(&ports).await;
    let db = Database::connect(&db_url).await.expect("connect to the test database");
    let creator = "creator-nginx-failover";

    let mut ws = nginx.connect_ws(&client).await;
    assert_eq!(ws.subscribe(creator, None).await["last_event_id"], 0);
    let holder = holder_of_the_subscription(&client, &ports).await;

    // Live through nginx, whichever instance each message went to.
    let mut acked = ingest_all(&client, &nginx, creator, 0..20).await;
    let before = ws.events(20).await;
    assert_eq!(ids(&before), (1..=20).collect::<Vec<_>>());

    // The instance holding the WebSocket dies: the dashboard sees its
    // connection end (no close frame: nobody is left to send one).
    let (daemon, _) = &mut daemons[holder];
    daemon.child.kill().expect("SIGKILL the instance holding the WebSocket");
    daemon.child.wait().expect("it exits");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, ws.framed.next()).await.expect("the connection ends in time") {
            None | Some(Err(_)) | Some(Ok(awc::ws::Frame::Close(_))) => break,
            Some(Ok(awc::ws::Frame::Ping(_) | awc::ws::Frame::Pong(_))) => {}
            Some(Ok(frame)) => panic!("nothing was committed, yet {frame:?}"),
        }
    }
    drop(ws);

    // Committed while the dashboard is away (nginx passes the requests to
    // the instances left).
    acked.extend(ingest_all(&client, &nginx, creator, 20..40).await);
    let sql = format!("SELECT count(*) AS n FROM events WHERE creator_id = '{creator}'");
    wait_count(&db, &sql, 40, "the messages sent while the dashboard was away are decided").await;

    // Back through nginx, on another instance, from the last event seen.
    let mut ws = nginx.connect_ws(&client).await;
    let resumed = ws.subscribe(creator, Some(20)).await;
    assert!(resumed["last_event_id"].as_i64().expect("a last event id") >= 40, "{resumed}");
    let alive: Vec<u16> = ports.iter().enumerate().filter(|&(i, _)| i != holder).map(|(_, p)| *p).collect();
    holder_of_the_subscription(&client, &alive).await;
    acked.extend(ingest_all(&client, &nginx, creator, 40..60).await);
    let after = ws.events(40).await;
    assert_eq!(ids(&after), (21..=60).collect::<Vec<_>>(), "every event once, in order, the missed ones first");

    // Nothing more, and what the dashboard saw is the log, frame for frame:
    // one decision per acknowledged message.
    ws.send(&json!({"type": "ping", "id": "end"})).await;
    assert_eq!(ws.next_json().await, json!({"type": "pong", "id": "end"}), "no extra event frames");
    let log = event_log(&db, creator).await;
    assert_eq!([before, after].concat(), log);
    let decided: BTreeSet<&str> = log.iter().map(|e| e["message"]["id"].as_str().expect("a message")).collect();
    let acked: BTreeSet<&str> = acked.iter().map(String::as_str).collect();
    assert_eq!(decided, acked, "each acknowledged message decided once");
    let stored = format!("SELECT count(*) AS n FROM messages WHERE creator_id = '{creator}'");
    assert_eq!(count(&db, &stored).await, 60, "retries stored nothing twice");
}

/// The index in `ports` of the one instance with a creator subscription.
async fn holder_of_the_subscription(client: &awc::Client, ports: &[u16]) -> usize {
    let mut subscriptions = Vec::new();
    for port in ports {
        subscriptions.push(metric(client, *port, "clusterd_ws_subscriptions").await);
    }
    let holders: Vec<usize> = (0..ports.len()).filter(|&i| subscriptions[i] == 1.0).collect();
    assert_eq!(holders.len(), 1, "one instance holds the subscription: {subscriptions:?}");
    assert_eq!(subscriptions.iter().sum::<f64>(), 1.0, "{subscriptions:?}");
    holders[0]
}
