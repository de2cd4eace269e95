//! Precision first through the API: messages that join on weaker evidence
//! are `review` members; an action answers the `core` members and holds
//! the review members back (unless told otherwise); a creator confirms a
//! review member; and corrections move the creator's bar, which a new
//! instance on the same database decides with.
//!
//! The bars here are plain cosines (no background, no trigram step), set
//! around the measured similarity of two fixture texts under the test
//! suite's `hash` embedder, so that which step decides is known.

use actix_web::http::StatusCode;
use clusterd::{embedding::HashEmbedder, settings::Settings};
use serde_json::{Value, json};

use crate::{
    helpers::{TestApp, fresh_database, spawn_app_on, spawn_app_with, test_settings},
    operations::{Via, action_frame, confirm_frame, event_log, get, op, post_clustered, sql},
};

const BASE: &str = "how much is the vip ticket for the paris show";
const NEAR: &str = "how much is the vip ticket for the berlin show";

/// The cosine of `NEAR` to `BASE` under the test embedder.
fn near_similarity() -> f32 {
    let embedder = HashEmbedder::new(test_settings("postgres://unused").embedder.dimensions);
    let (a, b) = (embedder.embed_one(BASE), embedder.embed_one(NEAR));
    let s: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    assert!((0.4..0.95).contains(&s), "the fixture texts are similar, not alike: {s}");
    s
}

/// Settings whose bars are raw cosines: a core join at `core`, a review
/// join at `review`.
fn bars(core: f32, review: f32) -> impl FnOnce(&mut Settings) {
    move |s| {
        s.clustering.trigram_members = 0;
        s.clustering.background_prior = 0.0;
        // The measured background never outweighs the prior of 0.
        s.clustering.background_prior_pairs = 1e12;
        s.clustering.core_threshold = core;
        s.clustering.review_threshold = review;
    }
}

/// Settings under which `NEAR` joins `BASE`'s cluster for review.
pub(crate) fn review_between() -> impl FnOnce(&mut Settings) {
    let s = near_similarity();
    bars(s + 0.02, s - 0.2)
}

async fn bar_offset(app: &TestApp, creator: &str) -> f32 {
    let rows = sql(app, "SELECT bar_offset FROM creators WHERE creator_id = $1", [creator.into()]).await;
    get(rows.first().expect("the creator has a row"), "bar_offset")
}

fn id(value: &Value) -> String {
    value["id"].as_str().expect("an id").to_owned()
}

/// A cluster of `BASE` (core) and `NEAR` (review); returns the cluster id,
/// the core message and the review message.
pub(crate) async fn cluster_with_review(app: &TestApp, creator: &str) -> (String, Value, Value) {
    let base = post_clustered(app, creator, BASE).await;
    assert_eq!((base["membership"].as_str(), base["similarity"].as_f64()), (Some("core"), Some(1.0)), "{base}");
    let cluster = base["cluster_id"].as_str().expect("a cluster").to_owned();
    let near = post_clustered(app, creator, NEAR).await;
    assert_eq!(near["cluster_id"], cluster.as_str(), "{near}");
    assert_eq!(near["membership"], "review", "{near}");
    let similarity = near["similarity"].as_f64().expect("a similarity");
    assert!((similarity - f64::from(near_similarity())).abs() < 1e-3, "{near}");
    (cluster, base, near)
}

#[actix_web::test]
async fn weaker_evidence_joins_for_review_and_shows_everywhere() {
    let app = spawn_app_with(review_between()).await;
    let creator = "creator-review";
    let (cluster, base, near) = cluster_with_review(&app, creator).await;
    let (_, detail) = app.get(&format!("/v1/clusters/{cluster}")).await;
    assert_eq!((detail["size"].clone(), detail["core_size"].clone()), (json!(2), json!(1)), "{detail}");
    let members: Vec<(Value, Value)> = detail["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| (m["id"].clone(), m["membership"].clone()))
        .collect();
    assert_eq!(members, vec![(base["id"].clone(), json!("core")), (near["id"].clone(), json!("review"))]);
    // The label is the core member's text, and the decision's event
    // carries the membership.
    assert_eq!(detail["label"], BASE);
    let log = event_log(&app, creator).await;
    let joined = log.last().expect("events");
    assert_eq!(
        (joined["event"].as_str(), joined["message"]["membership"].as_str()),
        (Some("cluster.updated"), Some("review"))
    );
    assert_eq!(joined["cluster"]["core_size"], 1);
    let (_, list) = app.get(&format!("/v1/creators/{creator}/clusters")).await;
    assert_eq!(list["clusters"][0]["core_size"], 1, "{list}");
    assert_eq!(list["clusters"][0]["sample_messages"][1]["membership"], "review", "{list}");
    app.assert_cluster_invariants(creator).await;
}

#[actix_web::test]
async fn an_action_answers_the_core_and_holds_review_members_back() {
    for via in [Via::Http, Via::Ws] {
        let app = spawn_app_with(review_between()).await;
        let mut ws = app.connect_ws().await;
        let creator = "creator-held-back";
        let (cluster, base, near) = cluster_with_review(&app, creator).await;
        let twin = post_clustered(&app, creator, BASE).await;
        assert_eq!((twin["cluster_id"].as_str(), twin["membership"].as_str()), (Some(cluster.as_str()), Some("core")));
        let before = event_log(&app, creator).await.len();

        let (status, answer) = op(&app, &mut ws, via, action_frame(&cluster, "99 euros.")).await;
        assert_eq!(status, StatusCode::OK, "{via:?}: {answer}");
        assert_eq!(answer["answered"], json!([base["id"], twin["id"]]), "{via:?}: {answer}");
        let held = &answer["held_back"];
        assert_eq!(held.as_array().map(Vec::len), Some(1), "{via:?}: {answer}");
        assert_eq!(held[0]["message_id"], near["id"]);
        let own = held[0]["cluster_id"].as_str().expect("a cluster").to_owned();
        assert_eq!(
            (answer["status"].as_str(), answer["size"].clone(), answer["core_size"].clone()),
            (Some("actioned"), json!(2), json!(2))
        );

        // The review member is in an open cluster of its own, as its core.
        let (_, alone) = app.get(&format!("/v1/clusters/{own}")).await;
        assert_eq!(
            (alone["status"].as_str(), alone["size"].clone(), alone["core_size"].clone()),
            (Some("open"), json!(1), json!(1))
        );
        assert_eq!(
            (alone["messages"][0]["id"].clone(), alone["messages"][0]["membership"].clone()),
            (near["id"].clone(), json!("core"))
        );

        // Its events: the removal's, then the action's.
        let log = event_log(&app, creator).await;
        let events: Vec<&Value> = log[before..].iter().collect();
        assert_eq!(events.len(), 2, "{events:?}");
        let (removed, actioned) = (events[0], events[1]);
        assert_eq!(removed["event"], "message.removed");
        assert_eq!(
            (removed["cluster"]["id"].as_str(), removed["cluster"]["size"].clone()),
            (Some(cluster.as_str()), json!(2))
        );
        assert_eq!(
            (removed["message"]["id"].clone(), removed["message"]["cluster_id"].as_str()),
            (near["id"].clone(), Some(own.as_str()))
        );
        assert_eq!(removed["new_cluster"]["id"], own.as_str());
        assert_eq!(actioned["event"], "cluster.actioned");
        assert_eq!(actioned["cluster"]["id"], cluster.as_str());
        // Holding back is not a correction: the creator has not looked.
        assert_eq!(bar_offset(&app, creator).await, 0.0);
        app.assert_cluster_invariants(creator).await;

        // Told to, an action answers the review members too.
        let creator = "creator-include-review";
        let (cluster, base, near) = cluster_with_review(&app, creator).await;
        let before = event_log(&app, creator).await.len();
        let mut frame = action_frame(&cluster, "99 euros, everywhere.");
        frame["include_review"] = json!(true);
        let (status, answer) = op(&app, &mut ws, via, frame).await;
        assert_eq!(status, StatusCode::OK, "{via:?}: {answer}");
        assert_eq!(answer["answered"], json!([base["id"], near["id"]]));
        assert_eq!(answer["held_back"], json!([]));
        assert_eq!((answer["size"].clone(), answer["core_size"].clone()), (json!(2), json!(2)));
        let log = event_log(&app, creator).await;
        assert_eq!(
            log[before..].iter().map(|e| e["event"].clone()).collect::<Vec<_>>(),
            vec![json!("cluster.actioned")]
        );
        app.assert_cluster_invariants(creator).await;
    }
}

#[actix_web::test]
async fn a_confirmed_review_member_joins_the_core_and_lowers_the_bar() {
    for via in [Via::Http, Via::Ws] {
        let app = spawn_app_with(review_between()).await;
        let mut ws = app.connect_ws().await;
        let creator = "creator-confirm";
        let (cluster, base, near) = cluster_with_review(&app, creator).await;
        let before = event_log(&app, creator).await.len();

        let (status, answer) = op(&app, &mut ws, via, confirm_frame(&cluster, &id(&near))).await;
        assert_eq!(status, StatusCode::OK, "{via:?}: {answer}");
        assert_eq!((answer["cluster"]["size"].clone(), answer["cluster"]["core_size"].clone()), (json!(2), json!(2)));
        assert_eq!(
            (answer["message"]["id"].clone(), answer["message"]["membership"].clone()),
            (near["id"].clone(), json!("core"))
        );
        let log = event_log(&app, creator).await;
        assert_eq!(log.len(), before + 1, "one event");
        let event = log.last().expect("an event");
        assert_eq!(event["event"], "message.confirmed");
        assert_eq!(
            (event["cluster"].clone(), event["message"].clone()),
            (answer["cluster"].clone(), answer["message"].clone())
        );
        // The creator said they match, below the core bar: it comes down.
        assert!(bar_offset(&app, creator).await < 0.0, "{via:?}");
        app.assert_cluster_invariants(creator).await;

        // A core member, or one not in that cluster: refused, nothing changes.
        let (status, _) = op(&app, &mut ws, via, confirm_frame(&cluster, &id(&near))).await;
        assert_eq!(status, StatusCode::CONFLICT);
        let (status, _) = op(&app, &mut ws, via, confirm_frame(&cluster, &id(&base))).await;
        assert_eq!(status, StatusCode::CONFLICT);
        let other = post_clustered(&app, creator, "a completely different question about parking").await;
        let other_cluster = other["cluster_id"].as_str().expect("a cluster").to_owned();
        assert_ne!(other_cluster, cluster);
        let (status, _) = op(&app, &mut ws, via, confirm_frame(&other_cluster, &id(&near))).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = op(&app, &mut ws, via, confirm_frame(&cluster, "not-an-id")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let unchanged = event_log(&app, creator).await.len();

        // In an actioned cluster: refused.
        let (status, _) = op(&app, &mut ws, via, action_frame(&cluster, "Answered.")).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = op(&app, &mut ws, via, confirm_frame(&cluster, &id(&near))).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(event_log(&app, creator).await.len(), unchanged + 1, "only the action's event");
    }
}

#[actix_web::test]
async fn a_removal_raises_the_bar_and_another_instance_decides_with_it() {
    // Bars at which NEAR joins BASE's cluster as core, as long as nothing
    // has been learned.
    let s = near_similarity();
    let settings = || bars(s - 0.02, s - 0.3);
    let creator = "creator-learns";

    let control = spawn_app_with(settings()).await;
    post_clustered(&control, creator, BASE).await;
    let near = post_clustered(&control, creator, NEAR).await;
    assert_eq!(near["membership"], "core", "unlearned, NEAR is core: {near}");

    let db = fresh_database().await;
    let app = spawn_app_on(&db, settings()).await;
    let base = post_clustered(&app, creator, BASE).await;
    let twin = post_clustered(&app, creator, BASE).await;
    let cluster = base["cluster_id"].as_str().expect("a cluster").to_owned();
    assert_eq!((twin["cluster_id"].as_str(), twin["membership"].as_str()), (Some(cluster.as_str()), Some("core")));
    // The creator says the twin differs, though it is identical: the bar
    // rises.
    let (status, body) = app.delete(&format!("/v1/clusters/{cluster}/messages/{}", id(&twin))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let offset = bar_offset(&app, creator).await;
    assert!(offset > 0.03, "the bar rose by {offset}");

    // A new instance on the same database (a restart, or another
    // instance): its decisions use the creator's learned bar.
    let other = spawn_app_on(&db, settings()).await;
    let near = post_clustered(&other, creator, NEAR).await;
    assert_eq!(
        (near["cluster_id"].as_str(), near["membership"].as_str()),
        (Some(cluster.as_str()), Some("review")),
        "{near}"
    );
    assert_eq!(bar_offset(&other, creator).await, offset);
    other.assert_cluster_invariants(creator).await;
}
