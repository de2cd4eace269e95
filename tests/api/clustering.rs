//! The clustering decision, end to end through the API.

use sea_orm::ConnectionTrait;
use serde_json::json;

use crate::helpers::{PATIENCE, spawn_app, spawn_app_with};

#[actix_web::test]
async fn similar_messages_share_a_cluster_and_unrelated_ones_do_not() {
    let app = spawn_app().await;
    let creator = "creator-similar";
    let price = app.post_message(creator, "How much does the ticket cost?").await;
    let price_again = app.post_message(creator, "how much does the  TICKET cost?").await; // same normalised text
    let price_typo = app.post_message(creator, "How much does the tickt cost??").await; // trigram match
    let merch = app.post_message(creator, "Will you restock the blue hoodie in XL soon").await;

    let price = app.wait_clustered(&price).await;
    let price_again = app.wait_clustered(&price_again).await;
    let price_typo = app.wait_clustered(&price_typo).await;
    let merch = app.wait_clustered(&merch).await;

    assert_eq!(price["cluster_id"], price_again["cluster_id"]);
    assert_eq!(price["cluster_id"], price_typo["cluster_id"]);
    assert_ne!(price["cluster_id"], merch["cluster_id"]);

    let (_, list) = app.get(&format!("/v1/creators/{creator}/clusters?sort=size")).await;
    let clusters = list["clusters"].as_array().expect("a list");
    assert_eq!(clusters.len(), 2, "{list}");
    assert_eq!(clusters[0]["size"], 3);
    assert_eq!(clusters[0]["label"], "How much does the ticket cost?");
    assert_eq!(clusters[0]["sample_messages"].as_array().map(Vec::len), Some(3));
    assert_eq!(clusters[1]["size"], 1);
    assert_eq!(list["next_cursor"], json!(null));
}

/// A flush returns once everything accepted before it is decided and its
/// events stored, without waiting for the embedder's batch to fill or its
/// timer: here a batch would otherwise wait a minute.
#[actix_web::test]
async fn a_flush_returns_once_everything_accepted_before_it_is_decided() {
    let app = spawn_app_with(|s| {
        s.embedder.max_wait_ms = 60_000;
        s.embedder.batch_size = 64;
        s.clustering.max_group = 1;
    })
    .await;
    let creator = "creator-flush";
    let mut ws = app.connect_ws().await;
    let mut ids = vec![ws.ingest(creator, "Is there a discount for students?").await];
    for text in ["When do the doors open?", "When do doors open", "Is parking free at the venue"] {
        ids.push(app.post_message(creator, text).await);
    }
    tokio::time::timeout(PATIENCE / 2, app.flush()).await.expect("the flush does not wait for the embedder's timer");
    for id in &ids {
        let (_, message) = app.get(&format!("/v1/messages/{id}")).await;
        assert_eq!(message["status"], "clustered", "{message}");
    }
    assert_eq!(app.count("events", &format!("creator_id = '{creator}'")).await, 4);
    // Nothing queued: a flush returns at once, and changes nothing.
    let before = app.fingerprint(&["messages", "clusters", "events"]).await;
    app.flush().await;
    assert_eq!(app.fingerprint(&["messages", "clusters", "events"]).await, before);
}

#[actix_web::test]
async fn creators_never_share_clusters() {
    let app = spawn_app().await;
    let a = app.post_message("creator-a", "Where can I buy the tickets?").await;
    let b = app.post_message("creator-b", "Where can I buy the tickets?").await;
    let a = app.wait_clustered(&a).await;
    let b = app.wait_clustered(&b).await;
    assert_ne!(a["cluster_id"], b["cluster_id"]);
}

#[actix_web::test]
async fn listing_pages_with_cursors_and_filters() {
    let app = spawn_app().await;
    let creator = "creator-pages";
    let texts = [
        "When is the next concert in Paris",
        "Do you ship merch to Brazil",
        "Can I get a refund for my ticket",
        "What camera do you use for your videos",
        "Is the meet and greet included with VIP",
    ];
    for text in texts {
        let id = app.post_message(creator, text).await;
        app.wait_clustered(&id).await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/creators/{creator}/clusters?limit=2");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = app.get(&path).await;
        assert_eq!(status, 200, "{page}");
        for c in page["clusters"].as_array().expect("a list") {
            seen.push(c["label"].as_str().expect("a label").to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let mut expected: Vec<String> = texts.iter().rev().map(|t| t.to_string()).collect();
    assert_eq!(seen, expected, "most recent first, each exactly once");
    expected.sort();

    let (_, actioned) = app.get(&format!("/v1/creators/{creator}/clusters?status=actioned")).await;
    assert_eq!(actioned["clusters"], json!([]));
    let (_, all) = app.get(&format!("/v1/creators/{creator}/clusters?status=all&limit=100")).await;
    assert_eq!(all["clusters"].as_array().map(Vec::len), Some(5));
}

#[actix_web::test]
async fn a_message_that_cannot_be_clustered_fails_alone_and_visibly() {
    let app = spawn_app().await;
    // Embedded rows left by an earlier life (received an hour ago, so the
    // recovery sweep takes them together in one group); one is corrupt: it
    // claims to be embedded but has no embedding.
    app.db
        .execute_unprepared(
            "INSERT INTO messages (id, creator_id, text, norm_key, sent_at, received_at, status, embedding)
             SELECT gen_random_uuid(), 'creator-poison', 'good message ' || g, sha256(('good message ' || g)::bytea),
                    now(), now() - interval '1 hour', 'embedded', array_fill(0.1::real, ARRAY[384])::vector
             FROM generate_series(1, 4) AS g;
             INSERT INTO messages (id, creator_id, text, norm_key, sent_at, received_at, status)
             VALUES ('0190b5a0-0000-7000-8000-00000000bad0', 'creator-poison', 'corrupt', sha256('corrupt'::bytea),
                     now(), now() - interval '1 hour', 'embedded');",
        )
        .await
        .expect("insert leftovers");
    // Rows the pipeline never queued: the recovery sweep finds them on its
    // timer, so this waits on the sweep.
    let failed = app.wait_status("0190b5a0-0000-7000-8000-00000000bad0", "failed").await;
    assert!(failed["error"].as_str().is_some_and(|e| e.contains("no embedding")), "{failed}");
    assert_eq!(failed["cluster_id"], json!(null));
    assert_eq!(app.count("messages", "creator_id = 'creator-poison' AND status = 'clustered'").await, 4);
    let id = app.post_message("creator-poison", "and life goes on").await;
    app.wait_clustered(&id).await;
}

/// The in-memory trigram step must agree with pg_trgm, which SPEC names.
#[actix_web::test]
async fn trigram_similarity_matches_pg_trgm() {
    use clusterd::clustering::trigram::Trigrams;
    let app = spawn_app().await;
    let texts = [
        "How much does the ticket cost?",
        "how much does the tickt cost??",
        "what is my credit score",
        "what is my credit limit",
        "a",
        "I_want_a refund!!! now",
        "  ,;  ",
        "Ünïcode ÉTÉ café",
        "unicode ete cafe",
        "how do i say thank you in spanish",
        "in spanish, how do you say thanks",
        "x1 2b 33c 4444",
    ];
    for a in texts {
        for b in texts {
            let row = app
                .db
                .query_one_raw(sea_orm::Statement::from_sql_and_values(
                    sea_orm::DbBackend::Postgres,
                    "SELECT similarity($1, $2) AS s",
                    [a.into(), b.into()],
                ))
                .await
                .expect("similarity()")
                .expect("a row");
            let expected: f32 = row.try_get("", "s").expect("a real");
            let ours = Trigrams::of(a).similarity(&Trigrams::of(b));
            assert!((ours - expected).abs() < 1e-6, "similarity({a:?}, {b:?}): pg_trgm {expected}, ours {ours}");
        }
    }
}

#[actix_web::test]
async fn a_new_cluster_like_an_actioned_one_carries_its_response() {
    let app = spawn_app().await;
    let creator = "creator-suggest";
    let first = app.post_message(creator, "How much is the VIP ticket?").await;
    let first = app.wait_clustered(&first).await;
    let answered = first["cluster_id"].as_str().expect("a cluster").to_owned();
    let (status, _) =
        app.post(&format!("/v1/clusters/{answered}/action"), &json!({"response_text": "VIP is 99 euros."})).await;
    assert_eq!(status, 200);

    let mut ws = app.connect_ws().await;
    let since = ws.subscribe(creator, None).await["last_event_id"].as_i64().expect("an id");
    let again = app.post_message(creator, "how much is the VIP ticket??").await;
    let again = app.wait_clustered(&again).await;
    let other = app.post_message(creator, "Will you restock the blue hoodie in XL soon").await;
    let other = app.wait_clustered(&other).await;

    let suggested = again["cluster_id"].as_str().expect("a cluster");
    assert_ne!(suggested, answered, "an actioned cluster takes no new message");
    let (_, cluster) = app.get(&format!("/v1/clusters/{suggested}")).await;
    assert_eq!(cluster["suggested_response"], "VIP is 99 euros.", "{cluster}");
    assert_eq!(cluster["status"], "open");
    let (_, unrelated) = app.get(&format!("/v1/clusters/{}", other["cluster_id"].as_str().expect("a cluster"))).await;
    assert_eq!(unrelated["suggested_response"], json!(null), "{unrelated}");

    // The events say so, as they happened.
    let events = ws.events(2).await;
    assert_eq!(events[0]["event_id"], since + 1);
    assert_eq!(events[0]["event"], "cluster.created");
    assert_eq!(events[0]["cluster"]["suggested_response"], "VIP is 99 euros.");
    assert_eq!(events[1]["event"], "cluster.created");
    assert_eq!(events[1]["cluster"]["suggested_response"], json!(null));
}
