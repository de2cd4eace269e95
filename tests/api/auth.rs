//! Bearer tokens and scopes: every route and every WebSocket frame type,
//! walked with no token, a wrong token, a revoked token, another creator's
//! token and the other scopes, refuses with 401/403 (or an error frame) and
//! changes nothing; the right scopes get through. Also per-token rate
//! limits, revocation of a live WebSocket, and the `clusterd token` CLI.

use std::time::Duration;

use actix_web::http::{Method, StatusCode};
use awc::ws;
use clusterd::{
    domain::token::{self, Scope},
    repository::Repository,
    settings::Settings,
};
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

use crate::helpers::{Daemon, PATIENCE, TestApp, WsClient, clusterd_command, spawn_app_with};

/// Auth on, and every token looked up afresh (a revocation applies at once).
fn with_auth(settings: &mut Settings) {
    settings.auth.enabled = true;
    settings.auth.cache_ttl_ms = 0;
}

/// Stores a new token of `scope` in the app's database; returns its secret
/// and id.
async fn token_for(app: &TestApp, scope: Scope) -> (String, uuid::Uuid) {
    let (secret, hash) = token::generate();
    let id = Repository::new(app.db.clone()).create_token(&hash, &scope, "test").await.expect("store a token");
    (secret, id)
}

async fn request(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    send(app, method, path, token.map(|t| format!("Bearer {t}")), body).await
}

/// A request with this `Authorization` header (or none).
async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    authorization: Option<String>,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let mut request = app.client.request(method, format!("{}{path}", app.address));
    if let Some(authorization) = authorization {
        request = request.insert_header(("authorization", authorization));
    }
    let mut response = match body {
        Some(body) => request.send_json(body).await,
        None => request.send().await,
    }
    .expect("the server answers");
    let status = response.status();
    let bytes = response.body().limit(16 << 20).await.expect("a body");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// The cluster a message ends in, once the pipeline has flushed (read from
/// the database: the test's clients all need tokens).
async fn wait_cluster_of(app: &TestApp, message_id: &str) -> String {
    app.flush().await;
    let row = app
        .db
        .query_one_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT cluster_id::text AS c FROM messages WHERE id = $1::uuid AND status = 'clustered'",
            [message_id.into()],
        ))
        .await
        .expect("query");
    row.unwrap_or_else(|| panic!("message {message_id} is not clustered after a flush"))
        .try_get("", "c")
        .expect("a cluster id")
}

/// One token of each scope the walks use.
struct Tokens {
    admin: String,
    ingest: String,
    creator: String,
    /// Another creator's.
    other: String,
}

async fn tokens(app: &TestApp) -> Tokens {
    Tokens {
        admin: token_for(app, Scope::Admin).await.0,
        ingest: token_for(app, Scope::Ingest).await.0,
        creator: token_for(app, Scope::Creator(CREATOR.into())).await.0,
        other: token_for(app, Scope::Creator(OTHER.into())).await.0,
    }
}

/// Opens a WebSocket with the token in the header or the query string.
async fn connect(app: &TestApp, token: &str, in_query: bool) -> WsClient {
    let (url, header) = if in_query {
        (format!("ws://127.0.0.1:{}/v1/ws?token={token}", app.port), None)
    } else {
        (format!("ws://127.0.0.1:{}/v1/ws", app.port), Some(format!("Bearer {token}")))
    };
    let mut request = app.client.ws(url).max_frame_size(1 << 20);
    if let Some(header) = header {
        request = request.header("authorization", header);
    }
    let (_response, framed) = request.connect().await.expect("the WebSocket handshake succeeds");
    WsClient { framed }
}

/// A digest of every row the API can change: equal digests, nothing changed.
async fn fingerprint(app: &TestApp) -> String {
    app.fingerprint(&["messages", "clusters", "events", "creators", "api_tokens"]).await
}

/// The creator the walk is about, and its data.
const CREATOR: &str = "creator-a";
const OTHER: &str = "creator-b";

struct Fixture {
    /// Two messages of one cluster; the second can be moved out.
    first: String,
    second: String,
    shipping: String,
    gifts: String,
    hours: String,
}

async fn fixture(app: &TestApp, admin: &str) -> Fixture {
    let mut ids = Vec::new();
    for text in [
        "how much is shipping to canada",
        "how much is shipping to canada?",
        "do you sell gift cards",
        "what time do you open on sundays",
    ] {
        let (status, body) = request(
            app,
            Method::POST,
            "/v1/messages",
            Some(admin),
            Some(&json!({"creator_id": CREATOR, "text": text})),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        ids.push(body["message_id"].as_str().expect("an id").to_owned());
    }
    let mut clusters = Vec::new();
    for id in &ids {
        clusters.push(wait_cluster_of(app, id).await);
    }
    assert_eq!(clusters[0], clusters[1], "the two shipping questions share a cluster");
    assert!(clusters[1] != clusters[2] && clusters[2] != clusters[3], "{clusters:?}");
    Fixture {
        first: ids[0].clone(),
        second: ids[1].clone(),
        shipping: clusters[0].clone(),
        gifts: clusters[2].clone(),
        hours: clusters[3].clone(),
    }
}

/// One route with a body that would succeed for a caller allowed to use it.
struct Route {
    method: Method,
    path: String,
    body: Option<Value>,
}

impl Route {
    fn new(method: Method, path: String, body: Option<Value>) -> Self {
        Self { method, path, body }
    }
}

#[actix_web::test]
async fn every_route_refuses_missing_wrong_revoked_and_out_of_scope_tokens_and_changes_nothing() {
    let app = spawn_app_with(with_auth).await;
    let Tokens { admin, ingest, creator, other } = tokens(&app).await;
    let (revoked, revoked_id) = token_for(&app, Scope::Admin).await;
    Repository::new(app.db.clone()).revoke_token(revoked_id).await.expect("revoke");
    let (wrong, _) = token::generate(); // never stored
    let f = fixture(&app, &admin).await;

    let message = json!({"creator_id": CREATOR, "text": "is there a discount for students"});
    let ingest_routes = [
        Route::new(Method::POST, "/v1/messages".into(), Some(message.clone())),
        Route::new(Method::POST, "/v1/messages/batch".into(), Some(json!({"messages": [message.clone()]}))),
    ];
    let read_message = Route::new(Method::GET, format!("/v1/messages/{}", f.first), None);
    let creator_routes = [
        Route::new(Method::GET, format!("/v1/creators/{CREATOR}/clusters"), None),
        Route::new(Method::GET, format!("/v1/clusters/{}", f.shipping), None),
        Route::new(Method::POST, format!("/v1/messages/{}/move", f.second), Some(json!({"cluster_id": f.hours}))),
        Route::new(Method::DELETE, format!("/v1/clusters/{}/messages/{}", f.hours, f.second), None),
        Route::new(Method::POST, format!("/v1/clusters/{}/merge", f.hours), Some(json!({"cluster_ids": [f.gifts]}))),
        Route::new(
            Method::POST,
            format!("/v1/clusters/{}/action", f.shipping),
            Some(json!({"response_text": "5 EUR"})),
        ),
    ];
    let admin_routes = [
        Route::new(Method::POST, "/v1/admin/messages/retry".into(), Some(json!({}))),
        Route::new(Method::GET, "/metrics".into(), None),
    ];
    let ws_route = Route::new(Method::GET, "/v1/ws".into(), None);
    let unknown_route = Route::new(Method::GET, "/v1/nothing-here".into(), None);

    // Who is refused where, and how: `Authorization` header values that
    // authenticate nobody, then valid tokens of the wrong scope.
    let bearer = |t: &str| Some(format!("Bearer {t}"));
    let unauthenticated = [
        None,
        bearer(&wrong),
        bearer(&revoked),
        Some("Basic Zm9vOmJhcg==".to_owned()),
        bearer(""),
        Some(wrong.clone()),
    ];
    let mut cases: Vec<(&Route, Option<String>, StatusCode)> = Vec::new();
    let every_route = ingest_routes
        .iter()
        .chain([&read_message])
        .chain(&creator_routes)
        .chain(&admin_routes)
        .chain([&ws_route, &unknown_route]);
    for route in every_route {
        for authorization in &unauthenticated {
            cases.push((route, authorization.clone(), StatusCode::UNAUTHORIZED));
        }
    }
    for route in &ingest_routes {
        for token in [&creator, &other] {
            cases.push((route, bearer(token), StatusCode::FORBIDDEN));
        }
    }
    cases.push((&read_message, bearer(&other), StatusCode::FORBIDDEN));
    for route in &creator_routes {
        for token in [&ingest, &other] {
            cases.push((route, bearer(token), StatusCode::FORBIDDEN));
        }
    }
    for route in &admin_routes {
        for token in [&ingest, &creator, &other] {
            cases.push((route, bearer(token), StatusCode::FORBIDDEN));
        }
    }

    let before = fingerprint(&app).await;
    for (route, authorization, expected) in &cases {
        let (status, body) =
            send(&app, route.method.clone(), &route.path, authorization.clone(), route.body.as_ref()).await;
        let what = format!("{} {} with {authorization:?}", route.method, route.path);
        assert_eq!(status, *expected, "{what}: {body}");
        let code = if *expected == StatusCode::UNAUTHORIZED { "unauthorized" } else { "forbidden" };
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
        assert_eq!(fingerprint(&app).await, before, "{what} changed something");
    }
    assert!(cases.len() > 80, "the walk covers {} cases", cases.len());

    // Probes stay open to everyone.
    for path in ["/healthz", "/readyz"] {
        let (status, _) = request(&app, Method::GET, path, None, None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }

    // The narrowest scope that may use each route gets through, in an
    // order where each operation still applies.
    for route in &ingest_routes {
        let (status, body) = request(&app, route.method.clone(), &route.path, Some(&ingest), route.body.as_ref()).await;
        assert!(status.is_success(), "{} {}: {status} {body}", route.method, route.path);
    }
    for token in [&ingest, &creator] {
        let (status, body) = request(&app, Method::GET, &read_message.path, Some(token), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    for route in &creator_routes {
        let (status, body) =
            request(&app, route.method.clone(), &route.path, Some(&creator), route.body.as_ref()).await;
        assert_eq!(status, StatusCode::OK, "{} {}: {body}", route.method, route.path);
    }
    for route in &admin_routes {
        let (status, _) = request(&app, route.method.clone(), &route.path, Some(&admin), route.body.as_ref()).await;
        assert_eq!(status, StatusCode::OK, "{} {}", route.method, route.path);
    }
    let (status, body) = request(&app, Method::GET, &unknown_route.path, Some(&creator), None).await;
    assert_eq!((status, &body["error"]["code"]), (StatusCode::NOT_FOUND, &json!("not_found")), "{body}");
}

/// Every frame type a client can send, for a given fixture.
fn frames(f: &Fixture) -> Vec<(&'static str, Value)> {
    vec![
        ("subscribe", json!({"type": "subscribe", "id": 1, "creator_id": CREATOR})),
        (
            "ingest",
            json!({"type": "ingest", "id": 2, "message": {"creator_id": CREATOR, "text": "do you ship to mars"}}),
        ),
        ("move", json!({"type": "move", "id": 3, "message_id": f.second, "cluster_id": f.hours})),
        ("remove", json!({"type": "remove", "id": 4, "cluster_id": f.hours, "message_id": f.second})),
        ("merge", json!({"type": "merge", "id": 5, "cluster_id": f.hours, "cluster_ids": [f.gifts]})),
        ("action", json!({"type": "action", "id": 6, "cluster_id": f.shipping, "response_text": "5 EUR"})),
    ]
}

#[actix_web::test]
async fn every_websocket_frame_is_checked_against_the_connection_token() {
    let app = spawn_app_with(with_auth).await;
    let Tokens { admin, ingest, creator, other } = tokens(&app).await;
    let f = fixture(&app, &admin).await;
    let before = fingerprint(&app).await;

    // Which frame types each token may not send.
    let refused: [(&str, &str, &[&str]); 3] = [
        ("other creator", &other, &["subscribe", "ingest", "action", "remove", "merge", "move"]),
        ("ingest", &ingest, &["subscribe", "action", "remove", "merge", "move"]),
        ("creator", &creator, &["ingest"]),
    ];
    for (who, token, kinds) in refused {
        for in_query in [false, true] {
            let mut ws = connect(&app, token, in_query).await;
            for (kind, frame) in frames(&f).into_iter().filter(|(kind, _)| kinds.contains(kind)) {
                ws.send(&frame).await;
                let reply = ws.next_json().await;
                assert_eq!(reply["type"], "error", "{who} {kind}: {reply}");
                assert_eq!(reply["error"]["code"], "forbidden", "{who} {kind}: {reply}");
                assert_eq!(reply["id"], frame["id"], "{who} {kind}: {reply}");
            }
            // The connection stays open and answers what the token may do.
            ws.send(&json!({"type": "ping", "id": "p"})).await;
            assert_eq!(ws.next_json().await, json!({"type": "pong", "id": "p"}));
            // Unsubscribing from what was never subscribed changes nothing.
            ws.send(&json!({"type": "unsubscribe", "creator_id": CREATOR})).await;
            assert_eq!(ws.next_json().await["type"], "unsubscribed");
        }
        assert_eq!(fingerprint(&app).await, before, "{who}'s refused frames changed something");
    }

    // The creator's token subscribes and acts; the ingest token ingests.
    let mut dashboard = connect(&app, &creator, true).await;
    let subscribed = dashboard.subscribe(CREATOR, Some(0)).await;
    let last = subscribed["last_event_id"].as_i64().expect("an event id");
    assert_eq!(dashboard.events(usize::try_from(last).expect("positive")).await.len(), 4);
    let mut integration = connect(&app, &ingest, false).await;
    let mars = integration.ingest(CREATOR, "do you ship to mars").await;
    assert_eq!(dashboard.events(1).await[0]["message"]["id"], mars.as_str());
    for (kind, frame) in frames(&f).into_iter().skip(2) {
        dashboard.send(&frame).await;
        let reply = loop {
            let frame = dashboard.next_json().await;
            if frame["type"] != "event" {
                break frame;
            }
        };
        assert_eq!(reply["type"], "result", "{kind}: {reply}");
    }
    assert_ne!(fingerprint(&app).await, before);
}

#[actix_web::test]
async fn a_revoked_token_is_refused_at_once_and_its_open_websocket_is_closed() {
    let app = spawn_app_with(|s| {
        with_auth(s);
        s.ws.heartbeat_interval_ms = 100;
    })
    .await;
    let (admin, _) = token_for(&app, Scope::Admin).await;
    let (creator, creator_id) = token_for(&app, Scope::Creator(CREATOR.into())).await;
    let (status, _) =
        request(&app, Method::GET, &format!("/v1/creators/{CREATOR}/clusters"), Some(&creator), None).await;
    assert_eq!(status, StatusCode::OK);
    let mut idle = connect(&app, &creator, false).await;
    idle.subscribe(CREATOR, None).await;

    // Revoked through the command line, like an operator would.
    let output = clusterd_command(&database_url(&app).await)
        .args(["token", "revoke", &creator_id.to_string()])
        .output()
        .expect("the CLI runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let (status, body) =
        request(&app, Method::GET, &format!("/v1/creators/{CREATOR}/clusters"), Some(&creator), None).await;
    assert_eq!((status, &body["error"]["code"]), (StatusCode::UNAUTHORIZED, &json!("unauthorized")), "{body}");
    // The live subscription ends with 1008 (policy violation).
    match idle.next_frame().await {
        ws::Frame::Close(reason) => assert_eq!(reason.map(|r| r.code), Some(ws::CloseCode::Policy)),
        other => panic!("a revoked token's stream got {other:?}"),
    }
    // The admin token was never affected.
    let (status, _) = request(&app, Method::GET, &format!("/v1/creators/{CREATOR}/clusters"), Some(&admin), None).await;
    assert_eq!(status, StatusCode::OK);
}

/// The database URL the app under test uses.
async fn database_url(app: &TestApp) -> String {
    let row = app
        .db
        .query_one_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, "SELECT current_database() AS d"))
        .await
        .expect("query")
        .expect("a row");
    let name: String = row.try_get("", "d").expect("a name");
    let admin = crate::helpers::admin_url();
    format!("{}/{name}", admin.rsplit_once('/').expect("a URL with a database").0)
}

#[actix_web::test]
async fn the_token_cli_creates_lists_and_revokes_and_stores_only_hashes() {
    let app = spawn_app_with(with_auth).await;
    let url = database_url(&app).await;
    let cli = |args: &[&str]| {
        let output = clusterd_command(&url).args(args).output().expect("the CLI runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cli(&["token", "create", "--creator", CREATOR, "--name", "dashboard"]);
    assert!(ok, "{err}");
    let secret = out.lines().last().expect("the token is the last line").to_owned();
    assert!(secret.starts_with("cd_"), "{out}");
    let (ok, out, _) = cli(&["token", "create", "--scope", "ingest"]);
    assert!(ok);
    let ingest = out.lines().last().expect("a token").to_owned();

    // Only hashes are stored: the secrets appear nowhere in the table.
    let dump = fingerprint_text(&app).await;
    assert!(!dump.contains(&secret) && !dump.contains(&ingest));
    let (ok, out, _) = cli(&["token", "list"]);
    assert!(ok);
    assert!(
        out.contains(&format!("creator:{CREATOR}")) && out.contains("ingest") && out.contains("dashboard"),
        "{out}"
    );
    assert!(!out.contains(&secret));

    let (status, _) =
        request(&app, Method::GET, &format!("/v1/creators/{CREATOR}/clusters"), Some(&secret), None).await;
    assert_eq!(status, StatusCode::OK);
    let id = out.lines().find(|l| l.contains("dashboard")).and_then(|l| l.split_whitespace().next()).expect("an id");
    let (ok, _, err) = cli(&["token", "revoke", id]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&["token", "revoke", id]);
    assert!(!ok && err.contains("no active token"), "revoking twice fails: {err}");
    let (status, _) =
        request(&app, Method::GET, &format!("/v1/creators/{CREATOR}/clusters"), Some(&secret), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Bad invocations fail with a clear message and create nothing.
    let count = || app.count("api_tokens", "true");
    let tokens = count().await;
    for args in
        [&["token", "create"][..], &["token", "create", "--scope", "root"], &["token", "create", "--creator", "a b"]]
    {
        let (ok, _, err) = cli(args);
        assert!(!ok && !err.is_empty(), "{args:?}");
    }
    assert_eq!(count().await, tokens);
}

async fn fingerprint_text(app: &TestApp) -> String {
    let row = app
        .db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT coalesce(string_agg(t::text || encode(t.hash, 'escape'), '|'), '') AS d FROM api_tokens t",
        ))
        .await
        .expect("query")
        .expect("a row");
    row.try_get("", "d").expect("text")
}

#[actix_web::test]
async fn a_token_past_its_rate_limit_gets_429_and_others_are_unaffected() {
    let app = spawn_app_with(|s| {
        with_auth(s);
        // One request per thousand seconds after a burst of 5: the limit
        // cannot refill while the test runs.
        s.auth.rate_per_sec = 0.001;
        s.auth.rate_burst = 5;
        s.limits.max_batch = 5;
    })
    .await;
    let (busy, _) = token_for(&app, Scope::Ingest).await;
    let (calm, _) = token_for(&app, Scope::Ingest).await;
    let message = json!({"creator_id": CREATOR, "text": "is there a discount for students"});
    // A batch of 3 spends 3; two single messages spend the rest.
    let batch = json!({"messages": [message, message, message]});
    let (status, body) = request(&app, Method::POST, "/v1/messages/batch", Some(&busy), Some(&batch)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let mut ids: Vec<String> = body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["message_id"].as_str().expect("an id").to_owned())
        .collect();
    for _ in 0..2 {
        let (status, body) = request(&app, Method::POST, "/v1/messages", Some(&busy), Some(&message)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        ids.push(body["message_id"].as_str().expect("an id").to_owned());
    }
    for id in &ids {
        wait_cluster_of(&app, id).await;
    }
    let before = fingerprint(&app).await;
    let mut response = app
        .client
        .post(format!("{}/v1/messages", app.address))
        .bearer_auth(&busy)
        .send_json(&message)
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert_eq!(fingerprint(&app).await, before);

    // Another token has its own budget, over HTTP and WebSocket alike.
    let (status, _) = request(&app, Method::POST, "/v1/messages", Some(&calm), Some(&message)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let mut ws = connect(&app, &calm, false).await; // the handshake spends one
    let mut refused = 0;
    for i in 0..5 {
        ws.send(&json!({"type": "ping", "id": i})).await;
        let reply = ws.next_json().await;
        match reply["type"].as_str() {
            Some("pong") => {}
            Some("error") => {
                assert_eq!(reply["error"]["code"], "rate_limited", "{reply}");
                assert_eq!(reply["id"], i, "{reply}");
                refused += 1;
            }
            _ => panic!("{reply}"),
        }
    }
    assert_eq!(refused, 2, "5 - 1 request - 1 handshake = 3 frames pass");
}

/// Starts the real binary with auth `enabled` until it is ready, stops it,
/// and returns what it logged.
async fn daemon_log(enabled: bool) -> String {
    let db_url = crate::helpers::fresh_database().await;
    let mut command = clusterd_command(&db_url);
    command
        .env("CLUSTERD__AUTH__ENABLED", enabled.to_string())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut daemon = Daemon::start(command);
    let port = daemon.port().await;
    let client = awc::Client::default();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !client
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status() == StatusCode::OK)
    {
        assert!(tokio::time::Instant::now() < deadline, "the daemon did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.child.kill().expect("stop the daemon");
    daemon.child.wait().expect("the daemon exits");
    let mut log = String::new();
    let mut stderr = daemon.child.stderr.take().expect("a piped stderr");
    std::io::Read::read_to_string(&mut stderr, &mut log).expect("the daemon's log");
    log
}

#[actix_web::test]
async fn the_daemon_warns_loudly_when_auth_is_off_and_only_then() {
    let off = daemon_log(false).await;
    assert!(off.contains("WARN") && off.contains("AUTHENTICATION IS OFF"), "{off}");
    let on = daemon_log(true).await;
    assert!(!on.contains("AUTHENTICATION IS OFF"), "{on}");
}
