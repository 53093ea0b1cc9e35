//! Idempotent publishing: an event published again with its key within the
//! window is stored and delivered once, on one instance, across a fleet and
//! on a Redis Cluster; a publish whose outcome is unknown answers 504, and a
//! backend that retries with keys through a Redis pause delivers every event
//! exactly once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::binary::Process;
use crate::client::Client;
use crate::fleet::{Cluster, Redis, fleet, in_fleet};
use crate::helpers::*;
use crate::shards::{add_member, campaigns_in_new_shards};

/// A numbered event of `campaign`, under `key` when given.
fn numbered(campaign: &str, seq: u64, key: Option<&str>) -> Value {
    let mut event =
        json!({"type": "state_invalidated", "payload": {"campaignId": campaign, "scope": "campaign", "seq": seq}});
    if let Some(key) = key {
        event["idempotencyKey"] = json!(key);
    }
    event
}

/// Publishes `body` with extra headers; the status and the answer.
async fn publish_with_headers(app: &TestApp, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = app.http.post(app.url("/v1/events")).bearer_auth(PUBLISH_TOKEN).json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The `seq` of every event that arrives within `wait` of the last one.
async fn seqs(client: &mut Client, wait: Duration) -> Vec<u64> {
    let mut seen = Vec::new();
    while let Some((_, event)) = client.next_event(wait).await {
        assert!(event.get("idempotencyKey").is_none(), "a key is never delivered: {event}");
        seen.push(event["payload"]["seq"].as_u64().expect("a numbered event"));
    }
    seen
}

#[tokio::test]
async fn an_event_published_again_with_its_key_is_delivered_once() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    assert_eq!(alice.subscribe("campaign", "c1").await["success"], true);

    assert_eq!(app.publish(&numbered("c1", 1, Some("k1"))).await, (202, json!({"accepted": 1})));
    for _ in 0..2 {
        assert_eq!(app.publish(&numbered("c1", 1, Some("k1"))).await, (202, json!({"accepted": 1, "duplicates": 1})));
    }
    // The header names a single event's key, bare or as the draft's quoted string.
    let single = numbered("c1", 2, None);
    assert_eq!(publish_with_headers(&app, &single, &[("Idempotency-Key", "k2")]).await.1, json!({"accepted": 1}));
    let quoted = publish_with_headers(&app, &single, &[("Idempotency-Key", "\"k2\"")]).await;
    assert_eq!(quoted.1, json!({"accepted": 1, "duplicates": 1}));
    assert_eq!(app.publish(&numbered("c1", 2, Some("k2"))).await.1["duplicates"], 1, "the field is the same key");
    // A batch retried whole after part of it was stored: only the rest is new.
    let first = json!([numbered("c1", 3, Some("k3")), numbered("c1", 4, Some("k4"))]);
    assert_eq!(app.publish(&first).await, (202, json!({"accepted": 2})));
    let retried = json!([numbered("c1", 3, Some("k3")), numbered("c1", 4, Some("k4")), numbered("c1", 5, Some("k5"))]);
    assert_eq!(app.publish(&retried).await, (202, json!({"accepted": 3, "duplicates": 2})));
    // Twice in one batch: once.
    let twice = json!([numbered("c1", 6, Some("k6")), numbered("c1", 6, Some("k6"))]);
    assert_eq!(app.publish(&twice).await, (202, json!({"accepted": 2, "duplicates": 1})));
    // A key is scoped to its campaign; events without a key are never deduplicated.
    assert_eq!(app.publish(&numbered("c2", 7, Some("k1"))).await, (202, json!({"accepted": 1})));
    for _ in 0..2 {
        assert_eq!(app.publish(&numbered("c1", 8, None)).await, (202, json!({"accepted": 1})));
    }
    assert_eq!(seqs(&mut alice, Duration::from_millis(300)).await, vec![1, 2, 3, 4, 5, 6, 8, 8]);
}

#[tokio::test]
async fn bad_keys_and_headers_are_refused_and_publish_nothing() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    assert_eq!(alice.subscribe("campaign", "c1").await["success"], true);
    let with_key = |key: Value| {
        let mut event = numbered("c1", 0, None);
        event["idempotencyKey"] = key;
        event
    };
    for (body, path) in [
        (with_key(json!("")), "idempotencyKey"),
        (with_key(json!("two words")), "idempotencyKey"),
        (with_key(json!("quo\"te")), "idempotencyKey"),
        (with_key(json!("k".repeat(256))), "idempotencyKey"),
        (with_key(json!(5)), "idempotencyKey"),
        (with_key(Value::Null), "idempotencyKey"),
        (json!([numbered("c1", 0, Some("ok")), with_key(json!("é"))]), "events[1].idempotencyKey"),
    ] {
        let (status, answer) = app.publish(&body).await;
        assert_eq!(status, 400, "{body}");
        assert!(answer["error"].as_str().unwrap_or_default().starts_with(&format!("{path}: ")), "{answer}");
    }
    let batch = json!([numbered("c1", 0, None)]);
    for (body, headers) in [
        (&batch, vec![("Idempotency-Key", "k")]),
        (&numbered("c1", 0, None), vec![("Idempotency-Key", "a b")]),
        (&numbered("c1", 0, None), vec![("Idempotency-Key", "\"k")]),
        (&numbered("c1", 0, Some("k1")), vec![("Idempotency-Key", "k2")]),
        (&numbered("c1", 0, None), vec![("Idempotency-Key", "k1"), ("Idempotency-Key", "k1")]),
    ] {
        let (status, answer) = publish_with_headers(&app, body, &headers).await;
        assert_eq!(status, 400, "{body} {headers:?}");
        assert!(answer["error"].as_str().unwrap_or_default().starts_with("Idempotency-Key: "), "{answer}");
    }
    alice.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_key_is_forgotten_after_the_window() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.publish.idempotency_window = Duration::from_millis(300)).await;
    let mut alice = app.connect("alice").await;
    assert_eq!(alice.subscribe("campaign", "c1").await["success"], true);
    assert_eq!(app.publish(&numbered("c1", 1, Some("k"))).await.1, json!({"accepted": 1}));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(app.publish(&numbered("c1", 2, Some("k"))).await.1, json!({"accepted": 1}));
    assert_eq!(seqs(&mut alice, Duration::from_millis(300)).await, vec![1, 2]);
}

#[tokio::test]
async fn a_retry_through_another_instance_is_stored_once() {
    let Some(redis) = Redis::start().await else { return };
    let apps = fleet(&redis, 2, "herald-idem").await;
    let mut clients = Vec::new();
    for app in &apps {
        let mut c = app.connect("alice").await;
        assert_eq!(c.subscribe("campaign", "c1").await["success"], true);
        clients.push(c);
    }
    assert_eq!(apps[0].publish(&numbered("c1", 1, Some("k1"))).await.1, json!({"accepted": 1}));
    assert_eq!(apps[1].publish(&numbered("c1", 1, Some("k1"))).await.1, json!({"accepted": 1, "duplicates": 1}));
    assert_eq!(apps[1].publish(&numbered("c1", 2, Some("k2"))).await.1, json!({"accepted": 1}));
    for c in &mut clients {
        assert_eq!(seqs(c, Duration::from_millis(500)).await, vec![1, 2]);
    }
    // The keys live beside c1's shard, in its hash slot, and no longer than the window.
    let shard = crate::shards::shard("c1");
    let keys = redis.cli(&["ZRANGE", &format!("{{herald-idem:{shard}}}:keys"), "0", "-1"]);
    assert_eq!(keys.lines().collect::<Vec<_>>(), ["c1 k1", "c1 k2"]);
}

/// On a cluster a batch spanning shards goes in one script per shard run:
/// each event's key is in its own shard's slot (else Redis refuses the
/// script), so a batch retried whole stores nothing twice.
#[tokio::test]
async fn on_a_cluster_a_batch_over_several_shards_retried_whole_is_stored_once() {
    let Some(cluster) = Cluster::start().await else { return };
    let campaigns = campaigns_in_new_shards(2);
    let url = cluster.url();
    let app = spawn_app_with(Backend::Sqlite, move |c| in_fleet(c, &url, "herald-idem-cluster")).await;
    add_member(&app, "alice", &campaigns).await;
    let mut clients = Vec::new();
    for campaign in ["c1", &campaigns[0], &campaigns[1]] {
        let mut c = app.connect("alice").await;
        assert_eq!(c.subscribe("campaign", campaign).await["success"], true);
        clients.push((campaign.to_owned(), c));
    }
    let batch = |n: u64| -> Value {
        (0..n).map(|seq| numbered(&clients[seq as usize % 3].0, seq, Some(&format!("key-{seq}")))).collect()
    };
    assert_eq!(app.publish(&batch(6)).await, (202, json!({"accepted": 6})));
    assert_eq!(app.publish(&batch(9)).await, (202, json!({"accepted": 9, "duplicates": 6})));
    for (i, (campaign, c)) in clients.iter_mut().enumerate() {
        let expected: Vec<u64> = (0..9).filter(|seq| seq % 3 == i as u64).collect();
        assert_eq!(seqs(c, Duration::from_millis(500)).await, expected, "{campaign}");
    }
}

/// What one publish task saw: every answer, in order.
type Answers = Vec<u16>;

/// The scenario: two instances on one private Redis, an event
/// published every 20 ms alternating between them, Redis paused (SIGSTOP)
/// for 7 s. Each event has its key, and is retried (on the other instance)
/// until it is accepted. Every event reaches the subscribers on both
/// instances exactly once; the first publishes of the pause answer 504 (the
/// outcome unknown: Redis runs them when it goes on), later ones 503. The
/// pause logs no new epoch and cuts no socket.
#[tokio::test]
async fn retries_with_keys_through_a_redis_pause_deliver_every_event_exactly_once() {
    let Some(redis) = Redis::start().await else { return };
    let url = redis.url();
    let env = [("HERALD_REDIS_URL", url.as_str()), ("HERALD_REDIS_PREFIX", "herald-pause"), ("HERALD_LOG", "info")];
    let instances = Arc::new([Process::start(&env).await, Process::start(&env).await]);
    let mut subscribers = Vec::new();
    for instance in instances.iter() {
        let mut c = Client::connect(instance.addr, Some(json!({"token": token("alice")})), "").await.unwrap();
        assert_eq!(c.subscribe("campaign", "c1").await["success"], true);
        subscribers.push(c);
    }

    let started = Instant::now();
    let (pause_at, pause_for, publish_for) = (Duration::from_secs(2), Duration::from_secs(7), Duration::from_secs(12));
    let mut tasks = Vec::new();
    let mut seq = 0u64;
    let mut paused = false;
    while started.elapsed() < publish_for {
        if !paused && started.elapsed() >= pause_at {
            redis.pause(true);
            paused = true;
        }
        if paused && started.elapsed() >= pause_at + pause_for {
            redis.pause(false);
            paused = false;
        }
        let instances = instances.clone();
        tasks.push(tokio::spawn(async move {
            let body = numbered("c1", seq, Some(&format!("event-{seq}")));
            let mut answers = Answers::new();
            let mut backoff = Duration::from_millis(100);
            for attempt in 0.. {
                let instance = &instances[(seq as usize + attempt) % 2];
                let sent = instance.http.post(instance.url("/v1/events")).bearer_auth(PUBLISH_TOKEN).json(&body).send();
                let status = match tokio::time::timeout(Duration::from_secs(10), sent).await {
                    Ok(Ok(response)) => response.status().as_u16(),
                    _ => 0,
                };
                answers.push(status);
                if status == 202 {
                    return answers;
                }
                assert!(matches!(status, 503 | 504 | 0), "event {seq}: {status}");
                assert!(attempt < 100, "event {seq} never accepted: {answers:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            unreachable!()
        }));
        seq += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if paused {
        redis.pause(false);
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("a publish task"));
    }
    let count = |status: u16| answers.iter().flatten().filter(|s| **s == status).count();
    let retried = answers.iter().filter(|a| a.len() > 1).count();
    for (i, subscriber) in subscribers.iter_mut().enumerate() {
        let mut got = seqs(subscriber, Duration::from_secs(3)).await;
        got.sort_unstable();
        let missing: Vec<u64> = (0..seq).filter(|s| got.binary_search(s).is_err()).collect();
        let twice: Vec<u64> = got.windows(2).filter(|w| w[0] == w[1]).map(|w| w[0]).collect();
        assert!(missing.is_empty() && twice.is_empty(), "instance {i}: missing {missing:?}, twice {twice:?}");
        assert!(!subscriber.is_closed(), "instance {i}: the pause cut a socket");
    }
    println!(
        "pause: {seq} events, {retried} retried; answers 504 {}, 503 {}, no answer {}, 202 {}; every event once on both instances",
        count(504),
        count(503),
        count(0),
        count(202),
    );
    assert!(count(504) >= 1, "no publish met the pause with an unknown outcome");
    for (i, instance) in instances.iter().enumerate() {
        let logs = instance.logs();
        assert!(!logs.contains("new epoch"), "instance {i} logged a new epoch after a pause:\n{logs}");
        assert!(!logs.contains("cut to recover"), "instance {i} cut sockets after a pause:\n{logs}");
    }
}
