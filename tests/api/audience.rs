//! Addressed events: an event with `audience` reaches exactly its users'
//! sockets among those in its rooms (every tab, whichever instance), live
//! and in a replay, and nobody else; an invalid audience is a 400 that
//! publishes nothing of its batch.

use std::time::Duration;

use serde_json::{Value, json};

use crate::client::Client;
use crate::fleet::{Redis, fleet};
use crate::helpers::*;

fn numbered(body: Value, seq: u64, audience: Option<&[&str]>) -> Value {
    let mut body = body;
    body["payload"]["seq"] = json!(seq);
    if let Some(users) = audience {
        body["audience"] = json!({ "users": users });
    }
    body
}

/// The seqs of the events that arrive within `wait` of each other; no event
/// carries the audience.
async fn seqs(client: &mut Client, wait: Duration) -> Vec<u64> {
    let mut seen = Vec::new();
    while let Some((_, event)) = client.next_event(wait).await {
        assert!(event.get("audience").is_none(), "the audience is never delivered: {event}");
        seen.push(event["payload"]["seq"].as_u64().expect("a numbered event"));
    }
    seen
}

/// The events that had arrived when the last ack came (a replay comes before its ack).
fn arrived(client: &mut Client) -> Vec<u64> {
    std::iter::from_fn(|| client.try_next_event()).map(|(_, e)| e["payload"]["seq"].as_u64().unwrap()).collect()
}

/// The scenario on `a` and `b` (two instances of a fleet, or one app twice).
async fn exactly_the_audience(a: &TestApp, b: &TestApp) {
    let apps = if a.database_url == b.database_url { vec![a] } else { vec![a, b] };
    for app in apps {
        run_sql(&app.database_url, "INSERT INTO campaign_members (campaign_id, user_id) VALUES ('c1', 'dave');").await;
    }
    // Alice has two tabs (one per instance, one only in the settlement's room),
    // bob and dave are in the campaign's room, carol is in another campaign.
    let mut alice_a = a.connect("alice").await;
    assert_eq!(alice_a.subscribe("campaign", "c1").await["success"], true);
    let mut alice_b = b.connect("alice").await;
    assert_eq!(alice_b.subscribe("settlement", "s1").await["success"], true);
    let mut bob = a.connect("bob").await;
    assert_eq!(bob.subscribe("campaign", "c1").await["success"], true);
    let mut dave = b.connect("dave").await;
    assert_eq!(dave.subscribe("campaign", "c1").await["success"], true);
    let mut carol = a.connect("carol").await;
    assert_eq!(carol.subscribe("campaign", "c2").await["success"], true);

    let update = || bodies::settlement_updated("c1", "s1");
    assert_eq!(a.publish(&numbered(update(), 0, None)).await.0, 202);
    let mut first = None;
    for c in [&mut alice_a, &mut alice_b, &mut bob, &mut dave] {
        let (_, event) = c.expect_event().await;
        first = Some(event["offset"].as_str().unwrap().to_owned());
    }
    let since = first.unwrap();

    // Carol is addressed but in none of its rooms: alice's tabs only.
    let (status, body) = a.publish(&numbered(update(), 1, Some(&["carol", "alice"]))).await;
    assert_eq!((status, &body), (202, &json!({"accepted": 1})));
    assert_eq!(a.publish(&numbered(update(), 2, None)).await.0, 202);
    // A batch, through the other instance.
    let batch = json!([
        numbered(update(), 3, Some(&["bob", "dave"])),
        numbered(bodies::state_invalidated("c1"), 4, Some(&["dave"])),
        numbered(bodies::state_invalidated("c2"), 5, Some(&["alice", "carol"])),
    ]);
    assert_eq!(b.publish(&batch).await.0, 202);

    let wait = Duration::from_millis(500);
    assert_eq!(seqs(&mut alice_a, wait).await, vec![1, 2], "alice's first tab");
    assert_eq!(seqs(&mut alice_b, wait).await, vec![1, 2], "alice's second tab");
    assert_eq!(seqs(&mut bob, wait).await, vec![2, 3], "bob");
    assert_eq!(seqs(&mut dave, wait).await, vec![2, 3, 4], "dave");
    assert_eq!(seqs(&mut carol, wait).await, vec![5], "carol");

    // A replay gives each user what was for them, on either instance.
    for (app, user, kind, id, expected) in [
        (b, "alice", "campaign", "c1", vec![1, 2]),
        (a, "alice", "settlement", "s1", vec![1, 2]),
        (b, "bob", "campaign", "c1", vec![2, 3]),
        (a, "dave", "campaign", "c1", vec![2, 3, 4]),
        (a, "dave", "settlement", "s1", vec![2, 3]),
    ] {
        let mut late = app.connect(user).await;
        let ack = late.subscribe_since(kind, id, json!(since)).await;
        assert_eq!(ack, json!({"success": true, "recovered": true}), "{user} {kind}");
        assert_eq!(arrived(&mut late), expected, "{user}'s replay of {kind}:{id}");
        late.expect_silence(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn addressed_events_reach_exactly_their_audience_on_one_instance() {
    let app = spawn_app().await;
    exactly_the_audience(&app, &app).await;
}

#[tokio::test]
async fn addressed_events_reach_exactly_their_audience_across_a_fleet() {
    let Some(redis) = Redis::start().await else { return };
    let apps = fleet(&redis, 2, "herald-audience").await;
    exactly_the_audience(&apps[0], &apps[1]).await;
}

#[tokio::test]
async fn an_invalid_audience_is_a_400_at_its_path_and_publishes_nothing() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    alice.subscribe("campaign", "c1").await;
    let good = bodies::state_invalidated("c1");
    let with = |audience: Value| {
        let mut body = bodies::state_invalidated("c1");
        body["audience"] = audience;
        body
    };
    let many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let cases = [
        (with(json!({"users": []})), "audience.users: expected 1 to 1000 user ids"),
        (with(json!({"users": many})), "audience.users: expected 1 to 1000 user ids"),
        (with(json!({"users": ["a", "b", "c", "a b"]})), "audience.users[3]: "),
        (with(json!({"users": ["a", ""]})), "audience.users[1]: "),
        (with(json!({"users": ["a", "b", "a"]})), "audience.users[2]: a user named twice"),
        (with(json!({"users": ["a", 5]})), "audience.users[1]: "),
        (with(json!({"users": "alice"})), "audience.users: "),
        (with(json!({})), "audience.users: required field is missing"),
        (with(json!({"users": ["a"], "groups": ["b"]})), "audience.groups: unknown field"),
        (with(json!(null)), "audience: "),
        (with(json!(["alice"])), "audience: "),
    ];
    for (body, expected) in cases {
        let (status, answer) = app.publish(&body).await;
        assert_eq!(status, 400, "{body}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.starts_with(expected), "{error:?} for {body}");
        // In a batch: the path has the index, and nothing of the batch is published.
        let (status, answer) = app.publish(&json!([good, body])).await;
        assert_eq!(status, 400);
        let error = answer["error"].as_str().unwrap();
        assert!(error.starts_with(&format!("events[1].{expected}")), "{error:?}");
    }
    alice.expect_silence(Duration::from_millis(300)).await;
    // The longest audience is fine.
    let most: Vec<String> = (0..999).map(|i| format!("u{i}")).chain(["alice".to_owned()]).collect();
    assert_eq!(app.publish(&with(json!({ "users": most }))).await.0, 202);
    assert_eq!(alice.expect_event().await.0, "state_invalidated");
}
