//! A flood of user revocations (thousands of distinct users): the store
//! keeps one row per user revoked within `HERALD_REVOCATION_TTL`, the log
//! writes one control entry per revocation and none to any shard, and no
//! event is pushed out of the replay history (a `since` still recovers).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::client::Client;
use crate::fleet::{Redis, in_fleet};
use crate::helpers::*;

const USERS: usize = 3_000;
const AT_ONCE: usize = 16;
const TTL: Duration = Duration::from_secs(2);
/// Far fewer than the revocations: had they gone to the shards, they would
/// have pushed every event out.
const MAX_EVENTS: usize = 200;

fn numbered(seq: u64) -> Value {
    json!({"type": "state_invalidated", "payload": {"campaignId": "c1", "scope": "campaign", "seq": seq}})
}

/// Revokes `users` distinct users, `AT_ONCE` at a time, through the
/// instances in turn; when each was sent and when its answer came.
async fn flood(apps: &[TestApp], users: usize) -> Vec<(Instant, Instant)> {
    futures_util::stream::iter(0..users)
        .map(|i| async move {
            let app = &apps[i % apps.len()];
            let sent = Instant::now();
            let answer = app
                .http
                .post(app.url("/v1/access/revoke"))
                .bearer_auth(PUBLISH_TOKEN)
                .json(&json!({ "userId": format!("flooded-{i}") }))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 202, "revocation {i}");
            (sent, Instant::now())
        })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await
}

async fn rows(database: &str) -> usize {
    let pool = sqlx::SqlitePool::connect(database).await.unwrap();
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM herald_user_revocations").fetch_one(&pool).await.unwrap();
    pool.close().await;
    n as usize
}

/// Publishes `n` numbered events through the instances in turn; the offsets
/// `client` received.
async fn publish(apps: &[TestApp], client: &mut Client, seqs: std::ops::Range<u64>) -> Vec<String> {
    let mut offsets = Vec::new();
    for seq in seqs {
        assert_eq!(apps[seq as usize % apps.len()].publish(&numbered(seq)).await.0, 202);
        let (_, event) = client.expect_event().await;
        assert_eq!(event["payload"]["seq"], seq);
        offsets.push(event["offset"].as_str().unwrap().to_owned());
    }
    offsets
}

/// The flood, on one instance (`redis` None) or two sharing a database.
async fn flood_keeps_the_store_bounded_and_the_replay_history(redis: Option<&Redis>) {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("herald.db").display());
    let config = |c: &mut herald::Config| {
        if let Some(redis) = redis {
            in_fleet(c, &redis.url(), "herald-flood");
        }
        c.replay.max_events = MAX_EVENTS;
        c.store.revocation_ttl = TTL;
    };
    let mut apps = vec![spawn_app_on(&database, config).await];
    if redis.is_some() {
        apps.push(spawn_app_on(&database, config).await);
    }
    run_sql(&database, FIXTURE).await;
    let mut alice = apps[0].connect("alice").await;
    assert_eq!(alice.subscribe("campaign", "c1").await["success"], true);
    let offsets = publish(&apps, &mut alice, 0..20).await;

    let started = Instant::now();
    let answered = flood(&apps, USERS).await;
    let took = started.elapsed();
    // One row per user revoked within the TTL, counted in whole seconds. The
    // last revocation sent forgot, when it ran, every row stamped more than
    // TTL + 1 s before it was sent; a row is stamped before it is answered:
    // so only those answered since then are left, and the ones in flight.
    let last_sent = answered.iter().map(|(sent, _)| *sent).max().unwrap();
    let since = last_sent.checked_sub(TTL + Duration::from_secs(1)).unwrap();
    let recent = answered.iter().filter(|(_, at)| *at >= since).count();
    let stored = rows(&database).await;
    assert!(stored <= recent + AT_ONCE, "{stored} rows; {recent} revocations in the last TTL + 1 s");
    let mut figures =
        format!("{USERS} revocations in {took:.1?}: {stored} rows at the end (bound: {recent} + {AT_ONCE} in flight)");

    if let Some(redis) = redis {
        // No revocation in any shard; one entry each in the control stream, capped.
        let shard_entries: u64 =
            (0..64).map(|k| redis.cli(&["XLEN", &format!("{{herald-flood:{k}}}:log")]).parse::<u64>().unwrap()).sum();
        assert_eq!(shard_entries, 20, "the shards hold the events only");
        let info = redis.cli(&["XINFO", "STREAM", "{herald-flood:control}:log"]);
        let field = |name: &str| -> u64 {
            let mut lines = info.lines();
            lines.find(|l| *l == name).and_then(|_| lines.next()).and_then(|v| v.parse().ok()).expect(name)
        };
        // The stream was made with one entry, added and trimmed at once (see event_log/stream.rs).
        let written = field("entries-added") - 1;
        assert_eq!(written, USERS as u64, "one control entry per revocation");
        assert!(field("length") <= MAX_EVENTS as u64 + 100, "the control stream is capped");
        figures += &format!(
            "; control stream: {written} entries written, {} kept; shards: {shard_entries} entries (the events)",
            field("length")
        );
    }
    // An event published after the flood is marked after every revocation of it.
    publish(&apps, &mut alice, 20..21).await;
    if let Some(redis) = redis {
        let shard = crate::shards::shard("c1");
        let last = redis.cli(&["XREVRANGE", &format!("{{herald-flood:{shard}}}:log"), "+", "-", "COUNT", "1"]);
        let mark = last.lines().skip_while(|l| *l != "c").nth(1).expect("the event's mark").to_owned();
        let epoch = redis.cli(&["GET", "{herald-flood:control}:epoch"]);
        let control = redis.cli(&["XREVRANGE", "{herald-flood:control}:log", "+", "-", "COUNT", "1"]);
        let (ms, seq) = control.lines().next().unwrap().split_once('-').unwrap();
        let expected = format!("{epoch}-{:013}-{:010}", ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap());
        assert_eq!(mark, expected, "the control stream's head when it was appended");
    }
    // The events before the flood are all still there to recover.
    let mut back = apps[apps.len() - 1].connect("bob").await;
    let ack = back.subscribe_since("campaign", "c1", json!(offsets[0])).await;
    assert_eq!(ack, json!({"success": true, "recovered": true}));
    let mut replayed = Vec::new();
    while let Some((_, event)) = back.next_event(Duration::from_millis(300)).await {
        replayed.push(event["payload"]["seq"].as_u64().unwrap());
    }
    assert_eq!(replayed, (1..21).collect::<Vec<u64>>(), "every event after the since, once");
    // Past the TTL, the next revocation leaves its own row alone.
    tokio::time::sleep(TTL + Duration::from_millis(1100)).await;
    flood(&apps[..1], 1).await;
    assert_eq!(rows(&database).await, 1, "expired rows are gone");
    println!(
        "flood ({}): {figures}; a since from before it recovered",
        if redis.is_some() { "fleet" } else { "memory" }
    );
}

#[tokio::test]
async fn a_revocation_flood_on_one_instance_keeps_the_store_bounded_and_the_replay_history() {
    flood_keeps_the_store_bounded_and_the_replay_history(None).await;
}

#[tokio::test]
async fn a_revocation_flood_in_a_fleet_keeps_the_store_bounded_and_the_replay_history() {
    let Some(redis) = Redis::start().await else { return };
    flood_keeps_the_store_bounded_and_the_replay_history(Some(&redis)).await;
}
