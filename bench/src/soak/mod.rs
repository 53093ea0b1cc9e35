//! Scenario 7, the churn soak: two herald instances over a private Redis (a shard linger of
//! 2 s, so that following shards also returns to zero), and a population of persistent clients
//! spread over both (member i on instance i % 2, in campaign `c<i % campaigns>`). Events are
//! published one request at a time, alternately through each instance, while every second
//! `churn` members leave (DISCONNECT, then a close), `churn` new ones arrive, `churn` throwaway
//! connections are cut mid-handshake (after the open packet, at once after CONNECT, or after its
//! answer), `churn` are cut at once after a subscribe, and `churn` members have their connection
//! reset and come back with `since` (the cuts alternate FIN and RST).
//!
//! Every 10 s (5 s in runs under a minute) it reads each instance's RSS, CPU and gauges against
//! the generator's own counts. After the churn it waits for every member to be back and every
//! event to arrive, checks that the gauges equal what the generator holds, closes every client
//! (half with DISCONNECT, half with an RST), and checks that `herald_connections`,
//! `herald_subscriptions` and `herald_pending_sessions` return to exactly 0 on both instances,
//! and `herald_fleet_shards_followed` too once the linger is over. What the clients were owed
//! and what they got is in `ledger`, the clients in `member`, what it measured and the checks
//! in `results`.

mod ledger;
mod member;
mod results;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use self::ledger::Tally;
use self::member::{Cmd, Ctx, Cut, Events, Feed, Member};
use self::results::{Churn, Gauges, Held, InstanceSample, Sample, held};
pub use self::results::{Soak, problems};
use crate::cli::SoakCfg;
use crate::load::Publisher;
use crate::proto;
use crate::results::{round1, round2};
use crate::servers::Instance;
use crate::session::{Bench, Session};
use crate::stats::{self, now_ns};

const INSTANCES: usize = 2;
const LINGER_S: u64 = 2;

/// The store rows the soak's users need: user `s<u>` is a member of campaign `c<u % campaigns>`.
pub fn membership_rows(cfg: &SoakCfg) -> Vec<(String, String)> {
    (0..cfg.clients).map(|u| (format!("c{}", u % cfg.campaigns), format!("s{u}"))).collect()
}

pub async fn scenario_7(b: &Bench) -> Result<Soak> {
    let sc = &b.cfg.soak;
    eprintln!(
        "  [herald] scenario 7: churn soak, {} clients over {INSTANCES} instances + Redis, {} campaigns, churn {}/s \
         of each kind, {} ev/s, {} s",
        sc.clients, sc.campaigns, sc.churn, sc.rate, sc.duration_s
    );
    let vars = vec![("HERALD_LOG_SHARD_LINGER", format!("{LINGER_S}s"))];
    let s = Session::start_on_redis(b, INSTANCES, sc.campaigns, vars).await?;
    let r = soak(b, &s).await;
    s.stop().await;
    r
}

struct Driver {
    ctx: Arc<Ctx>,
    clients: u32,
    campaigns: u32,
    active: Vec<(Arc<Member>, JoinHandle<()>)>,
    next_id: u32,
}

impl Driver {
    fn arrive(&mut self) {
        let id = self.next_id;
        self.next_id += 1;
        let user = id % self.clients;
        let (m, rx) = Member::new(id, user, user % self.campaigns, id as usize % INSTANCES);
        let h = tokio::spawn(member::run(self.ctx.clone(), m.clone(), rx));
        self.active.push((m, h));
    }

    /// A random subscribed member's index in `active`.
    fn pick(&self, rng: &mut fastrand::Rng) -> Option<usize> {
        if self.active.is_empty() {
            return None;
        }
        (0..64).map(|_| rng.usize(..self.active.len())).find(|&i| self.active[i].0.subscribed())
    }

    fn all_subscribed(&self) -> bool {
        self.active.iter().all(|(m, _)| m.subscribed())
    }

    /// Every member has every accepted event of its campaign.
    fn caught_up(&self) -> bool {
        self.active
            .iter()
            .all(|(m, _)| m.subscribed() && m.expect() >= self.ctx.feeds[m.campaign as usize].accepted_hi.load(Relaxed))
    }

    /// Every second, `k` of each kind of churn, one every 1/(5k) s.
    async fn churn(&mut self, k: u32, duration: Duration, t0: tokio::time::Instant) -> Churn {
        let mut c = Churn::default();
        let mut rng = fastrand::Rng::new();
        if k == 0 {
            tokio::time::sleep_until(t0 + duration).await;
            return c;
        }
        let spacing = Duration::from_secs_f64(1.0 / (5.0 * k as f64));
        let ops = (duration.as_secs_f64() * 5.0 * k as f64).round() as u32;
        for j in 0..ops {
            tokio::time::sleep_until(t0 + spacing * j).await;
            let round = j / 5;
            let (user, rst, inst) = (rng.u32(..self.clients), round % 2 == 1, round as usize % INSTANCES);
            match j % 5 {
                0 => match self.pick(&mut rng) {
                    Some(i) => {
                        self.active.swap_remove(i).0.tell(Cmd::Leave);
                        c.left += 1;
                    }
                    None => c.skipped += 1,
                },
                1 => {
                    self.arrive();
                    c.arrived += 1;
                }
                2 | 3 => {
                    let cut = if j % 5 == 3 {
                        c.cut_mid_subscribe += 1;
                        Cut::SubscribeSent
                    } else {
                        c.cut_mid_handshake += 1;
                        [Cut::Opened, Cut::ConnectSent, Cut::Connected][(round / 2) as usize % 3]
                    };
                    let ctx = self.ctx.clone();
                    tokio::spawn(member::throwaway(ctx, inst, user, user % self.campaigns, cut, rst));
                }
                _ => match self.pick(&mut rng) {
                    Some(i) => {
                        self.active[i].0.tell(Cmd::Drop);
                        c.dropped += 1;
                    }
                    None => c.skipped += 1,
                },
            }
        }
        c
    }
}

/// The publisher's outcome.
#[derive(Default)]
struct Published {
    accepted: AtomicU64,
    errors: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
    max_lag_ns: AtomicU64,
}

/// `rate` ev/s for `duration`, one request at a time: event i goes to campaign `i % campaigns`,
/// through instance `(i / campaigns) % instances` (so each campaign's events alternate).
async fn publish(ctx: &Ctx, pubs: &[Publisher], rate: f64, duration: Duration, out: &Published) {
    let n = (rate * duration.as_secs_f64()).round() as u64;
    let ncamp = ctx.feeds.len() as u64;
    let t0 = tokio::time::Instant::now();
    for i in 0..n {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        out.max_lag_ns.fetch_max(tokio::time::Instant::now().duration_since(due).as_nanos() as u64, Relaxed);
        let c = (i % ncamp) as usize;
        let feed = &ctx.feeds[c];
        let seq = feed.begun.fetch_add(1, Relaxed);
        match pubs[((i / ncamp) as usize) % pubs.len()].publish(c as u32, now_ns(), seq).await {
            Ok(()) => {
                feed.accepted_hi.store(seq + 1, Relaxed);
                out.accepted.fetch_add(1, Relaxed);
            }
            Err(e) => {
                feed.failed.lock().unwrap_or_else(|e| e.into_inner()).insert(seq);
                out.errors.fetch_add(1, Relaxed);
                out.first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
            }
        }
    }
}

/// A sample at `t0 + k * every` for every k up to `duration`, and one at its end.
async fn sample_all(
    ctx: &Ctx,
    instances: &[Instance],
    out: &Published,
    every: Duration,
    duration: Duration,
    t0: tokio::time::Instant,
) -> Vec<Sample> {
    let mut times: Vec<Duration> = (0..).map(|k| every * k).take_while(|t| *t <= duration).collect();
    if times.last() != Some(&duration) {
        times.push(duration);
    }
    let mut samples: Vec<Sample> = Vec::new();
    let mut cpu_before: Vec<Option<f64>> = instances.iter().map(|i| stats::proc_cpu_fine_s(i.proc.pid)).collect();
    let mut at_before = Instant::now();
    for t in times {
        tokio::time::sleep_until(t0 + t).await;
        let mut gauges = Vec::new();
        for inst in instances {
            gauges.push(Gauges::read(inst).await);
        }
        let held = held(ctx, &gauges);
        let secs = at_before.elapsed().as_secs_f64();
        at_before = Instant::now();
        let per_instance = instances
            .iter()
            .zip(held)
            .zip(cpu_before.iter_mut())
            .map(|((inst, held), before)| {
                let now = stats::proc_cpu_fine_s(inst.proc.pid);
                let pct = now.zip(*before).filter(|_| secs > 0.0).map(|(a, b)| round1(100.0 * (a - b) / secs));
                *before = now;
                InstanceSample { rss_kib: stats::proc_rss_kib(inst.proc.pid), cpu_pct: pct, held }
            })
            .collect();
        let s = Sample {
            t_s: round1(t.as_secs_f64()),
            per_instance,
            throwaways_in_flight: ctx.events.throwaways_in_flight.load(Relaxed),
            events_accepted: out.accepted.load(Relaxed),
            counts: ctx.tally.counts(),
        };
        eprintln!("    {}", progress_line(&s));
        samples.push(s);
    }
    samples
}

fn progress_line(s: &Sample) -> String {
    let each = |f: &dyn Fn(&InstanceSample) -> String| s.per_instance.iter().map(f).collect::<Vec<_>>().join("/");
    let opt = |g: Option<u64>| g.map_or("-".to_string(), |v| v.to_string());
    format!(
        "t={}s RSS MiB {} | connections {} (gen {}) | subscriptions {} (gen {}) | pending {} | shards {} | events {} | \
         deliveries {} dup {} silent {} declared {}",
        s.t_s,
        each(&|i| i.rss_kib.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0))),
        each(&|i| opt(i.held.gauges.connections)),
        each(&|i| i.held.generator_connected.to_string()),
        each(&|i| opt(i.held.gauges.subscriptions)),
        each(&|i| i.held.generator_subscribed.to_string()),
        each(&|i| opt(i.held.gauges.pending_sessions)),
        each(&|i| opt(i.held.gauges.shards_followed)),
        s.events_accepted,
        s.counts.deliveries,
        s.counts.duplicates,
        s.counts.silent_events,
        s.counts.declared_gaps,
    )
}

/// Polls `every` until `done` holds or `limit` passed: (seconds it took, the last value).
async fn poll<T>(limit: Duration, mut read: impl AsyncFnMut() -> T, done: impl Fn(&T) -> bool) -> (Option<f64>, T) {
    let t = Instant::now();
    loop {
        let v = read().await;
        if done(&v) {
            return (Some(round2(t.elapsed().as_secs_f64())), v);
        }
        if t.elapsed() > limit {
            return (None, v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn read_all(instances: &[Instance]) -> Vec<Gauges> {
    let mut v = Vec::new();
    for i in instances {
        v.push(Gauges::read(i).await);
    }
    v
}

async fn soak(b: &Bench, s: &Session<'_>) -> Result<Soak> {
    let sc = &b.cfg.soak;
    let instances = s.instances();
    let ctx = Arc::new(Ctx {
        key: jsonwebtoken::EncodingKey::from_secret(b.env.jwt_secret.as_bytes()),
        ws_config: proto::ws_config(b.cfg.read_buffer),
        addrs: instances.iter().map(|i| i.addr).collect(),
        feeds: (0..sc.campaigns).map(|_| Feed::default()).collect(),
        tally: Arc::new(Tally::default()),
        events: Events::default(),
        sem: Semaphore::new(b.cfg.connect_concurrency),
        connected: (0..INSTANCES).map(|_| AtomicU64::new(0)).collect(),
        subscribed: (0..INSTANCES).map(|_| AtomicU64::new(0)).collect(),
    });
    let pubs =
        instances.iter().map(|i| Publisher::new(&i.base_url(), &b.env.publish_token, 1)).collect::<Result<Vec<_>>>()?;
    let mut d =
        Driver { ctx: ctx.clone(), clients: sc.clients, campaigns: sc.campaigns, active: Vec::new(), next_id: 0 };

    // every member connects and subscribes
    let t_setup = Instant::now();
    for _ in 0..sc.clients {
        d.arrive();
    }
    let subscribed = || ctx.subscribed.iter().map(|a| a.load(Relaxed)).sum::<u64>();
    let limit = Duration::from_secs(60) + Duration::from_millis(20 * sc.clients as u64);
    let (setup_took, initial_subscribed) = poll(limit, async || subscribed(), |&n| n >= sc.clients as u64).await;
    let setup_s = setup_took.unwrap_or(round2(t_setup.elapsed().as_secs_f64()));
    eprintln!("    {initial_subscribed} of {} clients subscribed in {setup_s} s", sc.clients);
    if initial_subscribed == 0 {
        let e = ctx.events.first_connect_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (_, h) in &d.active {
            h.abort();
        }
        bail!("no client could subscribe: {}", e.unwrap_or_default());
    }

    // the churn, the events and the samples, together
    let duration = Duration::from_secs_f64(sc.duration_s);
    let every = Duration::from_secs(if sc.duration_s >= 60.0 { 10 } else { 5 });
    let published = Published::default();
    let gen0 = stats::self_cpu_s();
    let t0 = tokio::time::Instant::now();
    let (samples, churn, ()) = tokio::join!(
        sample_all(&ctx, instances, &published, every, duration, t0),
        d.churn(sc.churn, duration, t0),
        publish(&ctx, &pubs, sc.rate, duration, &published)
    );
    let generator_cpu_pct = round1(100.0 * (stats::self_cpu_s() - gen0) / sc.duration_s);

    // every member back, every event delivered
    eprintln!("    churn over: waiting for every client to be back and every event to arrive");
    let t_drain = Instant::now();
    let quiet = b.cfg.quiet;
    let mut last = (ctx.tally.counts().deliveries, Instant::now());
    while !(d.all_subscribed() && ctx.events.throwaways_in_flight.load(Relaxed) == 0 && d.caught_up()) {
        let n = ctx.tally.counts().deliveries;
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > quiet.max(Duration::from_secs(5)) || t_drain.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain_s = round2(t_drain.elapsed().as_secs_f64());

    // the gauges against what the generator holds: a session whose peer left before its CONNECT
    // counts as pending until herald's connect timeout (10 s) closes it
    let (held_match_after_s, gauges) =
        poll(Duration::from_secs(15), async || read_all(instances).await, |g| held(&ctx, g).iter().all(Held::matches))
            .await;
    let held = held(&ctx, &gauges);

    // every client closed: the gauges back to 0
    eprintln!("    closing every client");
    for (m, _) in &d.active {
        m.tell(Cmd::Finish);
    }
    let t_close = Instant::now();
    for (_, h) in d.active.drain(..) {
        if tokio::time::timeout(Duration::from_secs(10).saturating_sub(t_close.elapsed()), h).await.is_err() {
            ctx.events.not_back.fetch_add(1, Relaxed);
        }
    }
    // sockets at once, shards once the linger is over: the first reading where each is 0
    let t_closed = Instant::now();
    let (mut end_zero_after_s, mut shards_zero_after_s) = (None, None);
    let end = loop {
        let g = read_all(instances).await;
        let at = Some(round2(t_closed.elapsed().as_secs_f64()));
        if end_zero_after_s.is_none() && g.iter().all(Gauges::sockets_zero) {
            end_zero_after_s = at;
        }
        if shards_zero_after_s.is_none() && g.iter().all(|g| g.shards_followed == Some(0)) {
            shards_zero_after_s = at;
        }
        let done = end_zero_after_s.is_some() && shards_zero_after_s.is_some();
        if done || t_closed.elapsed() > Duration::from_secs(LINGER_S + 20) {
            break g;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let rss_end_kib = instances.iter().map(|i| stats::proc_rss_kib(i.proc.pid)).collect();

    let ev = &ctx.events;
    let first = |m: &std::sync::Mutex<Option<String>>| m.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(Soak {
        instances: INSTANCES,
        clients: sc.clients,
        campaigns: sc.campaigns,
        churn_per_s: sc.churn,
        events_per_s: sc.rate,
        duration_s: sc.duration_s,
        shard_linger_s: LINGER_S,
        setup_s,
        initial_subscribed,
        samples,
        churn,
        events_accepted: published.accepted.load(Relaxed),
        publish_errors: published.errors.load(Relaxed),
        first_publish_error: first(&published.first_error),
        max_publish_lag_ms: round2(published.max_lag_ns.load(Relaxed) as f64 / 1e6),
        counts: ctx.tally.counts(),
        owed_at_end: ev.owed_at_end.load(Relaxed),
        drain_s,
        not_back: ev.not_back.load(Relaxed),
        connect_failures: ev.connect_failures.load(Relaxed),
        first_connect_error: first(&ev.first_connect_error),
        server_closes: ev.server_closes.load(Relaxed),
        throwaway_failures: ev.throwaway_failures.load(Relaxed),
        first_throwaway_error: first(&ev.first_throwaway_error),
        protocol_errors: ev.protocol_errors.load(Relaxed),
        first_protocol_error: first(&ev.first_protocol_error),
        held,
        held_match_after_s,
        end,
        end_zero_after_s,
        shards_zero_after_s,
        rss_end_kib,
        generator_cpu_pct,
    })
}
