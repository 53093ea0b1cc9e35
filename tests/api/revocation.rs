//! `POST /v1/access/revoke`: a revoked user's sockets leave the campaign's
//! rooms on every instance, or are disconnected, and the cache forgets.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::{Client, ConnectError};
use crate::fleet::{Redis, in_fleet};
use crate::helpers::*;
use crate::proxy::Proxy;

async fn revoke(app: &TestApp, body: Value) -> (u16, Value) {
    let res = app.http.post(app.url("/v1/access/revoke")).bearer_auth(PUBLISH_TOKEN).json(&body).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// The next event, which must be `access_revoked`: nothing else may come
/// first (an event published after the revocation's 202 never does).
async fn revoked(client: &mut Client) -> Value {
    let (name, arg) = client.expect_event().await;
    assert_eq!(name, "access_revoked", "{arg}");
    arg
}

#[tokio::test]
async fn a_revoked_member_leaves_the_campaign_rooms_and_only_those() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.store.membership_cache_ttl = Duration::from_secs(60)).await;
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
    // In hook mode (HERALD_TEST_MEMBERSHIP=hook) the hook answered: 5 checks, and the 2 after the revocation.
    assert_eq!(app.hook.as_ref().map(|hook| (hook.calls(), hook.refused())), hook_mode().then_some((7, 0)));
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

async fn revoke_raw(app: &TestApp, body: &[u8]) -> (u16, Value) {
    let res = app
        .http
        .post(app.url("/v1/access/revoke"))
        .bearer_auth(PUBLISH_TOKEN)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// The revoke body follows the publish API's rules: one JSON object, nothing
/// after it, no unknown field, `campaignId` a valid id or absent (`null` is
/// not "absent": it would make a campaign revocation a user revocation).
#[tokio::test]
async fn bad_revocations_are_refused_and_change_nothing() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    alice.subscribe("campaign", "c1").await;
    let no_token = app.http.post(app.url("/v1/access/revoke")).json(&json!({"userId": "alice"})).send().await.unwrap();
    assert_eq!(no_token.status().as_u16(), 401);
    let long = json!({"userId": "a".repeat(257)}).to_string();
    let cases: &[(&str, &str)] = &[
        (r#"{}"#, "userId: required field is missing"),
        (r#"{"userId": ""}"#, "userId: "),
        (r#"{"userId": 5}"#, "userId: "),
        (r#"{"userId": null}"#, "userId: "),
        (r#"{"userId": "alice", "campaignId": "c:1"}"#, "campaignId: "),
        (r#"{"userId": "alice", "campaignId": null}"#, "campaignId: "),
        (r#"{"userId": "alice", "campaignId": ""}"#, "campaignId: "),
        (r#"{"userId": "alice", "campaignId": 1}"#, "campaignId: "),
        (r#"{"userId": "alice", "everything": true}"#, "everything: unknown field"),
        (r#"{"userId": "alice", "revokedAt": 0}"#, "revokedAt: unknown field"),
        (r#"{"userId": "zz\nFAKE-LOG-LINE ERROR herald: admin logged in"}"#, "userId: "),
        (r#"{"userId": "two words"}"#, "userId: "),
        (&long, "userId: "),
        (r#"{"userId": "alice"} GARBAGE"#, "body: invalid JSON"),
        (r#"{"userId": "alice"}{"userId": "bob"}"#, "body: invalid JSON"),
        (r#"{"userId": "alice", "campaignId": "c1"}]"#, "body: invalid JSON"),
        (r#"{"userId": "alice""#, "body: invalid JSON"),
        ("", "body: invalid JSON"),
        (r#"["alice"]"#, "body: expected an object"),
        (r#"["alice", "c1"]"#, "body: expected an object"),
        (r#"[{"userId": "alice"}]"#, "body: expected an object"),
        (r#""alice""#, "body: expected an object"),
        ("null", "body: expected an object"),
        ("5", "body: expected an object"),
    ];
    for (body, error) in cases {
        let (status, answer) = revoke_raw(&app, body.as_bytes()).await;
        assert_eq!(status, 400, "{body}");
        let got = answer["error"].as_str().unwrap_or_default();
        assert!(got.starts_with(error), "{body}: {got:?} should start with {error:?}");
        assert_eq!(answer.as_object().map(|o| o.len()), Some(1), "{answer}");
    }
    // Nothing was applied: she is still in the room, and not revoked as a user
    // (a token without `iat` would be refused after a user revocation).
    app.publish(&bodies::state_invalidated("c1")).await;
    assert_eq!(alice.expect_event().await.0, "state_invalidated", "still subscribed");
    app.connect("alice").await;
    // Whitespace around the one object is not trailing data.
    assert_eq!(revoke_raw(&app, b" \n{\"userId\": \"alice\", \"campaignId\": \"c1\"}\n ").await.0, 202);
    assert_eq!(revoked(&mut alice).await, json!({"campaignId": "c1"}));
}

#[tokio::test]
async fn a_revocation_reaches_every_instance_and_is_measured() {
    let Some(redis) = Redis::start().await else { return };
    let mut apps = Vec::new();
    for _ in 0..2 {
        let url = redis.url();
        apps.push(spawn_app_with(Backend::Sqlite, move |c| c.fleet.redis_url = Some(url)).await);
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

/// A token for `sub` issued at `iat` (`None`: no `iat` claim), valid for an hour.
fn token_issued(sub: &str, iat: Option<u64>) -> String {
    let mut claims = json!({ "sub": sub, "exp": now() + 3600 });
    if let Some(iat) = iat {
        claims["iat"] = json!(iat);
    }
    token_with(&jsonwebtoken::Header::default(), claims, JWT_SECRET.as_bytes())
}

async fn connects(app: &TestApp, token: &str) -> Result<Client, ConnectError> {
    app.try_connect(Some(json!({ "token": token })), "").await
}

/// A user revocation refuses, on every instance and after a restart, every
/// token of that user issued at or before it (or without `iat`); tokens
/// issued after it, and other users, connect.
#[tokio::test]
async fn a_revoked_user_cannot_come_back_with_an_older_token_on_any_instance_or_after_a_restart() {
    let Some(redis) = Redis::start().await else { return };
    let config = |url: String| {
        move |c: &mut herald::Config| {
            c.fleet.redis_url = Some(url);
            c.fleet.redis_prefix = "herald-user-revocation".into();
        }
    };
    // The fleet's one database (the instance that takes the revocation
    // stores it) outlives b, which restarts on it.
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("herald.db").display());
    let a = spawn_app_on(&database, config(redis.url())).await;
    let b = spawn_app_on(&database, config(redis.url())).await;
    run_sql(&database, FIXTURE).await;
    let before = token_issued("alice", Some(now() - 10));
    let without_iat = token_issued("alice", None);
    let mut on_b = connects(&b, &before).await.expect("connects before the revocation");
    assert_eq!(on_b.subscribe("campaign", "c1").await["success"], true);

    assert_eq!(revoke(&a, json!({"userId": "alice"})).await.0, 202);
    assert!(on_b.closed_within(Duration::from_secs(3)).await, "disconnected on the other instance");
    assert!(on_b.got_disconnect_packet(), "final");
    for (app, name) in [(&a, "a"), (&b, "b")] {
        for (token, what) in [(&before, "issued before"), (&without_iat, "without iat")] {
            assert_eq!(
                connects(app, token).await.err(),
                Some(ConnectError::Refused("Unauthorized".into())),
                "{what}, on instance {name}"
            );
        }
        let after = token_issued("alice", Some(now() + 1));
        let mut c = connects(app, &after).await.expect("a token issued after the revocation connects");
        assert_eq!(c.subscribe("campaign", "c1").await["success"], true);
        // A socket with a newer token cannot refresh to an older one.
        assert_eq!(c.emit_with_ack("refresh_token", json!({ "token": before })).await["error"], "Unauthorized");
        connects(app, &token("bob")).await.expect("another user is untouched");
    }
    let m = a.metrics().await;
    assert!(metric(&m, r#"herald_auth_failures_total{reason="revoked"}"#) >= 2.0, "{m}");

    // Instance b restarts on its database: it remembers.
    b.stop().await;
    let b = spawn_app_on(&database, config(redis.url())).await;
    assert_eq!(connects(&b, &before).await.err(), Some(ConnectError::Refused("Unauthorized".into())));
    connects(&b, &token_issued("alice", Some(now() + 1))).await.expect("a newer token still connects");
}

/// Subscribes in flight while a campaign revocation lands: their
/// membership checks read the store before the revocation (here they are
/// held on a table lock, then read "member"), and their joins come after it.
/// Every one is refused at its join, so after the 202 none of the user's
/// sockets is in the campaign's rooms, nothing published after it reaches
/// them, and the gauge agrees. (PostgreSQL, for the table lock.)
#[tokio::test]
async fn a_subscribe_racing_a_revocation_never_joins_after_it() {
    let Some(_) = postgres_url() else { return };
    let app = spawn_app_with(Backend::Postgres, |c| {
        c.store.membership_cache_ttl = Duration::ZERO;
        c.store.database_max_connections = 32;
    })
    .await;
    let mut bob = app.connect("bob").await;
    assert_eq!(bob.subscribe("campaign", "c1").await["success"], true);
    let mut sockets = Vec::new();
    for _ in 0..6 {
        sockets.push(app.connect("alice").await);
    }

    // Every membership check waits on the lock, having started before the revocation.
    use sqlx::Connection;
    let mut lock = sqlx::PgConnection::connect(&app.database_url).await.unwrap();
    let mut tx = lock.begin().await.unwrap();
    sqlx::query("LOCK TABLE campaign_members IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await.unwrap();
    let mut acks = Vec::new();
    for alice in &mut sockets {
        for (kind, id) in [("campaign", "c1"), ("settlement", "s1"), ("structure", "st1")] {
            let payload = json!({ format!("{kind}Id"): id });
            acks.push(alice.emit_in_flight(&format!("subscribe_{kind}"), payload, Duration::from_secs(20)));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(revoke(&app, json!({"userId": "alice", "campaignId": "c1"})).await.0, 202);
    // The checks read "member" (as of before the revocation), then the application removes her.
    tx.rollback().await.unwrap();
    run_sql(&app.database_url, "DELETE FROM campaign_members WHERE campaign_id = 'c1' AND user_id = 'alice';").await;
    for ack in futures_util::future::join_all(acks).await {
        assert_eq!(
            ack,
            Some(json!({"success": false, "error": "Unauthorized"})),
            "checked before the revocation, joined after"
        );
    }
    for alice in &mut sockets {
        let mut got = Vec::new();
        while let Some((name, arg)) = alice.try_next_event() {
            got.push((name, arg));
        }
        assert!(got.iter().all(|(name, _)| name == "access_revoked"), "{got:?}");
    }
    for body in [
        bodies::state_invalidated("c1"),
        bodies::settlement_updated("c1", "s1"),
        bodies::structure_updated("c1", "s1", "st1"),
    ] {
        assert_eq!(app.publish(&body).await.0, 202);
        assert!(bob.expect_event().await.1["offset"].is_string());
    }
    for alice in &mut sockets {
        alice.expect_silence(Duration::from_millis(100)).await;
    }
    let m = app.metrics().await;
    for kind in ["campaign", "settlement", "structure"] {
        let expected = if kind == "campaign" { 1.0 } else { 0.0 };
        assert_eq!(metric(&m, &format!("herald_subscriptions{{kind=\"{kind}\"}}")), expected, "{kind}: {m}");
    }
}

/// An instance applies every revocation logged after it started, however
/// late it first reads the control stream: here its reads are held back (a
/// proxy in front of Redis forwards only the connection it starts with)
/// while alice connects to it and another instance revokes her; once its
/// reads go through, alice is disconnected. (Before 0.3 it began reading at
/// the stream's head when it first reached it, past the revocation.)
#[tokio::test]
async fn a_revocation_logged_before_an_instance_first_reads_the_log_reaches_its_sockets() {
    let Some(redis) = Redis::start().await else { return };
    let a = spawn_app_with(Backend::Sqlite, |c| in_fleet(c, &redis.url(), "late-reader")).await;
    let proxy = Proxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    // The connection the instance opens at start is forwarded; its followers' reads wait.
    proxy.forward_only_first(1);
    let via_proxy = format!("redis://{}", proxy.addr());
    let b = spawn_app_on(&a.database_url, |c| in_fleet(c, &via_proxy, "late-reader")).await;
    let mut alice = b.connect("alice").await;
    let (status, _) = revoke(&a, json!({ "userId": "alice" })).await;
    assert_eq!(status, 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!alice.is_closed(), "instance b cannot read the log yet");
    proxy.forward_all();
    assert!(alice.closed_within(Duration::from_secs(10)).await, "the revocation reached alice on instance b");
    assert!(alice.got_disconnect_packet());
    let _ = alice.next_event(Duration::from_millis(10)).await;
}
