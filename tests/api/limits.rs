//! Limits and token lifetime: each limit refuses cleanly, counts in a
//! metric, and leaves other clients alone.

use std::time::Duration;

use jsonwebtoken::Header;
use serde_json::json;

use crate::client::{Client, ConnectError};
use crate::helpers::*;

fn refused(error: &str) -> serde_json::Value {
    json!({"success": false, "error": error})
}

#[tokio::test]
async fn a_socket_has_a_subscription_cap() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.max_subscriptions = 2).await;
    let mut alice = app.connect("alice").await;
    assert_eq!(alice.subscribe("campaign", "c1").await["success"], true);
    assert_eq!(alice.subscribe("settlement", "s1").await["success"], true);
    assert_eq!(alice.subscribe("structure", "st1").await, refused("Too many subscriptions"));
    // Already in the room: not a new subscription.
    assert_eq!(alice.subscribe("campaign", "c1").await["success"], true);
    assert_eq!(alice.unsubscribe("settlement", "s1").await["success"], true);
    assert_eq!(alice.subscribe("structure", "st1").await["success"], true);
    let m = app.metrics().await;
    assert_eq!(metric(&m, r#"herald_limits_hit_total{limit="subscriptions"}"#), 1.0);
}

#[tokio::test]
async fn a_socket_over_its_event_rate_is_refused_then_disconnected() {
    let app = spawn_app_with(Backend::Sqlite, |c| {
        c.client_event_rate = 1.0;
        c.client_event_burst = 3.0;
        c.rate_limit_strikes = 5;
    })
    .await;
    let mut bob = app.connect("bob").await;
    assert_eq!(bob.subscribe("campaign", "c1").await["success"], true);
    let mut flood = app.connect("alice").await;
    for _ in 0..3 {
        assert_eq!(flood.subscribe("campaign", "c1").await["success"], true);
    }
    assert_eq!(flood.subscribe("campaign", "c1").await, refused("Rate limited"));
    for _ in 0..10 {
        flood.emit("subscribe_campaign", json!({"campaignId": "c1"}));
    }
    assert!(flood.closed_within(Duration::from_secs(3)).await, "a socket that keeps going is disconnected");
    app.publish(&bodies::state_invalidated("c1")).await;
    assert_eq!(bob.expect_event().await.0, "state_invalidated");
    let m = app.metrics().await;
    assert!(metric(&m, r#"herald_limits_hit_total{limit="event_rate"}"#) >= 5.0);
    assert_eq!(metric(&m, r#"herald_limits_hit_total{limit="event_rate_disconnect"}"#), 1.0);
}

#[tokio::test]
async fn past_the_connection_cap_handshakes_are_refused_and_others_keep_working() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.max_connections = 2).await;
    let mut first = app.connect("alice").await;
    let second = app.connect("bob").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let third = app.try_connect(Some(json!({"token": token("carol")})), "").await.map(|_| ());
    assert_eq!(third, Err(ConnectError::Refused("Too many connections".into())));
    assert_eq!(first.subscribe("campaign", "c1").await["success"], true);
    second.close();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(app.try_connect(Some(json!({"token": token("carol")})), "").await.is_ok(), "a place was freed");
    let m = app.metrics().await;
    assert_eq!(metric(&m, r#"herald_limits_hit_total{limit="connections"}"#), 1.0);
}

fn token_expiring_in(sub: &str, secs: u64) -> String {
    token_with(&Header::default(), json!({"sub": sub, "exp": now() + secs}), JWT_SECRET.as_bytes())
}

async fn connect_with(app: &TestApp, token: String) -> Client {
    app.try_connect(Some(json!({"token": token})), "").await.expect("connects")
}

#[tokio::test]
async fn a_socket_is_cut_when_its_token_expires_unless_refreshed() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.jwt_leeway = Duration::ZERO).await;
    let mut expiring = connect_with(&app, token_expiring_in("alice", 2)).await;
    assert_eq!(expiring.subscribe("campaign", "c1").await["success"], true);
    let mut refreshed = connect_with(&app, token_expiring_in("bob", 2)).await;
    assert_eq!(refreshed.subscribe("campaign", "c1").await["success"], true);
    // Refreshes that change nothing.
    assert_eq!(
        refreshed.emit_with_ack("refresh_token", json!({"token": token("alice")})).await,
        refused("Unauthorized")
    );
    assert_eq!(refreshed.emit_with_ack("refresh_token", json!({"token": "garbage"})).await, refused("Unauthorized"));
    assert_eq!(refreshed.emit_with_ack("refresh_token", json!({"jwt": "x"})).await, refused("Invalid payload"));
    // A valid token for the same user moves the deadline.
    assert_eq!(
        refreshed.emit_with_ack("refresh_token", json!({"token": token("bob")})).await,
        json!({"success": true})
    );

    assert!(expiring.closed_within(Duration::from_secs(5)).await, "cut at exp");
    assert!(!refreshed.is_closed(), "the refreshed socket stays");
    app.publish(&bodies::state_invalidated("c1")).await;
    assert_eq!(refreshed.expect_event().await.0, "state_invalidated");
    let m = app.metrics().await;
    assert_eq!(metric(&m, r#"herald_limits_hit_total{limit="token_expired"}"#), 1.0);
}
