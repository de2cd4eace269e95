//! Race-freedom, shown with real concurrency: many client connections (each
//! its own TCP connection, HTTP or WebSocket) released together by a
//! barrier, one or two daemon instances on one database, and creator
//! operations racing with the messages that stream in. Outcomes are checked
//! on the database (`assert_cluster_invariants`) and against what the
//! clients saw happen before what; nothing depends on timing.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
};

use actix_web::http::StatusCode;
use futures_util::future::{join, join_all};
use serde_json::{Value, json};
use tokio::sync::{Barrier, watch};

use crate::helpers::{Snapshot, TestApp, WsClient, flush_all, fresh_database, is_decision, spawn_app, spawn_app_on};

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

    flush_all(apps).await;
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

/// A creator operation raced against incoming messages. Each picks its
/// target among the clusters that the API shows, within one question (so
/// that the two questions still never share a cluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Answers one of the largest open clusters (not a singleton: those
    /// are for merges and moves).
    Action,
    /// Removes a message from a cluster of two or more, open ones first.
    Remove,
    /// Merges an open cluster of a question (sometimes two) into another
    /// one.
    Merge,
    /// Moves a message of an open cluster into another open cluster of its
    /// question, often the largest (where new messages go).
    Move,
}

impl Op {
    const ALL: [Op; 4] = [Op::Action, Op::Remove, Op::Merge, Op::Move];

    /// How many workers run the operation: one for actions (each closes one
    /// of the largest open clusters, which the other operations should
    /// also get to change), three for removals (each opens a cluster that
    /// merges and moves can use).
    fn workers(self) -> usize {
        match self {
            Op::Action => 1,
            Op::Remove => 3,
            Op::Merge | Op::Move => 2,
        }
    }
}

/// One request of a worker: an operation, or the read of a listed cluster
/// that picks a message to remove.
#[derive(Debug, Clone)]
enum Call {
    Action { cluster: String },
    Remove { cluster: String, message: String },
    Merge { target: String, sources: Vec<String> },
    Move { message: String, to: String },
    Read { cluster: String },
}

/// The creator's newest event id just before a request was sent and just
/// after its answer came: the request saw the clusters as they were after
/// one of the events `before..=after`.
#[derive(Debug, Clone, Copy)]
struct Window {
    before: u64,
    after: u64,
}

/// A request that succeeded, in the order the clients saw them complete.
#[derive(Debug)]
struct Done {
    op: Op,
    call: Call,
    answer: Value,
    window: Window,
}

/// A request refused with 404 or 409: allowed only if, at some point of its
/// window, the event log shows the state that the refusal describes
/// ([`Call::explains`]), i.e. another request got there first.
#[derive(Debug)]
struct Refused {
    op: Op,
    call: Call,
    status: StatusCode,
    answer: Value,
    window: Window,
}

/// How one run of an operation ended.
enum Outcome {
    Done(Done),
    Refused(Refused),
    /// Nothing to operate on yet.
    NoTarget,
}

impl Call {
    async fn send(&self, app: &TestApp, pick: usize) -> (StatusCode, Value) {
        match self {
            Call::Action { cluster } => {
                let body = json!({"response_text": format!("answer {pick}")});
                app.post(&format!("/v1/clusters/{cluster}/action"), &body).await
            }
            Call::Remove { cluster, message } => {
                app.delete(&format!("/v1/clusters/{cluster}/messages/{message}")).await
            }
            Call::Merge { target, sources } => {
                app.post(&format!("/v1/clusters/{target}/merge"), &json!({"cluster_ids": sources})).await
            }
            Call::Move { message, to } => {
                app.post(&format!("/v1/messages/{message}/move"), &json!({"cluster_id": to})).await
            }
            Call::Read { cluster } => app.get(&format!("/v1/clusters/{cluster}?limit=500")).await,
        }
    }

    /// Sends the request; returns the answer and the window it ran in.
    /// Only 200, 404 and 409 are answers a race can give.
    async fn request(&self, op: Op, app: &TestApp, creator: &str, pick: usize) -> (StatusCode, Value, Window) {
        let before = app.last_event_id(creator).await;
        let (status, answer) = self.send(app, pick).await;
        let window = Window { before, after: app.last_event_id(creator).await };
        match status {
            StatusCode::OK => self.check_answer(&answer),
            StatusCode::NOT_FOUND | StatusCode::CONFLICT => {}
            s => panic!("{op:?}: {self:?} answered {s}: {answer}"),
        }
        (status, answer, window)
    }

    /// A 200 answer is about what was asked.
    fn check_answer(&self, answer: &Value) {
        match self {
            Call::Action { cluster } => {
                assert_eq!(answer["id"], cluster.as_str(), "{answer}");
                assert_eq!(answer["status"], "actioned", "{answer}");
                // The response answers the whole cluster, all of it core.
                let answered = answer["answered"].as_array().map_or(0, Vec::len);
                assert_eq!(answer["size"].as_u64(), Some(answered as u64), "{answer}");
                assert_eq!(answer["core_size"], answer["size"], "{answer}");
            }
            Call::Remove { cluster, message } => {
                assert_eq!(answer["cluster"]["id"], cluster.as_str(), "{answer}");
                assert_eq!(answer["message"]["id"], message.as_str(), "{answer}");
                assert_ne!(answer["message"]["cluster_id"], cluster.as_str(), "{answer}");
                assert_eq!(answer["message"]["status"], "clustered", "{answer}");
            }
            Call::Merge { target, sources } => {
                assert_eq!(answer["id"], target.as_str(), "{answer}");
                assert_eq!(answer["status"], "open", "{answer}");
                assert!(answer["size"].as_u64().is_some_and(|size| size > sources.len() as u64), "{answer}");
            }
            Call::Move { message, to } => {
                assert_eq!(answer["cluster"]["id"], to.as_str(), "{answer}");
                assert_eq!(answer["cluster"]["status"], "open", "{answer}");
                assert_eq!(answer["message"]["id"], message.as_str(), "{answer}");
                assert_eq!(answer["message"]["cluster_id"], to.as_str(), "{answer}");
                assert!(answer["from_cluster"].is_null() || answer["from_cluster"]["id"] != to.as_str(), "{answer}");
            }
            Call::Read { cluster } => assert_eq!(answer["id"], cluster.as_str(), "the cluster read"),
        }
    }

    /// Whether the clusters as they were at one point (`state`) explain a
    /// refusal, as docs/api.md lists each endpoint's refusals: only states
    /// that another request can bring about (merged away or emptied, the
    /// message moved or removed, actioned) explain anything here.
    fn explains(&self, status: StatusCode, state: &Snapshot) -> bool {
        let exists = |id: &String| state.cluster(id).is_some();
        match (self, status) {
            (Call::Action { cluster }, StatusCode::NOT_FOUND) => !exists(cluster),
            (Call::Action { cluster }, StatusCode::CONFLICT) => state.is_actioned(cluster),
            // The cluster is gone (then the message is not in it), or the
            // message left it.
            (Call::Remove { cluster, message }, StatusCode::NOT_FOUND) => {
                state.location_of(message) != Some(cluster.as_str())
            }
            (Call::Remove { cluster, message }, StatusCode::CONFLICT) => {
                state.location_of(message) == Some(cluster.as_str())
                    && (state.is_actioned(cluster) || state.cluster(cluster).is_some_and(|c| c.members.len() <= 1))
            }
            (Call::Merge { target, sources }, StatusCode::NOT_FOUND) => {
                !exists(target) || sources.iter().any(|s| !exists(s))
            }
            (Call::Merge { target, sources }, StatusCode::CONFLICT) => {
                let all = || std::iter::once(target).chain(sources);
                all().all(exists) && all().any(|c| state.is_actioned(c))
            }
            (Call::Move { to, .. }, StatusCode::NOT_FOUND) => !exists(to),
            (Call::Move { message, to }, StatusCode::CONFLICT) => {
                let from = state.location_of(message);
                exists(to)
                    && (from == Some(to.as_str())
                        || state.is_actioned(to)
                        || from.is_some_and(|f| state.is_actioned(f)))
            }
            (Call::Read { cluster }, StatusCode::NOT_FOUND) => !exists(cluster),
            _ => false,
        }
    }

    /// Whether `event` is the one this successful call (answered `answer`)
    /// emitted: the objects it carries are the ones answered.
    fn emitted(&self, answer: &Value, event: &Value) -> bool {
        let kind = event["event"].as_str().unwrap_or_default();
        match self {
            Call::Action { .. } => kind == "cluster.actioned" && event["cluster"] == actioned_cluster(answer),
            Call::Remove { .. } => {
                kind == "message.removed"
                    && event["cluster"] == answer["cluster"]
                    && event["message"] == answer["message"]
            }
            Call::Merge { sources, .. } => {
                let merged: Option<BTreeSet<&str>> =
                    event["merged_cluster_ids"].as_array().map(|ids| ids.iter().filter_map(Value::as_str).collect());
                kind == "cluster.merged"
                    && event["cluster"] == *answer
                    && merged == Some(sources.iter().map(String::as_str).collect())
            }
            Call::Move { .. } => {
                kind == "cluster.updated"
                    && event.get("from_cluster_id").is_some()
                    && event["cluster"] == answer["cluster"]
                    && event["message"] == answer["message"]
                    && event.get("from_cluster").unwrap_or(&Value::Null) == &answer["from_cluster"]
            }
            Call::Read { .. } => false,
        }
    }

    /// Whether `event` is one of the removals this successful action
    /// (answered `answer`) made of the review members it held back.
    fn held_back(&self, answer: &Value, event: &Value) -> bool {
        let Call::Action { cluster } = self else { return false };
        let into = |held: &Value| {
            held["message_id"] == event["message"]["id"] && held["cluster_id"] == event["new_cluster"]["id"]
        };
        event["event"] == "message.removed"
            && event["cluster"]["id"] == cluster.as_str()
            && answer["held_back"].as_array().is_some_and(|held| held.iter().any(into))
    }
}

/// The cluster object of an action's answer (without what it answered and
/// held back), as its event carries it.
fn actioned_cluster(answer: &Value) -> Value {
    let mut cluster = answer.clone();
    if let Some(fields) = cluster.as_object_mut() {
        fields.remove("answered");
        fields.remove("held_back");
    }
    cluster
}

/// Whether an event is a creator's operation (not a clustering decision).
fn is_operation(event: &Value) -> bool {
    !is_decision(event)
}

impl Op {
    /// Picks a target (`pick` varies the choice between runs) among the
    /// creator's clusters as the API shows them now, and runs the
    /// operation once.
    async fn run(self, app: &TestApp, creator: &str, pick: usize) -> Outcome {
        let call = match self {
            Op::Action => {
                let open: Vec<Listed> =
                    listing(app, creator, "open").await.into_iter().filter(|c| c.size >= 2).collect();
                let Some(cluster) = nth(&open, pick) else { return Outcome::NoTarget };
                Call::Action { cluster: cluster.id.clone() }
            }
            Op::Remove => {
                let mut candidates: Vec<Listed> =
                    listing(app, creator, "open").await.into_iter().filter(|c| c.size >= 2).collect();
                if candidates.is_empty() {
                    candidates = listing(app, creator, "all").await.into_iter().filter(|c| c.size >= 2).collect();
                }
                let Some(cluster) = nth(&candidates, pick) else { return Outcome::NoTarget };
                let cluster = cluster.id.clone();
                let read = Call::Read { cluster: cluster.clone() };
                let (status, detail, window) = read.request(self, app, creator, pick).await;
                if status != StatusCode::OK {
                    return Outcome::Refused(Refused { op: self, call: read, status, answer: detail, window });
                }
                let members: Vec<String> = detail["messages"]
                    .as_array()
                    .expect("a message list")
                    .iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect();
                let Some(message) = members.get(pick.wrapping_mul(7) % members.len().max(1)).cloned() else {
                    return Outcome::NoTarget;
                };
                Call::Remove { cluster, message }
            }
            Op::Merge => {
                let open = listing(app, creator, "open").await;
                let Some(group) = question_with_two_clusters(&open, pick) else { return Outcome::NoTarget };
                let target = group[(pick / 2) % group.len().min(3)];
                let others: Vec<&Listed> = group.iter().copied().filter(|c| c.id != target.id).collect();
                let n = if pick % 4 == 3 { others.len().min(2) } else { 1 };
                let first = (pick / 5) % others.len();
                let sources = (0..n).map(|i| others[(first + i) % others.len()].id.clone()).collect();
                Call::Merge { target: target.id.clone(), sources }
            }
            Op::Move => {
                let open = listing(app, creator, "open").await;
                let Some(group) = question_with_two_clusters(&open, pick) else { return Outcome::NoTarget };
                let from = (pick / 2) % group.len();
                // Half of the moves go into the largest cluster of the
                // question, the one that new messages keep joining.
                let to = if pick % 4 < 2 && from != 0 {
                    0
                } else {
                    (from + 1 + (pick / 4) % (group.len() - 1)) % group.len()
                };
                let samples = &group[from].samples;
                let Some(message) = samples.get(pick.wrapping_mul(7) % samples.len().max(1)) else {
                    return Outcome::NoTarget;
                };
                Call::Move { message: message.clone(), to: group[to].id.clone() }
            }
        };
        let (status, answer, window) = call.request(self, app, creator, pick).await;
        if status == StatusCode::OK {
            Outcome::Done(Done { op: self, call, answer, window })
        } else {
            Outcome::Refused(Refused { op: self, call, status, answer, window })
        }
    }
}

/// A cluster as a listing shows it.
struct Listed {
    id: String,
    size: u64,
    /// [`QUESTION`] or [`OTHER`], by its label (every member is of one).
    topic: &'static str,
    /// The ids of its first messages.
    samples: Vec<String>,
}

/// Up to 50 of the creator's clusters (`status`: open or all), largest
/// first.
async fn listing(app: &TestApp, creator: &str, status: &str) -> Vec<Listed> {
    let (code, list) = app.get(&format!("/v1/creators/{creator}/clusters?status={status}&sort=size&limit=50")).await;
    assert_eq!(code, StatusCode::OK, "{list}");
    list["clusters"]
        .as_array()
        .expect("a cluster list")
        .iter()
        .map(|c| {
            let label = c["label"].as_str().expect("a label");
            Listed {
                id: c["id"].as_str().expect("an id").to_owned(),
                size: c["size"].as_u64().expect("a size"),
                topic: [QUESTION, OTHER]
                    .into_iter()
                    .find(|q| label.starts_with(q))
                    .unwrap_or_else(|| panic!("label {label:?} is a variant of neither question")),
                samples: c["sample_messages"]
                    .as_array()
                    .expect("sample messages")
                    .iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect(),
            }
        })
        .collect()
}

/// The `pick`-th of the first three (wrapping), if any.
fn nth(clusters: &[Listed], pick: usize) -> Option<&Listed> {
    (!clusters.is_empty()).then(|| &clusters[pick % clusters.len().min(3)])
}

/// The listed clusters of one question (chosen by `pick`) that has at least
/// two of them, largest first.
fn question_with_two_clusters(listed: &[Listed], pick: usize) -> Option<Vec<&Listed>> {
    let groups: Vec<Vec<&Listed>> = [QUESTION, OTHER]
        .into_iter()
        .map(|q| listed.iter().filter(|c| c.topic == q).collect::<Vec<_>>())
        .filter(|g| g.len() >= 2)
        .collect();
    let n = groups.len();
    groups.into_iter().nth(pick % n.max(1))
}

/// A message as its sender saw it.
struct Sent {
    id: String,
    topic: &'static str,
    /// How many operations had succeeded (as seen by their clients)
    /// before this message was sent.
    ops_before: usize,
}

/// Flushes every instance, then checks that at least `n` of the creator's
/// messages are clustered (all those acknowledged so far: `n` of them).
async fn clustered_at_least(apps: &[&TestApp], creator: &str, n: usize) {
    flush_all(apps).await;
    let condition = format!("creator_id = '{}' AND status = 'clustered'", creator.replace('\'', "''"));
    let clustered = usize::try_from(apps[0].count("messages", &condition).await).expect("a count");
    assert!(clustered >= n, "{creator}: {clustered} messages clustered, fewer than the {n} acknowledged");
}

/// Streams of messages (two topics, over HTTP and WebSocket, spread over
/// `apps`) race with workers running each [`Op`] (also spread over `apps`,
/// so operations race each other too). The streams send in chunks and the
/// workers run in rounds: round r starts once chunk r is clustered and
/// chunk r + 2 waits for round r to end, so operations always run while the
/// next messages arrive and are decided, without any sleep.
///
/// Then, on the event log: every successful operation emitted exactly one
/// event, carrying what it answered, within the time it ran; every refusal
/// is explained by a state the log went through while it ran; no message
/// joined a cluster after its action; no removed or moved message went
/// back into the cluster it left but by another operation; and the two
/// questions never share a cluster.
async fn operations_race_with_new_messages(apps: &[&TestApp], creator: &str) {
    const QUESTION_STREAMS: usize = 6;
    const STREAMS: usize = QUESTION_STREAMS + 2;
    const CHUNKS: usize = 8;
    const CHUNK: usize = 4;
    const RUNS_PER_ROUND: usize = 2;
    const TRIES: usize = 3;

    let mut senders = Vec::with_capacity(STREAMS);
    for s in 0..STREAMS {
        senders.push(Sender::open_nth(apps, s).await);
    }
    let workers: Vec<(Op, TestApp)> = Op::ALL
        .iter()
        .flat_map(|op| std::iter::repeat_n(*op, op.workers()))
        .enumerate()
        .map(|(w, op)| (op, apps[w % apps.len()].with_own_connection()))
        .collect();
    let barrier = Barrier::new(STREAMS + workers.len());
    let chunks_sent = watch::Sender::new(0usize);
    let rounds_done = watch::Sender::new(0usize);
    let sent = RefCell::new(Vec::<Sent>::new());
    let done = RefCell::new(Vec::<Done>::new());
    let refused = RefCell::new(Vec::<Refused>::new());
    let idle = RefCell::new(Vec::<Op>::new());

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
        let (barrier, chunks_sent, rounds_done, done, refused, idle) =
            (&barrier, &chunks_sent, &rounds_done, &done, &refused, &idle);
        let n_workers = workers.len();
        async move {
            barrier.wait().await;
            for round in 0..CHUNKS {
                let mut chunks = chunks_sent.subscribe();
                chunks.wait_for(|n| *n >= (round + 1) * STREAMS).await.expect("the sender lives");
                // Decided, not only acknowledged: on a loaded machine the
                // operations would otherwise find nothing to act on until
                // the last messages had arrived, and race with nothing.
                clustered_at_least(apps, creator, (round + 1) * STREAMS * CHUNK).await;
                for run in 0..RUNS_PER_ROUND {
                    // A client that lost a race, or found nothing to do,
                    // looks again (a little later) and tries once more.
                    for attempt in 0..TRIES {
                        let pick = ((round * RUNS_PER_ROUND + run) * TRIES + attempt) * n_workers + w;
                        match op.run(app, creator, pick).await {
                            Outcome::Done(d) => {
                                done.borrow_mut().push(d);
                                break;
                            }
                            Outcome::Refused(r) => refused.borrow_mut().push(r),
                            Outcome::NoTarget => idle.borrow_mut().push(*op),
                        }
                    }
                }
                rounds_done.send_modify(|r| *r += 1);
            }
        }
    });
    join(join_all(streams), join_all(operations)).await;

    let (sent, done, refused) = (sent.into_inner(), done.into_inner(), refused.into_inner());
    assert_eq!(sent.len(), STREAMS * CHUNKS * CHUNK);
    flush_all(apps).await;
    apps[0].wait_settled(creator, sent.len() as i64).await;
    let replayed = apps[0].assert_cluster_invariants(creator).await;

    let successes = |op| done.iter().filter(|d| d.op == op).count();
    for op in Op::ALL {
        assert!(successes(op) > 0, "no {op:?} succeeded: the race did not happen ({done:?})");
    }
    for op in Op::ALL {
        let first = done.iter().position(|d| d.op == op).expect("a success");
        assert!(
            sent.iter().any(|m| m.ops_before > first),
            "messages were still arriving after the first {op:?} succeeded"
        );
    }

    // Each successful operation emitted exactly one event, the one carrying
    // what it answered, committed while it ran (an action also one removal
    // per review member it held back, just before); and the log holds no
    // other operation's event.
    let mut emitted = BTreeSet::new();
    let mut held_back = 0;
    let mut event_of = Vec::with_capacity(done.len());
    for d in &done {
        let matching: Vec<u64> = replayed
            .events
            .iter()
            .filter(|e| d.call.emitted(&d.answer, e))
            .map(|e| e["event_id"].as_u64().expect("an event id"))
            .collect();
        let [event_id] = matching[..] else {
            panic!("{:?} {:?} answered {} and has events {matching:?}, not exactly one", d.op, d.call, d.answer)
        };
        assert!(
            d.window.before < event_id && event_id <= d.window.after,
            "{:?}'s event {event_id} is outside the time it ran, after events {:?}",
            d.call,
            d.window
        );
        assert!(emitted.insert(event_id), "event {event_id} answers two operations");
        event_of.push(event_id);
        let removals: Vec<u64> = replayed
            .events
            .iter()
            .filter(|e| d.call.held_back(&d.answer, e))
            .map(|e| e["event_id"].as_u64().expect("an event id"))
            .collect();
        let expected = d.answer["held_back"].as_array().map_or(0, Vec::len);
        assert_eq!(removals.len(), expected, "{:?} answered {} with removals {removals:?}", d.call, d.answer);
        let first = event_id - expected as u64;
        assert_eq!(removals, (first..event_id).collect::<Vec<_>>(), "{:?}: removals just before", d.call);
        for removal in removals {
            assert!(emitted.insert(removal), "event {removal} answers two operations");
        }
        held_back += expected;
    }
    let operation_events: Vec<u64> = replayed
        .events
        .iter()
        .filter(|e| is_operation(e))
        .map(|e| e["event_id"].as_u64().expect("an event id"))
        .collect();
    assert_eq!(operation_events, emitted.iter().copied().collect::<Vec<_>>(), "operation events without an operation");
    assert_eq!(replayed.count("cluster.actioned"), successes(Op::Action), "one event per action");
    assert_eq!(replayed.count("message.removed"), successes(Op::Remove) + held_back, "one event per removal");
    assert_eq!(replayed.count("cluster.merged"), successes(Op::Merge), "one event per merge");
    let moves = replayed.events.iter().filter(|e| e.get("from_cluster_id").is_some()).count();
    assert_eq!(moves, successes(Op::Move), "one event per move");

    // Each refusal is one a race explains: at some point while it ran, the
    // log shows the cluster merged away or emptied, the message gone from
    // it, or the cluster actioned.
    for r in &refused {
        let Window { before, after } = r.window;
        assert!(
            (before..=after).any(|e| r.call.explains(r.status, replayed.after(e))),
            "{:?}: {:?} answered {} ({}), which no state of the log after events {before}..={after} explains",
            r.op,
            r.call,
            r.status,
            r.answer
        );
    }

    // A message sent after an action succeeded never joins that cluster.
    for message in &sent {
        let into = replayed.clustered_into(&message.id).expect("every message has a clustering event");
        for done in &done[..message.ops_before] {
            if let Call::Action { cluster } = &done.call {
                assert_ne!(&into, cluster, "message {} sent after cluster {} was actioned joined it", message.id, into);
            }
        }
    }
    // A removed or moved message never goes back into the cluster it left
    // by an automatic decision: only another operation (a merge or a move)
    // brings it back.
    let mut brought_back = 0;
    for (d, &event_id) in done.iter().zip(&event_of) {
        let event = replayed.event(event_id);
        let (message, left) = match &d.call {
            Call::Remove { cluster, message } => (message, cluster.clone()),
            Call::Move { message, .. } => {
                (message, event["from_cluster_id"].as_str().expect("a move names the cluster left").to_owned())
            }
            _ => continue,
        };
        for e in event_id + 1..=replayed.events.len() as u64 {
            let back = replayed.after(e).location_of(message) == Some(left.as_str());
            if back && replayed.after(e - 1).location_of(message) != Some(left.as_str()) {
                // A merge into that cluster, or a move of this message.
                let by = replayed.event(e);
                let merged_in = by["event"] == "cluster.merged";
                let moved_in = by.get("from_cluster_id").is_some() && by["message"]["id"] == message.as_str();
                assert!(
                    (merged_in || moved_in) && by["cluster"]["id"] == left.as_str(),
                    "message {message} was pulled back into cluster {left}, which it left by event {event_id}: {by}"
                );
                brought_back += 1;
            }
        }
    }
    // The two questions never share a cluster.
    for (id, cluster) in &replayed.clusters {
        let topics: BTreeSet<&str> = sent.iter().filter(|m| cluster.members.contains(&m.id)).map(|m| m.topic).collect();
        assert_eq!(topics.len(), 1, "cluster {id} mixes questions: {topics:?}");
    }
    let refusals: BTreeMap<String, usize> = refused.iter().fold(BTreeMap::new(), |mut counts, r| {
        *counts.entry(format!("{:?} {}", r.op, r.status.as_u16())).or_default() += 1;
        counts
    });
    let idle: BTreeMap<String, usize> = idle.into_inner().iter().fold(BTreeMap::new(), |mut counts, op| {
        *counts.entry(format!("{op:?}")).or_default() += 1;
        counts
    });
    let emptying =
        done.iter().filter(|d| matches!(d.call, Call::Move { .. }) && d.answer["from_cluster"].is_null()).count();
    eprintln!(
        "{creator}: {} messages, {} clusters, {} events; succeeded: {} actions, {} removals, {} merges, {} moves; \
         refused (each explained by the log): {refusals:?}; {brought_back} messages brought back by an operation; \
         nothing to do: {idle:?}; {emptying} moves emptied and deleted their cluster",
        sent.len(),
        replayed.clusters.len(),
        replayed.events.len(),
        successes(Op::Action),
        successes(Op::Remove),
        successes(Op::Merge),
        successes(Op::Move),
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
