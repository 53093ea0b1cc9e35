//! The membership store: SQLite always, PostgreSQL when
//! `HERALD_TEST_DATABASE_URL` is set (CI sets it), and the cache in front.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

async fn hierarchy_and_membership_decide(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.store.membership_cache_ttl = Duration::from_millis(300)).await;
    let mut dave = app.connect("dave").await;
    assert_eq!(dave.subscribe("structure", "st1").await["error"], "Unauthorized");
    // dave joins c1: once the cached "no" expires, the whole tree opens.
    run_sql(&app.database_url, "INSERT INTO campaign_members (campaign_id, user_id) VALUES ('c1', 'dave');").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    for (kind, id) in [("campaign", "c1"), ("settlement", "s1"), ("structure", "st1")] {
        assert_eq!(dave.subscribe(kind, id).await, json!({"success": true}), "{backend:?} {kind}");
    }
    // Removed again: after the TTL, a new subscription is refused.
    run_sql(&app.database_url, "DELETE FROM campaign_members WHERE user_id = 'dave';").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut again = app.connect("dave").await;
    assert_eq!(again.subscribe("campaign", "c1").await["error"], "Unauthorized", "{backend:?}");
    // A structure moved to another campaign's settlement follows its new parent.
    run_sql(&app.database_url, "UPDATE structures SET settlement_id = 's2' WHERE id = 'st1';").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut carol = app.connect("carol").await;
    assert_eq!(carol.subscribe("structure", "st1").await["success"], true, "{backend:?}");
}

#[tokio::test]
async fn sqlite_store_follows_membership_changes_after_the_cache_ttl() {
    hierarchy_and_membership_decide(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_store_follows_membership_changes_after_the_cache_ttl() {
    if postgres_url().is_none() {
        return;
    }
    hierarchy_and_membership_decide(Backend::Postgres).await;
}

#[tokio::test]
async fn postgres_without_migrations_needs_the_relations() {
    let Some(base) = postgres_url() else { return };
    let schema = format!("herald_empty_{:08x}", rand::random::<u32>());
    let pool = sqlx::PgPool::connect(&base).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&pool).await.unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    let mut config = herald::Config::defaults();
    config.listen = "127.0.0.1:0".into();
    config.auth.jwt_secret = Some(JWT_SECRET.into());
    config.publish.publish_token = Some(PUBLISH_TOKEN.into());
    config.store.database_url = url.clone();
    config.store.database_migrate = false;
    let err = herald::Application::build(config.clone()).await.err().expect("refused");
    let err = herald::telemetry::error_chain(&err);
    assert!(err.contains("campaign_members"), "{err}");
    // Views over the application's own tables are enough, with the table
    // herald writes and its index (its migrations, as the README says).
    sqlx::raw_sql(&format!(
        "SET search_path = {schema}; {} {}",
        include_str!("../../migrations/postgres/0002_user_revocations.sql"),
        include_str!("../../migrations/postgres/0003_user_revocations_by_time.sql")
    ))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::raw_sql(&format!(
        "SET search_path = {schema};
         CREATE TABLE app_memberships (campaign TEXT, member TEXT, role TEXT);
         CREATE TABLE app_settlements (id TEXT, campaign TEXT, name TEXT);
         CREATE TABLE app_structures (id TEXT, settlement TEXT);
         CREATE VIEW campaign_members AS SELECT campaign AS campaign_id, member AS user_id FROM app_memberships;
         CREATE VIEW settlements AS SELECT id, campaign AS campaign_id FROM app_settlements;
         CREATE VIEW structures AS SELECT id, settlement AS settlement_id FROM app_structures;
         INSERT INTO app_memberships VALUES ('c9', 'erin', 'gm');
         INSERT INTO app_settlements VALUES ('s9', 'c9', 'Town');"
    ))
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let app = herald::Application::build(config).await.expect("views suffice");
    let addr = app.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let mut erin = crate::client::Client::connect(addr, Some(json!({"token": token("erin")})), "").await.unwrap();
    assert_eq!(erin.subscribe("settlement", "s9").await, json!({"success": true}));
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_unreachable_store_answers_internal_error_and_readyz_503() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    // Drop the relation out from under the running gateway.
    run_sql(&app.database_url, "DROP TABLE campaign_members;").await;
    let ack = alice.subscribe("campaign", "c1").await;
    assert_eq!(ack, json!({"success": false, "error": "Internal error"}));
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap().status().as_u16();
    assert_eq!(ready, 503);
    // Restore it: answers come back without a restart.
    run_sql(&app.database_url, "CREATE TABLE campaign_members (campaign_id TEXT NOT NULL, user_id TEXT NOT NULL); INSERT INTO campaign_members VALUES ('c1', 'alice');").await;
    assert_eq!(alice.subscribe("campaign", "c1").await["success"], true);
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap().status().as_u16();
    assert_eq!(ready, 200);
}

#[tokio::test]
async fn instances_starting_together_on_one_sqlite_file_all_start() {
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("shared.db").display());
        let starts = (0..4).map(|_| {
            let mut config = herald::Config::defaults();
            config.listen = "127.0.0.1:0".into();
            config.auth.jwt_secret = Some(JWT_SECRET.into());
            config.publish.publish_token = Some(PUBLISH_TOKEN.into());
            config.store.database_url = url.clone();
            tokio::spawn(herald::Application::build(config))
        });
        for start in starts.collect::<Vec<_>>() {
            let built = start.await.unwrap();
            assert!(built.is_ok(), "{}", built.err().map(|e| herald::telemetry::error_chain(&e)).unwrap_or_default());
        }
    }
}
