//! `spawn_app()` and typed helpers shared by the integration tests.

use std::time::Duration;

use actix_web::http::StatusCode;
use awc::ws;
use clusterd::{settings::Settings, startup::Application};
use futures_util::{SinkExt, StreamExt};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use serde_json::{Value, json};

/// How long a test waits for something the pipeline does asynchronously.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub struct TestApp {
    pub port: u16,
    pub address: String,
    pub client: awc::Client,
    /// A connection to this test's own database, for assertions.
    pub db: DatabaseConnection,
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

/// The test settings (`config/test.toml`) pointed at `db_url`.
pub fn test_settings(db_url: &str) -> Settings {
    let mut settings = Settings::load_from(std::path::Path::new("config"), Some("test")).expect("test settings load");
    settings.database.url = db_url.to_owned().into();
    settings.server.bind = "127.0.0.1:0".parse().expect("a valid address");
    settings
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
    actix_web::rt::spawn(app.run_until_stopped());
    let db = Database::connect(&db_url).await.expect("connect to the test database");
    TestApp {
        port,
        address: format!("http://127.0.0.1:{port}"),
        client: awc::Client::builder().timeout(Duration::from_secs(30)).finish(),
        db,
    }
}

impl TestApp {
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

    /// Waits until the message is clustered; returns the message object.
    pub async fn wait_clustered(&self, message_id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let (status, message) = self.get(&format!("/v1/messages/{message_id}")).await;
            assert_eq!(status, StatusCode::OK, "{message}");
            if message["status"] == "clustered" {
                return message;
            }
            assert!(tokio::time::Instant::now() < deadline, "message {message_id} not clustered in time: {message}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

    /// Waits until the message reaches `status`; returns the message object.
    pub async fn wait_status(&self, message_id: &str, status: &str) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let (code, message) = self.get(&format!("/v1/messages/{message_id}")).await;
            assert_eq!(code, StatusCode::OK, "{message}");
            if message["status"] == status {
                return message;
            }
            assert!(tokio::time::Instant::now() < deadline, "message {message_id} not {status} in time: {message}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
        loop {
            let frame = tokio::time::timeout(PATIENCE, self.framed.next())
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
