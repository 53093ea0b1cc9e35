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
    let app = spawn_app_with(Backend::Sqlite, |c| c.limits.max_subscriptions = 2).await;
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

/// Subscribes sent together, without waiting for their acks, cannot pass
/// the cap together: it is checked at the join.
#[tokio::test]
async fn subscribes_sent_at_once_cannot_pass_the_cap_together() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.limits.max_subscriptions = 2).await;
    let settlements: Vec<String> = (0..20).map(|i| format!("s-many-{i}")).collect();
    let rows: Vec<String> = settlements.iter().map(|s| format!("('{s}', 'c1')")).collect();
    run_sql(&app.database_url, &format!("INSERT INTO settlements (id, campaign_id) VALUES {};", rows.join(", "))).await;
    let mut alice = app.connect("alice").await;
    let acks: Vec<_> = settlements
        .iter()
        .map(|id| alice.emit_in_flight("subscribe_settlement", json!({ "settlementId": id }), Duration::from_secs(5)))
        .collect();
    let mut joined = 0;
    for ack in acks {
        let ack = ack.await.expect("an ack");
        if ack["success"] == true {
            joined += 1;
        } else {
            assert_eq!(ack, refused("Too many subscriptions"));
        }
    }
    assert_eq!(joined, 2);
    let m = app.metrics().await;
    let gauge: f64 = ["campaign", "settlement", "structure"]
        .iter()
        .map(|k| metric(&m, &format!(r#"herald_subscriptions{{kind="{k}"}}"#)))
        .sum();
    assert_eq!(gauge, 2.0);
    assert_eq!(metric(&m, r#"herald_limits_hit_total{limit="subscriptions"}"#), 18.0);
}

#[tokio::test]
async fn a_socket_over_its_event_rate_is_refused_then_disconnected() {
    let app = spawn_rate_limited_app(5).await;
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
    let app = spawn_app_with(Backend::Sqlite, |c| c.limits.max_connections = 2).await;
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
    let app = spawn_app_with(Backend::Sqlite, |c| c.auth.jwt_leeway = Duration::ZERO).await;
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

/// An app with 128-packet socket buffers; a fast client and a slow one in
/// campaign c1, the slow one not reading (until its switch says so).
async fn fast_and_stalled() -> (TestApp, Client, Client, tokio::sync::watch::Sender<bool>) {
    let app = spawn_app_with(Backend::Sqlite, |c| c.connections.socket_buffer = 128).await;
    let mut fast = app.connect("alice").await;
    assert_eq!(fast.subscribe("campaign", "c1").await["success"], true);
    let (mut slow, stall) = Client::connect_stallable(app.addr, Some(json!({"token": token("bob")}))).await.unwrap();
    assert_eq!(slow.subscribe("campaign", "c1").await["success"], true);
    stall.send(true).unwrap();
    (app, fast, slow, stall)
}

/// Publishes batches of 40 events of 16 KiB to campaign c1 while `slow`
/// does not read, until herald finds its buffer full (the kernel's socket
/// buffers and its 128-packet buffer). Returns how many were published.
async fn publish_until_slow_consumer(app: &TestApp) -> usize {
    const BATCH: usize = 40;
    let slow_consumers = || async { metric(&app.metrics().await, r#"herald_limits_hit_total{limit="slow_consumer"}"#) };
    let blob = "x".repeat(16 * 1024);
    let mut published = 0;
    while slow_consumers().await == 0.0 {
        assert!(published < 2000, "the slow client's buffer never filled");
        let events: Vec<_> = (published..published + BATCH)
            .map(|seq| {
                let mut e = bodies::entity_updated("c1", "campaign", "c1");
                e["payload"]["entityData"] = json!({"seq": seq, "blob": blob});
                e
            })
            .collect();
        let (status, body) = app.publish(&json!(events)).await;
        assert_eq!(status, 202, "{body}");
        published += BATCH;
    }
    assert_eq!(slow_consumers().await, 1.0, "counted once");
    published
}

/// The offsets of the next `n` events, which must come.
async fn offsets(client: &mut Client, n: usize) -> Vec<String> {
    let mut all = Vec::new();
    for _ in 0..n {
        let (_, event) = client.next_event(Duration::from_secs(10)).await.expect("an event");
        all.push(event["offset"].as_str().unwrap().to_owned());
    }
    all
}

/// Every event that arrives until the connection closes, which it must.
async fn until_closed(client: &mut Client) -> Vec<String> {
    let mut seen = Vec::new();
    while let Some((_, event)) = client.next_event(Duration::from_secs(5)).await {
        seen.push(event["offset"].as_str().unwrap().to_owned());
    }
    assert!(client.closed_within(Duration::from_secs(5)).await, "the server closed the slow client's connection");
    seen
}

/// A client too slow for its events (here: one that stops reading for a
/// moment) is cut rather than left to miss events silently: it leaves its
/// rooms at once, and its connection is closed (not its Socket.IO session:
/// no DISCONNECT packet, a stock client comes back by itself). Reading again
/// within the grace period, it gets a gap-free prefix of the room's events,
/// then the close; it comes back with `since` and gets the rest. A fast
/// client on the same instance gets everything meanwhile.
#[tokio::test]
async fn a_slow_consumer_is_cut_and_recovers_without_a_gap() {
    let (app, mut fast, mut slow, stall) = fast_and_stalled().await;
    let published = publish_until_slow_consumer(&app).await;
    // It reads again at once: what was queued for it is still written, then the close.
    stall.send(false).unwrap();
    let seen = until_closed(&mut slow).await;
    assert!(!slow.got_disconnect_packet(), "a cut to recover is not a Socket.IO DISCONNECT");
    let all = offsets(&mut fast, published).await;
    assert!(seen.len() < published, "the slow client missed some events: {} of {published}", seen.len());
    assert_eq!(seen[..], all[..seen.len()], "what the slow client got has no gap");

    // It recovers the rest with `since`.
    let mut again = app.connect("bob").await;
    let since = seen.last().map_or(json!(null), |o| json!(o));
    let ack = again.subscribe_since("campaign", "c1", since).await;
    assert_eq!(ack, json!({"success": true, "recovered": true}));
    for expected in &all[seen.len()..] {
        let (_, event) = again.next_event(Duration::from_secs(10)).await.expect("the replay brings the rest");
        assert_eq!(event["offset"].as_str().unwrap(), expected);
    }
    again.expect_silence(Duration::from_millis(200)).await;
}

/// A client that reads nothing at all cannot hold its connection: once its
/// buffer is full, the connection is gone within the cut's grace period
/// (plus a little), though nothing more can be written to it; the gauges
/// count it out. When it reads again it gets a prefix, then the close, and
/// comes back subscribed.
#[tokio::test]
async fn a_client_that_never_reads_is_cut_within_the_bound() {
    let (app, mut fast, mut slow, stall) = fast_and_stalled().await;
    let published = publish_until_slow_consumer(&app).await;
    let cut = std::time::Instant::now();
    let bound = herald::transport::CLOSE_GRACE + Duration::from_secs(1);
    loop {
        let m = app.metrics().await;
        if metric(&m, "herald_connections") == 1.0 {
            assert_eq!(metric(&m, r#"herald_subscriptions{kind="campaign"}"#), 1.0, "{m}");
            break;
        }
        assert!(cut.elapsed() < bound, "the never-reading client still counts {:?} after its cut", cut.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("a client that never reads: gone {:?} after its buffer was found full", cut.elapsed());
    offsets(&mut fast, published).await;

    stall.send(false).unwrap();
    until_closed(&mut slow).await;
    assert!(!slow.got_disconnect_packet(), "a cut to recover is not a Socket.IO DISCONNECT");
    let mut again = app.connect("bob").await;
    assert_eq!(again.subscribe("campaign", "c1").await["success"], true);
    app.publish(&bodies::state_invalidated("c1")).await;
    assert_eq!(again.expect_event().await.0, "state_invalidated");
}

/// A replay longer than half the socket's buffer is not attempted (it would
/// not fit, nor would the ack): the ack says `recovered: false`, and live
/// events flow.
#[tokio::test]
async fn a_gap_longer_than_half_the_socket_buffer_is_not_replayed() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.connections.socket_buffer = 16).await;
    let mut first = app.connect("alice").await;
    assert_eq!(first.subscribe("campaign", "c1").await["success"], true);
    let (status, _) = app.publish(&bodies::state_invalidated("c1")).await;
    assert_eq!(status, 202);
    let since = first.expect_event().await.1["offset"].clone();
    first.close();
    for _ in 0..9 {
        let (status, _) = app.publish(&bodies::state_invalidated("c1")).await;
        assert_eq!(status, 202);
    }
    let mut again = app.connect("alice").await;
    assert_eq!(
        again.subscribe_since("campaign", "c1", since.clone()).await,
        json!({"success": true, "recovered": false})
    );
    again.expect_silence(Duration::from_millis(200)).await;
    let (status, _) = app.publish(&bodies::state_invalidated("c1")).await;
    assert_eq!(status, 202);
    assert_eq!(again.expect_event().await.0, "state_invalidated");

    // A gap of 8 (half the buffer) is replayed.
    let since = {
        let mut c = app.connect("bob").await;
        assert_eq!(c.subscribe("campaign", "c1").await["success"], true);
        let (status, _) = app.publish(&bodies::state_invalidated("c1")).await;
        assert_eq!(status, 202);
        c.expect_event().await.1["offset"].clone()
    };
    again.expect_event().await;
    for _ in 0..8 {
        let (status, _) = app.publish(&bodies::state_invalidated("c1")).await;
        assert_eq!(status, 202);
    }
    let mut bob = app.connect("bob").await;
    assert_eq!(bob.subscribe_since("campaign", "c1", since).await, json!({"success": true, "recovered": true}));
    for _ in 0..8 {
        bob.expect_event().await;
    }
    bob.expect_silence(Duration::from_millis(200)).await;
}

/// An idle instance lets go of events past the replay window too (a timer
/// trims the in-memory log, not only the next append).
#[tokio::test]
async fn the_replay_log_forgets_old_events_without_new_ones() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.replay.window = Duration::from_secs(1)).await;
    for _ in 0..3 {
        assert_eq!(app.publish(&bodies::state_invalidated("c1")).await.0, 202);
    }
    let m = app.metrics().await;
    assert_eq!(metric(&m, "herald_replay_log_events"), 3.0, "{m}");
    assert!(metric(&m, "herald_replay_log_bytes") > 0.0);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let m = app.metrics().await;
    assert_eq!(metric(&m, "herald_replay_log_events"), 0.0, "{m}");
    assert_eq!(metric(&m, "herald_replay_log_bytes"), 0.0, "{m}");
}
