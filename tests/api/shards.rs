//! The sharded fleet log: an instance reads only the shards its sockets
//! need, a socket joining a shard its instance did not follow loses nothing
//! and gets nothing twice, every followed shard resumes after Redis comes
//! back, a shard whose cluster slot moves is read from its new node, and
//! another layout cannot share a prefix in silence. Each test
//! starts its own `redis-server` (or cluster).

use std::time::{Duration, Instant};

use herald::Application;
use herald::event_log::shard_of;
use herald::rooms::CampaignId;
use serde_json::{Value, json};

use crate::client::Client;
use crate::fleet::{Cluster, Redis, fleet_with, in_fleet};
use crate::helpers::*;

const SHARDS: u32 = 64;

pub(crate) fn shard(campaign: &str) -> u32 {
    shard_of(&CampaignId::parse(campaign).expect("an id"), SHARDS)
}

/// `n` campaigns (`k…`) in shards of their own, none shared with c1's or c2's.
pub(crate) fn campaigns_in_new_shards(n: usize) -> Vec<String> {
    let mut taken = vec![shard("c1"), shard("c2")];
    let mut found = Vec::new();
    for i in 0.. {
        let id = format!("k{i}");
        if !taken.contains(&shard(&id)) {
            taken.push(shard(&id));
            found.push(id);
        }
        if found.len() == n {
            break;
        }
    }
    found
}

/// Makes `user` a member of `campaigns` in `app`'s store.
pub(crate) async fn add_member(app: &TestApp, user: &str, campaigns: &[String]) {
    let rows: Vec<String> = campaigns.iter().map(|c| format!("('{c}', '{user}')")).collect();
    run_sql(
        &app.database_url,
        &format!("INSERT INTO campaign_members (campaign_id, user_id) VALUES {};", rows.join(", ")),
    )
    .await;
}

fn numbered(campaign: &str, seq: u64) -> Value {
    json!({"type": "state_invalidated", "payload": {"campaignId": campaign, "scope": "campaign", "seq": seq}})
}

/// Publishes until accepted (Redis may be coming back).
async fn publish_accepted(app: &TestApp, body: &Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, answer) = app.publish(body).await;
        if status == 202 {
            return;
        }
        assert!(Instant::now() < deadline, "publishes still refused: {status} {answer}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The `seq` and offset of every event that arrives within `wait` of the last one.
async fn drain(client: &mut Client, wait: Duration) -> Vec<(u64, String)> {
    let mut seen = Vec::new();
    while let Some((_, event)) = client.next_event(wait).await {
        let seq = event["payload"]["seq"].as_u64().expect("a numbered event");
        seen.push((seq, event["offset"].as_str().expect("an offset").to_owned()));
    }
    seen
}

fn seqs(events: &[(u64, String)]) -> Vec<u64> {
    events.iter().map(|(seq, _)| *seq).collect()
}

async fn gauge(app: &TestApp, series: &str) -> f64 {
    metric(&app.metrics().await, series)
}

/// Waits until `series` on `app` is `value`.
async fn gauge_becomes(app: &TestApp, series: &str, value: f64, within: Duration) {
    let deadline = Instant::now() + within;
    while gauge(app, series).await != value {
        assert!(Instant::now() < deadline, "{series} never became {value}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_socket_joining_a_shard_its_instance_did_not_follow_gets_every_event_once() {
    let Some(redis) = Redis::start().await else { return };
    let apps = fleet_with(&redis, 2, "herald-shard-join", |_| {}).await;
    let (a, b) = (&apps[0], &apps[1]);
    let campaigns = campaigns_in_new_shards(4);
    for app in &apps {
        add_member(app, "carol", &campaigns).await;
    }
    const EVENTS: u64 = 80;
    for (trial, campaign) in campaigns.iter().enumerate() {
        let followed = gauge(b, "herald_fleet_shards_followed").await;
        let mut on_a = a.connect("carol").await;
        assert_eq!(on_a.subscribe("campaign", campaign).await["success"], true);
        // Events go on being published while the client moves to B.
        let publisher = {
            let (url, http, campaign) = (a.url("/v1/events"), a.http.clone(), campaign.clone());
            tokio::spawn(async move {
                for seq in 0..EVENTS {
                    let sent = http.post(&url).bearer_auth(PUBLISH_TOKEN).json(&numbered(&campaign, seq)).send();
                    assert_eq!(sent.await.unwrap().status(), 202);
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            })
        };
        let mut before = Vec::new();
        while before.len() < 10 + trial * 5 {
            let (_, event) = on_a.expect_event().await;
            before.push((event["payload"]["seq"].as_u64().unwrap(), event["offset"].as_str().unwrap().to_owned()));
        }
        on_a.close();
        let since = before.last().unwrap().1.clone();
        // B follows no shard of this campaign: the subscribe starts following it.
        let mut on_b = b.connect("carol").await;
        let ack = on_b.subscribe_since("campaign", campaign, json!(since)).await;
        assert_eq!(ack, json!({"success": true, "recovered": true}), "trial {trial}");
        publisher.await.unwrap();
        let after = drain(&mut on_b, Duration::from_millis(500)).await;
        let mut all = seqs(&before);
        all.extend(seqs(&after));
        // What A delivered before the move, then B from there: each event once, in order.
        let expected: Vec<u64> = (0..all.len() as u64).collect();
        assert_eq!(all, expected, "trial {trial}: before the move {:?}, after {:?}", seqs(&before), seqs(&after));
        assert_eq!(*all.last().unwrap(), EVENTS - 1, "trial {trial}: events missing at the end");
        assert!(after.windows(2).all(|w| w[0].1 < w[1].1), "trial {trial}: offsets increase");
        assert_eq!(gauge(b, "herald_fleet_shards_followed").await, followed + 1.0, "trial {trial}");
    }
}

#[tokio::test]
async fn an_instance_reads_a_shard_only_while_a_local_socket_needs_it() {
    let Some(redis) = Redis::start().await else { return };
    let apps =
        fleet_with(&redis, 1, "herald-shard-linger", |c| c.fleet.shard_linger = Duration::from_millis(500)).await;
    let app = &apps[0];
    let other = &campaigns_in_new_shards(1)[0];
    let read = || async { gauge(app, "herald_fleet_entries_read_total").await };
    assert_eq!(gauge(app, "herald_fleet_shards_followed").await, 0.0);

    let mut alice = app.connect("alice").await;
    assert_eq!(alice.subscribe("campaign", "c1").await["success"], true);
    assert_eq!(gauge(app, "herald_fleet_shards_followed").await, 1.0);
    // Another shard's events are not read here.
    let start = read().await;
    for seq in 0..10 {
        publish_accepted(app, &numbered(other, seq)).await;
    }
    for seq in 0..10 {
        publish_accepted(app, &numbered("c1", seq)).await;
    }
    let got = drain(&mut alice, Duration::from_millis(300)).await;
    assert_eq!(seqs(&got), (0..10).collect::<Vec<_>>());
    assert_eq!(read().await - start, 10.0, "only c1's shard is read");

    // Left once no socket needs it (the linger is 500 ms here).
    assert_eq!(alice.unsubscribe("campaign", "c1").await["success"], true);
    gauge_becomes(app, "herald_fleet_shards_followed", 0.0, Duration::from_secs(5)).await;
    let unread = read().await;
    for seq in 10..15 {
        publish_accepted(app, &numbered("c1", seq)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read().await, unread, "an unfollowed shard is not read");

    // Coming back with `since`: what was published meanwhile is replayed, once.
    let since = got.last().unwrap().1.clone();
    let ack = alice.subscribe_since("campaign", "c1", json!(since)).await;
    assert_eq!(ack, json!({"success": true, "recovered": true}));
    // Counted over the connection: the 10 before, then the 5 replayed, then the ack.
    assert_eq!(alice.events_before_last_ack(), 15, "the replay comes before the ack");
    publish_accepted(app, &numbered("c1", 15)).await;
    let again = drain(&mut alice, Duration::from_millis(300)).await;
    assert_eq!(seqs(&again), (10..16).collect::<Vec<_>>());
    assert_eq!(gauge(app, "herald_fleet_shards_followed").await, 1.0);
}

#[tokio::test]
async fn an_instance_that_loses_and_regains_redis_resumes_every_shard_it_follows() {
    let Some(redis) = Redis::start().await else { return };
    let apps = fleet_with(&redis, 2, "herald-shard-resume", |_| {}).await;
    let (a, b) = (&apps[0], &apps[1]);
    let campaigns = campaigns_in_new_shards(2);
    for app in &apps {
        add_member(app, "alice", &campaigns).await;
    }
    let followed = ["c1", campaigns[0].as_str()];
    let mut clients = Vec::new();
    for campaign in followed {
        let mut c = b.connect("alice").await;
        assert_eq!(c.subscribe("campaign", campaign).await["success"], true);
        publish_accepted(a, &numbered(campaign, 0)).await;
        assert_eq!(seqs(&drain(&mut c, Duration::from_millis(300)).await), vec![0]);
        clients.push(c);
    }
    assert_eq!(gauge(b, "herald_fleet_shards_followed").await, 2.0);

    // Redis stops answering for a while (nothing is lost).
    redis.pause(true);
    let paused = Instant::now();
    while b.http.get(b.url("/readyz")).send().await.unwrap().status() != 503 {
        assert!(paused.elapsed() < Duration::from_secs(5), "readyz never said 503");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A subscribe into a shard B does not follow yet: acked, but B cannot
    // know the shard's head, so the socket is cut once Redis answers.
    let mut blind = b.connect("alice").await;
    assert_eq!(blind.subscribe("campaign", &campaigns[1]).await["success"], true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.pause(false);

    assert!(blind.closed_within(Duration::from_secs(10)).await, "the socket that joined blind was not cut");
    for (campaign, client) in followed.iter().zip(&mut clients) {
        publish_accepted(a, &numbered(campaign, 1)).await;
        assert_eq!(seqs(&drain(client, Duration::from_millis(1000)).await), vec![1], "{campaign}");
        assert!(!client.is_closed(), "{campaign}: a follower resumed where it stopped, no cut needed");
    }
    assert_eq!(gauge(b, "herald_fleet_shards_followed").await, 3.0);
}

#[tokio::test]
async fn another_layout_on_the_same_prefix_is_refused_at_start_and_seen_at_run_time() {
    let Some(redis) = Redis::start().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("herald.db").display());
    let build = |prefix: &'static str, shards: u32| {
        let url = redis.url();
        let config = test_config(&database_url, move |c| {
            in_fleet(c, &url, prefix);
            c.fleet.log_shards = shards;
        });
        Application::build(config)
    };
    // An older herald's stream on the prefix.
    redis.cli(&["XADD", "{herald-old}:log", "*", "k", "state_invalidated"]);
    let refused = build("herald-old", 64).await.err().expect("refused").to_string();
    assert!(refused.contains("older than the sharded log"), "{refused}");
    // Another shard count on the prefix.
    let app = fleet_with(&redis, 1, "herald-layout", |_| {}).await.pop().unwrap();
    let refused = build("herald-layout", 8).await.err().expect("refused").to_string();
    assert!(refused.contains("another layout"), "{refused}");
    // The first sharded layout (revocations in every shard) on the prefix.
    redis.cli(&["SET", "{herald-v1}:log", "herald sharded log, 64 shards"]);
    let refused = build("herald-v1", 64).await.err().expect("refused").to_string();
    assert!(refused.contains("another layout"), "{refused}");

    // At run time: Redis forgot the claim and an older instance wrote its stream.
    redis.cli(&["DEL", "{herald-layout}:log"]);
    redis.cli(&["XADD", "{herald-layout}:log", "*", "k", "state_invalidated"]);
    let readyz = || async { app.http.get(app.url("/readyz")).send().await.unwrap().status().as_u16() };
    let seen = Instant::now();
    while readyz().await != 503 {
        assert!(seen.elapsed() < Duration::from_secs(12), "readyz never said 503");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The older instance is gone: this layout claims the prefix again.
    redis.cli(&["DEL", "{herald-layout}:log"]);
    let gone = Instant::now();
    while readyz().await != 200 {
        assert!(gone.elapsed() < Duration::from_secs(12), "readyz never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(redis.cli(&["GET", "{herald-layout}:log"]), "herald sharded log 2, 64 shards");
}

#[tokio::test]
async fn on_a_cluster_a_batch_over_several_shards_and_a_user_revocation_reach_every_shard() {
    let Some(cluster) = Cluster::start().await else { return };
    let campaigns = campaigns_in_new_shards(2);
    let mut apps = Vec::new();
    for _ in 0..2 {
        let url = cluster.url();
        apps.push(spawn_app_with(Backend::Sqlite, move |c| in_fleet(c, &url, "herald-cluster-shards")).await);
        add_member(apps.last().unwrap(), "alice", &campaigns).await;
    }
    let mut clients = Vec::new();
    for (i, campaign) in ["c1", &campaigns[0], &campaigns[1]].into_iter().enumerate() {
        let mut c = apps[i % 2].connect("alice").await;
        assert_eq!(c.subscribe("campaign", campaign).await["success"], true);
        clients.push((campaign.to_owned(), c));
    }
    // One batch, interleaving three shards: in a cluster, one append per run of one shard.
    let batch: Vec<Value> = (0..9).map(|seq| numbered(&clients[seq as usize % 3].0, seq)).collect();
    let (status, body) = apps[0].publish(&json!(batch)).await;
    assert_eq!((status, body["accepted"].as_u64()), (202, Some(9)), "{body}");
    for (i, (campaign, c)) in clients.iter_mut().enumerate() {
        let expected: Vec<u64> = (0..9).filter(|seq| seq % 3 == i as u64).collect();
        assert_eq!(seqs(&drain(c, Duration::from_millis(500)).await), expected, "{campaign}");
    }
    // A user's revocation (one entry, in the control stream): every socket of hers, on both instances, is disconnected.
    let revoked = apps[1]
        .http
        .post(apps[1].url("/v1/access/revoke"))
        .bearer_auth(PUBLISH_TOKEN)
        .json(&json!({"userId": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 202);
    for (campaign, c) in &clients {
        assert!(c.closed_within(Duration::from_secs(3)).await, "{campaign}: still connected");
        assert!(c.got_disconnect_packet(), "{campaign}: a final disconnect");
    }
}

#[tokio::test]
async fn on_a_cluster_a_shard_whose_slot_moves_is_read_from_its_new_node() {
    let Some(cluster) = Cluster::start().await else { return };
    let url = cluster.url();
    let app = spawn_app_with(Backend::Sqlite, move |c| in_fleet(c, &url, "herald-moved")).await;
    let mut client = app.connect("alice").await;
    assert_eq!(client.subscribe("campaign", "c1").await["success"], true);
    publish_accepted(&app, &numbered("c1", 0)).await;
    assert_eq!(seqs(&drain(&mut client, Duration::from_millis(500)).await), [0]);
    // The instance reads c1's shard on the one node that serves it; the slot moves away.
    cluster.move_slot_of(&format!("{{herald-moved:{}}}:log", shard("c1")));
    for seq in 1..=5 {
        publish_accepted(&app, &numbered("c1", seq)).await;
    }
    let after = drain(&mut client, Duration::from_secs(3)).await;
    assert_eq!(seqs(&after), [1, 2, 3, 4, 5], "read from the shard's new node, nothing lost or twice");
    assert!(!client.closed_within(Duration::from_millis(100)).await, "the socket stays connected");
}
