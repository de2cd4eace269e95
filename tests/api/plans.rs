//! The hot queries' plans, pinned: each must use the index chosen for it on
//! a realistically shaped table (many creators, few rows each), both as a
//! custom plan and as the generic plan prepared statements switch to.

use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait, Value};

use crate::helpers::{TestApp, spawn_app_with};

/// 400 creators x 60 messages in 20 clusters each (half of them actioned),
/// 8-dimensional vectors to keep set-up fast.
async fn populate(app: &TestApp) {
    app.db
        .execute_unprepared(
            "INSERT INTO clusters (id, creator_id, status, size, core_size, label, centroid, created_at, updated_at)
             SELECT gen_random_uuid(), 'creator-' || (g / 20), CASE WHEN g % 2 = 0 THEN 'open' ELSE 'actioned' END,
                    3, 3, 'label ' || g,
                    ARRAY[random(), random(), random(), random(), random(), random(), random(), random()]::real[]::vector,
                    now() - g * interval '1 second', now() - g * interval '1 second'
             FROM generate_series(0, 7999) AS g;
             INSERT INTO messages (id, creator_id, text, norm_key, sent_at, received_at, status, cluster_id,
                                   membership, similarity, embedding)
             SELECT gen_random_uuid(), c.creator_id, 'message ' || c.label || ' ' || k,
                    sha256(('message ' || c.label || ' ' || k)::bytea), now(), now(), 'clustered', c.id,
                    'core', 1, c.centroid
             FROM clusters c CROSS JOIN generate_series(1, 3) AS k;
             ANALYZE clusters; ANALYZE messages;",
        )
        .await
        .expect("populate");
}

/// The JSON plan of `sql` with `values`, custom or generic.
async fn plan(app: &TestApp, sql: &str, values: Vec<Value>, generic: bool) -> String {
    let tx = app.db.begin().await.expect("begin");
    let mode = if generic { "force_generic_plan" } else { "force_custom_plan" };
    tx.execute_unprepared(&format!("SET LOCAL plan_cache_mode = {mode}")).await.expect("set plan mode");
    let row = tx
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("EXPLAIN (FORMAT JSON) {sql}"),
            values,
        ))
        .await
        .expect("explain")
        .expect("a plan");
    let plan: serde_json::Value = row.try_get("", "QUERY PLAN").expect("a JSON plan");
    tx.rollback().await.expect("rollback");
    plan.to_string()
}

fn assert_uses(plan: &str, indexes: &[&str]) {
    for index in indexes {
        assert!(plan.contains(&format!("\"Index Name\":\"{index}\"")), "plan does not use {index}: {plan}");
    }
    assert!(!plan.contains("Seq Scan"), "plan has a sequential scan: {plan}");
}

#[actix_web::test]
async fn hot_queries_use_their_indexes() {
    let app = spawn_app_with(|s| s.embedder.dimensions = 8).await;
    populate(&app).await;
    let ids = Value::Array(
        sea_orm::sea_query::ArrayType::Uuid,
        Some(Box::new(vec![Value::Uuid(Some(uuid::Uuid::now_v7())), Value::Uuid(Some(uuid::Uuid::now_v7()))])),
    );
    let texts = |items: &[&str]| {
        Value::Array(
            sea_orm::sea_query::ArrayType::String,
            Some(Box::new(items.iter().map(|s| Value::String(Some(s.to_string()))).collect())),
        )
    };
    let vector = "[0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5]";
    for generic in [false, true] {
        let p = plan(&app, clusterd::repository::LOAD_GROUP_SQL, vec![ids.clone()], generic).await;
        // The group's rows come through the primary key or the partial
        // index of unfinished messages, both fine.
        assert!(p.contains("messages_pkey") || p.contains("messages_unfinished"), "{p}");
        assert_uses(&p, &["messages_by_norm_key", "clusters_pkey"]);
        let p =
            plan(&app, clusterd::repository::LOAD_OPEN_SQL, vec![texts(&["creator-7", "creator-8"])], generic).await;
        assert_uses(&p, &["clusters_open_by_creator"]);
        let suggest = vec![texts(&["creator-7", "creator-8"]), texts(&[vector, vector]), Value::from(0.6f32)];
        let p = plan(&app, clusterd::repository::SUGGEST_SQL, suggest, generic).await;
        assert!(!p.contains("Seq Scan"), "{p}");
        let claim = vec![uuid::Uuid::now_v7().into(), 2000i64.into(), 1000i64.into()];
        let p = plan(&app, clusterd::repository::UNFINISHED_SQL, claim, generic).await;
        assert_uses(&p, &["messages_unfinished"]);

        let list = "SELECT id, size FROM clusters WHERE creator_id = $1 AND status = 'open'
                    ORDER BY updated_at DESC, id DESC LIMIT 21";
        let p = plan(&app, list, vec!["creator-7".into()], generic).await;
        assert!(p.contains("clusters_by_creator_recent") || p.contains("clusters_open_by_creator"), "{p}");
        assert!(!p.contains("Seq Scan"), "{p}");

        let events = "SELECT event_id FROM events WHERE creator_id = $1 AND event_id > $2 AND event_id <= $3
                      ORDER BY event_id LIMIT 500";
        let p = plan(&app, events, vec!["creator-7".into(), 0i64.into(), 10i64.into()], generic).await;
        assert_uses(&p, &["events_pkey"]);
    }
}
