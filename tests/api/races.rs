//! Race-freedom, shown with real concurrency: many client connections (each
//! its own TCP connection, HTTP or WebSocket) released together by a
//! barrier, one or two daemon instances on one database, and creator
//! operations racing with the messages that stream in. Outcomes are checked
//! on the database (`assert_cluster_invariants`) and against what the
//! clients saw happen before what; nothing depends on timing.

use std::{cell::RefCell, collections::BTreeSet};

use actix_web::http::StatusCode;
use futures_util::future::{join, join_all};
use serde_json::json;
use tokio::sync::{Barrier, watch};

use crate::helpers::{TestApp, WsClient, fresh_database, spawn_app, spawn_app_on};

/// One question, asked in many small variations that the test embedder
/// (character n-grams) clusters together.
const QUESTION: &str = "how much is the vip ticket for the paris show";
/// An unrelated question: never in a cluster with [`QUESTION`].
const OTHER: &str = "will you restock the blue hoodie in size xl";

/// The `i % 50`-th of 50 distinct variations of `base`: an extra word and
/// different punctuation.
fn variant(base: &str, i: usize) -> String {
    const ENDINGS: [&str; 5] = ["", "?", "??", "!", " ?"];
    const WORDS: [&str; 10] =
        ["", " please", " exactly", " now", " today", " again", " really", " actually", " then", " tonight"];
    let i = i % (ENDINGS.len() * WORDS.len());
    format!("{base}{}{}", WORDS[i / ENDINGS.len()], ENDINGS[i % ENDINGS.len()])
}

/// A client connection that sends messages, opened before the race so that
/// sending only writes a request or a frame.
enum Sender {
    /// A handle with its own HTTP connection pool, already connected.
    Http(TestApp),
    Ws(WsClient),
}

impl Sender {
    async fn open(app: &TestApp, websocket: bool) -> Self {
        if websocket {
            let mut ws = app.connect_ws().await;
            ws.send(&json!({"type": "ping"})).await;
            assert_eq!(ws.next_json().await["type"], "pong", "the session is up");
            Self::Ws(ws)
        } else {
            let http = app.with_own_connection();
            let (status, _) = http.get("/healthz").await;
            assert_eq!(status, StatusCode::OK, "the connection is up (and kept alive for the race)");
            Self::Http(http)
        }
    }

    /// Opens the `i`-th of a set of senders: instances in turn, and on each
    /// instance HTTP and WebSocket in turn.
    async fn open_nth(apps: &[&TestApp], i: usize) -> Self {
        Self::open(apps[i % apps.len()], (i / apps.len()) % 2 == 1).await
    }

    /// Sends one message; returns its id once acknowledged.
    async fn send(&mut self, creator: &str, text: &str) -> String {
        match self {
            Self::Http(app) => app.post_message(creator, text).await,
            Self::Ws(ws) => ws.ingest(creator, text).await,
        }
    }
}

/// Sends `n` variations of one question for one creator at the same
/// instant from `n` connections spread over `apps`, and checks that they
/// end in one cluster, decided by one `cluster.created` and `n - 1`
/// `cluster.updated` events with ids 1..=n.
async fn burst(apps: &[&TestApp], creator: &str, n: usize) -> crate::helpers::Replayed {
    let mut senders = Vec::with_capacity(n);
    for i in 0..n {
        senders.push(Sender::open_nth(apps, i).await);
    }
    let barrier = Barrier::new(n);
    let sends = senders.iter_mut().enumerate().map(|(i, sender)| {
        let barrier = &barrier;
        async move {
            barrier.wait().await;
            sender.send(creator, &variant(QUESTION, i)).await
        }
    });
    let ids: BTreeSet<String> = join_all(sends).await.into_iter().collect();
    assert_eq!(ids.len(), n, "every message got its own id");

    apps[0].wait_settled(creator, n as i64).await;
    let replayed = apps[0].assert_cluster_invariants(creator).await;
    let clusters: Vec<_> = replayed.clusters.values().collect();
    let sizes: Vec<usize> = clusters.iter().map(|c| c.members.len()).collect();
    assert_eq!(clusters.len(), 1, "{n} similar messages at once end in one cluster, not clusters of sizes {sizes:?}");
    assert_eq!(clusters[0].members, ids);
    assert_eq!(clusters[0].status, "open");
    assert_eq!(replayed.count("cluster.created"), 1);
    assert_eq!(replayed.count("cluster.updated"), n - 1);
    let event_ids: Vec<u64> = replayed.events.iter().filter_map(|e| e["event_id"].as_u64()).collect();
    assert_eq!(event_ids, (1..=n as u64).collect::<Vec<_>>(), "event ids 1..={n}, no gap, no duplicate");
    for app in apps {
        let (status, list) = app.get(&format!("/v1/creators/{creator}/clusters?status=all")).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        assert_eq!(list["clusters"].as_array().map(Vec::len), Some(1), "{list}");
        assert_eq!(list["clusters"][0]["size"], n, "{list}");
    }
    replayed
}

/// On one instance, a subscriber also sees the decisions live, in order,
/// exactly as the log holds them.
async fn burst_on_one_instance(n: usize) {
    let app = spawn_app().await;
    let creator = format!("creator-burst-{n}");
    let mut watcher = app.connect_ws().await;
    watcher.subscribe(&creator, None).await;
    let replayed = burst(&[&app], &creator, n).await;
    assert_eq!(watcher.events(n).await, replayed.events, "live events are the log's, in order");
}

#[actix_web::test]
async fn two_similar_messages_at_the_same_instant_end_in_one_cluster() {
    burst_on_one_instance(2).await;
}

#[actix_web::test]
async fn fifty_similar_messages_at_the_same_instant_end_in_one_cluster() {
    burst_on_one_instance(50).await;
}

#[actix_web::test]
async fn two_similar_messages_at_the_same_instant_through_two_instances_end_in_one_cluster() {
    let db_url = fresh_database().await;
    let one = spawn_app_on(&db_url, |_| {}).await;
    let two = spawn_app_on(&db_url, |_| {}).await;
    burst(&[&one, &two], "creator-burst-2x2", 2).await;
}

#[actix_web::test]
async fn fifty_similar_messages_at_the_same_instant_through_two_instances_end_in_one_cluster() {
    let db_url = fresh_database().await;
    let one = spawn_app_on(&db_url, |_| {}).await;
    let two = spawn_app_on(&db_url, |_| {}).await;
    burst(&[&one, &two], "creator-burst-50x2", 50).await;
}

/// The same with each message embedded and decided in its own transaction,
/// so the two instances contend for the creator's lock once per message.
#[actix_web::test]
async fn fifty_similar_messages_through_two_instances_deciding_one_message_per_transaction_end_in_one_cluster() {
    let db_url = fresh_database().await;
    let one_by_one = |s: &mut clusterd::settings::Settings| {
        s.clustering.max_group = 1;
        s.embedder.batch_size = 1;
    };
    let one = spawn_app_on(&db_url, one_by_one).await;
    let two = spawn_app_on(&db_url, one_by_one).await;
    burst(&[&one, &two], "creator-burst-50x2-single", 50).await;
}

/// A creator operation raced against incoming messages. Merge and move
/// become further variants: each says how it picks its target among the
/// clusters that the API shows, which answers only mean that another
/// operation got there first, and what it did when it succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Answers one of the largest open clusters.
    Action,
    /// Removes a message from a cluster of two or more, open ones first.
    Remove,
}

/// A successful operation, in the order the clients saw them complete.
#[derive(Debug)]
struct Done {
    op: Op,
    /// The cluster operated on.
    cluster: String,
    /// The message operated on, for operations on a message.
    message: Option<String>,
}

/// How one run of an operation ended.
enum Outcome {
    Done(Done),
    /// An allowed refusal: the target changed between the read and the
    /// operation (actioned, shrunk, the message left).
    LostRace,
    /// Nothing to operate on yet.
    NoTarget,
}

impl Op {
    const ALL: [Op; 2] = [Op::Action, Op::Remove];

    /// Answers that only mean that another operation changed the target
    /// first; any other refusal is a bug.
    fn lost_race(self, status: StatusCode) -> bool {
        match self {
            // Already actioned.
            Op::Action => status == StatusCode::CONFLICT,
            // The message left the cluster, or is its last one.
            Op::Remove => matches!(status, StatusCode::NOT_FOUND | StatusCode::CONFLICT),
        }
    }

    /// Picks a target (`pick` varies the choice between runs) among the
    /// creator's clusters as the API shows them now, and runs the
    /// operation once.
    async fn run(self, app: &TestApp, creator: &str, pick: usize) -> Outcome {
        let (status, body, cluster, message) = match self {
            Op::Action => {
                let open = clusters(app, creator, "open", 0).await;
                let Some(target) = nth(&open, pick) else { return Outcome::NoTarget };
                let (status, body) = app
                    .post(&format!("/v1/clusters/{target}/action"), &json!({"response_text": format!("answer {pick}")}))
                    .await;
                (status, body, target, None)
            }
            Op::Remove => {
                let mut candidates = clusters(app, creator, "open", 2).await;
                if candidates.is_empty() {
                    candidates = clusters(app, creator, "all", 2).await;
                }
                let Some(target) = nth(&candidates, pick) else { return Outcome::NoTarget };
                let (status, detail) = app.get(&format!("/v1/clusters/{target}?limit=500")).await;
                assert_eq!(status, StatusCode::OK, "a cluster never disappears: {detail}");
                let members: Vec<String> = detail["messages"]
                    .as_array()
                    .expect("a message list")
                    .iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect();
                let Some(message) = members.get(pick.wrapping_mul(7) % members.len().max(1)).cloned() else {
                    return Outcome::NoTarget;
                };
                let (status, body) = app.delete(&format!("/v1/clusters/{target}/messages/{message}")).await;
                if status == StatusCode::OK {
                    assert_eq!(body["cluster"]["id"], target.as_str(), "{body}");
                    assert_eq!(body["message"]["id"], message.as_str(), "{body}");
                    assert_ne!(body["message"]["cluster_id"], target.as_str(), "{body}");
                    assert_eq!(body["message"]["status"], "clustered", "{body}");
                }
                (status, body, target, Some(message))
            }
        };
        match status {
            StatusCode::OK => Outcome::Done(Done { op: self, cluster, message }),
            s if self.lost_race(s) => Outcome::LostRace,
            s => panic!("{self:?} on cluster {cluster} answered {s}: {body}"),
        }
    }
}

/// The ids of up to 10 of the creator's clusters (`status`: open or all)
/// with at least `min_size` messages, largest first.
async fn clusters(app: &TestApp, creator: &str, status: &str, min_size: u64) -> Vec<String> {
    let (code, list) = app.get(&format!("/v1/creators/{creator}/clusters?status={status}&sort=size&limit=10")).await;
    assert_eq!(code, StatusCode::OK, "{list}");
    list["clusters"]
        .as_array()
        .expect("a cluster list")
        .iter()
        .filter(|c| c["size"].as_u64().is_some_and(|size| size >= min_size))
        .filter_map(|c| c["id"].as_str().map(str::to_owned))
        .collect()
}

/// The `pick`-th of the first three (wrapping), if any.
fn nth(ids: &[String], pick: usize) -> Option<String> {
    (!ids.is_empty()).then(|| ids[pick % ids.len().min(3)].clone())
}

/// A message as its sender saw it.
struct Sent {
    id: String,
    topic: &'static str,
    /// How many operations had succeeded (as seen by their clients)
    /// before this message was sent.
    ops_before: usize,
}

/// Streams of messages (two topics, over HTTP and WebSocket, spread over
/// `apps`) race with workers running each [`Op`] (also spread over `apps`,
/// so operations race each other too). The streams send in chunks and the
/// workers run in rounds: round r starts once chunk r is acknowledged and
/// chunk r + 2 waits for round r to end, so operations always run while the
/// next messages arrive and are decided, without any sleep.
async fn operations_race_with_new_messages(apps: &[&TestApp], creator: &str) {
    const QUESTION_STREAMS: usize = 6;
    const STREAMS: usize = QUESTION_STREAMS + 2;
    const CHUNKS: usize = 8;
    const CHUNK: usize = 4;
    const WORKERS_PER_OP: usize = 2;
    const RUNS_PER_ROUND: usize = 2;

    let mut senders = Vec::with_capacity(STREAMS);
    for s in 0..STREAMS {
        senders.push(Sender::open_nth(apps, s).await);
    }
    let workers: Vec<(Op, TestApp)> = Op::ALL
        .iter()
        .flat_map(|op| std::iter::repeat_n(*op, WORKERS_PER_OP))
        .enumerate()
        .map(|(w, op)| (op, apps[w % apps.len()].with_own_connection()))
        .collect();
    let barrier = Barrier::new(STREAMS + workers.len());
    let chunks_sent = watch::Sender::new(0usize);
    let rounds_done = watch::Sender::new(0usize);
    let sent = RefCell::new(Vec::<Sent>::new());
    let done = RefCell::new(Vec::<Done>::new());
    let lost = RefCell::new(Vec::<Op>::new());

    let streams = senders.iter_mut().enumerate().map(|(s, sender)| {
        let (barrier, chunks_sent, rounds_done, sent, done) = (&barrier, &chunks_sent, &rounds_done, &sent, &done);
        let n_workers = workers.len();
        async move {
            let topic = if s < QUESTION_STREAMS { QUESTION } else { OTHER };
            barrier.wait().await;
            for chunk in 0..CHUNKS {
                if chunk >= 2 {
                    let round = chunk - 2;
                    let mut rounds = rounds_done.subscribe();
                    rounds.wait_for(|r| *r >= (round + 1) * n_workers).await.expect("the sender lives");
                }
                for j in 0..CHUNK {
                    let ops_before = done.borrow().len();
                    let id = sender.send(creator, &variant(topic, (chunk * CHUNK + j) * STREAMS + s)).await;
                    sent.borrow_mut().push(Sent { id, topic, ops_before });
                }
                chunks_sent.send_modify(|n| *n += 1);
            }
        }
    });
    let operations = workers.iter().enumerate().map(|(w, (op, app))| {
        let (barrier, chunks_sent, rounds_done, done, lost) = (&barrier, &chunks_sent, &rounds_done, &done, &lost);
        let n_workers = workers.len();
        async move {
            barrier.wait().await;
            for round in 0..CHUNKS {
                let mut chunks = chunks_sent.subscribe();
                chunks.wait_for(|n| *n >= (round + 1) * STREAMS).await.expect("the sender lives");
                for run in 0..RUNS_PER_ROUND {
                    match op.run(app, creator, (round * RUNS_PER_ROUND + run) * n_workers + w).await {
                        Outcome::Done(d) => done.borrow_mut().push(d),
                        Outcome::LostRace => lost.borrow_mut().push(*op),
                        Outcome::NoTarget => {}
                    }
                }
                rounds_done.send_modify(|r| *r += 1);
            }
        }
    });
    join(join_all(streams), join_all(operations)).await;

    let (sent, done) = (sent.into_inner(), done.into_inner());
    assert_eq!(sent.len(), STREAMS * CHUNKS * CHUNK);
    apps[0].wait_settled(creator, sent.len() as i64).await;
    let replayed = apps[0].assert_cluster_invariants(creator).await;

    let successes = |op| done.iter().filter(|d| d.op == op).count();
    for op in Op::ALL {
        assert!(successes(op) > 0, "no {op:?} succeeded: the race did not happen ({done:?})");
    }
    assert_eq!(replayed.count("cluster.actioned"), successes(Op::Action), "one event per action");
    assert_eq!(replayed.count("message.removed"), successes(Op::Remove), "one event per removal");
    for op in Op::ALL {
        let first = done.iter().position(|d| d.op == op).expect("a success");
        assert!(
            sent.iter().any(|m| m.ops_before > first),
            "messages were still arriving after the first {op:?} succeeded"
        );
    }

    // A message sent after an action succeeded never joins that cluster.
    for message in &sent {
        let into = replayed.clustered_into(&message.id).expect("every message has a clustering event");
        for action in done[..message.ops_before].iter().filter(|d| d.op == Op::Action) {
            assert_ne!(
                into, action.cluster,
                "message {} sent after cluster {} was actioned joined it",
                message.id, into
            );
        }
    }
    // A removed message is never pulled back into the cluster it left.
    for removal in done.iter().filter(|d| d.op == Op::Remove) {
        let message = removal.message.as_ref().expect("a removal names its message");
        assert_ne!(replayed.location[message], removal.cluster, "message {message} went back into the cluster it left");
    }
    // The two questions never share a cluster.
    for (id, cluster) in &replayed.clusters {
        let topics: BTreeSet<&str> = sent.iter().filter(|m| cluster.members.contains(&m.id)).map(|m| m.topic).collect();
        assert_eq!(topics.len(), 1, "cluster {id} mixes questions: {topics:?}");
    }
    let lost = lost.into_inner();
    eprintln!(
        "{creator}: {} messages, {} clusters, {} actions and {} removals succeeded, {} lost races",
        sent.len(),
        replayed.clusters.len(),
        successes(Op::Action),
        successes(Op::Remove),
        lost.len()
    );
}

#[actix_web::test]
async fn operations_racing_with_new_messages_keep_the_invariants() {
    let app = spawn_app().await;
    operations_race_with_new_messages(&[&app], "creator-ops-race").await;
}

#[actix_web::test]
async fn operations_racing_with_new_messages_through_two_instances_keep_the_invariants() {
    let db_url = fresh_database().await;
    let one = spawn_app_on(&db_url, |_| {}).await;
    let two = spawn_app_on(&db_url, |_| {}).await;
    operations_race_with_new_messages(&[&one, &two], "creator-ops-race-x2").await;
}
