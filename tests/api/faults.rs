//! Dependency outages with real services of the test's own: a scratch
//! PostgreSQL stopped mid-stream and started again, or frozen (SIGSTOP) and
//! resumed (the stack's serves every other test, so it is never touched),
//! and a scratch Redis killed and started again. The daemon must answer 503 `unavailable` with
//! `Retry-After` for writes while its database is away, lose nothing it
//! acknowledged, and resume by itself when the service is back.

use std::{
    cell::{Cell, RefCell},
    collections::BTreeSet,
    path::PathBuf,
    process::{Child, Command, Stdio},
    rc::Rc,
    time::Duration,
};

use actix_web::http::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{Daemon, PATIENCE, ReservedPort, TestApp, clusterd_command, spawn_app_on};

/// Runs `scripts/stack.sh` with `args`, which knows the PostgreSQL binaries
/// and the system user that runs them; panics with its output on failure.
fn stack(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack.sh");
    let output = Command::new(script).args(args).output().expect("scripts/stack.sh runs");
    assert!(
        output.status.success(),
        "scripts/stack.sh {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// [`stack`] off the runtime's thread, so that the stream keeps writing.
async fn stack_async(args: Vec<String>) {
    actix_web::rt::task::spawn_blocking(move || stack(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .expect("scripts/stack.sh did not panic");
}

/// A PostgreSQL server of this test's own (`scripts/stack.sh scratch-pg`),
/// removed with its data when dropped.
struct ScratchPg {
    dir: PathBuf,
    port: ReservedPort,
}

impl ScratchPg {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("clusterd-scratch-pg-{}", Uuid::now_v7().simple()));
        let pg = Self { dir, port: ReservedPort::new() };
        pg.up();
        pg
    }

    fn dir(&self) -> &str {
        self.dir.to_str().expect("a UTF-8 temporary directory")
    }

    /// Starts the server (again) on the same port and data.
    fn up(&self) {
        stack(&["scratch-pg", "start", self.dir(), &self.port.port().to_string()]);
    }

    /// [`ScratchPg::up`] without blocking the test's runtime.
    async fn up_async(&self) {
        stack_async(vec!["scratch-pg".into(), "start".into(), self.dir().into(), self.port.port().to_string()]).await;
    }

    /// Stops it: `fast` (clients disconnected, a clean shutdown) or
    /// `immediate` (as if the server crashed).
    async fn down(&self, mode: &str) {
        stack_async(vec!["scratch-pg".into(), "stop".into(), self.dir().into(), mode.into()]).await;
    }

    fn url(&self) -> String {
        format!("postgres://clusterd@127.0.0.1:{}/postgres", self.port.port())
    }

    /// Sends `signal` to the server and all its processes: SIGSTOP makes a
    /// database that hangs (connections open, nothing answers), SIGCONT
    /// brings it back.
    fn signal(&self, signal: &str) {
        self.try_signal(signal).unwrap_or_else(|e| panic!("kill -{signal} the scratch server: {e}"));
    }

    fn try_signal(&self, signal: &str) -> Result<(), String> {
        let pidfile = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).map_err(|e| e.to_string())?;
        let postmaster = pidfile.lines().next().ok_or("an empty postmaster.pid")?.trim().to_owned();
        let mut pids = vec![postmaster.clone()];
        for entry in std::fs::read_dir("/proc").map_err(|e| e.to_string())?.flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if ppid == Some(postmaster.as_str()) {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        let status = Command::new("kill").arg(format!("-{signal}")).args(&pids).status().map_err(|e| e.to_string())?;
        if status.success() { Ok(()) } else { Err(format!("kill -{signal} {pids:?}: {status}")) }
    }
}

impl Drop for ScratchPg {
    fn drop(&mut self) {
        // A test that failed while the server was stopped must not leave
        // it frozen: a stopped server cannot shut down.
        let _ = self.try_signal("CONT");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack.sh");
        let _ = Command::new(script).args(["scratch-pg", "remove", self.dir()]).output();
    }
}

/// What the daemon answered to one write.
#[derive(Debug, Clone)]
struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    body: Value,
}

/// POSTs one message and records the whole answer.
async fn write(client: &awc::Client, address: &str, creator: &str, text: &str, external_id: &str) -> Answer {
    let body = json!({"creator_id": creator, "text": text, "external_id": external_id});
    let mut response =
        client.post(format!("{address}/v1/messages")).send_json(&body).await.expect("the server answers");
    let retry_after =
        response.headers().get("retry-after").map(|v| v.to_str().expect("an ASCII Retry-After").to_owned());
    let body = response.json::<Value>().await.expect("a JSON answer");
    Answer { status: response.status(), retry_after, body }
}

/// Concurrent writers, each one write after the other on its own
/// connection, from tasks of their own: every answer, in arrival order.
#[derive(Default)]
struct Stream {
    answers: RefCell<Vec<Answer>>,
    stop: Cell<bool>,
    /// Writers still running.
    running: Cell<usize>,
}

impl Stream {
    /// Starts `writers` writers, each writing to the creators in turn, until
    /// [`Stream::finish`].
    fn start(app: &TestApp, writers: usize, creators: &[String], tag: &str) -> Rc<Self> {
        let stream = Rc::new(Self::default());
        for w in 0..writers {
            let (me, app, creators, tag) =
                (stream.clone(), app.with_own_connection(), creators.to_vec(), tag.to_owned());
            me.running.set(me.running.get() + 1);
            actix_web::rt::spawn(async move {
                let mut i = 0usize;
                while !me.stop.get() {
                    let creator = &creators[i % creators.len()];
                    let text = format!("question {} about the tour, {tag}", i % 7);
                    let answer = write(&app.client, &app.address, creator, &text, &format!("w{w}-{i}")).await;
                    me.answers.borrow_mut().push(answer);
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                me.running.set(me.running.get() - 1);
            });
        }
        stream
    }

    fn len(&self) -> usize {
        self.answers.borrow().len()
    }

    /// Waits until at least `n` answers after the first `from` have
    /// `status`.
    async fn wait_for(&self, from: usize, n: usize, status: StatusCode) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let seen = self.answers.borrow()[from.min(self.len())..].iter().filter(|a| a.status == status).count();
            if seen >= n {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "the stream saw {seen} of {n} answers {status}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the writers once their writes in flight are answered (bounded
    /// by the client's timeout); returns every answer.
    async fn finish(&self) -> Vec<Answer> {
        self.stop.set(true);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.running.get() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "the writers did not stop");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.answers.borrow().clone()
    }
}

/// A WebSocket subscriber to one creator that stays subscribed through
/// anything: when the server closes it (1013 when a replay from the log
/// failed) or a subscribe is refused (the database is away), it subscribes
/// again with `since` = the last event it received. Collects every event.
struct Subscriber {
    events: RefCell<Vec<Value>>,
    resubscribed: Cell<usize>,
}

impl Subscriber {
    fn start(app: &TestApp, creator: &str) -> Rc<Self> {
        let subscriber = Rc::new(Self { events: RefCell::default(), resubscribed: Cell::new(0) });
        let (me, app, creator) = (subscriber.clone(), app.with_own_connection(), creator.to_owned());
        actix_web::rt::spawn(async move {
            loop {
                let since = me.last();
                let mut ws = app.connect_ws().await;
                ws.send(&json!({"type": "subscribe", "creator_id": creator, "since": since})).await;
                me.listen(&mut ws).await;
                me.resubscribed.set(me.resubscribed.get() + 1);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        subscriber
    }

    /// Receives until the connection ends or the subscription is refused.
    async fn listen(&self, ws: &mut crate::helpers::WsClient) {
        use futures_util::StreamExt;
        while let Ok(Some(Ok(frame))) = tokio::time::timeout(Duration::from_secs(60), ws.framed.next()).await {
            let awc::ws::Frame::Text(bytes) = frame else {
                if matches!(frame, awc::ws::Frame::Close(_)) {
                    return;
                }
                continue;
            };
            let frame: Value = serde_json::from_slice(&bytes).expect("a JSON frame");
            match frame["type"].as_str() {
                Some("event") => self.events.borrow_mut().push(frame),
                Some("subscribed") => {}
                _ => return, // an error: the database is away; subscribe again
            }
        }
    }

    fn last(&self) -> i64 {
        self.events.borrow().last().map_or(0, |e| e["event_id"].as_i64().expect("an event id"))
    }

    /// Waits until it has received event `n`.
    async fn wait_for(&self, n: i64) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.last() < n {
            assert!(tokio::time::Instant::now() < deadline, "the subscriber got up to event {} of {n}", self.last());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Asserts the daemon's answer to a write while the database is down.
/// The ids of the acknowledged answers; every other answer must be a clean
/// 503 (never a 500, never a hang).
fn acked_ids(answers: &[Answer]) -> BTreeSet<String> {
    answers
        .iter()
        .filter_map(|answer| {
            if answer.status == StatusCode::ACCEPTED {
                return Some(answer.body["message_id"].as_str().expect("an ack carries the id").to_owned());
            }
            assert_unavailable(answer);
            None
        })
        .collect()
}

fn assert_unavailable(answer: &Answer) {
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{answer:?}");
    assert_eq!(answer.body["error"]["code"], "unavailable", "{answer:?}");
    assert!(answer.retry_after.as_deref().is_some_and(|s| s.parse::<u64>().is_ok()), "Retry-After: {answer:?}");
}

#[actix_web::test]
async fn a_database_outage_answers_503_loses_nothing_and_the_daemon_recovers_by_itself() {
    let pg = ScratchPg::start();
    let app = spawn_app_on(&pg.url(), |_| {}).await;
    let tag = Uuid::now_v7().simple().to_string();
    let creators: Vec<String> = (0..3).map(|k| format!("creator-outage-{k}")).collect();
    let subscriber = Subscriber::start(&app, &creators[0]);
    let stream = Stream::start(&app, 4, &creators, &tag);

    for (round, mode) in ["immediate", "fast"].into_iter().enumerate() {
        // Mid-stream: the pipeline has work in flight when the server goes.
        stream.wait_for(stream.len(), 50, StatusCode::ACCEPTED).await;
        pg.down(mode).await;

        // Writes while it is down: 503 `unavailable` with Retry-After,
        // within the connect timeout (the client's own timeout is longer).
        let down_from = stream.len();
        let answer = write(&app.client, &app.address, &creators[0], "is anyone there", &format!("down{round}")).await;
        assert_unavailable(&answer);
        stream.wait_for(down_from, 4, StatusCode::SERVICE_UNAVAILABLE).await;
        let (status, body) = app.get("/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "not ready without a database: {body}");
        // Over the WebSocket: an error frame, and the connection stays open.
        let mut ws = app.connect_ws().await;
        let message = json!({"creator_id": creators[1], "text": "anyone?", "external_id": format!("ws-down{round}")});
        ws.send(&json!({"type": "ingest", "id": 7, "message": message})).await;
        let reply = ws.next_json().await;
        assert_eq!(
            (&reply["type"], &reply["id"], &reply["error"]["code"]),
            (&json!("error"), &json!(7), &json!("unavailable")),
            "{reply}"
        );
        ws.send(&json!({"type": "ping"})).await;
        assert_eq!(ws.next_json().await["type"], "pong");

        // Back on the same port and data: the daemon serves writes again by
        // itself, without a restart.
        pg.up_async().await;
        stream.wait_for(stream.len(), 50, StatusCode::ACCEPTED).await;
        let (status, body) = app.get("/readyz").await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let answers = stream.finish().await;

    // Every answer was an ack or a clean 503: never a 500, never a hang.
    let acked = acked_ids(&answers);
    let refused = answers.len() - acked.len();
    assert!(refused >= 8, "the stream met both outages: {refused} refused of {}", answers.len());

    // Every acknowledged message ends clustered exactly once; nothing was
    // marked failed for an outage; the event logs are whole.
    for id in &acked {
        app.wait_clustered(id).await;
    }
    for creator in &creators {
        let stored = app.count("messages", &format!("creator_id = '{creator}'")).await;
        app.wait_settled(creator, stored).await;
        let replayed = app.assert_cluster_invariants(creator).await;
        assert_eq!(replayed.events.len() as i64, stored, "{creator}: one event per message");
        if creator == &creators[0] {
            // The subscriber received the whole log, in order, each event
            // once, across both outages.
            subscriber.wait_for(stored).await;
            let received: Vec<Value> = subscriber.events.borrow().clone();
            let ids: Vec<i64> = received.iter().map(|e| e["event_id"].as_i64().expect("an id")).collect();
            assert_eq!(ids, (1..=stored).collect::<Vec<_>>(), "events 1..n, in order, once each");
            for (got, logged) in received.iter().zip(&replayed.events) {
                assert_eq!(got["message"]["id"], logged["message"]["id"], "the logged event, as logged");
            }
        }
    }
    let in_db = app.count("messages", "status = 'clustered'").await;
    assert_eq!(app.count("messages", "true").await, in_db, "every stored message is clustered, none failed");
    let acked_list: Vec<String> = acked.iter().map(|id| format!("'{id}'")).collect();
    assert_eq!(
        app.count("messages", &format!("id IN ({})", acked_list.join(","))).await,
        acked.len() as i64,
        "every acknowledged message is stored"
    );
    assert_eq!(
        app.count("(SELECT creator_id, external_id FROM messages GROUP BY 1, 2 HAVING count(*) > 1) AS d", "true")
            .await,
        0,
        "no message stored twice"
    );
}

/// A Redis server of this test's own (Debian's `redis-server`, which the
/// stack installs), on a reserved port so it can come back where the daemon
/// expects it; killed when dropped. Also used by `instances`.
pub struct ScratchRedis {
    port: ReservedPort,
    child: Option<Child>,
}

impl ScratchRedis {
    pub fn start() -> Self {
        let mut redis = Self { port: ReservedPort::new(), child: None };
        redis.up();
        redis
    }

    pub fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.port().to_string(), "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/stack.sh up installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + PATIENCE;
        while redis::Client::open(self.url()).and_then(|c| c.get_connection()).is_err() {
            assert!(std::time::Instant::now() < deadline, "the scratch redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it (SIGKILL): an outage, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL redis-server");
            child.wait().expect("redis-server exits");
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port.port())
    }

    async fn keys(&self) -> i64 {
        let client = redis::Client::open(self.url()).expect("a redis URL");
        let mut conn = client.get_multiplexed_async_connection().await.expect("redis accepts connections");
        redis::cmd("DBSIZE").query_async(&mut conn).await.expect("DBSIZE")
    }
}

impl Drop for ScratchRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Posts `n` messages with texts never seen before (cache misses that the
/// embedder writes to Redis); asserts every one is acknowledged.
async fn post_fresh(app: &TestApp, creator: &str, label: &str, n: usize) -> Vec<String> {
    let tag = Uuid::now_v7().simple().to_string();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(app.post_message(creator, &format!("{label} question {i} about the show {tag}")).await);
    }
    ids
}

#[actix_web::test]
async fn a_redis_outage_costs_the_cache_only_and_the_cache_returns_with_redis() {
    let mut redis = ScratchRedis::start();
    let url = redis.url();
    let db = crate::helpers::fresh_database().await;
    let app = spawn_app_on(&db, move |s| s.redis.url = Some(url.into())).await;
    let creator = "creator-redis-outage";
    let mut all = Vec::new();

    // Redis up: vectors are written there.
    let ids = post_fresh(&app, creator, "before", 10).await;
    for id in &ids {
        app.wait_clustered(id).await;
    }
    all.extend(ids);
    assert!(redis.keys().await >= 10, "the embedder wrote its vectors to Redis");
    assert_eq!(app.metric("clusterd_embed_cache_errors_total").await, 0.0);

    // Redis gone: every write is still acknowledged and clustered.
    redis.kill();
    let ids = post_fresh(&app, creator, "during", 10).await;
    for id in &ids {
        app.wait_clustered(id).await;
    }
    all.extend(ids);
    assert!(app.metric("clusterd_embed_cache_errors_total").await >= 1.0, "the outage shows on /metrics");

    // Redis back, empty, on the same port: the daemon uses it again.
    redis.up();
    assert_eq!(redis.keys().await, 0, "a fresh Redis");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while redis.keys().await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the daemon never wrote to Redis again");
        let ids = post_fresh(&app, creator, "after", 2).await;
        for id in &ids {
            app.wait_clustered(id).await;
        }
        all.extend(ids);
    }
    // Once it is back, Redis answers without errors.
    let errors = app.metric("clusterd_embed_cache_errors_total").await;
    let ids = post_fresh(&app, creator, "last", 3).await;
    for id in &ids {
        app.wait_clustered(id).await;
    }
    all.extend(ids);
    assert_eq!(app.metric("clusterd_embed_cache_errors_total").await, errors, "no Redis errors once it is back");
    assert_eq!(app.metric("clusterd_pipeline_errors_total{stage=\"embed\"}").await, 0.0);

    app.wait_settled(creator, all.len() as i64).await;
    app.assert_cluster_invariants(creator).await;
}

#[actix_web::test]
async fn a_database_that_hangs_answers_503_and_the_daemon_recovers_when_it_answers_again() {
    let pg = ScratchPg::start();
    // One commit slot, always busy under the stream: the freeze almost
    // surely catches a commit on the wire, which must not hold writes.
    let app = spawn_app_on(&pg.url(), |s| s.ingest.pool_size = 1).await;
    let tag = Uuid::now_v7().simple().to_string();
    let creators: Vec<String> = (0..3).map(|k| format!("creator-hang-{k}")).collect();
    let stream = Stream::start(&app, 8, &creators, &tag);

    stream.wait_for(0, 50, StatusCode::ACCEPTED).await;
    pg.signal("STOP");
    let hung_from = stream.len();
    let answer = write(&app.client, &app.address, &creators[0], "is anyone there", "hung").await;
    assert_unavailable(&answer);
    stream.wait_for(hung_from, 4, StatusCode::SERVICE_UNAVAILABLE).await;
    pg.signal("CONT");
    stream.wait_for(stream.len(), 50, StatusCode::ACCEPTED).await;
    let answers = stream.finish().await;

    let acked = acked_ids(&answers);
    for id in &acked {
        app.wait_clustered(id).await;
    }
    for creator in &creators {
        let stored = app.count("messages", &format!("creator_id = '{creator}'")).await;
        app.wait_settled(creator, stored).await;
        app.assert_cluster_invariants(creator).await;
    }
}

/// A daemon started while its database is down (as after a reboot, when
/// the services come up in any order) waits for it instead of exiting, and
/// serves once it is there.
#[actix_web::test]
async fn a_daemon_started_before_its_database_waits_for_it_and_then_serves() {
    let pg = ScratchPg::start();
    pg.down("fast").await;
    let mut command = clusterd_command(&pg.url());
    command.env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::piped());
    let mut daemon = Daemon::start(command);
    // Its log, line by line, read off the test's runtime.
    let (lines, mut log) = tokio::sync::mpsc::unbounded_channel();
    let stderr = daemon.child.stderr.take().expect("a piped stderr");
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let waiting = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = log.recv().await {
            if line.contains("the database is unavailable; waiting for it") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(waiting, Ok(true), "the daemon says it waits for the database");
    assert!(daemon.child.try_wait().expect("the daemon's status").is_none(), "the daemon exited instead of waiting");

    pg.up_async().await;
    // It binds its listener once it has its database.
    let port = daemon.port().await;
    let client = awc::Client::default();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let message = json!({"creator_id": "c1", "text": "are you open on sundays"});
        let answer = client.post(format!("http://127.0.0.1:{port}/v1/messages")).send_json(&message).await;
        if answer.is_ok_and(|r| r.status() == StatusCode::ACCEPTED) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the daemon did not serve once its database was up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.child.kill().expect("stop the daemon");
    daemon.child.wait().expect("the daemon exits");
}
