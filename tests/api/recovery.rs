//! Connection state recovery: every event carries an `offset`; a subscribe
//! may carry `since`, and herald replays what the socket missed, or says
//! `recovered: false`.
//!
//! First the edge cases, on one instance (the in-memory log) and on two over
//! Redis; then the drop tests: 1,000 clients behind TCP proxies that cut
//! every connection every couple of seconds while events flow, each client
//! coming back (often on the other instance) with `since`; and the same with
//! a Redis restart and a graceful instance restart during the run.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::client::Client;
use crate::fleet::Redis;
use crate::helpers::*;
use crate::proxy::Proxy;

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

const RECOVERED: fn() -> Value = || json!({"success": true, "recovered": true});
const NOT_RECOVERED: fn() -> Value = || json!({"success": true, "recovered": false});
const SUBSCRIBED: fn() -> Value = || json!({"success": true});

fn offset(event: &Value) -> String {
    event["offset"].as_str().unwrap_or_else(|| panic!("an event without a string offset: {event}")).to_owned()
}

fn seq(event: &Value) -> u64 {
    event["payload"]["seq"].as_u64().unwrap_or_else(|| panic!("an event without payload.seq: {event}"))
}

fn with_seq(mut body: Value, seq: u64) -> Value {
    body["payload"]["seq"] = json!(seq);
    body
}

/// Every event that arrives within `wait` of the previous one.
async fn drain(client: &mut Client, wait: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    while let Some((name, event)) = client.next_event(wait).await {
        assert_eq!(event["type"], json!(name), "an event is emitted under its type");
        got.push(event);
    }
    got
}

/// The events that had already arrived (e.g. when an ack came: a replay
/// comes before its ack), without waiting.
fn arrived(client: &mut Client) -> Vec<Value> {
    std::iter::from_fn(|| client.try_next_event()).map(|(_, e)| e).collect()
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(seq).collect()
}

/// Offsets must be non-empty strings of one width, strictly increasing (as
/// strings) in the order received.
fn assert_offsets_increase(events: &[Value], who: &str) {
    let offsets: Vec<String> = events.iter().map(offset).collect();
    for o in &offsets {
        assert!(!o.is_empty(), "{who}: an empty offset");
    }
    for w in offsets.windows(2) {
        assert_eq!(w[0].len(), w[1].len(), "{who}: offsets of different widths: {:?} then {:?}", w[0], w[1]);
        assert!(w[0] < w[1], "{who}: offsets not strictly increasing: {:?} then {:?}", w[0], w[1]);
    }
}

/// Publishes and requires a 202.
async fn publish_ok(app: &TestApp, body: Value) {
    let (status, answer) = app.publish(&body).await;
    assert_eq!(status, 202, "publish {body}: {answer}");
}

/// An offset later than `o`, of the same form: the last digit run plus one
/// (with carry), i.e. the very next value if offsets count.
fn next_offset(o: &str) -> String {
    let mut chars: Vec<char> = o.chars().collect();
    let mut i = chars.iter().rposition(char::is_ascii_digit).unwrap_or_else(|| panic!("no digit in offset {o:?}"));
    loop {
        if chars[i] == '9' {
            chars[i] = '0';
            assert!(i > 0 && chars[i - 1].is_ascii_digit(), "cannot bump offset {o:?}");
            i -= 1;
        } else {
            chars[i] = (chars[i] as u8 + 1) as char;
            break;
        }
    }
    chars.into_iter().collect()
}

/// An offset much later than `o`, of the same form: its most significant
/// digit below 8 raised by one.
fn far_offset(o: &str) -> String {
    let mut chars: Vec<char> = o.chars().collect();
    let i = chars.iter().position(|c| ('0'..'8').contains(c)).unwrap_or_else(|| panic!("cannot bump offset {o:?}"));
    chars[i] = (chars[i] as u8 + 1) as char;
    chars.into_iter().collect()
}

/// Instances over `redis`, each on its own fixture database.
async fn redis_fleet(redis: &Redis, n: usize) -> Vec<TestApp> {
    let mut apps = Vec::new();
    for _ in 0..n {
        let url = redis.url();
        apps.push(
            spawn_app_with(Backend::Sqlite, move |c| {
                c.fleet.redis_url = Some(url);
                c.fleet.redis_timeout = Duration::from_secs(1);
            })
            .await,
        );
    }
    apps
}

/// One of each kind of event, numbered: `(body, the rooms it targets)`.
/// Campaign c1 (settlement s1, structure st1) and c2.
fn sample(seq: u64) -> (Value, &'static [&'static str]) {
    let (body, rooms): (Value, &'static [&'static str]) = match seq % 6 {
        0 => (bodies::settlement_updated("c1", "s1"), &["campaign:c1", "settlement:s1"]),
        1 => (bodies::state_invalidated("c1"), &["campaign:c1"]),
        2 => (bodies::structure_updated("c1", "s1", "st1"), &["campaign:c1", "settlement:s1", "structure:st1"]),
        3 => (bodies::state_invalidated("c2"), &["campaign:c2"]),
        4 => (bodies::entity_updated("c1", "settlement", "s1"), &["campaign:c1", "settlement:s1"]),
        _ => (bodies::world_time_changed("c1"), &["campaign:c1"]),
    };
    (with_seq(body, seq), rooms)
}

fn sample_seqs_for(room: &str, range: std::ops::Range<u64>) -> Vec<u64> {
    range.filter(|s| sample(*s).1.contains(&room)).collect()
}

// ---------------------------------------------------------------------------
// Edge cases
// ---------------------------------------------------------------------------

#[tokio::test]
async fn every_event_has_a_fixed_width_offset_that_increases_in_each_room() {
    let app = spawn_app().await;
    let mut subscribers = Vec::new();
    for (user, kind, id) in [
        ("alice", "campaign", "c1"),
        ("bob", "settlement", "s1"),
        ("bob", "structure", "st1"),
        ("carol", "campaign", "c2"),
    ] {
        let mut c = app.connect(user).await;
        // Without `since` the ack is as before: no `recovered`.
        assert_eq!(c.subscribe(kind, id).await, SUBSCRIBED());
        subscribers.push((format!("{kind}:{id}"), c));
    }
    let n = 36;
    for s in 0..n {
        publish_ok(&app, sample(s).0).await;
    }
    let mut offset_of_seq: HashMap<u64, String> = HashMap::new();
    let mut widths = HashSet::new();
    for (room, c) in &mut subscribers {
        let got = drain(c, Duration::from_millis(400)).await;
        assert_eq!(seqs(&got), sample_seqs_for(room, 0..n), "{room}");
        assert_offsets_increase(&got, room);
        for e in &got {
            widths.insert(offset(e).len());
            // One event, one offset, whichever room it reached a socket by.
            let o = offset_of_seq.entry(seq(e)).or_insert_with(|| offset(e));
            assert_eq!(*o, offset(e), "seq {} has two offsets", seq(e));
        }
    }
    assert_eq!(widths.len(), 1, "offsets of several widths: {widths:?}");
    println!("offsets look like {:?}", offset_of_seq[&0]);
}

#[tokio::test]
async fn a_since_whose_successors_were_trimmed_is_not_recovered() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.replay.max_events = 3).await;
    let mut alice = app.connect("alice").await;
    alice.subscribe("campaign", "c1").await;
    for s in 0..10 {
        publish_ok(&app, with_seq(bodies::state_invalidated("c1"), s)).await;
    }
    let got = drain(&mut alice, Duration::from_millis(300)).await;
    assert_eq!(seqs(&got), (0..10).collect::<Vec<_>>());
    let offsets: Vec<String> = got.iter().map(offset).collect();

    // Only the last 3 (7, 8, 9) are kept: after event 0, 1..=6 are gone.
    let mut late = app.connect("bob").await;
    assert_eq!(late.subscribe_since("campaign", "c1", json!(offsets[0])).await, NOT_RECOVERED());
    assert_eq!(seqs(&arrived(&mut late)), Vec::<u64>::new(), "a partial replay before recovered:false");
    late.expect_silence(Duration::from_millis(200)).await;

    // After event 7, everything (8, 9) is still held.
    let mut near = app.connect("bob").await;
    assert_eq!(near.subscribe_since("campaign", "c1", json!(offsets[7])).await, RECOVERED());
    let replayed = arrived(&mut near);
    assert_eq!(seqs(&replayed), vec![8, 9], "the replay comes before the ack");
    near.expect_silence(Duration::from_millis(200)).await;

    // Both are subscribed now, and get live events once.
    publish_ok(&app, with_seq(bodies::state_invalidated("c1"), 10)).await;
    for c in [&mut alice, &mut late, &mut near] {
        let got = drain(c, Duration::from_millis(300)).await;
        assert_eq!(seqs(&got), vec![10]);
        assert!(offset(&got[0]) > offsets[9]);
    }
}

#[tokio::test]
async fn a_since_older_than_the_replay_window_is_not_recovered() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.replay.window = Duration::from_secs(1)).await;
    let mut alice = app.connect("alice").await;
    alice.subscribe("campaign", "c1").await;
    for s in 0..2 {
        publish_ok(&app, with_seq(bodies::state_invalidated("c1"), s)).await;
    }
    let got = drain(&mut alice, Duration::from_millis(300)).await;
    assert_eq!(seqs(&got), vec![0, 1]);
    // Fresh: recovered.
    let mut fresh = app.connect("bob").await;
    assert_eq!(fresh.subscribe_since("campaign", "c1", json!(offset(&got[0]))).await, RECOVERED());
    assert_eq!(seqs(&arrived(&mut fresh)), vec![1]);
    // Event 1 is older than the window now.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let mut stale = app.connect("bob").await;
    assert_eq!(stale.subscribe_since("campaign", "c1", json!(offset(&got[0]))).await, NOT_RECOVERED());
    assert_eq!(seqs(&arrived(&mut stale)), Vec::<u64>::new());
    stale.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_malformed_since_is_an_invalid_payload_and_subscribes_nothing() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    alice.subscribe("campaign", "c1").await;
    publish_ok(&app, with_seq(bodies::state_invalidated("c1"), 0)).await;
    let real = offset(&alice.expect_event().await.1);

    let mut probe = app.connect("alice").await;
    let bad = [
        json!(null),
        json!(5),
        json!(1.5),
        json!(true),
        json!({}),
        json!({"offset": real}),
        json!([real]),
        json!(""),
        json!("garbage"),
        json!("x".repeat(1_000)),
        json!("9".repeat(1_000)),
        json!(format!("{real}0")),
        json!(format!(" {real}")),
        json!(format!("{real}\n")),
        json!(&real[1..]),
        json!("-1"),
    ];
    for (kind, id) in [("campaign", "c1"), ("settlement", "s1"), ("structure", "st1")] {
        for since in &bad {
            assert_eq!(
                probe.subscribe_since(kind, id, since.clone()).await,
                json!({"success": false, "error": "Invalid payload"}),
                "subscribe_{kind} with since {since}"
            );
        }
    }
    // A well-formed since with a malformed id is still invalid.
    assert_eq!(
        probe.subscribe_since("campaign", "../c1", json!(real)).await,
        json!({"success": false, "error": "Invalid payload"})
    );
    // Nothing was replayed, and the socket joined nothing.
    publish_ok(&app, with_seq(bodies::structure_updated("c1", "s1", "st1"), 1)).await;
    probe.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(seqs(&drain(&mut alice, Duration::from_millis(300)).await), vec![1]);
}

#[tokio::test]
async fn a_since_from_another_room_never_replays_another_rooms_events() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await; // sees every c1 event
    alice.subscribe("campaign", "c1").await;
    let mut carol = app.connect("carol").await; // sees every c2 event
    carol.subscribe("campaign", "c2").await;
    let n = 24;
    for s in 0..n {
        publish_ok(&app, sample(s).0).await;
    }
    let on_c1 = drain(&mut alice, Duration::from_millis(300)).await;
    let on_c2 = drain(&mut carol, Duration::from_millis(0)).await;
    assert_eq!(seqs(&on_c1), sample_seqs_for("campaign:c1", 0..n));
    assert_eq!(seqs(&on_c2), sample_seqs_for("campaign:c2", 0..n));
    let c1_offset = |s: u64| offset(on_c1.iter().find(|e| seq(e) == s).unwrap());
    let c2_offset = |s: u64| offset(on_c2.iter().find(|e| seq(e) == s).unwrap());

    // (user, room, since, what the since is)
    let cases = [
        ("bob", "settlement", "s1", c2_offset(3), "an offset of campaign c2"),
        ("bob", "settlement", "s1", c1_offset(1), "an offset of a c1 event not in s1"),
        ("bob", "structure", "st1", c1_offset(4), "an offset of a c1/s1 event not in st1"),
        ("carol", "campaign", "c2", c1_offset(0), "an offset of campaign c1"),
        ("alice", "campaign", "c1", c2_offset(9), "an offset of campaign c2"),
    ];
    let mut clients = Vec::new();
    for (user, kind, id, since, what) in cases {
        let room = format!("{kind}:{id}");
        let mut c = app.connect(user).await;
        let ack = c.subscribe_since(kind, id, json!(since)).await;
        assert_eq!(ack["success"], true, "{room} with {what}: {ack}");
        assert!(ack["recovered"].is_boolean(), "{room} with {what}: {ack}");
        let mut replayed = arrived(&mut c);
        replayed.extend(drain(&mut c, Duration::from_millis(200)).await);
        let allowed = sample_seqs_for(&room, 0..n);
        for e in &replayed {
            assert!(allowed.contains(&seq(e)), "{room} with {what} replayed seq {} of another room", seq(e));
            assert!(offset(e) > since, "{room} with {what} replayed seq {} from before since", seq(e));
        }
        assert_offsets_increase(&replayed, &room);
        if ack["recovered"] == true {
            // Recovered: then exactly the room's events after since.
            let by_offset: Vec<u64> = (0..n)
                .filter(|s| allowed.contains(s))
                .filter(|s| {
                    let o = if room == "campaign:c2" { c2_offset(*s) } else { c1_offset(*s) };
                    o > since
                })
                .collect();
            assert_eq!(seqs(&replayed), by_offset, "{room} with {what}");
        } else {
            assert_eq!(seqs(&replayed), Vec::<u64>::new(), "{room} with {what}: a replay with recovered:false");
        }
        println!("{room} with {what}: {ack}, {} replayed", replayed.len());
        clients.push((room, c));
    }
    // Each is subscribed, and a live event of its room arrives once.
    publish_ok(&app, with_seq(bodies::structure_updated("c1", "s1", "st1"), 100)).await;
    publish_ok(&app, with_seq(bodies::state_invalidated("c2"), 101)).await;
    for (room, c) in &mut clients {
        let expected = if room == "campaign:c2" { vec![101] } else { vec![100] };
        assert_eq!(seqs(&drain(c, Duration::from_millis(300)).await), expected, "{room}");
    }
}

#[tokio::test]
async fn a_since_at_the_last_offset_is_recovered_with_nothing_to_replay() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    alice.subscribe("settlement", "s1").await;
    for s in 0..3 {
        publish_ok(&app, with_seq(bodies::settlement_updated("c1", "s1"), s)).await;
    }
    let got = drain(&mut alice, Duration::from_millis(300)).await;
    let last = offset(got.last().unwrap());
    let mut back = app.connect("alice").await;
    assert_eq!(back.subscribe_since("settlement", "s1", json!(last)).await, RECOVERED());
    back.expect_silence(Duration::from_millis(300)).await;
    publish_ok(&app, with_seq(bodies::settlement_updated("c1", "s1"), 3)).await;
    let live = drain(&mut back, Duration::from_millis(300)).await;
    assert_eq!(seqs(&live), vec![3]);
    assert!(offset(&live[0]) > last);
}

#[tokio::test]
async fn a_since_from_the_future_is_not_recovered_and_replays_nothing() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    alice.subscribe("campaign", "c1").await;
    for s in 0..3 {
        publish_ok(&app, with_seq(bodies::state_invalidated("c1"), s)).await;
    }
    let got = drain(&mut alice, Duration::from_millis(300)).await;
    let last = offset(got.last().unwrap());
    for (what, future) in [("the next offset", next_offset(&last)), ("a far offset", far_offset(&last))] {
        assert!(future > last && future.len() == last.len(), "{what}: {future:?} after {last:?}");
        let mut c = app.connect("bob").await;
        assert_eq!(c.subscribe_since("campaign", "c1", json!(future)).await, NOT_RECOVERED(), "{what} {future:?}");
        c.expect_silence(Duration::from_millis(300)).await;
    }
    // And the log goes on: a since from before that future still recovers.
    publish_ok(&app, with_seq(bodies::state_invalidated("c1"), 3)).await;
    let mut c = app.connect("bob").await;
    assert_eq!(c.subscribe_since("campaign", "c1", json!(offset(&got[0]))).await, RECOVERED());
    assert_eq!(seqs(&arrived(&mut c)), vec![1, 2, 3]);
}

/// A `recovered: false` ack comes before every live event of the room. A
/// client that keeps the offset of each event it gets and is cut before the
/// ack would otherwise re-subscribe with a live event's offset, be told
/// `recovered: true`, and never learn what it missed.
async fn not_recovered_ack_before_live_events(app: &TestApp) {
    let mut alice = app.connect("alice").await;
    alice.subscribe("campaign", "c1").await;
    publish_ok(app, with_seq(bodies::state_invalidated("c1"), 0)).await;
    let got = drain(&mut alice, Duration::from_millis(300)).await;
    let future = far_offset(&offset(&got[0]));
    // Events for c1 without pause, from several publishers, while clients
    // subscribe with a since herald cannot serve.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publishers: Vec<_> = (0..2)
        .map(|_| {
            let (http, addr, stop) = (app.http.clone(), app.addr, stop.clone());
            tokio::spawn(async move {
                let mut published = 0;
                while !stop.load(Ordering::SeqCst) {
                    let response = http
                        .post(format!("http://{addr}/v1/events"))
                        .bearer_auth(PUBLISH_TOKEN)
                        .json(&bodies::state_invalidated("c1"))
                        .send()
                        .await
                        .expect("publish");
                    assert_eq!(response.status().as_u16(), 202);
                    published += 1;
                }
                published
            })
        })
        .collect();
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = app.connect("bob").await;
        assert_eq!(c.subscribe_since("campaign", "c1", json!(future)).await, NOT_RECOVERED());
        assert_eq!(c.events_before_last_ack(), 0, "a live event arrived before the recovered:false ack");
        clients.push(c);
    }
    stop.store(true, Ordering::SeqCst);
    let mut published = 0;
    for p in publishers {
        published += p.await.expect("publisher");
    }
    let mut live = 0;
    for c in &mut clients {
        live += drain(c, Duration::from_millis(100)).await.len();
    }
    // The check above only means something if events were flowing.
    assert!(live > 0 && published > 20, "{live} live events after the acks, {published} published");
}

#[tokio::test]
async fn a_not_recovered_ack_comes_before_any_live_event() {
    not_recovered_ack_before_live_events(&spawn_app().await).await;
}

#[tokio::test]
async fn a_not_recovered_ack_comes_before_any_live_event_with_redis() {
    let Some(redis) = Redis::start().await else { return };
    let apps = redis_fleet(&redis, 1).await;
    not_recovered_ack_before_live_events(&apps[0]).await;
}

#[tokio::test]
async fn a_non_member_with_since_is_unauthorized_and_gets_nothing() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    alice.subscribe("campaign", "c1").await;
    for s in 0..3 {
        publish_ok(&app, with_seq(bodies::structure_updated("c1", "s1", "st1"), s)).await;
    }
    let first = offset(&drain(&mut alice, Duration::from_millis(300)).await[0]);
    let mut carol = app.connect("carol").await;
    for (kind, id) in [("campaign", "c1"), ("settlement", "s1"), ("structure", "st1"), ("campaign", "nope")] {
        assert_eq!(
            carol.subscribe_since(kind, id, json!(first)).await,
            json!({"success": false, "error": "Unauthorized"}),
            "{kind}:{id}"
        );
    }
    carol.expect_silence(Duration::from_millis(300)).await;
    publish_ok(&app, with_seq(bodies::structure_updated("c1", "s1", "st1"), 3)).await;
    carol.expect_silence(Duration::from_millis(300)).await;
}

/// A client gets e0, goes away, five events go by, it comes back (on the
/// last of `apps`) with since = e0's offset: exactly those five, in order,
/// before the ack; then live ones, no duplicate.
async fn back_after_a_gap(apps: &[TestApp]) {
    let (first, last) = (&apps[0], &apps[apps.len() - 1]);
    let mut c = first.connect("alice").await;
    assert_eq!(c.subscribe("campaign", "c1").await, SUBSCRIBED());
    publish_ok(first, sample(0).0).await;
    let e0 = c.expect_event().await.1;
    assert_eq!(seq(&e0), 0);
    c.close();
    assert!(c.closed_within(Duration::from_secs(2)).await);
    let missed: Vec<u64> = (1..=6).filter(|s| sample(*s).1.contains(&"campaign:c1")).collect();
    assert_eq!(missed.len(), 5);
    for (i, s) in (1..=6).enumerate() {
        publish_ok(&apps[i % apps.len()], sample(s).0).await;
    }
    let mut back = last.connect("alice").await;
    let started = Instant::now();
    assert_eq!(back.subscribe_since("campaign", "c1", json!(offset(&e0))).await, RECOVERED());
    let took = started.elapsed();
    let replayed = arrived(&mut back);
    assert_eq!(seqs(&replayed), missed, "the replay, before the ack");
    assert_offsets_increase(&[vec![e0.clone()], replayed.clone()].concat(), "replay");
    back.expect_silence(Duration::from_millis(200)).await;
    publish_ok(first, sample(8).0).await;
    let live = drain(&mut back, Duration::from_millis(400)).await;
    assert_eq!(seqs(&live), vec![8], "then live, once");
    assert!(offset(&live[0]) > offset(replayed.last().unwrap()));
    println!("back after a gap on {} instance(s): recovered ack in {took:?}", apps.len());
}

#[tokio::test]
async fn a_client_back_after_a_gap_gets_exactly_what_it_missed_then_live() {
    let app = spawn_app().await;
    back_after_a_gap(std::slice::from_ref(&app)).await;
}

#[tokio::test]
async fn a_client_back_on_another_instance_gets_exactly_what_it_missed_then_live() {
    let Some(redis) = Redis::start().await else { return };
    let apps = redis_fleet(&redis, 2).await;
    back_after_a_gap(&apps).await;
}

#[tokio::test]
async fn offsets_are_the_same_whichever_instance_delivers() {
    let Some(redis) = Redis::start().await else { return };
    let apps = redis_fleet(&redis, 3).await;
    let mut clients = Vec::new();
    for app in &apps {
        let mut c = app.connect("alice").await;
        c.subscribe("campaign", "c1").await;
        clients.push(c);
    }
    for s in 0..12 {
        publish_ok(&apps[s as usize % 3], with_seq(bodies::state_invalidated("c1"), s)).await;
    }
    let mut seen: Vec<Vec<(u64, String)>> = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        let got = drain(c, Duration::from_millis(400)).await;
        let mut sorted = seqs(&got);
        sorted.sort_unstable();
        assert_eq!(sorted, (0..12).collect::<Vec<_>>(), "client on instance {i}");
        assert_offsets_increase(&got, &format!("client on instance {i}"));
        let mut pairs: Vec<(u64, String)> = got.iter().map(|e| (seq(e), offset(e))).collect();
        pairs.sort();
        seen.push(pairs);
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0], seen[2]);
}

/// A socket in two rooms gets each event once live; coming back to both with
/// the since it has for each, it still gets each missed event once (README:
/// a socket in several target rooms receives an event once; a replay skips
/// what the socket already got through another of its rooms). In the order
/// the README recommends (broader room first), the offsets also increase;
/// in the other order they need not (README), but nothing comes twice.
async fn recovering_two_rooms(order: [(&str, &str); 2], in_offset_order: bool) {
    let app = spawn_app().await;
    let mut c = app.connect("alice").await;
    c.subscribe("campaign", "c1").await;
    c.subscribe("settlement", "s1").await;
    publish_ok(&app, sample(0).0).await; // both rooms
    let e0 = c.expect_event().await.1;
    c.expect_silence(Duration::from_millis(200)).await;
    c.close();
    assert!(c.closed_within(Duration::from_secs(2)).await);
    for s in 1..=5 {
        publish_ok(&app, sample(s).0).await;
    }
    let mut back = app.connect("alice").await;
    for (kind, id) in order {
        assert_eq!(back.subscribe_since(kind, id, json!(offset(&e0))).await, RECOVERED(), "{kind}:{id}");
    }
    let got = drain(&mut back, Duration::from_millis(300)).await;
    if in_offset_order {
        assert_offsets_increase(&got, "two rooms");
    }
    let mut s = seqs(&got);
    s.sort_unstable();
    // 1, 2, 4, 5 are in c1 (2 and 4 also in s1); 3 is c2's.
    assert_eq!(s, vec![1, 2, 4, 5], "each missed event once ({order:?})");
    publish_ok(&app, sample(6).0).await;
    assert_eq!(seqs(&drain(&mut back, Duration::from_millis(300)).await), vec![6], "then live, once");
}

#[tokio::test]
async fn a_socket_recovering_two_rooms_gets_each_missed_event_once() {
    recovering_two_rooms([("campaign", "c1"), ("settlement", "s1")], true).await;
}

#[tokio::test]
async fn a_socket_recovering_two_rooms_narrower_first_still_gets_each_missed_event_once() {
    recovering_two_rooms([("settlement", "s1"), ("campaign", "c1")], false).await;
}

// ---------------------------------------------------------------------------
// The drop tests
// ---------------------------------------------------------------------------

/// The two drop tests load the machine; they run one at a time.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Clients in a drop test (`HERALD_DROP_CLIENTS` overrides, e.g. to bisect).
fn clients_count() -> usize {
    std::env::var("HERALD_DROP_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000)
}
const CAMPAIGNS: u64 = 10;
const KINDS: [&str; 3] = ["campaign", "settlement", "structure"];
/// Events per second, over both instances.
const RATE: u64 = 50;

/// Event `seq` of the drop tests, and the rooms it targets. Seqs
/// `0..CAMPAIGNS` (the warm-up) are structure updates, so they reach every room.
fn drop_event(seq: u64) -> (Value, Vec<String>) {
    let k = seq % CAMPAIGNS;
    let (c, s, st) = (format!("rc{k}"), format!("rs{k}"), format!("rst{k}"));
    let (body, rooms) = match (seq / CAMPAIGNS + 2) % 3 {
        0 => (bodies::settlement_updated(&c, &s), vec![format!("campaign:{c}"), format!("settlement:{s}")]),
        1 => (bodies::state_invalidated(&c), vec![format!("campaign:{c}")]),
        _ => (
            bodies::structure_updated(&c, &s, &st),
            vec![format!("campaign:{c}"), format!("settlement:{s}"), format!("structure:{st}")],
        ),
    };
    (with_seq(body, seq), rooms)
}

fn drop_membership_sql() -> String {
    let mut sql = String::new();
    for k in 0..CAMPAIGNS {
        sql.push_str(&format!(
            "INSERT INTO campaign_members (campaign_id, user_id) VALUES ('rc{k}', 'ru{k}');
             INSERT INTO settlements (id, campaign_id) VALUES ('rs{k}', 'rc{k}');
             INSERT INTO structures (id, settlement_id) VALUES ('rst{k}', 'rs{k}');"
        ));
    }
    sql
}

/// What the shared counters say, for the test's driver.
#[derive(Default)]
struct Progress {
    /// Clients connected and subscribed right now.
    settled: AtomicUsize,
    /// Clients whose first subscription succeeded.
    started: AtomicUsize,
    /// Clients that hold an offset.
    with_offset: AtomicUsize,
    /// Events received, over all clients.
    delivered: AtomicU64,
}

/// How a (re)subscription was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// `{success: true}`, no since sent.
    Fresh,
    /// `{success: true, recovered: true}`.
    Recovered,
    /// `{success: true, recovered: false}`: the client must refetch.
    NotRecovered,
}

/// One successful (re)subscription.
struct Subscribed {
    since: Option<String>,
    answer: Answer,
    /// When the ack arrived.
    at: Instant,
    /// From the first connection attempt to the ack.
    took: Duration,
}

/// One received event.
struct Got {
    seq: Option<u64>,
    offset: Option<String>,
}

/// A client that, whenever its connection dies, comes back (on the next
/// route, so alternating proxies) and re-subscribes with `since` = the last
/// offset it received, retrying until it is subscribed. It records what it
/// receives and how each subscription was answered.
struct Reconnecting {
    user: String,
    kind: &'static str,
    id: String,
    routes: Arc<Vec<SocketAddr>>,
    next_route: usize,
    last_offset: Option<String>,
    got: Vec<Got>,
    subscribed: Vec<Subscribed>,
    /// Attempts that did not end subscribed, by why.
    failed: HashMap<String, usize>,
}

impl Reconnecting {
    fn room(&self) -> String {
        format!("{}:{}", self.kind, self.id)
    }

    /// Runs until `stop`, then returns what it saw.
    async fn run(mut self, progress: Arc<Progress>, mut stop: watch::Receiver<bool>) -> Self {
        let mut first = true;
        'sessions: loop {
            let Some(mut client) = self.session(&progress, &mut stop).await else { break };
            progress.settled.fetch_add(1, Ordering::SeqCst);
            if first {
                progress.started.fetch_add(1, Ordering::SeqCst);
                first = false;
            }
            loop {
                tokio::select! {
                    biased;
                    event = client.recv_event() => match event {
                        Some((_, event)) => self.record(&progress, &event),
                        None => break,
                    },
                    _ = stop.changed() => {
                        while let Some((_, event)) = client.try_next_event() {
                            self.record(&progress, &event);
                        }
                        progress.settled.fetch_sub(1, Ordering::SeqCst);
                        break 'sessions;
                    }
                }
            }
            progress.settled.fetch_sub(1, Ordering::SeqCst);
            // Cut: come back after a random delay, as socket.io clients do,
            // so that a thousand do not come back in the same millisecond.
            let jitter = Duration::from_millis(rand::random::<u64>() % 250);
            tokio::select! {
                () = tokio::time::sleep(jitter) => {}
                _ = stop.changed() => break,
            }
        }
        self
    }

    fn record(&mut self, progress: &Progress, event: &Value) {
        let offset = event["offset"].as_str().map(str::to_owned);
        if self.last_offset.is_none() && offset.is_some() {
            progress.with_offset.fetch_add(1, Ordering::SeqCst);
        }
        if offset.is_some() {
            self.last_offset = offset.clone();
        }
        progress.delivered.fetch_add(1, Ordering::SeqCst);
        self.got.push(Got { seq: event["payload"]["seq"].as_u64(), offset });
    }

    /// Connects and subscribes, retrying (with backoff, alternating routes)
    /// until subscribed; `None` when stopped first.
    async fn session(&mut self, progress: &Progress, stop: &mut watch::Receiver<bool>) -> Option<Client> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            if *stop.borrow() {
                return None;
            }
            let route = self.routes[self.next_route % self.routes.len()];
            self.next_route += 1;
            let since = self.last_offset.clone();
            match self.attempt(progress, route, since.as_deref()).await {
                Ok((client, answer)) => {
                    self.subscribed.push(Subscribed { since, answer, at: Instant::now(), took: started.elapsed() });
                    return Some(client);
                }
                Err(why) => {
                    *self.failed.entry(why).or_default() += 1;
                    let pause = backoff + Duration::from_millis(rand::random::<u64>() % 50);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        _ = stop.changed() => return None,
                    }
                }
            }
        }
    }

    /// One connection and subscription. What arrives before the ack (a
    /// replay) stays in the client's queue, in order, for `run` to record;
    /// when the connection dies before the ack, what had arrived is recorded
    /// here (it came, in order: a real client would have handled it).
    async fn attempt(
        &mut self,
        progress: &Progress,
        route: SocketAddr,
        since: Option<&str>,
    ) -> Result<(Client, Answer), String> {
        let mut client = Client::connect(route, Some(json!({ "token": token(&self.user) })), "")
            .await
            .map_err(|_| "connect failed".to_owned())?;
        let mut payload = json!({ format!("{}Id", self.kind): self.id });
        if let Some(since) = since {
            payload["since"] = json!(since);
        }
        let closed = client.on_close();
        let event = format!("subscribe_{}", self.kind);
        let ack = tokio::select! {
            // An ack that arrived counts even if the connection closed since.
            biased;
            // A reconnect storm of 1,000 clients on 2 cores (debug build) can
            // take seconds to ack: slow is not wrong; only no answer at all is.
            ack = client.try_emit_with_ack_within(&event, payload, Duration::from_secs(20)) => ack,
            () = closed => None,
        };
        let answer = match &ack {
            Some(a) if *a == SUBSCRIBED() && since.is_none() => Ok(Answer::Fresh),
            Some(a) if *a == RECOVERED() && since.is_some() => Ok(Answer::Recovered),
            Some(a) if *a == NOT_RECOVERED() && since.is_some() => Ok(Answer::NotRecovered),
            Some(a) if a["success"] == false => Err(format!("refused: {}", a["error"])),
            Some(a) => Err(format!("unexpected ack {a} (since {since:?})")),
            None if client.is_closed() => Err("cut while subscribing".to_owned()),
            None => Err("no ack within 20 s".to_owned()),
        };
        match answer {
            Ok(answer) => Ok((client, answer)),
            Err(why) => {
                // Whatever had arrived is real (a partial replay): record it.
                while let Some((_, event)) = client.try_next_event() {
                    self.record(progress, &event);
                }
                Err(why)
            }
        }
    }
}

/// An event the publisher sent.
struct Published {
    seq: u64,
    rooms: Vec<String>,
    /// When the request started.
    started: Instant,
    /// The HTTP status; 0 when the request itself failed (instance down).
    status: u16,
}

/// Two (or more) instances over one Redis, each on its own SQLite file that
/// the test owns (so an instance can be restarted on it), each behind a proxy.
struct DropFleet {
    _dirs: Vec<tempfile::TempDir>,
    databases: Vec<String>,
    apps: Vec<Option<TestApp>>,
    proxies: Vec<Proxy>,
    /// Where the publisher sends, instance by instance (direct, not proxied).
    targets: Arc<Mutex<Vec<SocketAddr>>>,
    redis_url: String,
}

fn fleet_config(redis_url: String) -> impl FnOnce(&mut herald::Config) {
    move |c| {
        c.fleet.redis_url = Some(redis_url);
        c.fleet.redis_prefix = "herald-recovery".into();
        c.fleet.redis_timeout = Duration::from_secs(1);
        c.shutdown_grace = Duration::from_secs(5);
    }
}

impl DropFleet {
    async fn start(redis: &Redis, n: usize) -> DropFleet {
        let sql = drop_membership_sql();
        let (mut dirs, mut databases, mut apps, mut proxies, mut targets) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            let dir = tempfile::tempdir().unwrap();
            let database = format!("sqlite://{}", dir.path().join("herald.db").display());
            let app = spawn_app_on(&database, fleet_config(redis.url())).await;
            run_sql(&database, &sql).await;
            proxies.push(Proxy::start(app.addr).await);
            targets.push(app.addr);
            apps.push(Some(app));
            databases.push(database);
            dirs.push(dir);
        }
        DropFleet {
            _dirs: dirs,
            databases,
            apps,
            proxies,
            targets: Arc::new(Mutex::new(targets)),
            redis_url: redis.url(),
        }
    }

    /// Stops instance `i` gracefully (its sockets are disconnected), starts a
    /// new one on the same database and Redis, and points its proxy at it.
    async fn restart(&mut self, i: usize) -> Duration {
        let started = Instant::now();
        let old = self.apps[i].take().expect("running");
        old.stop().await;
        let app = spawn_app_on(&self.databases[i], fleet_config(self.redis_url.clone())).await;
        self.proxies[i].set_upstream(app.addr);
        self.targets.lock().unwrap()[i] = app.addr;
        self.apps[i] = Some(app);
        started.elapsed()
    }

    fn cut(&self, which: &[usize]) -> usize {
        which.iter().map(|i| self.proxies[*i].cut_all()).sum()
    }

    fn cuts(&self) -> u64 {
        self.proxies.iter().map(Proxy::cuts).sum()
    }
}

/// A running drop test: the clients and the publisher.
struct DropRun {
    started: Instant,
    progress: Arc<Progress>,
    stop: watch::Sender<bool>,
    clients: Vec<tokio::task::JoinHandle<Reconnecting>>,
    warmup: Vec<Published>,
    publisher: tokio::task::JoinHandle<Vec<Published>>,
}

async fn publish_one(http: &reqwest::Client, target: SocketAddr, seq: u64) -> Published {
    let (body, rooms) = drop_event(seq);
    let started = Instant::now();
    let status = match tokio::time::timeout(
        Duration::from_secs(5),
        http.post(format!("http://{target}/v1/events")).bearer_auth(PUBLISH_TOKEN).json(&body).send(),
    )
    .await
    {
        Ok(Ok(r)) => r.status().as_u16(),
        _ => 0,
    };
    Published { seq, rooms, started, status }
}

impl DropRun {
    /// Connects `clients_count()` clients (1,000) in batches over the proxies, waits until each
    /// is subscribed and holds an offset (a warm-up event per campaign), then
    /// starts publishing at `RATE` for `publish_for`.
    async fn start(fleet: &DropFleet, publish_for: Duration) -> DropRun {
        let routes: Arc<Vec<SocketAddr>> = Arc::new(fleet.proxies.iter().map(Proxy::addr).collect());
        let progress = Arc::new(Progress::default());
        let (stop, stopped) = watch::channel(false);
        let mut clients = Vec::new();
        for batch in (0..clients_count()).collect::<Vec<_>>().chunks(100) {
            for &i in batch {
                let k = i as u64 % CAMPAIGNS;
                let kind = KINDS[(i / CAMPAIGNS as usize) % 3];
                let id = match kind {
                    "campaign" => format!("rc{k}"),
                    "settlement" => format!("rs{k}"),
                    _ => format!("rst{k}"),
                };
                let client = Reconnecting {
                    user: format!("ru{k}"),
                    kind,
                    id,
                    routes: routes.clone(),
                    next_route: i,
                    last_offset: None,
                    got: Vec::new(),
                    subscribed: Vec::new(),
                    failed: HashMap::new(),
                };
                clients.push(tokio::spawn(client.run(progress.clone(), stopped.clone())));
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while progress.started.load(Ordering::SeqCst) < clients.len() {
                assert!(Instant::now() < deadline, "clients did not all subscribe");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let http = reqwest::Client::new();
        let mut warmup = Vec::new();
        for seq in 0..CAMPAIGNS {
            let target = fleet.targets.lock().unwrap()[seq as usize % 2];
            let p = publish_one(&http, target, seq).await;
            assert_eq!(p.status, 202, "warm-up publish");
            warmup.push(p);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while progress.with_offset.load(Ordering::SeqCst) < clients.len() {
            assert!(Instant::now() < deadline, "the warm-up did not reach every client");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let targets = fleet.targets.clone();
        let publisher = tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let until = Instant::now() + publish_for;
            let mut seq = CAMPAIGNS;
            while Instant::now() < until {
                tick.tick().await;
                let target = {
                    let t = targets.lock().unwrap();
                    t[seq as usize % t.len()]
                };
                sent.push(publish_one(&http, target, seq).await);
                seq += 1;
            }
            sent
        });
        DropRun { started: Instant::now(), progress, stop, clients, warmup, publisher }
    }

    /// Sleeps until `at` after the publisher started.
    async fn at(&self, at: Duration) {
        tokio::time::sleep_until((self.started + at).into()).await;
    }

    /// Waits for the publisher, then for quiet (every client subscribed, no
    /// event for 1 s), then stops the clients and returns what they saw.
    async fn finish(self) -> (Vec<Reconnecting>, Vec<Published>, Duration) {
        let mut published = self.warmup;
        published.extend(self.publisher.await.expect("publisher"));
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut last, mut still) = (self.progress.delivered.load(Ordering::SeqCst), Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.progress.delivered.load(Ordering::SeqCst);
            let settled = self.progress.settled.load(Ordering::SeqCst);
            if now != last || settled != self.clients.len() {
                (last, still) = (now, Instant::now());
            } else if still.elapsed() >= Duration::from_secs(1) {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("no quiet within 20 s: {settled}/{} clients subscribed", self.clients.len());
                break;
            }
        }
        let took = self.started.elapsed();
        let _ = self.stop.send(true);
        let mut clients = Vec::new();
        for c in self.clients {
            clients
                .push(tokio::time::timeout(Duration::from_secs(10), c).await.expect("client stops").expect("client"));
        }
        (clients, published, took)
    }
}

/// What the checks found.
#[derive(Default)]
struct Verdict {
    expected: usize,
    delivered: usize,
    /// Events received that were not required (refused or exempt), each at most once.
    extra: usize,
    duplicates: usize,
    missing: usize,
    recoveries: Vec<Duration>,
    refetches: usize,
    problems: Vec<String>,
}

impl Verdict {
    fn problem(&mut self, p: String) {
        if self.problems.len() < 30 {
            self.problems.push(p);
        } else if self.problems.len() == 30 {
            self.problems.push("…".into());
        }
    }
}

/// Checks every client against what was published.
///
/// For every client, over the whole run (across reconnections):
/// - every event it received has a `payload.seq` and an `offset`, targets its
///   room and was published;
/// - no seq arrives twice;
/// - offsets strictly increase (as strings, of one width) in arrival order;
/// - every *required* event arrived: an event is required when it was
///   accepted (202) and its publish request started after `exempt_until`
///   for this client (`None`: every accepted event is required).
///
/// Every seq has one offset, whichever client and instance it came by.
fn verify(
    clients: &[Reconnecting],
    published: &[Published],
    exempt_until: impl Fn(&Reconnecting) -> Option<Instant>,
) -> Verdict {
    let mut v = Verdict::default();
    let by_seq: HashMap<u64, &Published> = published.iter().map(|p| (p.seq, p)).collect();
    let mut offset_of: HashMap<u64, String> = HashMap::new();
    for (i, c) in clients.iter().enumerate() {
        let room = c.room();
        let exempt = exempt_until(c);
        let required: HashSet<u64> = published
            .iter()
            .filter(|p| p.status == 202 && p.rooms.contains(&room))
            .filter(|p| exempt.is_none_or(|t| p.started > t))
            .map(|p| p.seq)
            .collect();
        v.expected += required.len();
        let mut seen = HashSet::new();
        let mut previous: Option<&str> = None;
        for g in &c.got {
            let (Some(seq), Some(offset)) = (g.seq, g.offset.as_deref()) else {
                v.problem(format!("client {i} ({room}): an event without seq or offset"));
                continue;
            };
            match by_seq.get(&seq) {
                Some(p) if p.rooms.contains(&room) => {}
                _ => v.problem(format!("client {i} ({room}): got seq {seq}, not an event of its room")),
            }
            if !seen.insert(seq) {
                v.duplicates += 1;
                v.problem(format!("client {i} ({room}): seq {seq} twice"));
            } else if required.contains(&seq) {
                v.delivered += 1;
            } else {
                v.extra += 1;
            }
            if let Some(prev) = previous
                && !(prev.len() == offset.len() && prev < offset)
            {
                v.problem(format!("client {i} ({room}): offset {offset:?} (seq {seq}) after {prev:?}"));
            }
            previous = Some(offset);
            let o = offset_of.entry(seq).or_insert_with(|| offset.to_owned());
            if o != offset {
                v.problem(format!("seq {seq} came with offsets {o:?} and {offset:?}"));
            }
        }
        let mut missing: Vec<u64> = required.difference(&seen).copied().collect();
        missing.sort_unstable();
        if !missing.is_empty() {
            v.missing += missing.len();
            v.problem(format!(
                "client {i} ({room}): {} required events missing, e.g. {:?}; subscriptions {:?}",
                missing.len(),
                &missing[..missing.len().min(8)],
                c.subscribed.iter().map(|s| s.answer).collect::<Vec<_>>()
            ));
        }
        for s in &c.subscribed {
            match s.answer {
                Answer::Recovered => v.recoveries.push(s.took),
                Answer::NotRecovered => v.refetches += 1,
                Answer::Fresh => {}
            }
        }
    }
    v
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn failures_summary(clients: &[Reconnecting]) -> HashMap<String, usize> {
    let mut all: HashMap<String, usize> = HashMap::new();
    for c in clients {
        for (why, n) in &c.failed {
            *all.entry(why.clone()).or_default() += n;
        }
    }
    all
}

fn figures(name: &str, clients: &[Reconnecting], published: &[Published], cuts: u64, v: &mut Verdict, took: Duration) {
    v.recoveries.sort_unstable();
    let accepted = published.iter().filter(|p| p.status == 202).count();
    println!(
        "{name}: {} clients, {} events published ({accepted} accepted), {cuts} connections cut, \
         delivered {}/{} required, {} extra (unrequired) deliveries, {} duplicates, {} missing, \
         {} recovered re-subscriptions (ack after p50 {:?}, p99 {:?}, max {:?}), {} recovered:false, \
         failed attempts {:?}, run {:.1} s",
        clients.len(),
        published.len(),
        v.delivered,
        v.expected,
        v.extra,
        v.duplicates,
        v.missing,
        v.recoveries.len(),
        percentile(&v.recoveries, 50),
        percentile(&v.recoveries, 99),
        v.recoveries.last().copied().unwrap_or_default(),
        v.refetches,
        failures_summary(clients),
        took.as_secs_f64(),
    );
}

/// 1,000 clients over two proxied instances; every connection cut several
/// times while 50 events/s flow; every client comes back with `since` (often
/// on the other instance). Nothing is trimmed (defaults: 5 min, 100,000
/// events), so every re-subscription must recover and every client must get
/// every accepted event of its room exactly once, in offset order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drop_test_every_client_gets_every_event_exactly_once_through_cuts() {
    let Some(redis) = Redis::start().await else { return };
    let _heavy = HEAVY.lock().await;
    let fleet = DropFleet::start(&redis, 2).await;
    let run = DropRun::start(&fleet, Duration::from_secs(10)).await;
    for (at, which) in [(2.0, &[0, 1][..]), (4.0, &[0][..]), (6.0, &[1][..]), (8.0, &[0, 1][..]), (9.5, &[0, 1][..])] {
        run.at(Duration::from_secs_f64(at)).await;
        let n = fleet.cut(which);
        println!("t={at}s: cut {n} connections on proxies {which:?}");
    }
    let (clients, published, took) = run.finish().await;
    let mut v = verify(&clients, &published, |_| None);
    for (i, c) in clients.iter().enumerate() {
        if c.subscribed.iter().any(|s| s.answer == Answer::NotRecovered) {
            v.problem(format!("client {i} ({}): recovered:false although nothing was trimmed", c.room()));
        }
    }
    for (why, n) in failures_summary(&clients) {
        if why.starts_with("refused") || why.starts_with("unexpected") || why.starts_with("no ack") {
            v.problem(format!("{n} subscribe attempts: {why}"));
        }
    }
    figures("drop test", &clients, &published, fleet.cuts(), &mut v, took);
    assert!(v.problems.is_empty(), "{}", v.problems.join("\n"));
    // The test did what it says: every client came back with since at least once.
    for (i, c) in clients.iter().enumerate() {
        assert!(c.subscribed.iter().any(|s| s.answer == Answer::Recovered), "client {i} never recovered");
    }
}

/// The same with, during the run, Redis killed and restarted empty (no
/// persistence) on its port, and one instance restarted gracefully.
///
/// The log lived in Redis, so a restart loses it. The guarantee asserted:
/// - as always: no duplicate, offsets strictly increasing (one width) in
///   arrival order over the whole run, nothing of another room, one offset
///   per seq across clients and instances;
/// - `recovered: false` is allowed only for a `since` that came from an event
///   whose publish started before Redis was back (the log holding it is
///   gone); for a `since` from after the restart, and across the graceful
///   instance restart, the re-subscription must recover;
/// - completeness: after a `recovered: false` the client refetches, so the
///   events published before that answer are not required of it (they may
///   arrive, at most once); every accepted event whose publish started after
///   the client's last `recovered: false` (or, with none, every accepted
///   event) must arrive, exactly once;
/// - `"Internal error"` answers (Redis unreachable while re-subscribing) are
///   retried and only counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drop_test_with_a_redis_restart_and_an_instance_restart() {
    let Some(mut redis) = Redis::start().await else { return };
    let _heavy = HEAVY.lock().await;
    let mut fleet = DropFleet::start(&redis, 2).await;
    let run = DropRun::start(&fleet, Duration::from_secs(12)).await;
    run.at(Duration::from_secs(2)).await;
    println!("t=2s: cut {} connections on both proxies", fleet.cut(&[0, 1]));
    run.at(Duration::from_secs(3)).await;
    redis.kill();
    println!("t=3s: Redis killed");
    run.at(Duration::from_secs(4)).await;
    redis.restart().await;
    let redis_back = Instant::now();
    println!("t={:.1}s: Redis back, empty", (redis_back - run.started).as_secs_f64());
    run.at(Duration::from_secs(6)).await;
    println!("t=6s: cut {} connections on proxy 0", fleet.cut(&[0]));
    run.at(Duration::from_secs(7)).await;
    let took = fleet.restart(1).await;
    println!("t=7s: instance 1 restarted gracefully in {took:?}");
    run.at(Duration::from_secs(9)).await;
    println!("t=9s: cut {} connections on both proxies", fleet.cut(&[0, 1]));
    run.at(Duration::from_secs(11)).await;
    println!("t=11s: cut {} connections on proxy 1", fleet.cut(&[1]));
    let (clients, published, took) = run.finish().await;

    let started_of: HashMap<u64, Instant> = published.iter().map(|p| (p.seq, p.started)).collect();
    let mut v = verify(&clients, &published, |c| {
        c.subscribed.iter().filter(|s| s.answer == Answer::NotRecovered).map(|s| s.at).max()
    });
    for (i, c) in clients.iter().enumerate() {
        for s in c.subscribed.iter().filter(|s| s.answer == Answer::NotRecovered) {
            let since = s.since.as_deref().unwrap_or_default();
            let since_seq = c.got.iter().find(|g| g.offset.as_deref() == Some(since)).and_then(|g| g.seq);
            let justified = since_seq.and_then(|q| started_of.get(&q)).is_some_and(|t| *t < redis_back);
            if !justified {
                v.problem(format!(
                    "client {i} ({}): recovered:false for since {since:?} (seq {since_seq:?}), from after Redis was back",
                    c.room()
                ));
            }
        }
    }
    for (why, n) in failures_summary(&clients) {
        if (why.starts_with("refused") && !why.contains("Internal error"))
            || why.starts_with("unexpected")
            || why.starts_with("no ack")
        {
            v.problem(format!("{n} subscribe attempts: {why}"));
        }
    }
    figures("drop test with restarts", &clients, &published, fleet.cuts(), &mut v, took);
    assert!(v.problems.is_empty(), "{}", v.problems.join("\n"));
}
