//! The exact query cache of cluster lists and details, against the real
//! Redis: a repeated read is a hit with the identical body; every kind of
//! change makes the next read a miss that shows it; two instances on one
//! Redis share entries and never serve one another's stale ones; a
//! principal who may not see a page is refused even when it is cached;
//! and Redis killed costs the shared tier only.

use actix_web::http::StatusCode;
use clusterd::{
    domain::token::{self, Scope},
    repository::Repository,
    settings::Settings,
};
use serde_json::{Value, json};

use crate::{
    faults::ScratchRedis,
    helpers::{TestApp, fresh_database, redis_url, spawn_app_on},
    membership::{cluster_with_review, review_between},
};

/// The shared test Redis.
fn with_redis(settings: &mut Settings) {
    settings.redis.url = Some(redis_url().into());
}

/// A creator name of this run alone (the test Redis outlives test runs;
/// the cache's namespace keeps databases apart anyway).
fn creator(label: &str) -> String {
    format!("creator-cache-{label}-{}", uuid::Uuid::now_v7().simple())
}

/// `GET path` with an optional bearer token: the status and the raw body.
async fn get_raw(app: &TestApp, path: &str, token: Option<&str>) -> (StatusCode, Vec<u8>) {
    let mut request = app.client.get(format!("{}{path}", app.address));
    if let Some(token) = token {
        request = request.insert_header(("authorization", format!("Bearer {token}")));
    }
    let mut response = request.send().await.expect("the server answers");
    let body = response.body().limit(16 << 20).await.expect("a body");
    (response.status(), body.to_vec())
}

/// `clusterd_query_cache_total` of `route` (list, detail) and `result`
/// (hit, miss).
async fn lookups(app: &TestApp, route: &str, result: &str) -> f64 {
    app.metric(&format!("clusterd_query_cache_total{{result=\"{result}\",route=\"{route}\"}}")).await
}

/// Reads `path` (a `route` read) and asserts the lookup was a `result`
/// (hit or miss); returns the raw body of the 200.
async fn read(app: &TestApp, route: &str, path: &str, result: &str) -> Vec<u8> {
    let before = (lookups(app, route, "hit").await, lookups(app, route, "miss").await);
    let (status, body) = get_raw(app, path, None).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let after = (lookups(app, route, "hit").await, lookups(app, route, "miss").await);
    let expected = if result == "hit" { (before.0 + 1.0, before.1) } else { (before.0, before.1 + 1.0) };
    assert_eq!(after, expected, "GET {path} was not one {result} (hits, misses before: {before:?})");
    body
}

/// Waits until `app` has stored `n` answers in Redis in all: writes go
/// behind the answer (`cache.write_behind`), so another instance may miss
/// until then.
async fn stored(app: &TestApp, n: f64) {
    let deadline = tokio::time::Instant::now() + crate::helpers::PATIENCE;
    while app.metric("clusterd_query_cache_writes_total{result=\"stored\"}").await < n {
        assert!(tokio::time::Instant::now() < deadline, "{n} answers never reached Redis");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).expect("a JSON body")
}

/// Reads `path` until it is cached (a miss, then a hit with the same
/// body); returns the body.
async fn cached(app: &TestApp, route: &str, path: &str) -> Value {
    let (_, first) = get_raw(app, path, None).await;
    let again = read(app, route, path, "hit").await;
    assert_eq!(again, first, "a hit answers the identical body");
    json_of(&again)
}

/// The clusters of a list body, by id.
fn clusters(list: &Value) -> std::collections::BTreeMap<String, Value> {
    list["clusters"]
        .as_array()
        .expect("a cluster list")
        .iter()
        .map(|c| (c["id"].as_str().expect("an id").to_owned(), c.clone()))
        .collect()
}

#[actix_web::test]
async fn a_repeated_read_is_a_hit_with_the_identical_body() {
    let app = spawn_app_on(&fresh_database().await, with_redis).await;
    let creator = creator("repeat");
    for text in ["How much is the VIP ticket?", "Do you ship merch to Brazil?", "When do doors open?"] {
        let id = app.post_message(&creator, text).await;
        app.wait_clustered(&id).await;
    }
    let list_path = format!("/v1/creators/{creator}/clusters?sort=size&limit=2");
    let first = read(&app, "list", &list_path, "miss").await;
    let second = read(&app, "list", &list_path, "hit").await;
    assert_eq!(second, first, "byte for byte");
    let list = json_of(&first);
    assert_eq!(list["clusters"].as_array().map(Vec::len), Some(2), "{list}");

    // Other parameters are other entries; the next page is its own.
    let cursor = list["next_cursor"].as_str().expect("a second page");
    let next = read(&app, "list", &format!("{list_path}&cursor={cursor}"), "miss").await;
    assert_eq!(json_of(&next)["clusters"].as_array().map(Vec::len), Some(1));
    read(&app, "list", &format!("/v1/creators/{creator}/clusters?sort=size&limit=3"), "miss").await;
    read(&app, "list", &list_path, "hit").await;

    let cluster = list["clusters"][0]["id"].as_str().expect("an id");
    let detail_path = format!("/v1/clusters/{cluster}");
    let first = read(&app, "detail", &detail_path, "miss").await;
    assert_eq!(read(&app, "detail", &detail_path, "hit").await, first);
    read(&app, "detail", &format!("{detail_path}?limit=1"), "miss").await;

    // Errors are not cached, and cost no lookup.
    let (status, _) = get_raw(&app, &format!("/v1/creators/{creator}/clusters?cursor=nonsense"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = get_raw(&app, &format!("/v1/creators/{creator}/clusters?cursor=nonsense"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an error is never served from the cache");
    let (status, _) = get_raw(&app, &format!("/v1/clusters/{}", uuid::Uuid::now_v7()), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[actix_web::test]
async fn every_change_makes_the_next_read_a_miss_that_shows_it() {
    let db = fresh_database().await;
    let review = review_between();
    let app = spawn_app_on(&db, move |s| {
        review(s);
        with_redis(s);
    })
    .await;
    let creator = creator("changes");
    let (cluster, base, near) = cluster_with_review(&app, &creator).await;
    let near_id = near["id"].as_str().expect("an id").to_owned();
    let list_path = format!("/v1/creators/{creator}/clusters?status=all");
    let detail_path = format!("/v1/clusters/{cluster}");

    // Confirm.
    let detail = cached(&app, "detail", &detail_path).await;
    assert_eq!(detail["core_size"], 1, "{detail}");
    cached(&app, "list", &list_path).await;
    let (status, body) = app.post(&format!("/v1/clusters/{cluster}/messages/{near_id}/confirm"), &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let detail = json_of(&read(&app, "detail", &detail_path, "miss").await);
    assert_eq!(detail["core_size"], 2, "the confirmation shows: {detail}");
    let list = json_of(&read(&app, "list", &list_path, "miss").await);
    assert_eq!(clusters(&list)[&cluster]["core_size"], 2, "{list}");

    // A decision (a new message clustered).
    cached(&app, "list", &list_path).await;
    cached(&app, "detail", &detail_path).await;
    let shipping = app.post_message(&creator, "Do you ship merch to Brazil?").await;
    let shipping = app.wait_clustered(&shipping).await;
    let shipping_cluster = shipping["cluster_id"].as_str().expect("a cluster").to_owned();
    assert_ne!(shipping_cluster, cluster);
    let list = json_of(&read(&app, "list", &list_path, "miss").await);
    assert!(clusters(&list).contains_key(&shipping_cluster), "the decision shows: {list}");
    // The detail of another cluster of the creator misses too (keyed by
    // the creator's last event), and still shows the same cluster.
    let detail = json_of(&read(&app, "detail", &detail_path, "miss").await);
    assert_eq!(detail["size"], 2, "{detail}");

    // Remove.
    cached(&app, "list", &list_path).await;
    let (status, body) = app.delete(&format!("/v1/clusters/{cluster}/messages/{near_id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let list = clusters(&json_of(&read(&app, "list", &list_path, "miss").await));
    assert_eq!(list[&cluster]["size"], 1, "the removal shows: {list:?}");
    assert_eq!(list.len(), 3, "the removed message has a cluster of its own: {list:?}");

    // Move it back.
    cached(&app, "list", &list_path).await;
    cached(&app, "detail", &detail_path).await;
    let (status, body) = app.post(&format!("/v1/messages/{near_id}/move"), &json!({"cluster_id": cluster})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let list = clusters(&json_of(&read(&app, "list", &list_path, "miss").await));
    assert_eq!((list[&cluster]["size"].clone(), list.len()), (json!(2), 2), "the move shows: {list:?}");
    let detail = json_of(&read(&app, "detail", &detail_path, "miss").await);
    let members: Vec<&str> =
        detail["messages"].as_array().expect("messages").iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(members, [base["id"].as_str().expect("an id"), near_id.as_str()], "{detail}");

    // Merge the shipping cluster in.
    cached(&app, "list", &list_path).await;
    let shipping_path = format!("/v1/clusters/{shipping_cluster}");
    cached(&app, "detail", &shipping_path).await;
    let (status, body) =
        app.post(&format!("/v1/clusters/{cluster}/merge"), &json!({"cluster_ids": [shipping_cluster]})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let list = clusters(&json_of(&read(&app, "list", &list_path, "miss").await));
    assert_eq!((list[&cluster]["size"].clone(), list.len()), (json!(3), 1), "the merge shows: {list:?}");
    let (status, _) = get_raw(&app, &shipping_path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the merged-away cluster's cached detail is unreachable");

    // Action.
    cached(&app, "list", &list_path).await;
    cached(&app, "detail", &detail_path).await;
    let (status, body) = app.post(&format!("{detail_path}/action"), &json!({"response_text": "It is 99"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let list = clusters(&json_of(&read(&app, "list", &list_path, "miss").await));
    assert_eq!(list[&cluster]["status"], "actioned", "the action shows: {list:?}");
    let detail = json_of(&read(&app, "detail", &detail_path, "miss").await);
    assert_eq!((detail["status"].as_str(), detail["response_text"].as_str()), (Some("actioned"), Some("It is 99")));
    let open = json_of(&read(&app, "list", &format!("/v1/creators/{creator}/clusters"), "miss").await);
    assert_eq!(open["clusters"], json!([]), "no open cluster left: {open}");
}

#[actix_web::test]
async fn two_instances_on_one_redis_share_entries_and_see_each_others_writes_at_once() {
    let db = fresh_database().await;
    let one = spawn_app_on(&db, with_redis).await;
    let two = spawn_app_on(&db, with_redis).await;
    let creator = creator("instances");
    let id = one.post_message(&creator, "How much is the VIP ticket?").await;
    let cluster = one.wait_clustered(&id).await["cluster_id"].as_str().expect("a cluster").to_owned();
    let list_path = format!("/v1/creators/{creator}/clusters");
    let detail_path = format!("/v1/clusters/{cluster}");

    // Cached by one, a hit on two (whose in-process cache never saw it).
    let first = read(&one, "list", &list_path, "miss").await;
    stored(&one, 1.0).await;
    assert_eq!(read(&two, "list", &list_path, "hit").await, first);
    let first = read(&two, "detail", &detail_path, "miss").await;
    stored(&two, 1.0).await;
    assert_eq!(read(&one, "detail", &detail_path, "hit").await, first);

    // Written through two: one's very next reads show it.
    let (status, body) = two.post(&format!("{detail_path}/action"), &json!({"response_text": "99"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let list = json_of(&read(&one, "list", &list_path, "miss").await);
    assert_eq!(list["clusters"], json!([]), "the actioned cluster left the open list: {list}");
    let detail = json_of(&read(&one, "detail", &detail_path, "miss").await);
    assert_eq!(detail["status"], "actioned", "{detail}");

    // A message decided by one: two's next read shows it.
    let all_path = format!("{list_path}?status=all");
    let cached_all = read(&two, "list", &all_path, "miss").await;
    stored(&two, 2.0).await;
    assert_eq!(read(&one, "list", &all_path, "hit").await, cached_all);
    let id = one.post_message(&creator, "Do you ship merch to Brazil?").await;
    let new_cluster = one.wait_clustered(&id).await["cluster_id"].as_str().expect("a cluster").to_owned();
    let list = json_of(&read(&two, "list", &all_path, "miss").await);
    assert!(clusters(&list).contains_key(&new_cluster), "{list}");
}

#[actix_web::test]
async fn with_writes_awaited_an_answer_is_in_redis_before_the_client_has_it() {
    let db = fresh_database().await;
    let awaited = |s: &mut Settings| {
        with_redis(s);
        s.cache.write_behind = false;
    };
    let one = spawn_app_on(&db, awaited).await;
    let two = spawn_app_on(&db, awaited).await;
    let creator = creator("awaited");
    let id = one.post_message(&creator, "How much is the VIP ticket?").await;
    one.wait_clustered(&id).await;
    let list_path = format!("/v1/creators/{creator}/clusters");
    let first = read(&one, "list", &list_path, "miss").await;
    assert_eq!(read(&two, "list", &list_path, "hit").await, first, "no wait needed");
}

/// Stores a token of `scope` in the app's database; returns its secret.
async fn token_for(app: &TestApp, scope: Scope) -> String {
    let (secret, hash) = token::generate();
    Repository::new(app.db.clone()).create_token(&hash, &scope, "cache test").await.expect("store a token");
    secret
}

/// The hits of both routes, read from `/metrics` with an admin token.
async fn hits_seen_by(app: &TestApp, admin: &str) -> f64 {
    let (status, body) = get_raw(app, "/metrics", Some(admin)).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body).expect("metrics are UTF-8");
    ["list", "detail"]
        .iter()
        .map(|route| {
            let sample = format!("clusterd_query_cache_total{{result=\"hit\",route=\"{route}\"}} ");
            text.lines()
                .find_map(|line| line.strip_prefix(&sample))
                .map_or(0.0, |value| value.trim().parse().expect("a numeric sample"))
        })
        .sum()
}

#[actix_web::test]
async fn a_principal_without_access_is_refused_even_when_the_page_is_cached() {
    let app = spawn_app_on(&fresh_database().await, |s| {
        with_redis(s);
        s.auth.enabled = true;
        s.auth.cache_ttl_ms = 0;
    })
    .await;
    let (alice, mallory) = (creator("alice"), creator("mallory"));
    let admin = token_for(&app, Scope::Admin).await;
    let own = token_for(&app, Scope::Creator(alice.clone())).await;
    let other = token_for(&app, Scope::Creator(mallory.clone())).await;
    let ingest = token_for(&app, Scope::Ingest).await;
    let (status, ack) = {
        let mut response = app
            .client
            .post(format!("{}/v1/messages", app.address))
            .insert_header(("authorization", format!("Bearer {ingest}")))
            .send_json(&json!({"creator_id": alice, "text": "How much is the VIP ticket?"}))
            .await
            .expect("the server answers");
        (response.status(), response.json::<Value>().await.expect("an ack"))
    };
    assert_eq!(status, StatusCode::ACCEPTED, "{ack}");
    app.flush().await;
    let list_path = format!("/v1/creators/{alice}/clusters");
    let (status, list) = get_raw(&app, &list_path, Some(&admin)).await;
    assert_eq!(status, StatusCode::OK);
    let cluster = json_of(&list)["clusters"][0]["id"].as_str().expect("a clustered message").to_owned();
    let detail_path = format!("/v1/clusters/{cluster}");
    let (status, detail) = get_raw(&app, &detail_path, Some(&admin)).await;
    assert_eq!(status, StatusCode::OK);

    // Cached now: alice's own token hits them.
    let hits = hits_seen_by(&app, &admin).await;
    assert_eq!(get_raw(&app, &list_path, Some(&own)).await, (StatusCode::OK, list.clone()));
    assert_eq!(get_raw(&app, &detail_path, Some(&own)).await, (StatusCode::OK, detail.clone()));
    assert_eq!(hits_seen_by(&app, &admin).await, hits + 2.0, "both were hits");

    // Anyone else is refused before the cache is asked.
    let hits = hits_seen_by(&app, &admin).await;
    for (token, expected) in [
        (Some(other.as_str()), StatusCode::FORBIDDEN),
        (Some(ingest.as_str()), StatusCode::FORBIDDEN),
        (Some("not-a-token"), StatusCode::UNAUTHORIZED),
        (None, StatusCode::UNAUTHORIZED),
    ] {
        for path in [&list_path, &detail_path] {
            let (status, body) = get_raw(&app, path, token).await;
            assert_eq!(status, expected, "GET {path} with {token:?}: {}", String::from_utf8_lossy(&body));
            assert_ne!(body, list, "no cached body leaks");
            assert_ne!(body, detail, "no cached body leaks");
        }
    }
    let (status, _) = get_raw(&app, &format!("/v1/clusters/{}", uuid::Uuid::now_v7()), Some(&other)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "an unknown cluster is 404 for everyone");
    assert_eq!(hits_seen_by(&app, &admin).await, hits, "refused requests never reach the cache");
}

/// Query cache entries in the Redis at `url` (the embedder's vectors are
/// there too).
async fn query_keys(url: &str) -> usize {
    let client = redis::Client::open(url).expect("a redis URL");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis accepts connections");
    let keys: Vec<String> = redis::cmd("KEYS").arg("clusterd:q:*").query_async(&mut conn).await.expect("KEYS");
    keys.len()
}

#[actix_web::test]
async fn redis_killed_the_reads_still_answer_correctly_and_the_shared_tier_comes_back() {
    let mut redis = ScratchRedis::start();
    let url = redis.url();
    let app = spawn_app_on(&fresh_database().await, move |s| s.redis.url = Some(url.into())).await;
    let creator = creator("outage");
    let id = app.post_message(&creator, "How much is the VIP ticket?").await;
    app.wait_clustered(&id).await;
    let path = format!("/v1/creators/{creator}/clusters");
    cached(&app, "list", &path).await;
    stored(&app, 1.0).await;
    assert_eq!(query_keys(&redis.url()).await, 1, "the answer is in Redis");
    assert_eq!(app.metric("clusterd_query_cache_errors_total").await, 0.0);

    // Redis gone: a change still shows at once, and the in-process LRU
    // still serves repeated reads.
    redis.kill();
    let id = app.post_message(&creator, "Do you ship merch to Brazil?").await;
    let shipping = app.wait_clustered(&id).await["cluster_id"].as_str().expect("a cluster").to_owned();
    let list = json_of(&read(&app, "list", &path, "miss").await);
    assert!(clusters(&list).contains_key(&shipping), "{list}");
    assert_eq!(json_of(&read(&app, "list", &path, "hit").await), list, "the in-process tier answers");
    assert!(app.metric("clusterd_query_cache_errors_total").await >= 1.0, "the outage shows on /metrics");

    // Redis back, empty: answers are shared again, by themselves.
    redis.up();
    let deadline = tokio::time::Instant::now() + crate::helpers::PATIENCE;
    let mut n = 0;
    assert_eq!(redis.keys().await, 0, "a fresh Redis");
    while query_keys(&redis.url()).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the daemon never wrote to Redis again");
        n += 1;
        let id = app.post_message(&creator, &format!("When do doors open for show {n}?")).await;
        app.wait_clustered(&id).await;
        let (status, _) = get_raw(&app, &path, None).await;
        assert_eq!(status, StatusCode::OK);
    }
    let errors = app.metric("clusterd_query_cache_errors_total").await;
    cached(&app, "list", &format!("{path}?sort=size")).await;
    assert_eq!(app.metric("clusterd_query_cache_errors_total").await, errors, "no Redis errors once it is back");
}
