//! Presence: `presence: true` on a subscribe; members per user with their
//! connection counts in the ack and `GET /v1/presence/{kind}/{id}`;
//! `presence_joined` / `presence_left` on a user's first and last
//! connection, through several tabs, revocations, an instance that stops or
//! dies without a goodbye, and a Redis restart.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::Client;
use crate::fleet::{Cluster, Redis, fleet_with, in_fleet};
use crate::helpers::*;

/// Fast rounds, so that the tests wait little.
const INTERVAL: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_millis(600);
/// Long enough for a leave to be told: the linger (the timeout) and a few rounds.
const LEAVE: Duration = Duration::from_millis(600 + 400);

fn fast(config: &mut herald::config::Config) {
    config.fleet.presence_interval = INTERVAL;
    config.fleet.presence_timeout = TIMEOUT;
}

async fn subscribe_with_presence(client: &mut Client, kind: &str, id: &str) -> Value {
    client.emit_with_ack(&format!("subscribe_{kind}"), json!({ format!("{kind}Id"): id, "presence": true })).await
}

/// The presence events that arrive within `wait` of each other, as
/// `(name, userId)`; any other event fails.
async fn presence_events(client: &mut Client, wait: Duration) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    while let Some((name, event)) = client.next_event(wait).await {
        assert!(name.starts_with("presence_"), "{name} {event}");
        seen.push((name, event["userId"].as_str().unwrap().to_owned()));
    }
    seen
}

fn joined(user: &str) -> (String, String) {
    ("presence_joined".into(), user.into())
}

fn left(user: &str) -> (String, String) {
    ("presence_left".into(), user.into())
}

async fn query(app: &TestApp, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = app.http.get(app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The members of `room` as the query API gives them: (userId, connections).
async fn members(app: &TestApp, kind: &str, id: &str) -> Vec<(String, u64)> {
    let (status, body) = query(app, &format!("/v1/presence/{kind}/{id}"), Some(PUBLISH_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["room"], format!("{kind}:{id}"));
    let members: Vec<(String, u64)> = body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["userId"].as_str().unwrap().to_owned(), m["connections"].as_u64().unwrap()))
        .collect();
    assert_eq!(body["count"], members.len());
    members
}

/// Waits until the query API says `expected`, at most `within`.
async fn members_become(app: &TestApp, kind: &str, id: &str, expected: &[(&str, u64)], within: Duration) {
    let expected: Vec<(String, u64)> = expected.iter().map(|(u, n)| ((*u).to_owned(), *n)).collect();
    let deadline = Instant::now() + within;
    loop {
        let now = members(app, kind, id).await;
        if now == expected {
            return;
        }
        assert!(Instant::now() < deadline, "members {now:?}, expected {expected:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn members_are_users_with_connection_counts_and_join_and_leave_once() {
    let app = spawn_app_with(Backend::Sqlite, fast).await;
    let mut alice = app.connect("alice").await;
    // The first member: nobody was there; it is then told of itself.
    assert_eq!(subscribe_with_presence(&mut alice, "campaign", "c1").await, json!({"success": true, "presence": []}));
    assert_eq!(presence_events(&mut alice, INTERVAL * 4).await, vec![joined("alice")]);
    // Without the flag nothing changes: no presence in the ack, no presence events.
    let mut plain = app.connect("bob").await;
    assert_eq!(plain.subscribe("campaign", "c1").await, json!({"success": true}));
    let mut bob = app.connect("bob").await;
    let ack = subscribe_with_presence(&mut bob, "campaign", "c1").await;
    assert_eq!(ack, json!({"success": true, "presence": [{"userId": "alice", "connections": 1}]}));
    assert_eq!(presence_events(&mut alice, INTERVAL * 4).await, vec![joined("bob")]);
    assert_eq!(presence_events(&mut bob, Duration::ZERO).await, vec![joined("bob")]);
    // A second tab is the same member: no event, two connections.
    let mut alice2 = app.connect("alice").await;
    let ack = subscribe_with_presence(&mut alice2, "campaign", "c1").await;
    assert_eq!(ack["presence"], json!([{"userId": "alice", "connections": 1}, {"userId": "bob", "connections": 1}]));
    members_become(&app, "campaign", "c1", &[("alice", 2), ("bob", 1)], Duration::from_secs(2)).await;
    assert_eq!(presence_events(&mut bob, INTERVAL * 4).await, vec![]);
    // Subscribing again with presence changes nothing.
    let again = subscribe_with_presence(&mut alice2, "campaign", "c1").await;
    assert_eq!(again["presence"], json!([{"userId": "alice", "connections": 2}, {"userId": "bob", "connections": 1}]));
    // One tab goes: still a member; the last goes: left, once.
    alice.close();
    members_become(&app, "campaign", "c1", &[("alice", 1), ("bob", 1)], Duration::from_secs(2)).await;
    assert_eq!(alice2.unsubscribe("campaign", "c1").await, json!({"success": true}));
    let unsubscribed = Instant::now();
    assert_eq!(presence_events(&mut bob, LEAVE).await, vec![left("alice")]);
    let took = unsubscribed.elapsed() - LEAVE;
    assert!(took >= TIMEOUT, "told after {took:?}: a leave lingers for the timeout");
    members_become(&app, "campaign", "c1", &[("bob", 1)], Duration::from_secs(2)).await;
    assert_eq!(presence_events(&mut alice2, INTERVAL * 2).await, vec![], "an unsubscribed socket hears nothing");
    plain.expect_silence(Duration::ZERO).await;
    let m = app.metrics().await;
    assert_eq!(
        metric(&m, "herald_presence_messages_total{event=\"presence_joined\"}"),
        3.0,
        "alice told of herself, both of bob"
    );
    assert_eq!(metric(&m, "herald_presence_messages_total{event=\"presence_left\"}"), 1.0);
    // Everyone gone: what presence holds goes back to exactly nothing.
    bob.close();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let m = app.metrics().await;
        let held = (metric(&m, "herald_presence_subscriptions"), metric(&m, "herald_presence_rooms"));
        if held == (0.0, 0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "presence still holds {held:?}");
        tokio::time::sleep(INTERVAL).await;
    }
}

#[tokio::test]
async fn presence_follows_membership_and_revocations() {
    let app = spawn_app_with(Backend::Sqlite, fast).await;
    let mut alice = app.connect("alice").await;
    subscribe_with_presence(&mut alice, "campaign", "c1").await;
    let mut bob = app.connect("bob").await;
    subscribe_with_presence(&mut bob, "settlement", "s1").await;
    subscribe_with_presence(&mut bob, "campaign", "c1").await;
    let mut carol = app.connect("carol").await;
    assert_eq!(
        subscribe_with_presence(&mut carol, "campaign", "c1").await,
        json!({"success": false, "error": "Unauthorized"})
    );
    assert_eq!(
        carol.emit_with_ack("subscribe_campaign", json!({"campaignId": "c2", "presence": "yes"})).await,
        json!({"success": false, "error": "Invalid payload"})
    );
    members_become(&app, "campaign", "c1", &[("alice", 1), ("bob", 1)], Duration::from_secs(2)).await;
    presence_events(&mut alice, INTERVAL * 3).await;
    // A revocation takes bob out of every room of c1, and out of their presence.
    let revoked = app
        .http
        .post(app.url("/v1/access/revoke"))
        .bearer_auth(PUBLISH_TOKEN)
        .json(&json!({"userId": "bob", "campaignId": "c1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status().as_u16(), 202);
    let started = Instant::now();
    let (name, event) = alice.next_event(INTERVAL * 3).await.expect("bob leaves at once");
    let took = started.elapsed();
    assert_eq!((name.as_str(), &event["userId"]), ("presence_left", &json!("bob")));
    println!("presence_left {took:?} after a revocation's 202 (rounds every {INTERVAL:?}, timeout {TIMEOUT:?})");
    assert_eq!(presence_events(&mut alice, INTERVAL * 3).await, vec![], "once");
    members_become(&app, "campaign", "c1", &[("alice", 1)], Duration::from_millis(500)).await;
    members_become(&app, "settlement", "s1", &[], Duration::from_millis(500)).await;
    carol.expect_silence(Duration::ZERO).await;
}

#[tokio::test]
async fn the_query_api_wants_the_publish_token_and_a_room() {
    let app = spawn_app_with(Backend::Sqlite, fast).await;
    assert_eq!(query(&app, "/v1/presence/campaign/c1", None).await.0, 401);
    assert_eq!(query(&app, "/v1/presence/campaign/c1", Some("wrong")).await.0, 401);
    for bad in ["/v1/presence/guild/c1", "/v1/presence/campaign/a%20b", "/v1/presence/user/alice"] {
        let (status, body) = query(&app, bad, Some(PUBLISH_TOKEN)).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].is_string());
    }
    assert_eq!(members(&app, "structure", "st9").await, vec![]);
}

/// Redis' clock, in ms.
fn redis_now_ms(redis: &Redis) -> u64 {
    let time = redis.cli(&["TIME"]);
    let mut lines = time.lines();
    let seconds: u64 = lines.next().unwrap().trim().parse().unwrap();
    let micros: u64 = lines.next().unwrap().trim().parse().unwrap();
    seconds * 1000 + micros / 1000
}

#[tokio::test]
async fn a_fleet_shares_presence_and_drops_a_dead_instances_members_within_the_bound() {
    let Some(mut redis) = Redis::start().await else { return };
    let apps = fleet_with(&redis, 2, "herald-presence", fast).await;
    let (a, b) = (&apps[0], &apps[1]);
    let mut alice = a.connect("alice").await;
    subscribe_with_presence(&mut alice, "campaign", "c1").await;
    let mut alice_on_b = b.connect("alice").await;
    subscribe_with_presence(&mut alice_on_b, "campaign", "c1").await;
    let mut bob = b.connect("bob").await;
    let bob_ack = subscribe_with_presence(&mut bob, "campaign", "c1").await;
    for app in [a, b] {
        members_become(app, "campaign", "c1", &[("alice", 2), ("bob", 1)], Duration::from_secs(2)).await;
    }
    let mut seen = presence_events(&mut alice, INTERVAL * 4).await;
    seen.sort();
    assert_eq!(seen, vec![joined("alice"), joined("bob")], "alice on A: each user once");
    // Bob's ack and the events after it: each user once.
    let mut seen: Vec<_> =
        bob_ack["presence"].as_array().unwrap().iter().map(|m| joined(m["userId"].as_str().unwrap())).collect();
    seen.extend(presence_events(&mut bob, Duration::ZERO).await);
    seen.sort();
    assert_eq!(seen, vec![joined("alice"), joined("bob")], "bob on B: each user once");

    // An instance that dies without a goodbye (its members written, then no
    // round ever again): made here by hand, as a dead instance leaves them.
    let prefix = "{herald-presence:presence}";
    let now = redis_now_ms(&redis).to_string();
    redis.cli(&["ZADD", &format!("{prefix}:alive"), &now, "dead-instance"]);
    redis.cli(&["SADD", &format!("{prefix}:rooms:dead-instance"), "campaign:c1"]);
    redis.cli(&["HSET", &format!("{prefix}:room:campaign:c1"), "dead-instance", "dave 2 bob 1"]);
    assert_eq!(presence_events(&mut alice, INTERVAL * 4).await, vec![joined("dave")]);
    members_become(a, "campaign", "c1", &[("alice", 2), ("bob", 2), ("dave", 2)], Duration::ZERO).await;
    let died = Instant::now();
    assert_eq!(presence_events(&mut bob, INTERVAL * 4).await, vec![joined("dave")], "bob on B");
    let (name, event) = bob.next_event(TIMEOUT * 4).await.expect("dave leaves");
    let took = died.elapsed();
    assert_eq!((name.as_str(), &event["userId"]), ("presence_left", &json!("dave")), "bob on B");
    assert!(took < TIMEOUT * 2 + INTERVAL * 4, "dave left after {took:?}");
    assert_eq!(presence_events(&mut alice, INTERVAL * 4).await, vec![left("dave")]);
    println!("a dead instance's members dropped within {took:?} (timeout {TIMEOUT:?}, interval {INTERVAL:?})");
    assert_eq!(redis.cli(&["EXISTS", &format!("{prefix}:rooms:dead-instance")]), "0", "swept");
    members_become(b, "campaign", "c1", &[("alice", 2), ("bob", 1)], Duration::ZERO).await;

    // Redis restarts empty: the subscribed sockets are cut (the log is
    // new), their clients come back; presence is rebuilt, and nobody is
    // told that anyone left.
    redis.kill();
    tokio::time::sleep(INTERVAL * 3).await;
    redis.restart().await;
    for client in [&alice, &alice_on_b, &bob] {
        assert!(client.closed_within(Duration::from_secs(5)).await, "cut after the Redis restart");
    }
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    for client in [&mut alice, &mut bob] {
        assert_eq!(subscribe_with_presence(client, "campaign", "c1").await["success"], true);
    }
    for app in [a, b] {
        members_become(app, "campaign", "c1", &[("alice", 1), ("bob", 1)], Duration::from_secs(5)).await;
    }
    tokio::time::sleep(TIMEOUT * 2).await;
    for (who, client) in [("alice", &mut alice), ("bob", &mut bob)] {
        let events: Vec<_> =
            std::iter::from_fn(|| client.try_next_event()).map(|(n, e)| (n, e["userId"].clone())).collect();
        assert!(events.iter().all(|(n, _)| n == "presence_joined"), "{who}: no one left: {events:?}");
    }

    // An instance that stops says goodbye: its members go at once.
    let mut apps = apps;
    let b = apps.pop().unwrap();
    let stopped = Instant::now();
    b.stop().await;
    members_become(&apps[0], "campaign", "c1", &[("alice", 1)], Duration::from_millis(500)).await;
    println!("a stopped instance's members gone from the query within {:?}", stopped.elapsed());
    assert_eq!(presence_events(&mut alice, LEAVE).await, vec![left("bob")]);
}

#[tokio::test]
async fn a_big_room_is_told_counts_only_at_most_once_a_second() {
    let app = spawn_app_with(Backend::Sqlite, |c| {
        fast(c);
        c.fleet.presence_max_members = 3;
    })
    .await;
    let users: Vec<String> = (0..30).map(|i| format!("u{i}")).collect();
    let rows: Vec<String> = users.iter().map(|u| format!("('c1', '{u}')")).collect();
    run_sql(
        &app.database_url,
        &format!("INSERT INTO campaign_members (campaign_id, user_id) VALUES {};", rows.join(", ")),
    )
    .await;
    let mut alice = app.connect("alice").await;
    subscribe_with_presence(&mut alice, "campaign", "c1").await;
    let mut bob = app.connect("bob").await;
    subscribe_with_presence(&mut bob, "campaign", "c1").await;
    members_become(&app, "campaign", "c1", &[("alice", 1), ("bob", 1)], Duration::from_secs(2)).await;
    presence_events(&mut alice, INTERVAL * 3).await;
    presence_events(&mut bob, Duration::ZERO).await;

    // A storm: 30 users join within a round or two; past 3 members, counts
    // only. Alice's events are timed as they arrive, while the storm goes on.
    let started = Instant::now();
    let listener = tokio::spawn(async move {
        let mut counts = Vec::new();
        let mut joined = 0;
        let deadline = Instant::now() + Duration::from_secs(4);
        while let Some((name, event)) = alice.next_event(deadline.saturating_duration_since(Instant::now())).await {
            match name.as_str() {
                "presence_count" => {
                    assert_eq!(event["room"], "campaign:c1");
                    counts.push((started.elapsed(), event["count"].as_u64().unwrap()));
                }
                "presence_joined" => joined += 1,
                other => panic!("{other} {event}"),
            }
        }
        (counts, joined)
    });
    let mut storm = Vec::new();
    for user in &users {
        let mut c = app.connect(user).await;
        assert_eq!(subscribe_with_presence(&mut c, "campaign", "c1").await["success"], true);
        storm.push(c);
    }
    let (counts, joined) = listener.await.unwrap();
    println!("a storm of 30 joins: {joined} presence_joined then {} presence_count: {counts:?}", counts.len());
    assert_eq!(counts.last().map(|(_, n)| *n), Some(32), "the count catches up");
    assert!(joined <= 1, "past the maximum, no more joins are told: {joined}");
    for pair in counts.windows(2) {
        // One a second at the server; arrival times here jitter.
        assert!(pair[1].0 - pair[0].0 >= Duration::from_millis(800), "at most one count a second: {counts:?}");
    }
    // A listener coming in now is acked the count.
    let mut late = app.connect("u0").await;
    let ack = subscribe_with_presence(&mut late, "settlement", "s1").await;
    assert_eq!(ack, json!({"success": true, "presence": []}), "another room is not big");
    let ack = subscribe_with_presence(&mut late, "campaign", "c1").await;
    assert_eq!(ack, json!({"success": true, "presenceCount": 32}));
    // Counts go down too (after the linger), still at most once a second.
    storm.iter().for_each(Client::close);
    let mut last = None;
    while let Some((name, event)) = bob.next_event(Duration::from_secs(2)).await {
        // Bob may have been told one join before the room went over 3 members.
        if name == "presence_joined" && last.is_none() {
            continue;
        }
        assert_eq!(name, "presence_count", "{event}");
        last = event["count"].as_u64();
    }
    assert_eq!(last, Some(3), "alice, bob and the late u0");
}

/// On a Redis Cluster: presence lives in one slot (one hash tag), and its
/// scripts work there: two instances share their members, a leave is told.
#[tokio::test]
async fn on_a_cluster_a_fleet_shares_presence() {
    let Some(cluster) = Cluster::start().await else { return };
    let mut apps = Vec::new();
    for _ in 0..2 {
        let url = cluster.url();
        apps.push(
            spawn_app_with(Backend::Sqlite, move |c| {
                in_fleet(c, &url, "herald-cluster-presence");
                fast(c);
            })
            .await,
        );
    }
    let (a, b) = (&apps[0], &apps[1]);
    let mut alice = a.connect("alice").await;
    assert_eq!(subscribe_with_presence(&mut alice, "campaign", "c1").await["success"], true);
    let mut bob = b.connect("bob").await;
    assert_eq!(subscribe_with_presence(&mut bob, "campaign", "c1").await["success"], true);
    for app in [a, b] {
        members_become(app, "campaign", "c1", &[("alice", 1), ("bob", 1)], Duration::from_secs(3)).await;
    }
    let mut seen = presence_events(&mut alice, INTERVAL * 4).await;
    seen.sort();
    assert_eq!(seen, vec![joined("alice"), joined("bob")], "each user once");
    bob.close();
    assert_eq!(presence_events(&mut alice, LEAVE * 2).await, vec![left("bob")]);
    members_become(a, "campaign", "c1", &[("alice", 1)], Duration::ZERO).await;
}
