//! The drop tests: 1,000 clients behind TCP proxies that cut every
//! connection every couple of seconds while events flow, each client coming
//! back (often on the other instance) with `since`; and the same with a Redis
//! restart and a graceful instance restart during the run. The harness is in
//! `harness.rs`; here, the checks and the two tests.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::fleet::Redis;
mod harness;

use harness::{Answer, DropFleet, DropRun, Published, Reconnecting};

/// The two drop tests load the machine; they run one at a time.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
