//! Hostile input, field by field, for every request and every WebSocket
//! frame type: wrong types, missing and extra fields, empty, huge and
//! deeply nested values, invalid UTF-8, NUL, control and zero-width
//! characters, emoji, right-to-left text, injection strings, huge batches.
//!
//! Each case is either refused with its error, and then nothing at all has
//! changed in the database (every row of messages, clusters, events and
//! creators, compared before and after), or accepted and stored exactly as
//! sent, read back through the API. `docs/api.md` ("Input rules") lists
//! what is accepted and what is refused.

use actix_http::ws::Item;
use actix_web::{
    http::{Method, StatusCode},
    web::Bytes,
};
use awc::ws;
use chrono::{DateTime, Utc};
use futures_util::SinkExt;
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

use crate::helpers::{TestApp, WsClient, spawn_app};

const BAD: StatusCode = StatusCode::BAD_REQUEST;
const NOT_FOUND: StatusCode = StatusCode::NOT_FOUND;
const TOO_LARGE: StatusCode = StatusCode::PAYLOAD_TOO_LARGE;
const CONFLICT: StatusCode = StatusCode::CONFLICT;
/// `limits.max_frame_bytes` in the test config.
const MAX_FRAME_BYTES: usize = 65_536;

/// What the server must do with a case.
#[derive(Debug, Clone)]
enum Expect {
    /// Refused with this status and error code; nothing changes.
    Refused(StatusCode, &'static str),
    /// Accepted and stored exactly as sent.
    Stored,
    /// Accepted, and the field reads back as this (a documented
    /// normalisation: an empty visitor is no visitor, `sent_at` is an
    /// instant in UTC to the microsecond).
    StoredAs(Value),
}
use Expect::{Refused, Stored, StoredAs};

fn invalid() -> Expect {
    Refused(BAD, "invalid_request")
}

/// Every row of the tables a request could change, with counts for a
/// readable failure.
#[derive(Debug, PartialEq, Eq)]
struct World {
    messages: i64,
    clusters: i64,
    events: i64,
    creators: i64,
    /// A digest of every row of those tables.
    rows: String,
}

async fn world(app: &TestApp) -> World {
    let count = |table| app.count(table, "true");
    World {
        messages: count("messages").await,
        clusters: count("clusters").await,
        events: count("events").await,
        creators: count("creators").await,
        rows: app.fingerprint(&["messages", "clusters", "events", "creators"]).await,
    }
}

/// Flushes the pipeline, then checks that no message is `pending` or
/// `embedded` and none failed: whatever was accepted also goes through the
/// pipeline.
async fn settle(app: &TestApp) {
    app.flush().await;
    assert_eq!(app.count("messages", "status IN ('pending', 'embedded')").await, 0, "messages still unfinished");
    assert_eq!(app.count("messages", "status <> 'clustered'").await, 0, "an accepted message failed");
}

// ---------------------------------------------------------------------------
// The message fields: POST /v1/messages, batch items, WebSocket `ingest`.

/// One field of a message, set to a value (`None`: removed) on top of a
/// valid message.
struct FieldCase {
    field: &'static str,
    value: Option<Value>,
    expect: Expect,
}

fn case(field: &'static str, value: Value, expect: Expect) -> FieldCase {
    FieldCase { field, value: Some(value), expect }
}

fn deep_array(levels: usize) -> Value {
    (0..levels).fold(json!("bottom"), |inner, _| json!([inner]))
}

/// Text that mixes everything a text may hold: controls, zero-width and
/// bidi characters, emoji sequences, combining marks, injection strings.
const HOSTILE_TEXTS: &[&str] = &[
    "\u{1}\u{7}\u{8}\u{1b}[31mred\u{1b}[0m\u{7f}\u{85}\r\n",
    "\u{200B}\u{200C}\u{200D}\u{2060}\u{FEFF}",
    "zero\u{200B}width\u{FEFF}joiner",
    "👩‍👩‍👧‍👦🏳️‍🌈🇫🇷👍🏽 ✨",
    "مرحبا بالعالم \u{202E}txt.exe\u{202C} שלום",
    "e\u{301} vs é, ﬁ ligature, Ǆ, ß, İ",
    "'; DROP TABLE messages; --",
    "\" OR 1=1; -- \\' \\x00 \\u0000 %00 %s %n {{7*7}} ${jndi:ldap://x}",
    "\", \"creator_id\": \"victim\", \"x\": \"",
    "{\"$gt\": \"\"} </script><script>alert(1)</script>",
    "\\",
    "𝕳𝖊𝖑𝖑𝖔 \u{10FFFF} \u{E000}",
];

fn message_cases() -> Vec<FieldCase> {
    let mut cases = vec![
        // The whole body.
        case("", json!([]), invalid()),
        case("", json!(["hostile", "positional"]), invalid()),
        case("", json!("text"), invalid()),
        case("", json!(5), invalid()),
        case("", json!(null), invalid()),
        case("", json!({}), invalid()),
        // Extra fields: a typo must not pass, nor a server-owned field.
        case("extrnal_id", json!("typo"), invalid()),
        case("id", json!("0190b5a0-0000-7000-8000-000000000000"), invalid()),
        case("status", json!("clustered"), invalid()),
        case("cluster_id", json!("0190b5a0-0000-7000-8000-000000000000"), invalid()),
        case("received_at", json!("2026-11-25T10:00:00Z"), invalid()),
        case("embedding", json!([0.1, 0.2]), invalid()),
        // creator_id
        FieldCase { field: "creator_id", value: None, expect: invalid() },
        case("creator_id", json!(null), invalid()),
        case("creator_id", json!(5), invalid()),
        case("creator_id", json!(["c"]), invalid()),
        case("creator_id", json!({"id": "c"}), invalid()),
        case("creator_id", json!(true), invalid()),
        case("creator_id", json!(""), invalid()),
        case("creator_id", json!("a".repeat(129)), invalid()),
        case("creator_id", json!("a".repeat(128)), Stored),
        case("creator_id", json!("A-z_0.9:-"), Stored),
        case("creator_id", json!("a\u{0}b"), invalid()),
        case("creator_id", json!("a\u{1}b"), invalid()),
        case("creator_id", json!("a\u{200B}b"), invalid()),
        case("creator_id", json!("crème"), invalid()),
        case("creator_id", json!("🎉"), invalid()),
        case("creator_id", json!("\u{202E}abc"), invalid()),
        case("creator_id", json!("a b"), invalid()),
        case("creator_id", json!("a/../b"), invalid()),
        case("creator_id", json!("'; DROP TABLE messages; --"), invalid()),
        // text
        FieldCase { field: "text", value: None, expect: invalid() },
        case("text", json!(null), invalid()),
        case("text", json!(5), invalid()),
        case("text", json!(["a"]), invalid()),
        case("text", json!({"$ne": null}), invalid()),
        case("text", json!(""), invalid()),
        case("text", json!(" \n\t\r "), invalid()),
        case("text", json!("\u{3000}\u{2003}\u{85}"), invalid()),
        case("text", json!("a\u{0}b"), invalid()),
        case("text", json!("\u{0}"), invalid()),
        case("text", json!("x".repeat(4001)), Refused(TOO_LARGE, "payload_too_large")),
        case("text", json!("🎉".repeat(4001)), Refused(TOO_LARGE, "payload_too_large")),
        case("text", json!("x".repeat(1 << 20)), Refused(TOO_LARGE, "payload_too_large")),
        case("text", json!("é".repeat(4000)), Stored),
        case("text", json!("🎉".repeat(4000)), Stored),
        case("text", json!("  padded, kept as sent  "), Stored),
        // external_id
        case("external_id", json!(null), Stored),
        case("external_id", json!(5), invalid()),
        case("external_id", json!(["e"]), invalid()),
        case("external_id", json!(""), invalid()),
        case("external_id", json!("e".repeat(257)), invalid()),
        case("external_id", json!("e".repeat(256)), Stored),
        case("external_id", json!("e\u{0}"), invalid()),
        case("external_id", json!("e\u{1}"), invalid()),
        case("external_id", json!("e\t1"), invalid()),
        case("external_id", json!("e\n1"), invalid()),
        case("external_id", json!("e\u{200B}1 🎉 مرحبا"), Stored),
        case("external_id", json!(" '; DROP TABLE messages; -- "), Stored),
        // visitor
        case("visitor", json!(null), Stored),
        case("visitor", json!({}), StoredAs(json!(null))),
        case("visitor", json!({"id": null, "name": null, "avatar_url": null}), StoredAs(json!(null))),
        case("visitor", json!("v-1"), invalid()),
        case("visitor", json!(5), invalid()),
        case("visitor", json!(["v-1", "Ana", "https://example.com/a.png"]), invalid()),
        case("visitor", json!({"nick": "x"}), invalid()),
        case("visitor", json!({"id": "v", "id2": "w"}), invalid()),
        case("visitor.id", json!(5), invalid()),
        case("visitor.id", json!({}), invalid()),
        case("visitor.id", json!(""), Stored),
        case("visitor.id", json!("v\u{0}"), invalid()),
        case("visitor.id", json!("v".repeat(257)), invalid()),
        case("visitor.id", json!("v".repeat(256)), Stored),
        case("visitor.id", json!("v\u{1}\u{200B}🎉 '; --"), Stored),
        case("visitor.name", json!(["Ana"]), invalid()),
        case("visitor.name", json!("Ana\u{0}"), invalid()),
        case("visitor.name", json!("n".repeat(257)), invalid()),
        case("visitor.name", json!("🎉".repeat(256)), Stored),
        case("visitor.name", json!("\u{202E}anA\u{202C} مرحبا \u{200D}\u{7}"), Stored),
        case("visitor.name", json!("<img src=x onerror=alert(1)>"), Stored),
        case("visitor.avatar_url", json!(5), invalid()),
        case("visitor.avatar_url", json!(""), invalid()),
        case("visitor.avatar_url", json!("javascript:alert(1)"), invalid()),
        case("visitor.avatar_url", json!("data:image/png;base64,iVBORw0KGgo="), invalid()),
        case("visitor.avatar_url", json!("//cdn.example.com/a.png"), invalid()),
        case("visitor.avatar_url", json!("https://"), invalid()),
        case("visitor.avatar_url", json!("https://a b/c.png"), invalid()),
        case("visitor.avatar_url", json!("https://a/\u{0}.png"), invalid()),
        case("visitor.avatar_url", json!("https://a/\n.png"), invalid()),
        case("visitor.avatar_url", json!(format!("https://a/{}", "x".repeat(2040))), invalid()),
        case("visitor.avatar_url", json!(format!("https://a/{}", "x".repeat(2038))), Stored),
        case("visitor.avatar_url", json!("HTTPS://cdn.example.com/ä/🎉.png?q='--&x=\"y\"#f"), Stored),
        case("visitor.avatar_url", json!("http://[::1]:8080/a.png"), Stored),
        // raw_payload: any JSON, kept as a JSON value.
        case("raw_payload", json!(null), Stored),
        case("raw_payload", json!(5), Stored),
        case("raw_payload", json!("str \u{1} 🎉 \u{202E}"), Stored),
        case("raw_payload", json!([]), Stored),
        case("raw_payload", json!({}), Stored),
        case(
            "raw_payload",
            json!({"big": 12345678901234567890u64, "neg": -9223372036854775808i64, "f": 1.5e300, "tiny": 5e-324,
                   "zero": -0.0, "digits": 0.30000000000000004, "t": true, "n": null, "": "empty key",
                   "'; DROP TABLE messages; --": {"$where": "1"}, "\u{200B}🎉": ["\u{7f}", "\\u0000"]}),
            Stored,
        ),
        // The nearest f64 of each: the default parser of serde_json was 2 ULP
        // off for the first (found by the ws_frame fuzz target).
        case("raw_payload", json!([1.3333333333333337, 0.1, 2.2250738585072014e-308, 1.7976931348623157e308]), Stored),
        case("raw_payload", deep_array(32), Stored),
        case("raw_payload", deep_array(33), invalid()),
        case("raw_payload", json!({"k": "nul\u{0}"}), invalid()),
        case("raw_payload", json!({"nul\u{0}key": 1}), invalid()),
        case("raw_payload", json!([[[["\u{0}"]]]]), invalid()),
        case("raw_payload", json!({"blob": "x".repeat(64 * 1024)}), Refused(TOO_LARGE, "payload_too_large")),
        // sent_at
        case("sent_at", json!(null), Stored),
        case("sent_at", json!(5), invalid()),
        case("sent_at", json!(1764064800), invalid()),
        case("sent_at", json!({"$date": "2026-11-25T10:00:00Z"}), invalid()),
        case("sent_at", json!(""), invalid()),
        case("sent_at", json!("yesterday"), invalid()),
        case("sent_at", json!("2026-11-25"), invalid()),
        case("sent_at", json!("2026-11-25T10:00:00"), invalid()),
        case("sent_at", json!("2026-13-01T00:00:00Z"), invalid()),
        case("sent_at", json!("2026-02-30T00:00:00Z"), invalid()),
        case("sent_at", json!("2026-11-25T10:00:00Z\u{0}"), invalid()),
        case("sent_at", json!(" 2026-11-25T10:00:00Z"), invalid()),
        case("sent_at", json!("2016-12-31T23:59:60Z"), invalid()),
        case("sent_at", json!("0000-01-01T00:00:00Z"), invalid()),
        case("sent_at", json!("9999-12-31T23:59:59-01:00"), invalid()),
        case("sent_at", json!("0000-01-01T00:00:00+01:00"), invalid()),
        case("sent_at", json!("2016-12-31T23:59:60.5Z"), invalid()),
        case("sent_at", json!("2026-11-25T10:00:00Z"), Stored),
        case("sent_at", json!("1970-01-01T00:00:00Z"), Stored),
        case("sent_at", json!("0001-01-01T00:00:00Z"), Stored),
        case("sent_at", json!("9999-12-31T23:59:59.999999Z"), Stored),
        case("sent_at", json!("2026-11-25T10:00:00+01:00"), StoredAs(json!("2026-11-25T09:00:00Z"))),
        case("sent_at", json!("2026-11-25t10:00:00.5z"), StoredAs(json!("2026-11-25T10:00:00.5Z"))),
        case("sent_at", json!("2026-11-25T10:00:00.123456789Z"), StoredAs(json!("2026-11-25T10:00:00.123456Z"))),
    ];
    for text in HOSTILE_TEXTS {
        cases.push(case("text", json!(text), Stored));
    }
    cases
}

/// A valid message with the case applied. `creator` keeps each transport's
/// messages apart, so that the same `external_id` is no duplicate.
fn message_body(creator: &str, case: &FieldCase) -> Value {
    let mut body = json!({"creator_id": creator, "text": "a perfectly ordinary question"});
    let field = case.field;
    if field.is_empty() {
        return case.value.clone().expect("a whole-body case has a body");
    }
    let (object, key) = match field.split_once('.') {
        Some((parent, key)) => {
            if !body[parent].is_object() {
                body[parent] = json!({});
            }
            (&mut body[parent], key)
        }
        None => (&mut body, field),
    };
    let object = object.as_object_mut().expect("an object");
    match &case.value {
        Some(value) => object.insert(key.to_owned(), value.clone()),
        None => object.remove(key),
    };
    body
}

/// Reads the message back through the API (and its `raw_payload` from the
/// database: the API does not show it) and compares every field with what
/// was sent, byte for byte, but for the case's documented normalisation.
async fn assert_stored(app: &TestApp, id: &str, sent: &Value, case: &FieldCase) {
    let what = format!("{} = {:?}", case.field, case.value);
    let (status, got) = app.get(&format!("/v1/messages/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{what}: {got}");
    let or_null = |v: &Value| if v.is_null() { Value::Null } else { v.clone() };
    assert_eq!(got["creator_id"], sent["creator_id"], "{what}");
    assert_eq!(got["text"].as_str().map(str::as_bytes), sent["text"].as_str().map(str::as_bytes), "{what}");
    assert_eq!(got["external_id"], or_null(&sent["external_id"]), "{what}");
    let visitor = match &sent["visitor"] {
        Value::Null => Value::Null,
        v => json!({"id": v["id"], "name": v["name"], "avatar_url": v["avatar_url"]}),
    };
    let visitor = if case.field == "visitor" && matches!(case.expect, StoredAs(_)) { Value::Null } else { visitor };
    assert_eq!(got["visitor"], visitor, "{what}");
    let instant =
        |v: &Value| v.as_str().map(|s| DateTime::parse_from_rfc3339(s).expect("RFC 3339").with_timezone(&Utc));
    match (&case.expect, &sent["sent_at"]) {
        (StoredAs(expected), _) if case.field == "sent_at" => {
            assert_eq!(instant(&got["sent_at"]), instant(expected), "{what}: {}", got["sent_at"]);
        }
        (_, Value::Null) => {
            assert_eq!(got["sent_at"], got["received_at"], "{what}: sent_at defaults to the receive time")
        }
        (_, sent_at) => assert_eq!(instant(&got["sent_at"]), instant(sent_at), "{what}"),
    }
    let row = app
        .db
        .query_one_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT raw_payload::text AS p FROM messages WHERE id = $1::uuid",
            [id.into()],
        ))
        .await
        .expect("read raw_payload")
        .expect("the message row");
    let payload: Option<String> = row.try_get("", "p").expect("a text column");
    let payload = payload.map_or(Value::Null, |p| serde_json::from_str(&p).expect("stored JSON"));
    assert_eq!(payload, or_null(&sent["raw_payload"]), "{what}: raw_payload");
}

#[actix_web::test]
async fn every_message_field_over_http_batch_and_websocket() {
    let app = spawn_app().await;
    let cases = message_cases();

    // POST /v1/messages, one case at a time.
    let mut before = world(&app).await;
    let mut accepted = Vec::new();
    for case in cases.iter().filter(|c| matches!(c.expect, Refused(..))) {
        let body = message_body("hostile-http", case);
        let (status, answer) = app.post("/v1/messages", &body).await;
        let Refused(expected, code) = case.expect else { unreachable!() };
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (expected, Some(code)),
            "{} = {:?}: {answer}",
            case.field,
            case.value
        );
        let after = world(&app).await;
        assert_eq!(after, before, "{} = {:?} changed something", case.field, case.value);
        before = after;
    }
    for case in cases.iter().filter(|c| !matches!(c.expect, Refused(..))) {
        let body = message_body("hostile-http", case);
        let (status, answer) = app.post("/v1/messages", &body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{} = {:?}: {answer}", case.field, case.value);
        accepted.push((answer["message_id"].as_str().expect("an id").to_owned(), body, case));
    }
    for (id, body, case) in &accepted {
        assert_stored(&app, id, body, case).await;
    }
    settle(&app).await;

    // One batch of every case: good and bad items mixed, each answered in
    // its place; only the good ones are stored.
    let before = world(&app).await;
    let items: Vec<Value> = cases.iter().map(|c| message_body("hostile-batch", c)).collect();
    let (status, answer) = app.post("/v1/messages/batch", &json!({"messages": items})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let results = answer["results"].as_array().expect("results");
    assert_eq!(results.len(), cases.len());
    let mut stored = 0;
    for ((case, item), result) in cases.iter().zip(&items).zip(results) {
        match case.expect {
            Refused(_, code) => {
                assert_eq!(result["error"]["code"], code, "{} = {:?}: {result}", case.field, case.value)
            }
            _ => {
                let id = result["message_id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{} = {:?}: {result}", case.field, case.value));
                assert_stored(&app, id, item, case).await;
                stored += 1;
            }
        }
    }
    assert_eq!(world(&app).await.messages, before.messages + stored, "the refused items stored nothing");
    settle(&app).await;

    // WebSocket `ingest`: an error frame with the code, the connection
    // stays open, nothing changes; or an ack and the message as sent.
    let mut ws = app.connect_ws().await;
    let mut before = world(&app).await;
    for case in cases.iter().filter(|c| matches!(c.expect, Refused(..))) {
        let frame = json!({"type": "ingest", "id": case.field, "message": message_body("hostile-ws", case)});
        let frame = frame.to_string();
        if frame.len() > MAX_FRAME_BYTES {
            continue; // closes with 1009: every_websocket_frame_type_refuses_what_it_cannot_take
        }
        let Refused(_, code) = case.expect else { unreachable!() };
        expect_ws_error(&mut ws, &frame, code).await;
        let after = world(&app).await;
        assert_eq!(after, before, "ingest {} = {:?} changed something", case.field, case.value);
        before = after;
    }
    let mut accepted = Vec::new();
    for case in cases.iter().filter(|c| !matches!(c.expect, Refused(..))) {
        let body = message_body("hostile-ws", case);
        ws.send(&json!({"type": "ingest", "message": body})).await;
        let ack = ws.next_json().await;
        assert_eq!(ack["type"], "ack", "{} = {:?}: {ack}", case.field, case.value);
        accepted.push((ack["message_id"].as_str().expect("an id").to_owned(), body, case));
    }
    for (id, body, case) in &accepted {
        assert_stored(&app, id, body, case).await;
    }
    settle(&app).await;
}

/// Sends a text frame that must be refused: an error frame with `code`,
/// and the connection still answers a ping.
async fn expect_ws_error(ws: &mut WsClient, text: &str, code: &str) {
    ws.send_text(text.to_owned()).await;
    let reply = ws.next_json().await;
    let shown: String = text.chars().take(200).collect();
    assert_eq!(reply["type"], "error", "{shown} -> {reply}");
    assert_eq!(reply["error"]["code"], code, "{shown} -> {reply}");
    assert!(reply["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{reply}");
    ws.send(&json!({"type": "ping", "id": "still-open"})).await;
    assert_eq!(ws.next_json().await, json!({"type": "pong", "id": "still-open"}), "after {shown}");
}

// ---------------------------------------------------------------------------
// Raw HTTP bodies and the other requests.

enum Body {
    None,
    Json(Value),
    /// Raw bytes sent as `application/json`.
    Raw(Vec<u8>),
    /// Raw bytes with another content type.
    Typed(&'static str, Vec<u8>),
}

struct Call {
    method: Method,
    path: String,
    body: Body,
    expect: Expect,
}

fn get(path: impl Into<String>, expect: Expect) -> Call {
    Call { method: Method::GET, path: path.into(), body: Body::None, expect }
}

fn post(path: impl Into<String>, body: Value, expect: Expect) -> Call {
    Call { method: Method::POST, path: path.into(), body: Body::Json(body), expect }
}

fn post_raw(path: impl Into<String>, body: impl Into<Vec<u8>>, expect: Expect) -> Call {
    Call { method: Method::POST, path: path.into(), body: Body::Raw(body.into()), expect }
}

fn delete(path: impl Into<String>, expect: Expect) -> Call {
    Call { method: Method::DELETE, path: path.into(), body: Body::None, expect }
}

fn not_found() -> Expect {
    Refused(NOT_FOUND, "not_found")
}

async fn call(app: &TestApp, call: &Call) -> (StatusCode, Value) {
    let request = app.client.request(call.method.clone(), format!("{}{}", app.address, call.path));
    let sent = match &call.body {
        Body::None => request.send().await,
        Body::Json(value) => request.send_json(value).await,
        Body::Raw(bytes) => request.insert_header(("content-type", "application/json")).send_body(bytes.clone()).await,
        Body::Typed(kind, bytes) => request.insert_header(("content-type", *kind)).send_body(bytes.clone()).await,
    };
    let mut response = sent.expect("the server answers");
    let status = response.status();
    let body = response.json::<Value>().limit(64 << 20).await.unwrap_or(Value::Null);
    (status, body)
}

/// Runs refused calls, each checked for its error and for nothing changed.
async fn refused(app: &TestApp, calls: &[Call]) {
    let mut before = world(app).await;
    for c in calls {
        let Refused(status, code) = c.expect else { panic!("{} {} is not a refused case", c.method, c.path) };
        let (got, answer) = call(app, c).await;
        let shown: String = c.path.chars().take(120).collect();
        assert_eq!((got, answer["error"]["code"].as_str()), (status, Some(code)), "{} {shown}: {answer}", c.method);
        assert!(answer["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{answer}");
        let after = world(app).await;
        assert_eq!(after, before, "{} {shown} changed something", c.method);
        before = after;
    }
}

/// Every raw body an endpoint with a JSON body must refuse.
fn bad_bodies(path: &str) -> Vec<Call> {
    let mut calls = vec![
        post_raw(path, "", invalid()),
        post_raw(path, "{", invalid()),
        post_raw(path, "null", invalid()),
        post_raw(path, "[]", invalid()),
        post_raw(path, "\"text\"", invalid()),
        post_raw(path, "{} {}", invalid()),
        post_raw(path, "\u{FEFF}{}", invalid()),
        post_raw(path, b"{\"creator_id\": \"c\xff\", \"text\": \"\xc3\x28\"}".to_vec(), invalid()),
        post_raw(path, b"{\"\xfe\": 1}".to_vec(), invalid()),
        post_raw(path, "{\"text\": \"\\ud800\"}", invalid()),
        post_raw(path, "{\"text\": \"\u{0}\"}", invalid()),
        post_raw(path, "{\"n\": 1e400}", invalid()),
        post_raw(path, "[".repeat(100_000), invalid()),
        post_raw(path, format!("{}1{}", "{\"a\":".repeat(50_000), "}".repeat(50_000)), invalid()),
        Call {
            method: Method::POST,
            path: path.into(),
            body: Body::Typed("text/plain", b"{}".to_vec()),
            expect: invalid(),
        },
    ];
    let huge = format!("{{\"x\": \"{}\"}}", "x".repeat(17 << 20));
    calls.push(post_raw(path, huge, Refused(TOO_LARGE, "payload_too_large")));
    calls
}

/// Posts a message and waits for it to be clustered; returns (message id,
/// cluster id). Texts are random so that each opens its own cluster.
async fn clustered_message(app: &TestApp, creator: &str) -> (String, String) {
    let words: Vec<String> = (0..3).map(|_| format!("{:x}", rand::random::<u64>())).collect();
    let id = app.post_message(creator, &words.join(" ")).await;
    let message = app.wait_clustered(&id).await;
    (id, message["cluster_id"].as_str().expect("a cluster").to_owned())
}

#[actix_web::test]
async fn every_other_request_refuses_what_it_cannot_take() {
    let app = spawn_app().await;
    let (m1, c1) = clustered_message(&app, "ops").await;
    let (_m2, c2) = clustered_message(&app, "ops").await;
    let (_m3, c3) = clustered_message(&app, "ops").await;
    assert!(c1 != c2 && c2 != c3 && c1 != c3, "three clusters");
    let (status, answer) = app.post(&format!("/v1/clusters/{c3}/action"), &json!({"response_text": "done"})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let unknown = "0190b5a0-0000-7000-8000-000000000000";
    let long_id = "f".repeat(4000);

    let mut calls = Vec::new();
    // POST /v1/messages and /batch: raw bodies.
    calls.extend(bad_bodies("/v1/messages"));
    calls.extend(bad_bodies("/v1/messages/batch"));
    let tiny = json!({"creator_id": "ops", "text": "x"});
    calls.extend([
        post("/v1/messages/batch", json!({}), invalid()),
        post("/v1/messages/batch", json!({"messages": null}), invalid()),
        post("/v1/messages/batch", json!({"messages": "x"}), invalid()),
        post("/v1/messages/batch", json!({"messages": {"0": tiny}}), invalid()),
        post("/v1/messages/batch", json!({"messages": []}), invalid()),
        post("/v1/messages/batch", json!([[tiny]]), invalid()),
        post("/v1/messages/batch", json!({"messages": [tiny], "atomic": true}), invalid()),
        post("/v1/messages/batch", json!({"messages": vec![json!({}); 1001]}), Refused(TOO_LARGE, "payload_too_large")),
        post(
            "/v1/messages/batch",
            json!({"messages": vec![json!(0); 200_000]}),
            Refused(TOO_LARGE, "payload_too_large"),
        ),
    ]);
    // GET /v1/messages/{id}
    for id in ["not-a-uuid", unknown, "%00", "%FF%FE", "'%20OR%201=1--", &long_id, "%F0%9F%8E%89", &format!("{m1}%00")]
    {
        calls.push(get(format!("/v1/messages/{id}"), not_found()));
    }
    // GET /v1/creators/{creator_id}/clusters
    for creator in ["bad%20id", "%00", "a%00b", "%FF", "%E2%80%AE", &"a".repeat(129), "%F0%9F%8E%89"] {
        calls.push(get(format!("/v1/creators/{creator}/clusters"), invalid()));
    }
    for query in [
        "status=",
        "status=OPEN",
        "status=open%00",
        "status=closed",
        "status=open&status=all",
        "sort=",
        "sort=SIZE",
        "sort=size;DROP%20TABLE%20clusters",
        "sort=%FF",
        "limit=",
        "limit=0",
        "limit=-1",
        "limit=101",
        "limit=1.5",
        "limit=abc",
        "limit=99999999999",
        "limit=%00",
        "cursor=",
        "cursor=garbage",
        "cursor=%00",
        "cursor=%FF%FE",
        "cursor=eyJ4IjoxfQ",
        "cursor=%27%20OR%201=1--",
    ] {
        calls.push(get(format!("/v1/creators/ops/clusters?{query}"), invalid()));
    }
    calls.push(get(format!("/v1/creators/ops/clusters?cursor={}", "A".repeat(10_000)), invalid()));
    // GET /v1/clusters/{id}
    for id in ["nope", unknown, "%00", "%FF", &long_id] {
        calls.push(get(format!("/v1/clusters/{id}"), not_found()));
    }
    for query in ["limit=0", "limit=501", "limit=-5", "limit=x", "cursor=", "cursor=garbage", "cursor=%00"] {
        calls.push(get(format!("/v1/clusters/{c1}?{query}"), invalid()));
    }
    // POST /v1/clusters/{id}/action
    let action = format!("/v1/clusters/{c1}/action");
    calls.extend(bad_bodies(&action));
    calls.extend([
        post(&action, json!({}), invalid()),
        post(&action, json!({"response_text": null}), invalid()),
        post(&action, json!({"response_text": 5}), invalid()),
        post(&action, json!({"response_text": ["hi"]}), invalid()),
        post(&action, json!({"response_text": ""}), invalid()),
        post(&action, json!({"response_text": " \n "}), invalid()),
        post(&action, json!({"response_text": "hi\u{0}"}), invalid()),
        post(&action, json!({"response_text": "x".repeat(4001)}), Refused(TOO_LARGE, "payload_too_large")),
        post(&action, json!({"response_text": "hi", "status": "open"}), invalid()),
        post(&action, json!(["hi"]), invalid()),
        post(format!("/v1/clusters/{c3}/action"), json!({"response_text": "again"}), Refused(CONFLICT, "conflict")),
        post(format!("/v1/clusters/{unknown}/action"), json!({"response_text": "hi"}), not_found()),
        post("/v1/clusters/%00/action", json!({"response_text": "hi"}), not_found()),
    ]);
    // POST /v1/clusters/{id}/merge
    let merge = format!("/v1/clusters/{c1}/merge");
    calls.extend(bad_bodies(&merge));
    let many: Vec<String> = (0..101).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    calls.extend([
        post(&merge, json!({}), invalid()),
        post(&merge, json!({"cluster_ids": null}), invalid()),
        post(&merge, json!({"cluster_ids": c2}), invalid()),
        post(&merge, json!({"cluster_ids": [5]}), invalid()),
        post(&merge, json!({"cluster_ids": [[c2]]}), invalid()),
        post(&merge, json!({"cluster_ids": []}), invalid()),
        post(&merge, json!({"cluster_ids": many}), invalid()),
        post(&merge, json!({"cluster_ids": [c1]}), invalid()),
        post(&merge, json!({"cluster_ids": [c2, c2.to_uppercase()]}), invalid()),
        post(&merge, json!({"cluster_ids": [c2], "into": c1}), invalid()),
        post(&merge, json!([[c2]]), invalid()),
        post(&merge, json!({"cluster_ids": ["not-an-id"]}), not_found()),
        post(&merge, json!({"cluster_ids": ["\u{0}"]}), not_found()),
        post(&merge, json!({"cluster_ids": [c2, unknown]}), not_found()),
        post(&merge, json!({"cluster_ids": [c3]}), Refused(CONFLICT, "conflict")),
        post(format!("/v1/clusters/{unknown}/merge"), json!({"cluster_ids": [c2]}), not_found()),
    ]);
    // POST /v1/messages/{id}/move
    let moving = format!("/v1/messages/{m1}/move");
    calls.extend(bad_bodies(&moving));
    calls.extend([
        post(&moving, json!({}), invalid()),
        post(&moving, json!({"cluster_id": null}), invalid()),
        post(&moving, json!({"cluster_id": 5}), invalid()),
        post(&moving, json!({"cluster_id": [c2]}), invalid()),
        post(&moving, json!({"cluster_id": c2, "force": true}), invalid()),
        post(&moving, json!([c2]), invalid()),
        post(&moving, json!({"cluster_id": ""}), not_found()),
        post(&moving, json!({"cluster_id": "x\u{0}"}), not_found()),
        post(&moving, json!({"cluster_id": unknown}), not_found()),
        post(&moving, json!({"cluster_id": c3}), Refused(CONFLICT, "conflict")),
        post(format!("/v1/messages/{unknown}/move"), json!({"cluster_id": c2}), not_found()),
        post("/v1/messages/%FF/move", json!({"cluster_id": c2}), not_found()),
    ]);
    // DELETE /v1/clusters/{id}/messages/{message_id}
    calls.extend([
        delete(format!("/v1/clusters/{c2}/messages/{m1}"), not_found()),
        delete(format!("/v1/clusters/{c1}/messages/{unknown}"), not_found()),
        delete(format!("/v1/clusters/{c1}/messages/%00"), not_found()),
        delete(format!("/v1/clusters/%FF/messages/{m1}"), not_found()),
        delete(format!("/v1/clusters/x/messages/{long_id}"), not_found()),
    ]);
    // POST /v1/admin/messages/retry
    let retry = "/v1/admin/messages/retry";
    calls.extend(bad_bodies(retry));
    calls.extend([
        post(retry, json!({"creator_id": 5}), invalid()),
        post(retry, json!({"creator_id": "a\u{0}b"}), invalid()),
        post(retry, json!({"creator_id": "bad id"}), invalid()),
        post(retry, json!({"creator_id": ""}), invalid()),
        post(retry, json!({"message_ids": "x"}), invalid()),
        post(retry, json!({"message_ids": ["not-a-uuid"]}), invalid()),
        post(retry, json!({"message_ids": [5]}), invalid()),
        post(retry, json!({"message_ids": ["\u{0}"]}), invalid()),
        post(retry, json!({"all": true}), invalid()),
        post(retry, json!([]), invalid()),
        post(retry, json!({"message_ids": vec![unknown; 1001]}), Refused(TOO_LARGE, "payload_too_large")),
    ]);
    settle(&app).await;
    refused(&app, &calls).await;

    // What is accepted is kept exactly as sent: a response text of any
    // characters, read back through the API.
    let longest = "🎉".repeat(4000);
    for text in HOSTILE_TEXTS.iter().copied().chain([longest.as_str()]) {
        let (_, cluster) = clustered_message(&app, "ops").await;
        let (status, answer) =
            app.post(&format!("/v1/clusters/{cluster}/action"), &json!({"response_text": text})).await;
        assert_eq!(status, StatusCode::OK, "{text:?}: {answer}");
        let (_, detail) = app.get(&format!("/v1/clusters/{cluster}")).await;
        assert_eq!(detail["response_text"].as_str().map(str::as_bytes), Some(text.as_bytes()), "{text:?}");
    }
    // Unknown query parameters are ignored; ids are UUIDs in any case.
    let (status, body) = app.get("/v1/creators/ops/clusters?status=all&utm_source=x&_=1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app.get(&format!("/v1/messages/{}", m1.to_uppercase())).await;
    assert_eq!((status, body["id"].as_str()), (StatusCode::OK, Some(m1.as_str())));
    let (status, body) = app.post(retry, &json!({})).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"retried": 0})));
    let (status, body) = app.post(retry, &json!({"creator_id": "ops", "message_ids": []})).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"retried": 0})));
    settle(&app).await;
    app.assert_cluster_invariants("ops").await;
}

// ---------------------------------------------------------------------------
// WebSocket frames.

#[actix_web::test]
async fn every_websocket_frame_type_refuses_what_it_cannot_take() {
    let app = spawn_app().await;
    let (m1, c1) = clustered_message(&app, "ops").await;
    let (_m2, c2) = clustered_message(&app, "ops").await;
    let unknown = "0190b5a0-0000-7000-8000-000000000000";
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let bad = "invalid_request";
    let frames: Vec<(String, &str)> = [
        // Not a frame at all.
        ("", bad),
        ("{", bad),
        ("null", bad),
        ("5", bad),
        ("\"ping\"", bad),
        ("[]", bad),
        ("[\"ping\"]", bad),
        ("[\"subscribe\", null, \"ops\"]", bad),
        (&deep, bad),
        ("{\"type\": \"ping\"} {\"type\": \"ping\"}", bad),
        ("{\"type\": \"\\ud800\"}", bad),
        ("{\"type\": \"ping\u{0}\"}", bad),
        ("{\"n\": 1e400}", bad),
        // The type.
        ("{}", bad),
        ("{\"type\": null}", bad),
        ("{\"type\": 5}", bad),
        ("{\"type\": [\"ping\"]}", bad),
        ("{\"type\": \"PING\"}", bad),
        ("{\"type\": \" ping\"}", bad),
        ("{\"type\": \"dance\"}", bad),
        ("{\"type\": \"event\"}", bad),
        ("{\"type\": \"pong\"}", bad),
        ("{\"type\": \"ack\"}", bad),
        // ping
        ("{\"type\": \"ping\", \"extra\": 1}", bad),
        // subscribe
        ("{\"type\": \"subscribe\"}", bad),
        ("{\"type\": \"subscribe\", \"creator_id\": null}", bad),
        ("{\"type\": \"subscribe\", \"creator_id\": 5}", bad),
        ("{\"type\": \"subscribe\", \"creator_id\": [\"ops\"]}", bad),
        ("{\"type\": \"subscribe\", \"creator_id\": \"\"}", bad),
        ("{\"type\": \"subscribe\", \"creator_id\": \"o\\u0000ps\"}", bad),
        ("{\"type\": \"subscribe\", \"creator_id\": \"bad id\"}", bad),
        ("{\"type\": \"subscribe\", \"creator_id\": \"🎉\"}", bad),
        ("{\"type\": \"subscribe\", \"creator_id\": \"ops\", \"since\": -1}", bad),
        ("{\"type\": \"subscribe\", \"creator_id\": \"ops\", \"since\": \"0\"}", bad),
        ("{\"type\": \"subscribe\", \"creator_id\": \"ops\", \"since\": 1.5}", bad),
        ("{\"type\": \"subscribe\", \"creator_id\": \"ops\", \"since\": 1e30}", bad),
        ("{\"type\": \"subscribe\", \"creator_id\": \"ops\", \"since\": 99999999999999999999}", bad),
        ("{\"type\": \"subscribe\", \"creator_id\": \"ops\", \"filter\": \"*\"}", bad),
        // unsubscribe
        ("{\"type\": \"unsubscribe\"}", bad),
        ("{\"type\": \"unsubscribe\", \"creator_id\": 5}", bad),
        ("{\"type\": \"unsubscribe\", \"creator_id\": \"ops\", \"all\": true}", bad),
        // ingest (its message fields: every_message_field_over_http_batch_and_websocket)
        ("{\"type\": \"ingest\"}", bad),
        ("{\"type\": \"ingest\", \"message\": null}", bad),
        ("{\"type\": \"ingest\", \"message\": \"hi\"}", bad),
        ("{\"type\": \"ingest\", \"message\": [\"ops\", \"hi\"]}", bad),
        ("{\"type\": \"ingest\", \"message\": {\"creator_id\": \"ops\", \"text\": \"hi\"}, \"x\": 1}", bad),
        ("{\"type\": \"ingest\", \"creator_id\": \"ops\", \"text\": \"hi\"}", bad),
    ]
    .into_iter()
    .map(|(f, c)| (f.to_owned(), c))
    .collect();
    let mut frames = frames;
    // The creator operations.
    let op = |v: Value| v.to_string();
    frames.extend([
        (op(json!({"type": "action"})), bad),
        (op(json!({"type": "action", "cluster_id": c1})), bad),
        (op(json!({"type": "action", "cluster_id": c1, "response_text": 5})), bad),
        (op(json!({"type": "action", "cluster_id": 5, "response_text": "hi"})), bad),
        (op(json!({"type": "action", "cluster_id": c1, "response_text": ""})), bad),
        (op(json!({"type": "action", "cluster_id": c1, "response_text": "a\u{0}"})), bad),
        (op(json!({"type": "action", "cluster_id": c1, "response_text": "x".repeat(4001)})), "payload_too_large"),
        (op(json!({"type": "action", "cluster_id": c1, "response_text": "hi", "x": 1})), bad),
        (op(json!({"type": "action", "cluster_id": unknown, "response_text": "hi"})), "not_found"),
        (op(json!({"type": "action", "cluster_id": "'; DROP TABLE clusters; --", "response_text": "hi"})), "not_found"),
        (op(json!({"type": "remove", "cluster_id": c1})), bad),
        (op(json!({"type": "remove", "cluster_id": c1, "message_id": 5})), bad),
        (op(json!({"type": "remove", "cluster_id": c2, "message_id": m1})), "not_found"),
        (op(json!({"type": "remove", "cluster_id": c1, "message_id": "\u{0}"})), "not_found"),
        (op(json!({"type": "merge", "cluster_id": c1})), bad),
        (op(json!({"type": "merge", "cluster_id": c1, "cluster_ids": c2})), bad),
        (op(json!({"type": "merge", "cluster_id": c1, "cluster_ids": []})), bad),
        (op(json!({"type": "merge", "cluster_id": c1, "cluster_ids": [c1]})), bad),
        (op(json!({"type": "merge", "cluster_id": c1, "cluster_ids": [c2, c2]})), bad),
        (op(json!({"type": "merge", "cluster_id": c1, "cluster_ids": ["nope"]})), "not_found"),
        (op(json!({"type": "merge", "cluster_id": "nope", "cluster_ids": [c2]})), "not_found"),
        (op(json!({"type": "move", "message_id": m1})), bad),
        (op(json!({"type": "move", "message_id": m1, "cluster_id": [c2]})), bad),
        (op(json!({"type": "move", "message_id": m1, "cluster_id": c2, "x": null})), bad),
        (op(json!({"type": "move", "message_id": m1, "cluster_id": unknown})), "not_found"),
        (op(json!({"type": "move", "message_id": "\u{0}", "cluster_id": c2})), "not_found"),
    ]);

    settle(&app).await;
    let mut ws = app.connect_ws().await;
    let mut before = world(&app).await;
    for (frame, code) in &frames {
        expect_ws_error(&mut ws, frame, code).await;
        let after = world(&app).await;
        assert_eq!(after, before, "{frame} changed something");
        before = after;
    }
    // A refused frame echoes the client's id when it is a string or a
    // number; a reply to an accepted frame echoes any id as sent.
    ws.send_text(r#"{"type": "dance", "id": "d-1"}"#.into()).await;
    assert_eq!(ws.next_json().await["id"], "d-1");
    let id = json!({"nested": [1, "🎉\u{202E}", {"'": null}]});
    ws.send(&json!({"type": "ping", "id": id})).await;
    assert_eq!(ws.next_json().await, json!({"type": "pong", "id": id}));
    // Binary frames, even of valid JSON, get an error frame.
    for bytes in [b"\xff\xfe\x00\x01".to_vec(), br#"{"type": "ping"}"#.to_vec()] {
        ws.framed.send(ws::Message::Binary(bytes.into())).await.expect("sent");
        assert_eq!(ws.next_json().await["error"]["code"], "invalid_request");
    }
    // Subscribing twice is a conflict; unsubscribing from anything answers.
    ws.subscribe("ops", None).await;
    expect_ws_error(&mut ws, r#"{"type": "subscribe", "creator_id": "ops"}"#, "conflict").await;
    for creator in ["ops", "never-subscribed"] {
        ws.send(&json!({"type": "unsubscribe", "creator_id": creator})).await;
        assert_eq!(ws.next_json().await, json!({"type": "unsubscribed", "creator_id": creator}));
    }
    assert_eq!(world(&app).await, before, "nothing changed");

    // A text message that is not UTF-8 fails the connection with 1007
    // (RFC 6455, 8.1); it arrives fragmented here, as a client cannot send
    // it whole through a text API.
    ws.framed
        .send(ws::Message::Continuation(Item::FirstText(Bytes::from_static(b"{\"type\": \"p"))))
        .await
        .expect("sent");
    ws.framed.send(ws::Message::Continuation(Item::Last(Bytes::from_static(b"ing\xff\"}")))).await.expect("sent");
    expect_close(&mut ws, 1007).await;

    // A fragmented message beyond the frame limit closes with 1009, like
    // one oversized frame.
    let mut ws = app.connect_ws().await;
    let chunk = Bytes::from(vec![b' '; 16 * 1024]);
    ws.framed.send(ws::Message::Continuation(Item::FirstText(chunk.clone()))).await.expect("sent");
    for _ in 0..4 {
        ws.framed.send(ws::Message::Continuation(Item::Continue(chunk.clone()))).await.expect("sent");
    }
    ws.framed
        .send(ws::Message::Continuation(Item::Last(Bytes::from_static(b"{\"type\": \"ping\"}"))))
        .await
        .expect("sent");
    expect_close(&mut ws, 1009).await;
    assert_eq!(world(&app).await, before, "nothing changed");
}

async fn expect_close(ws: &mut WsClient, code: u16) {
    match ws.next_frame().await {
        ws::Frame::Close(Some(reason)) => assert_eq!(u16::from(reason.code), code, "{reason:?}"),
        other => panic!("expected a close frame with {code}, got {other:?}"),
    }
}
