//! A session: the servers of one scenario (one instance, several behind a private Redis, or
//! herald instances on a private Redis Cluster) and
//! the clients connected to them. `connect` sets the clients up and measures the setup,
//! `traffic` runs one publish phase and its drain and measures what arrived, `stop` ends it all.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::cli::Cfg;
use crate::load::{PhasePlan, Publisher, publish_phase};
use crate::proto::{self, Client, ClientCfg};
use crate::results::{Setup, Traffic, per_conn, round1, round2};
use crate::servers::{self, Env, Instance, Kind, Redis};
use crate::stats::{self, SeqSet, Shared, now_ns, self_cpu_s, sum_cpu_s, sum_rss_kib};

/// What every session shares: the settings and the servers' environment.
pub struct Bench {
    pub cfg: Cfg,
    pub env: Env,
}

pub struct Session<'a> {
    b: &'a Bench,
    instances: Vec<Instance>,
    redis: Vec<Redis>,
    shared: Arc<Shared>,
    ccfg: Arc<ClientCfg>,
    clients: Vec<Arc<Client>>,
    handles: Vec<JoinHandle<()>>,
    accepted: Arc<Vec<Mutex<SeqSet>>>,
    next_seq: Vec<u64>,
    /// One per instance; `route[c]` is the one campaign `c`'s events go through.
    publishers: Vec<Arc<Publisher>>,
    route: Vec<usize>,
    /// The seq ranges `[lo, hi)` per campaign of the last traffic phase.
    last_range: Option<(Vec<u64>, Vec<u64>)>,
    /// Whether the clients `connect` sets up subscribe with `presence: true`.
    presence: bool,
}

/// Where a session's instances share their events.
enum Backplane {
    None,
    /// One private Redis, and more settings for herald.
    Redis {
        vars: Vec<(&'static str, String)>,
    },
    Cluster {
        shards: u32,
    },
}

impl<'a> Session<'a> {
    /// One instance of `kind`, or `n_instances` over a private Redis.
    pub async fn start(b: &'a Bench, kind: Kind, n_instances: usize, campaigns: u32) -> Result<Session<'a>> {
        let backplane = if n_instances > 1 { Backplane::Redis { vars: vec![] } } else { Backplane::None };
        Self::launch(b, kind, n_instances, campaigns, backplane).await
    }

    /// `n_instances` of herald over a private Redis, with `vars` as more of their settings.
    pub async fn start_on_redis(
        b: &'a Bench,
        n_instances: usize,
        campaigns: u32,
        vars: Vec<(&'static str, String)>,
    ) -> Result<Session<'a>> {
        Self::launch(b, Kind::Herald, n_instances, campaigns, Backplane::Redis { vars }).await
    }

    /// `n_instances` of herald over a private three-master Redis Cluster, with `shards` log shards.
    pub async fn start_on_cluster(
        b: &'a Bench,
        n_instances: usize,
        campaigns: u32,
        shards: u32,
    ) -> Result<Session<'a>> {
        Self::launch(b, Kind::Herald, n_instances, campaigns, Backplane::Cluster { shards }).await
    }

    async fn launch(
        b: &'a Bench,
        kind: Kind,
        n_instances: usize,
        campaigns: u32,
        backplane: Backplane,
    ) -> Result<Session<'a>> {
        let mut redis = Vec::new();
        let mut instances = Vec::new();
        let started: Result<()> = async {
            let (url, vars) = match backplane {
                Backplane::None => (None, vec![]),
                Backplane::Redis { vars } => {
                    let r = servers::start_redis(&b.env, &[]).await?;
                    let url = r.url();
                    redis.push(r);
                    (Some(url), vars)
                }
                Backplane::Cluster { shards } => {
                    let c = servers::start_cluster(&b.env).await?;
                    let url = c.url();
                    redis = c.nodes;
                    // Engine.IO pings (all of a session's clients connect within a second, so
                    // theirs come in bursts) would land in one phase and not the next: rarer
                    // than any phase, they leave only the events' work to compare.
                    let vars = vec![("HERALD_LOG_SHARDS", shards.to_string()), ("HERALD_PING_INTERVAL", "600s".into())];
                    (Some(url), vars)
                }
            };
            for k in 0..n_instances {
                let label = if url.is_some() { format!("fleet{k}") } else { "solo".to_string() };
                instances.push(servers::start(&b.env, kind, &label, url.as_deref(), &vars).await?);
            }
            Ok(())
        }
        .await;
        if let Err(e) = started {
            for i in instances {
                i.proc.stop().await;
            }
            for r in redis {
                r.proc.stop().await;
            }
            return Err(e);
        }
        let shared = Arc::new(Shared::new(n_instances));
        let ccfg = Arc::new(ClientCfg {
            key: jsonwebtoken::EncodingKey::from_secret(b.env.jwt_secret.as_bytes()),
            ws_config: proto::ws_config(b.cfg.read_buffer),
            setup_timeout: Duration::from_secs(120),
            sem: Arc::new(Semaphore::new(b.cfg.connect_concurrency)),
            shared: shared.clone(),
        });
        let publishers = instances
            .iter()
            .map(|i| Publisher::new(&i.base_url(), &b.env.publish_token, b.cfg.publishers).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(Session {
            b,
            instances,
            redis,
            shared,
            ccfg,
            clients: Vec::new(),
            handles: Vec::new(),
            accepted: Arc::new((0..campaigns).map(|_| Mutex::new(SeqSet::default())).collect()),
            next_seq: vec![0; campaigns as usize],
            publishers,
            route: vec![0; campaigns as usize],
            last_range: None,
            presence: false,
        })
    }

    /// From now on, campaign `c`'s events are published through instance `owner(c)` (instance 0
    /// until this is called).
    pub fn publish_through(&mut self, owner: impl Fn(u32) -> usize) {
        for (c, r) in self.route.iter_mut().enumerate() {
            *r = owner(c as u32);
        }
    }

    /// From now on, the clients `connect` sets up subscribe with `presence: true` when `on`.
    pub fn subscribe_with_presence(&mut self, on: bool) {
        self.presence = on;
    }

    /// Every client `connect` set up, subscribed or not.
    pub fn clients(&self) -> &[Arc<Client>] {
        &self.clients
    }

    /// The counters every client task updates.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The clients' settings (signing key, WebSocket settings).
    pub fn client_cfg(&self) -> &ClientCfg {
        &self.ccfg
    }

    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }

    /// The private Redis nodes (none, one, or a cluster's three).
    pub fn redis_nodes(&self) -> &[Redis] {
        &self.redis
    }

    /// Per instance, for the last traffic phase: (deliveries to its clients, events its clients
    /// needed: the accepted events of every campaign one of them subscribed to, once each).
    pub fn last_phase_by_instance(&self) -> Vec<(u64, u64)> {
        let mut out = vec![(0, 0); self.instances.len()];
        let Some((lo, hi)) = &self.last_range else { return out };
        let mut wanted = vec![std::collections::BTreeSet::new(); self.instances.len()];
        for c in self.clients.iter().filter(|c| c.subscribed.load(Relaxed)) {
            let (k, ci) = (c.group as usize, c.campaign as usize);
            out[k].0 += c.seen.lock().unwrap_or_else(|e| e.into_inner()).count_in(lo[ci], hi[ci]);
            wanted[k].insert(ci);
        }
        for (k, set) in wanted.iter().enumerate() {
            out[k].1 = set
                .iter()
                .map(|&ci| self.accepted[ci].lock().unwrap_or_else(|e| e.into_inner()).count_in(lo[ci], hi[ci]))
                .sum();
        }
        out
    }

    fn pids(&self) -> Vec<u32> {
        self.instances.iter().map(|i| i.proc.pid).collect()
    }

    /// Connects and subscribes `n` clients; `assign(i)` = (campaign, instance).
    pub async fn connect(&mut self, n: u32, assign: impl Fn(u32) -> (u32, usize)) -> Setup {
        tokio::time::sleep(self.b.cfg.settle).await;
        let rss_before = sum_rss_kib(&self.pids());
        let t0 = Instant::now();
        for i in 0..n {
            let (campaign, inst) = assign(i);
            let c = Arc::new(Client {
                idx: i,
                campaign,
                group: inst as u8,
                addr: self.instances[inst].addr,
                subscribed: false.into(),
                seen: Mutex::new(SeqSet::default()),
                presence: self.presence,
                presence_events: Default::default(),
            });
            self.clients.push(c.clone());
            self.handles.push(tokio::spawn(proto::run(self.ccfg.clone(), c)));
        }
        let deadline = t0 + Duration::from_secs(150) + Duration::from_millis(n as u64 * 20);
        let mut last_report = Instant::now();
        loop {
            let done = self.shared.subscribed.load(Relaxed) + self.shared.connect_failures.load(Relaxed);
            if done >= n as u64 || Instant::now() > deadline {
                break;
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                last_report = Instant::now();
                eprintln!("    ... {} subscribed, {} failed", self.shared.subscribed.load(Relaxed), {
                    self.shared.connect_failures.load(Relaxed)
                });
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), self.shared.setup_done.notified()).await;
        }
        let setup_s = t0.elapsed().as_secs_f64();
        let subscribed = self.shared.subscribed.load(Relaxed);
        let failures = self.shared.connect_failures.load(Relaxed);
        tokio::time::sleep(self.b.cfg.settle).await;
        let rss_sub = sum_rss_kib(&self.pids());
        let first_error = self.shared.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Setup {
            clients: n,
            subscribed,
            connect_failures: failures,
            first_connect_error: first_error,
            setup_s: round2(setup_s),
            connections_per_s: round1(subscribed as f64 / setup_s.max(1e-9)),
            rss_before_kib: rss_before,
            rss_subscribed_kib: rss_sub,
            rss_per_conn_kib: per_conn(rss_before, rss_sub, subscribed),
            generator_rss_kib: stats::proc_rss_kib(std::process::id()),
        }
    }

    /// One traffic phase at `rate` events/s over `campaigns` for `secs`, then a drain.
    pub async fn traffic(&mut self, rate: f64, secs: f64, campaigns: &[u32]) -> Traffic {
        let sh = self.shared.clone();
        let pids = self.pids();
        let redis_pids: Vec<u32> = self.redis.iter().map(|r| r.proc.pid).collect();
        let subs: Vec<Arc<Client>> = self.clients.iter().filter(|c| c.subscribed.load(Relaxed)).cloned().collect();
        sh.reset_histograms();
        let (d0, dup0, perr0, disc0) = (
            sh.deliveries.load(Relaxed),
            sh.duplicates.load(Relaxed),
            sh.protocol_errors.load(Relaxed),
            sh.disconnects.load(Relaxed),
        );
        let cpu0 = sum_cpu_s(&pids);
        let rcpu0 = (!redis_pids.is_empty()).then(|| sum_cpu_s(&redis_pids)).flatten();
        let gen0 = self_cpu_s();
        let plan = PhasePlan {
            campaigns,
            base: &self.next_seq,
            route: &self.route,
            rate,
            duration: Duration::from_secs_f64(secs),
            workers: self.b.cfg.publishers,
        };
        let out = publish_phase(&self.publishers, &self.accepted, plan).await;
        let publish_wall_s = (out.end_ns - out.t0_ns) as f64 / 1e9;
        for &c in campaigns {
            self.next_seq[c as usize] = out.hi[c as usize];
        }
        // expected deliveries: every accepted event of its campaign, for every subscribed client
        let expected: u64 = {
            let acc = &self.accepted;
            subs.iter()
                .map(|c| {
                    let ci = c.campaign as usize;
                    acc[ci].lock().unwrap_or_else(|e| e.into_inner()).count_in(out.lo[ci], out.hi[ci])
                })
                .sum()
        };
        // drain: until everything expected arrived, or nothing arrived for `quiet`
        let quiet = self.b.cfg.quiet;
        let t_drain = Instant::now();
        let mut last = sh.deliveries.load(Relaxed);
        let mut last_change = Instant::now();
        loop {
            let d = sh.deliveries.load(Relaxed);
            if d - d0 >= expected || t_drain.elapsed() > Duration::from_secs(120) {
                break;
            }
            if d != last {
                last = d;
                last_change = Instant::now();
            } else if last_change.elapsed() > quiet {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let drain_s = t_drain.elapsed().as_secs_f64();
        let end_ns = now_ns();
        let gen1 = self_cpu_s();
        let cpu1 = sum_cpu_s(&pids);
        let rcpu1 = (!redis_pids.is_empty()).then(|| sum_cpu_s(&redis_pids)).flatten();
        let deliveries = sh.deliveries.load(Relaxed) - d0;
        let lost: u64 = subs
            .iter()
            .map(|c| {
                let ci = c.campaign as usize;
                let acc = self.accepted[ci].lock().unwrap_or_else(|e| e.into_inner());
                let seen = c.seen.lock().unwrap_or_else(|e| e.into_inner());
                seen.missing_from(&acc, out.lo[ci], out.hi[ci])
            })
            .sum();
        let last_delivery = sh.last_delivery_ns.load(Relaxed).max(out.end_ns);
        let window_s = (last_delivery.saturating_sub(out.t0_ns)) as f64 / 1e9;
        let srv_cpu = match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let phase_s = (end_ns - out.t0_ns) as f64 / 1e9;
        // over the busy window (first publish to last delivery); the drain's idle tail is tiny
        let gen_pct = 100.0 * (gen1 - gen0) / window_s.max(1e-9);
        let lat = sh.latency_all();
        let (near, far) = if sh.hist.len() > 1 { (Some(sh.latency(0)), Some(sh.latency(1))) } else { (None, None) };
        tokio::time::sleep(self.b.cfg.settle).await;
        let rss_after = sum_rss_kib(&pids);
        let first_perr = sh.first_protocol_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.last_range = Some((out.lo, out.hi));
        Traffic {
            target_events_per_s: rate,
            duration_s: secs,
            campaigns: campaigns.len(),
            subscribers: subs.len(),
            events_planned: out.planned,
            events_accepted: out.accepted,
            publish_errors: out.errors,
            first_publish_error: out.first_error,
            publish_events_per_s: round1(out.accepted as f64 / publish_wall_s.max(1e-9)),
            max_publish_lag_ms: round2(out.max_lag_ms),
            expected_deliveries: expected,
            deliveries,
            deliveries_per_s: round1(deliveries as f64 / window_s.max(1e-9)),
            lost,
            drain_s: round2(drain_s),
            duplicates: sh.duplicates.load(Relaxed) - dup0,
            protocol_errors: sh.protocol_errors.load(Relaxed) - perr0,
            first_protocol_error: first_perr,
            disconnects: sh.disconnects.load(Relaxed) - disc0,
            latency_ms: lat,
            latency_near_ms: near,
            latency_far_ms: far,
            cross_instance_p50_ms: near.zip(far).map(|(n, f)| round2(f.p50_ms - n.p50_ms)),
            server_cpu_s: srv_cpu.map(round2),
            server_cpu_us_per_delivery: srv_cpu.filter(|_| deliveries > 0).map(|s| round2(s * 1e6 / deliveries as f64)),
            server_cpu_pct: srv_cpu.map(|s| round1(100.0 * s / phase_s.max(1e-9))),
            redis_cpu_s: rcpu0.zip(rcpu1).map(|(a, b)| round2(b - a)),
            generator_cpu_pct: round1(gen_pct),
            generator_bound: gen_pct > 90.0,
            rss_after_kib: rss_after,
            rss_after_per_conn_kib: None,
        }
    }

    pub async fn stop(self) {
        self.shared.stopping.store(true, Relaxed);
        for i in self.instances {
            i.proc.stop().await;
        }
        for h in &self.handles {
            h.abort();
        }
        for h in self.handles {
            let _ = h.await;
        }
        for r in self.redis {
            r.proc.stop().await;
        }
    }
}
