//! Subscribing and unsubscribing: acks, membership through the hierarchy,
//! bad payloads.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

const QUIET: Duration = Duration::from_millis(300);

fn ok() -> Value {
    json!({"success": true})
}

fn refused(error: &str) -> Value {
    json!({"success": false, "error": error})
}

#[tokio::test]
async fn members_subscribe_to_their_campaign_settlements_and_structures() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    assert_eq!(alice.subscribe("campaign", "c1").await, ok());
    assert_eq!(alice.subscribe("settlement", "s1").await, ok());
    assert_eq!(alice.subscribe("structure", "st1").await, ok());
    // Subscribing twice is fine.
    assert_eq!(alice.subscribe("campaign", "c1").await, ok());
}

#[tokio::test]
async fn non_members_and_unknown_ids_get_the_same_unauthorized() {
    let app = spawn_app().await;
    let mut carol = app.connect("carol").await;
    assert_eq!(carol.subscribe("campaign", "c1").await, refused("Unauthorized"));
    // The parent campaign decides for settlements and structures.
    assert_eq!(carol.subscribe("settlement", "s1").await, refused("Unauthorized"));
    assert_eq!(carol.subscribe("structure", "st1").await, refused("Unauthorized"));
    for kind in ["campaign", "settlement", "structure"] {
        assert_eq!(carol.subscribe(kind, "does-not-exist").await, refused("Unauthorized"), "{kind}");
    }
    // A forged sub is just another user who is a member of nothing.
    let mut mallory = app.connect("mallory").await;
    assert_eq!(mallory.subscribe("campaign", "c1").await, refused("Unauthorized"));
    // carol's own rooms still work.
    assert_eq!(carol.subscribe("structure", "st2").await, ok());
}

#[tokio::test]
async fn malformed_payloads_get_invalid_payload() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    let long = "a".repeat(129);
    let bad = [
        json!("c1"),
        json!(null),
        json!(["c1"]),
        json!({}),
        json!({"campaignId": 7}),
        json!({"campaignId": null}),
        json!({"campaignId": "../x"}),
        json!({"campaignId": long}),
        json!({"campaignId": "c1:x"}),
        json!({"campaignId": "*"}),
        json!({"campaignId": "cé"}),
        json!({"settlementId": "s1"}),
    ];
    for event in ["subscribe_campaign", "unsubscribe_campaign"] {
        for payload in &bad {
            assert_eq!(
                alice.emit_with_ack(event, payload.clone()).await,
                refused("Invalid payload"),
                "{event} {payload}"
            );
        }
    }
    // An event with no argument at all.
    alice.send_raw("420[\"subscribe_campaign\"]");
    // The socket is still fine.
    assert_eq!(alice.subscribe("campaign", "c1").await, ok());
    let ack = alice.next_event(QUIET).await;
    assert!(ack.is_none(), "{ack:?}");
}

#[tokio::test]
async fn unsubscribe_always_succeeds_when_well_formed_and_stops_delivery() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    assert_eq!(alice.unsubscribe("campaign", "c1").await, ok(), "not subscribed yet");
    assert_eq!(alice.unsubscribe("structure", "nowhere").await, ok());
    assert_eq!(alice.subscribe("campaign", "c1").await, ok());
    app.publish(&bodies::state_invalidated("c1")).await;
    assert_eq!(alice.expect_event().await.0, "state_invalidated");
    assert_eq!(alice.unsubscribe("campaign", "c1").await, ok());
    assert_eq!(alice.unsubscribe("campaign", "c1").await, ok(), "idempotent");
    let (status, _) = app.publish(&bodies::state_invalidated("c1")).await;
    assert_eq!(status, 202);
    alice.expect_silence(QUIET).await;
}

#[tokio::test]
async fn events_without_an_ack_callback_are_handled_silently() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    alice.emit("subscribe_campaign", json!({"campaignId": "c1"}));
    alice.emit("subscribe_campaign", json!({"campaignId": "../x"}));
    alice.emit("subscribe_campaign", json!({"campaignId": "c2"}));
    // The ack-less subscribe took effect: the event arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.publish(&bodies::state_invalidated("c1")).await;
    assert_eq!(alice.expect_event().await.0, "state_invalidated");
    app.publish(&bodies::state_invalidated("c2")).await;
    alice.expect_silence(QUIET).await;
}

#[tokio::test]
async fn unknown_events_are_answered_and_break_nothing() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    assert_eq!(alice.emit_with_ack("join_everything", json!({})).await, refused("Unknown event"));
    alice.emit("join_everything", json!({"campaignId": "c2"}));
    assert_eq!(alice.subscribe("campaign", "c1").await, ok());
    assert!(!alice.is_closed());
}

#[tokio::test]
async fn a_hostile_client_does_not_disturb_others() {
    let app = spawn_app().await;
    let mut bob = app.connect("bob").await;
    assert_eq!(bob.subscribe("campaign", "c1").await, ok());
    let evil = app.connect("mallory").await;
    for frame in [
        "42[",
        "4",
        "42{}",
        "43",
        "49[\"x\"]",
        "42999999999999999999999[\"subscribe_campaign\",{}]",
        "451-[\"subscribe_campaign\",{\"_placeholder\":true,\"num\":0}]",
    ] {
        evil.send_raw(frame);
    }
    app.publish(&bodies::state_invalidated("c1")).await;
    assert_eq!(bob.expect_event().await.0, "state_invalidated");
}

#[tokio::test]
async fn subscriptions_are_counted_by_kind() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    alice.subscribe("campaign", "c1").await;
    alice.subscribe("campaign", "c1").await;
    alice.subscribe("settlement", "s1").await;
    alice.subscribe("campaign", "c2").await;
    let m = app.metrics().await;
    assert_eq!(metric(&m, r#"herald_subscriptions{kind="campaign"}"#), 1.0);
    assert_eq!(metric(&m, r#"herald_subscriptions{kind="settlement"}"#), 1.0);
    assert_eq!(metric(&m, r#"herald_acks_total{event="subscribe_campaign",outcome="success"}"#), 2.0);
    assert_eq!(metric(&m, r#"herald_acks_total{event="subscribe_campaign",outcome="unauthorized"}"#), 1.0);
    assert_eq!(metric(&m, "herald_connections"), 1.0);
    alice.close();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = app.metrics().await;
    assert_eq!(metric(&m, "herald_connections"), 0.0);
    assert_eq!(metric(&m, r#"herald_subscriptions{kind="campaign"}"#), 0.0);
}

#[tokio::test]
async fn two_thousand_clients_subscribing_on_connect_all_get_their_ack() {
    let app = spawn_app().await;
    let addr = app.addr;
    let mut tasks = Vec::new();
    // At most 200 handshakes in flight, like a page load storm rather than a SYN flood.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(200));
    for i in 0..2000 {
        let sub = if i % 2 == 0 { "alice" } else { "bob" };
        let t = token(sub);
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let mut c = crate::client::Client::connect(addr, Some(json!({"token": t})), "").await.expect("connects");
            drop(permit);
            // Sent the moment CONNECT is read, like a client's connect callback.
            let ack = c.try_emit_with_ack("subscribe_campaign", json!({"campaignId": "c1"})).await;
            (ack, c)
        }));
    }
    let mut acked = 0;
    let mut clients = Vec::new();
    for t in tasks {
        let (ack, c) = t.await.unwrap();
        if ack == Some(ok()) {
            acked += 1;
        }
        clients.push(c);
    }
    assert_eq!(acked, 2000);
}

#[tokio::test]
async fn a_message_over_the_size_limit_closes_only_that_socket() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.connections.max_message_bytes = 16 * 1024).await;
    let mut bob = app.connect("bob").await;
    assert_eq!(bob.subscribe("campaign", "c1").await, ok());
    let big = app.connect("mallory").await;
    big.send_raw(&format!("42[\"subscribe_campaign\",{{\"campaignId\":\"{}\"}}]", "a".repeat(20 * 1024)));
    assert!(big.closed_within(Duration::from_secs(3)).await, "the oversized message closes its socket");
    app.publish(&bodies::state_invalidated("c1")).await;
    assert_eq!(bob.expect_event().await.0, "state_invalidated");
    // Just under the limit is still an ordinary (invalid) request.
    let mut fine = app.connect("alice").await;
    let reply = fine.emit_with_ack("subscribe_campaign", json!({"campaignId": "a".repeat(15 * 1024)})).await;
    assert_eq!(reply, refused("Invalid payload"));
}

#[tokio::test]
async fn recovering_overlapping_rooms_in_any_order_delivers_each_event_once() {
    let app = spawn_app().await;
    let mut publisher_view = app.connect("bob").await;
    publisher_view.subscribe("campaign", "c1").await;
    let mut alice = app.connect("alice").await;
    alice.subscribe("campaign", "c1").await;
    alice.subscribe("settlement", "s1").await;
    app.publish(&bodies::settlement_updated("c1", "s1")).await;
    let (_, first) = alice.expect_event().await;
    let last = first["offset"].as_str().unwrap().to_owned();
    alice.close();
    // Missed: two events in both rooms, one in the campaign only.
    app.publish(&bodies::settlement_updated("c1", "s1")).await;
    app.publish(&bodies::state_invalidated("c1")).await;
    app.publish(&bodies::structure_updated("c1", "s1", "st1")).await;
    for _ in 0..4 {
        publisher_view.expect_event().await;
    }
    // Back: the settlement first, then the campaign, both from the same last offset.
    let mut back = app.connect("alice").await;
    let ack = back.emit_with_ack("subscribe_settlement", json!({"settlementId": "s1", "since": last})).await;
    assert_eq!(ack, json!({"success": true, "recovered": true}));
    let ack = back.emit_with_ack("subscribe_campaign", json!({"campaignId": "c1", "since": last})).await;
    assert_eq!(ack, json!({"success": true, "recovered": true}));
    let mut got = Vec::new();
    while let Some((name, event)) = back.next_event(QUIET).await {
        got.push((name, event["offset"].as_str().unwrap().to_owned()));
    }
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["settlement_updated", "structure_updated", "state_invalidated"], "each missed event once");
    // And live events after that come once too.
    app.publish(&bodies::settlement_updated("c1", "s1")).await;
    assert_eq!(back.expect_event().await.0, "settlement_updated");
    back.expect_silence(QUIET).await;
}
