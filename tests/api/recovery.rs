//! Connection state recovery: every event carries an `offset`; a subscribe
//! may carry `since`, and herald replays what the socket missed, or says
//! `recovered: false`.
//!
//! The edge cases, on one instance (the in-memory log) and on two over
//! Redis; the drop tests, with many clients through cuts and restarts, are in
//! `drop/`.
//!
//! (About 600 lines: fifteen edge cases of one promise, each its own test,
//! sharing the helpers at the top.)

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::Client;
use crate::fleet::Redis;
use crate::helpers::*;

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

pub(crate) const RECOVERED: fn() -> Value = || json!({"success": true, "recovered": true});
pub(crate) const NOT_RECOVERED: fn() -> Value = || json!({"success": true, "recovered": false});
pub(crate) const SUBSCRIBED: fn() -> Value = || json!({"success": true});

fn offset(event: &Value) -> String {
    event["offset"].as_str().unwrap_or_else(|| panic!("an event without a string offset: {event}")).to_owned()
}

fn seq(event: &Value) -> u64 {
    event["payload"]["seq"].as_u64().unwrap_or_else(|| panic!("an event without payload.seq: {event}"))
}

pub(crate) fn with_seq(mut body: Value, seq: u64) -> Value {
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
