//! `POST /v1/access/revoke`: a revoked user's sockets leave the campaign's
//! rooms on every instance, or are disconnected, and the cache forgets.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::Client;
use crate::fleet::Redis;
use crate::helpers::*;

async fn revoke(app: &TestApp, body: Value) -> (u16, Value) {
    let res = app.http.post(app.url("/v1/access/revoke")).bearer_auth(PUBLISH_TOKEN).json(&body).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Waits for `access_revoked`, skipping other events.
async fn revoked(client: &mut Client) -> Value {
    loop {
        let (name, arg) = client.expect_event().await;
        if name == "access_revoked" {
            return arg;
        }
    }
}

#[tokio::test]
async fn a_revoked_member_leaves_the_campaign_rooms_and_only_those() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.membership_cache_ttl = Duration::from_secs(60)).await;
    run_sql(&app.database_url, "INSERT INTO campaign_members VALUES ('c2', 'alice');").await;
    let mut alice = app.connect("alice").await;
    for (kind, id) in [("campaign", "c1"), ("settlement", "s1"), ("structure", "st1"), ("campaign", "c2")] {
        assert_eq!(alice.subscribe(kind, id).await["success"], true, "{kind} {id}");
    }
    let mut bob = app.connect("bob").await;
    bob.subscribe("campaign", "c1").await;
    // The application removes her, then tells herald.
    run_sql(&app.database_url, "DELETE FROM campaign_members WHERE campaign_id = 'c1' AND user_id = 'alice';").await;
    assert_eq!(revoke(&app, json!({"userId": "alice", "campaignId": "c1"})).await, (202, json!({"revoked": true})));
    assert_eq!(revoked(&mut alice).await, json!({"campaignId": "c1"}));

    app.publish(&bodies::structure_updated("c1", "s1", "st1")).await;
    assert_eq!(bob.expect_event().await.0, "structure_updated");
    alice.expect_silence(Duration::from_millis(300)).await;
    // Her other campaign still reaches her.
    app.publish(&bodies::state_invalidated("c2")).await;
    assert_eq!(alice.expect_event().await.0, "state_invalidated");
    // The cached "member" is gone at once, despite the 60 s TTL.
    assert_eq!(alice.subscribe("campaign", "c1").await["error"], "Unauthorized");
    assert_eq!(alice.subscribe("settlement", "s1").await["error"], "Unauthorized");
    let m = app.metrics().await;
    assert_eq!(metric(&m, r#"herald_subscriptions{kind="campaign"}"#), 2.0, "bob's c1 and alice's c2");
}

#[tokio::test]
async fn revoking_a_user_without_a_campaign_disconnects_all_of_their_sockets() {
    let app = spawn_app().await;
    let first = app.connect("alice").await;
    let second = app.connect("alice").await;
    let mut bob = app.connect("bob").await;
    bob.subscribe("campaign", "c1").await;
    assert_eq!(revoke(&app, json!({"userId": "alice"})).await.0, 202);
    assert!(first.closed_within(Duration::from_secs(2)).await);
    assert!(second.closed_within(Duration::from_secs(2)).await);
    app.publish(&bodies::state_invalidated("c1")).await;
    assert_eq!(bob.expect_event().await.0, "state_invalidated");
}

#[tokio::test]
async fn bad_revocations_are_refused_and_change_nothing() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    alice.subscribe("campaign", "c1").await;
    let no_token = app.http.post(app.url("/v1/access/revoke")).json(&json!({"userId": "alice"})).send().await.unwrap();
    assert_eq!(no_token.status().as_u16(), 401);
    for (body, path) in [
        (json!({}), "body"),
        (json!({"userId": ""}), "userId"),
        (json!({"userId": 5}), "userId"),
        (json!({"userId": "alice", "campaignId": "c:1"}), "campaignId"),
        (json!({"userId": "alice", "everything": true}), "everything"),
    ] {
        let (status, answer) = revoke(&app, body.clone()).await;
        assert_eq!(status, 400, "{body}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.starts_with(path), "{error:?} should name {path}");
    }
    app.publish(&bodies::state_invalidated("c1")).await;
    assert_eq!(alice.expect_event().await.0, "state_invalidated", "still subscribed");
}

#[tokio::test]
async fn a_revocation_reaches_every_instance_and_is_measured() {
    let Some(redis) = Redis::start().await else { return };
    let mut apps = Vec::new();
    for _ in 0..2 {
        let url = redis.url();
        apps.push(spawn_app_with(Backend::Sqlite, move |c| c.redis_url = Some(url)).await);
    }
    let mut latencies = Vec::new();
    for round in 0..10 {
        let mut sockets = Vec::new();
        for app in &apps {
            let mut c = app.connect("alice").await;
            assert_eq!(c.subscribe("campaign", "c1").await["success"], true);
            sockets.push(c);
        }
        let started = Instant::now();
        assert_eq!(revoke(&apps[round % 2], json!({"userId": "alice", "campaignId": "c1"})).await.0, 202);
        let accepted = started.elapsed();
        // Published right after the 202, on the other instance: never delivered to her.
        assert_eq!(apps[(round + 1) % 2].publish(&bodies::state_invalidated("c1")).await.0, 202);
        for c in &mut sockets {
            assert_eq!(revoked(c).await["campaignId"], "c1");
            latencies.push(started.elapsed().saturating_sub(accepted).as_secs_f64() * 1e3);
        }
        for c in &mut sockets {
            c.expect_silence(Duration::from_millis(200)).await;
        }
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "revocation: from the 202 to access_revoked on every instance: p50 {:.2} ms, max {:.2} ms ({} sockets)",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
        latencies.len()
    );
}
