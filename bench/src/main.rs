//! herald-bench: the load generator for herald and its two yardsticks (the Node socket.io
//! reference and the "floor" server). See bench/README.md for what each figure means.
//!
//! One process, one thread (tokio current-thread runtime), one task per simulated client. It
//! starts and stops the servers itself (pinned with `taskset`), connects the clients over raw
//! Engine.IO v4 / Socket.IO v5 WebSockets, publishes through `POST /v1/events` and measures
//! latency, loss, duplicates, setup rate, the servers' RSS and CPU time, and its own CPU time.

mod load;
mod proto;
mod report;
mod servers;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::load::{PhasePlan, Publisher, publish_phase};
use crate::proto::{Client, ClientCfg};
use crate::servers::{Env, Instance, Kind, Redis};
use crate::stats::{SeqSet, Shared, now_ns, self_cpu_s, sum_cpu_s, sum_rss_kib};

/// Load generator for herald (Socket.IO gateway), the Node reference and the floor server.
#[derive(Parser, Debug)]
#[command(name = "herald-bench", version)]
struct Cli {
    /// Scenarios to run: `all` or a comma-separated list of 1..5.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Servers to run against, comma-separated: herald,node,floor [default: all three; herald with --smoke].
    #[arg(long)]
    server: Option<String>,
    /// Clients in scenarios 1-4 [default: 10000; 200 with --smoke].
    #[arg(long)]
    clients: Option<u32>,
    /// Clients in scenario 5 (the ramp) [default: 2000; 200 with --smoke].
    #[arg(long)]
    ramp_clients: Option<u32>,
    /// Seconds of traffic in scenarios 2-4 [default: 60; 3 with --smoke].
    #[arg(long)]
    duration: Option<f64>,
    /// Events per second in scenarios 2, 3 and 4 [default: 5 for 2 and 4, 500 for 3].
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds per step of the ramp (scenario 5) [default: 5; 2 with --smoke].
    #[arg(long)]
    step_duration: Option<f64>,
    /// Event rates of the ramp steps, comma-separated [default: 5,10,15,20,25,35,50,75,100,125,150,200,300,400,600,800,1600,3200; 25,50 with --smoke].
    #[arg(long)]
    ramp_rates: Option<String>,
    /// A ramp step passes when its p99 latency is below this (and nothing was lost).
    #[arg(long, default_value_t = 100.0)]
    p99_limit_ms: f64,
    /// Campaigns in scenario 3 (clients are spread evenly over them).
    #[arg(long, default_value_t = 100)]
    campaigns: u32,
    /// Tiny run for CI: 200 clients, 2-3 s per scenario, herald only; exits non-zero on any loss,
    /// duplicate, protocol error, failed connection or failed publish. Never a timed assertion.
    #[arg(long)]
    smoke: bool,
    /// herald binary [default: `herald` next to this executable].
    #[arg(long)]
    herald_bin: Option<PathBuf>,
    /// Prepared copy of the Node reference (with node_modules).
    #[arg(long, default_value = "/tmp/node-baseline")]
    node_dir: PathBuf,
    #[arg(long, default_value = "node")]
    node_bin: String,
    /// Built floor server.
    #[arg(long, default_value = "/tmp/floor/target/release/floor")]
    floor_bin: PathBuf,
    #[arg(long, default_value = "redis-server")]
    redis_bin: String,
    /// CPUs the servers (and redis) are pinned to with taskset.
    #[arg(long, default_value = "0")]
    server_cpus: String,
    /// Do not pin the servers.
    #[arg(long)]
    no_pin: bool,
    /// Client handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Concurrent publish requests (keep-alive connections).
    #[arg(long, default_value_t = 16)]
    publishers: usize,
    /// WebSocket read buffer per client, bytes.
    #[arg(long, default_value_t = 4096)]
    read_buffer: usize,
    /// Keep the temporary directory (server logs, fixtures).
    #[arg(long)]
    keep_tmp: bool,
    /// Also write the final JSON line to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

/// Resolved settings.
pub struct Cfg {
    pub scenarios: Vec<u8>,
    pub servers: Vec<Kind>,
    pub clients: u32,
    pub ramp_clients: u32,
    pub duration: f64,
    pub rate_one: f64,
    pub rate_many: f64,
    pub step: f64,
    pub ramp_rates: Vec<f64>,
    pub p99_limit_ms: f64,
    pub campaigns: u32,
    pub smoke: bool,
    pub settle: Duration,
    pub quiet: Duration,
    pub connect_concurrency: usize,
    pub publishers: usize,
    pub read_buffer: usize,
}

struct Bench {
    cfg: Cfg,
    env: Env,
}

fn resolve(cli: &Cli) -> Result<Cfg> {
    let smoke = cli.smoke;
    let scenarios: Vec<u8> = if cli.scenario.trim() == "all" {
        vec![1, 2, 3, 4, 5]
    } else {
        let mut v = Vec::new();
        for s in cli.scenario.split(',') {
            let n: u8 = s.trim().parse().with_context(|| format!("bad scenario {s:?}"))?;
            if !(1..=5).contains(&n) {
                bail!("scenario {n} does not exist (1..5)");
            }
            v.push(n);
        }
        v.sort();
        v.dedup();
        v
    };
    let servers_s =
        cli.server.clone().unwrap_or_else(|| if smoke { "herald".into() } else { "herald,node,floor".into() });
    let mut servers = Vec::new();
    for s in servers_s.split(',') {
        servers.push(Kind::parse(s).with_context(|| format!("unknown server {s:?} (herald, node, floor)"))?);
    }
    let ramp_rates = match &cli.ramp_rates {
        Some(s) => s.split(',').map(|r| r.trim().parse::<f64>()).collect::<Result<Vec<_>, _>>()?,
        None if smoke => vec![25.0, 50.0],
        None => vec![
            5.0, 10.0, 15.0, 20.0, 25.0, 35.0, 50.0, 75.0, 100.0, 125.0, 150.0, 200.0, 300.0, 400.0, 600.0, 800.0,
            1600.0, 3200.0,
        ],
    };
    let rate_check = |r: f64| r.is_finite() && r > 0.0;
    if !ramp_rates.iter().all(|r| rate_check(*r)) || cli.rate.is_some_and(|r| !rate_check(r)) {
        bail!("rates must be positive");
    }
    let cfg = Cfg {
        scenarios,
        servers,
        clients: cli.clients.unwrap_or(if smoke { 200 } else { 10_000 }),
        ramp_clients: cli.ramp_clients.unwrap_or(if smoke { 200 } else { 2_000 }),
        duration: cli.duration.unwrap_or(if smoke { 3.0 } else { 60.0 }),
        rate_one: cli.rate.unwrap_or(5.0),
        rate_many: cli.rate.unwrap_or(500.0),
        step: cli.step_duration.unwrap_or(if smoke { 2.0 } else { 5.0 }),
        ramp_rates,
        p99_limit_ms: cli.p99_limit_ms,
        campaigns: cli.campaigns.max(1),
        smoke,
        settle: if smoke { Duration::from_millis(200) } else { Duration::from_secs(1) },
        quiet: if smoke { Duration::from_secs(2) } else { Duration::from_secs(10) },
        connect_concurrency: cli.connect_concurrency.max(1),
        publishers: cli.publishers.max(1),
        read_buffer: cli.read_buffer.max(256),
    };
    if cfg.duration <= 0.0 || cfg.step <= 0.0 || cfg.clients == 0 || cfg.ramp_clients == 0 {
        bail!("durations and client counts must be positive");
    }
    Ok(cfg)
}

/// Soft open-files limit up to the hard limit; returns the new soft limit.
fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit { rlim_cur: rl.rlim_max, rlim_max: rl.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return rl.rlim_max;
            }
        }
        rl.rlim_cur
    }
}

/// The CPUs this process may run on.
fn own_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity into a zeroed cpu_set_t of the right size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|c| libc::CPU_ISSET(*c, &set)).collect()
    }
}

fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

// ------------------------------------------------------------------ a session: servers + clients

struct Session<'a> {
    b: &'a Bench,
    instances: Vec<Instance>,
    redis: Option<Redis>,
    shared: Arc<Shared>,
    ccfg: Arc<ClientCfg>,
    clients: Vec<Arc<Client>>,
    handles: Vec<JoinHandle<()>>,
    accepted: Arc<Vec<Mutex<SeqSet>>>,
    next_seq: Vec<u64>,
    publisher: Arc<Publisher>,
}

impl<'a> Session<'a> {
    async fn start(b: &'a Bench, kind: Kind, n_instances: usize, campaigns: u32) -> Result<Session<'a>> {
        let mut redis = None;
        let mut instances = Vec::new();
        let started: Result<()> = async {
            if n_instances > 1 {
                let r = servers::start_redis(&b.env).await?;
                let url = r.url();
                redis = Some(r);
                for k in 0..n_instances {
                    instances.push(servers::start(&b.env, kind, &format!("fleet{k}"), Some(&url)).await?);
                }
            } else {
                instances.push(servers::start(&b.env, kind, "solo", None).await?);
            }
            Ok(())
        }
        .await;
        if let Err(e) = started {
            for i in instances {
                i.proc.stop().await;
            }
            if let Some(r) = redis {
                r.proc.stop().await;
            }
            return Err(e);
        }
        let shared = Arc::new(Shared::new(n_instances));
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(b.cfg.read_buffer)
            .write_buffer_size(0)
            .max_message_size(Some(1 << 20))
            .max_frame_size(Some(1 << 20));
        let ccfg = Arc::new(ClientCfg {
            key: jsonwebtoken::EncodingKey::from_secret(b.env.jwt_secret.as_bytes()),
            ws_config,
            setup_timeout: Duration::from_secs(120),
            sem: Arc::new(Semaphore::new(b.cfg.connect_concurrency)),
            shared: shared.clone(),
        });
        let publisher = Arc::new(Publisher::new(&instances[0].base_url(), &b.env.publish_token, b.cfg.publishers)?);
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
            publisher,
        })
    }

    fn pids(&self) -> Vec<u32> {
        self.instances.iter().map(|i| i.proc.pid).collect()
    }

    /// Connects and subscribes `n` clients; `assign(i)` = (campaign, instance).
    async fn connect(&mut self, n: u32, assign: impl Fn(u32) -> (u32, usize)) -> Value {
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
        let per_conn = match (rss_before, rss_sub) {
            (Some(a), Some(b)) if subscribed > 0 => Some(round2((b as f64 - a as f64) / subscribed as f64)),
            _ => None,
        };
        let first_error = self.shared.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        json!({
            "clients": n,
            "subscribed": subscribed,
            "connect_failures": failures,
            "first_connect_error": first_error,
            "setup_s": round2(setup_s),
            "connections_per_s": round1(subscribed as f64 / setup_s.max(1e-9)),
            "rss_before_kib": rss_before,
            "rss_subscribed_kib": rss_sub,
            "rss_per_conn_kib": per_conn,
            "generator_rss_kib": stats::proc_rss_kib(std::process::id()),
        })
    }

    /// One traffic phase at `rate` events/s over `campaigns` for `secs`, then a drain.
    async fn traffic(&mut self, rate: f64, secs: f64, campaigns: &[u32]) -> Value {
        let sh = self.shared.clone();
        let pids = self.pids();
        let redis_pid = self.redis.as_ref().map(|r| r.proc.pid);
        let subs: Vec<Arc<Client>> = self.clients.iter().filter(|c| c.subscribed.load(Relaxed)).cloned().collect();
        sh.reset_histograms();
        let (d0, dup0, perr0, disc0) = (
            sh.deliveries.load(Relaxed),
            sh.duplicates.load(Relaxed),
            sh.protocol_errors.load(Relaxed),
            sh.disconnects.load(Relaxed),
        );
        let cpu0 = sum_cpu_s(&pids);
        let rcpu0 = redis_pid.and_then(stats::proc_cpu_s);
        let gen0 = self_cpu_s();
        let plan = PhasePlan {
            campaigns,
            base: &self.next_seq,
            rate,
            duration: Duration::from_secs_f64(secs),
            workers: self.b.cfg.publishers,
        };
        let out = publish_phase(&self.publisher, &self.accepted, plan).await;
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
        let rcpu1 = redis_pid.and_then(stats::proc_cpu_s);
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
        json!({
            "target_events_per_s": rate,
            "duration_s": secs,
            "campaigns": campaigns.len(),
            "subscribers": subs.len(),
            "events_planned": out.planned,
            "events_accepted": out.accepted,
            "publish_errors": out.errors,
            "first_publish_error": out.first_error,
            "publish_events_per_s": round1(out.accepted as f64 / publish_wall_s.max(1e-9)),
            "max_publish_lag_ms": round2(out.max_lag_ms),
            "expected_deliveries": expected,
            "deliveries": deliveries,
            "deliveries_per_s": round1(deliveries as f64 / window_s.max(1e-9)),
            "lost": lost,
            "drain_s": round2(drain_s),
            "duplicates": sh.duplicates.load(Relaxed) - dup0,
            "protocol_errors": sh.protocol_errors.load(Relaxed) - perr0,
            "first_protocol_error": first_perr,
            "disconnects": sh.disconnects.load(Relaxed) - disc0,
            "latency_ms": lat,
            "latency_near_ms": near,
            "latency_far_ms": far,
            "cross_instance_p50_ms": near.zip(far).map(|(n, f)| round2(f.p50_ms - n.p50_ms)),
            "server_cpu_s": srv_cpu.map(round2),
            "server_cpu_us_per_delivery": srv_cpu.filter(|_| deliveries > 0).map(|s| round2(s * 1e6 / deliveries as f64)),
            "server_cpu_pct": srv_cpu.map(|s| round1(100.0 * s / phase_s.max(1e-9))),
            "redis_cpu_s": rcpu0.zip(rcpu1).map(|(a, b)| round2(b - a)),
            "generator_cpu_pct": round1(gen_pct),
            "generator_bound": gen_pct > 90.0,
            "rss_after_kib": rss_after,
            "rss_after_per_conn_kib": None::<f64>,
        })
    }

    async fn stop(self) {
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
        if let Some(r) = self.redis {
            r.proc.stop().await;
        }
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn per_conn(before: &Value, after: &Value, n: &Value) -> Value {
    match (before.as_f64(), after.as_f64(), n.as_f64()) {
        (Some(a), Some(b), Some(n)) if n > 0.0 => json!(round2((b - a) / n)),
        _ => Value::Null,
    }
}

// ------------------------------------------------------------------ scenarios

async fn scenarios_1_2(b: &Bench, kind: Kind, want1: bool, want2: bool) -> Result<(Option<Value>, Option<Value>)> {
    let n = b.cfg.clients;
    let mut s = Session::start(b, kind, 1, 1).await?;
    eprintln!("  [{}] scenario 1/2: connecting {n} clients to campaign c0", kind.name());
    let setup = s.connect(n, |_| (0, 0)).await;
    eprintln!("  [{}] setup: {}", kind.name(), setup);
    let mut s1 = json!({ "campaigns": 1, "setup": setup.clone(), "rss_after_traffic_kib": null,
                         "rss_after_traffic_per_conn_kib": null });
    let mut s2 = None;
    if want2 {
        eprintln!("  [{}] scenario 2: {} ev/s for {} s", kind.name(), b.cfg.rate_one, b.cfg.duration);
        let mut t = s.traffic(b.cfg.rate_one, b.cfg.duration, &[0]).await;
        t["rss_after_per_conn_kib"] = per_conn(&setup["rss_before_kib"], &t["rss_after_kib"], &setup["subscribed"]);
        s1["rss_after_traffic_kib"] = t["rss_after_kib"].clone();
        s1["rss_after_traffic_per_conn_kib"] = t["rss_after_per_conn_kib"].clone();
        eprintln!("  [{}] traffic: {}", kind.name(), t);
        s2 = Some(json!({ "setup": setup, "traffic": t }));
    }
    s.stop().await;
    Ok((want1.then_some(s1), s2))
}

async fn scenario_3(b: &Bench, kind: Kind) -> Result<Value> {
    let camps = b.cfg.campaigns;
    let mut s = Session::start(b, kind, 1, camps).await?;
    eprintln!("  [{}] scenario 3: {} clients over {camps} campaigns", kind.name(), b.cfg.clients);
    let setup = s.connect(b.cfg.clients, |i| (i % camps, 0)).await;
    eprintln!("  [{}] setup: {}", kind.name(), setup);
    let list: Vec<u32> = (0..camps).collect();
    let mut t = s.traffic(b.cfg.rate_many, b.cfg.duration, &list).await;
    t["rss_after_per_conn_kib"] = per_conn(&setup["rss_before_kib"], &t["rss_after_kib"], &setup["subscribed"]);
    eprintln!("  [{}] traffic: {}", kind.name(), t);
    s.stop().await;
    Ok(json!({ "setup": setup, "traffic": t }))
}

async fn scenario_4(b: &Bench, kind: Kind) -> Result<Value> {
    let mut s = Session::start(b, kind, 2, 1).await?;
    eprintln!("  [{}] scenario 4: {} clients over 2 instances + redis", kind.name(), b.cfg.clients);
    let setup = s.connect(b.cfg.clients, |i| (0, (i % 2) as usize)).await;
    eprintln!("  [{}] setup: {}", kind.name(), setup);
    let mut t = s.traffic(b.cfg.rate_one, b.cfg.duration, &[0]).await;
    t["rss_after_per_conn_kib"] = per_conn(&setup["rss_before_kib"], &t["rss_after_kib"], &setup["subscribed"]);
    eprintln!("  [{}] traffic: {}", kind.name(), t);
    s.stop().await;
    Ok(json!({ "instances": 2, "publish_to": "instance 0 (near)", "setup": setup, "traffic": t }))
}

fn step_passes(t: &Value, limit_ms: f64) -> (bool, Vec<String>) {
    let u = |k: &str| t[k].as_u64().unwrap_or(0);
    let mut why = Vec::new();
    if u("lost") > 0 {
        why.push(format!("{} lost", u("lost")));
    }
    if u("duplicates") > 0 {
        why.push(format!("{} duplicates", u("duplicates")));
    }
    if u("publish_errors") > 0 {
        why.push(format!("{} publish errors", u("publish_errors")));
    }
    if u("disconnects") > 0 {
        why.push(format!("{} disconnects", u("disconnects")));
    }
    let p99 = t["latency_ms"]["p99_ms"].as_f64().unwrap_or(f64::INFINITY);
    if p99 >= limit_ms {
        why.push(format!("p99 {p99} ms >= {limit_ms} ms"));
    }
    let target = t["target_events_per_s"].as_f64().unwrap_or(0.0);
    let achieved = t["publish_events_per_s"].as_f64().unwrap_or(0.0);
    if achieved < 0.9 * target {
        why.push(format!("publisher reached only {achieved} of {target} ev/s"));
    }
    (why.is_empty(), why)
}

async fn scenario_5(b: &Bench, kind: Kind) -> Result<Value> {
    let n = b.cfg.ramp_clients;
    let mut s = Session::start(b, kind, 1, 1).await?;
    eprintln!("  [{}] scenario 5: ramp with {n} clients", kind.name());
    let setup = s.connect(n, |_| (0, 0)).await;
    eprintln!("  [{}] setup: {}", kind.name(), setup);
    let mut steps = Vec::new();
    let mut best: Option<Value> = None;
    let mut stopped = Value::Null;
    for &rate in &b.cfg.ramp_rates {
        let mut t = s.traffic(rate, b.cfg.step, &[0]).await;
        let (ok, why) = step_passes(&t, b.cfg.p99_limit_ms);
        t["pass"] = json!(ok);
        t["fail_reasons"] = json!(why);
        eprintln!(
            "  [{}] step {rate} ev/s: {} deliveries/s, p99 {} ms, lost {}, gen CPU {}% -> {}",
            kind.name(),
            t["deliveries_per_s"],
            t["latency_ms"]["p99_ms"],
            t["lost"],
            t["generator_cpu_pct"],
            if ok { "pass".to_string() } else { format!("FAIL ({})", why.join(", ")) }
        );
        steps.push(t.clone());
        if ok {
            best = Some(t);
        } else {
            stopped = json!(format!("{rate} ev/s: {}", why.join(", ")));
            break;
        }
    }
    s.stop().await;
    let best_rate = best.as_ref().map(|t| t["deliveries_per_s"].clone()).unwrap_or(Value::Null);
    Ok(json!({
        "setup": setup,
        "p99_limit_ms": b.cfg.p99_limit_ms,
        "steps": steps,
        "max_sustained_deliveries_per_s": best_rate,
        "max_sustained_events_per_s": best.as_ref().map(|t| t["target_events_per_s"].clone()),
        "generator_bound_at_max": best.as_ref().map(|t| t["generator_bound"].clone()),
        "generator_cpu_pct_at_max": best.as_ref().map(|t| t["generator_cpu_pct"].clone()),
        "stopped_at": stopped,
    }))
}

/// Smoke checks: anything lost, duplicated, refused or malformed is a failure.
fn smoke_problems(server: &str, name: &str, v: &Value, out: &mut Vec<String>) {
    let check = |what: &str, x: &Value| (x.as_u64().unwrap_or(0) > 0).then(|| format!("{server} {name}: {what} = {x}"));
    if let Some(setup) = v.get("setup") {
        out.extend(check("connect_failures", &setup["connect_failures"]));
        if setup["subscribed"].as_u64().unwrap_or(0) == 0 {
            out.push(format!("{server} {name}: no client subscribed"));
        }
    }
    let mut traffic: Vec<&Value> = v.get("traffic").into_iter().collect();
    if let Some(Value::Array(steps)) = v.get("steps") {
        traffic.extend(steps.iter());
    }
    for t in traffic {
        for k in ["lost", "duplicates", "protocol_errors", "publish_errors", "disconnects"] {
            out.extend(check(k, &t[k]));
        }
        if t["deliveries"].as_u64().unwrap_or(0) == 0 {
            out.push(format!("{server} {name}: no delivery"));
        }
    }
}

async fn run(cli: Cli) -> Result<bool> {
    let cfg = resolve(&cli)?;
    let nofile = raise_nofile();
    let need = cfg.clients.max(cfg.ramp_clients) as u64 + 200;
    if nofile < need {
        eprintln!("WARNING: open-files limit {nofile} is below the {need} this run needs (raise `ulimit -Hn`)");
    }
    let cpus = own_cpus();
    let pin = if cli.no_pin {
        None
    } else if servers::which("taskset").is_none() {
        eprintln!("WARNING: taskset not found; servers run unpinned");
        None
    } else {
        Some(cli.server_cpus.clone())
    };
    if let Some(p) = &pin
        && cpus.iter().any(|c| p.split(',').any(|s| s.trim() == c.to_string()))
    {
        eprintln!(
            "WARNING: the generator may run on CPUs {cpus:?}, overlapping the servers' ({p}); \
             run it through scripts/bench (taskset -c 1) for meaningful figures"
        );
    }
    let herald_bin = match &cli.herald_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.parent().context("exe dir")?.join("herald"),
    };
    let tmp = std::env::temp_dir().join(format!("herald-bench.{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let env = Env {
        db_path: tmp.join("bench.db"),
        fixture_json: tmp.join("fixture.json"),
        tmp: tmp.clone(),
        jwt_secret: random_hex(32)?,
        publish_token: random_hex(24)?,
        herald_bin,
        node_bin: cli.node_bin.clone(),
        node_dir: cli.node_dir.clone(),
        floor_bin: cli.floor_bin.clone(),
        redis_bin: cli.redis_bin.clone(),
        pin,
        max_connections: 25_000,
    };
    let users = cfg.clients.max(cfg.ramp_clients);
    let rows = servers::membership_rows(users, cfg.campaigns);
    servers::write_fixture_db(&env.db_path, &rows).await?;
    servers::write_fixture_json(&env.fixture_json, &rows)?;
    drop(rows);

    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: stopping the servers this run started");
            servers::kill_all_children();
            std::process::exit(130);
        }
    });

    let b = Bench { cfg, env };
    let cfg = &b.cfg;
    eprintln!(
        "herald-bench: scenarios {:?}, servers {:?}, {} clients ({} in the ramp), {} s, generator CPUs {:?}, servers pinned to {:?}",
        cfg.scenarios,
        cfg.servers.iter().map(|k| k.name()).collect::<Vec<_>>(),
        cfg.clients,
        cfg.ramp_clients,
        cfg.duration,
        cpus,
        b.env.pin
    );
    let want = |n: u8| cfg.scenarios.contains(&n);
    let mut results = serde_json::Map::new();
    let mut failures: Vec<String> = Vec::new();
    for &kind in &cfg.servers {
        let name = kind.name();
        let mut res = serde_json::Map::new();
        let missing = match kind {
            Kind::Herald => (!b.env.herald_bin.is_file()).then(|| format!("{} not found", b.env.herald_bin.display())),
            Kind::Node => (!b.env.node_dir.join("node_modules").is_dir())
                .then(|| format!("{}/node_modules not found (scripts/bench prepares it)", b.env.node_dir.display())),
            Kind::Floor => (!b.env.floor_bin.is_file())
                .then(|| format!("{} not found (scripts/bench builds it)", b.env.floor_bin.display())),
        };
        if let Some(m) = missing {
            eprintln!("ERROR: {name}: {m}");
            failures.push(format!("{name}: {m}"));
            results.insert(name.into(), json!({ "error": m }));
            continue;
        }
        eprintln!("== {name}");
        if want(1) || want(2) {
            match scenarios_1_2(&b, kind, want(1), want(2)).await {
                Ok((s1, s2)) => {
                    if let Some(v) = s1 {
                        res.insert("s1".into(), v);
                    }
                    if let Some(v) = s2 {
                        res.insert("s2".into(), v);
                    }
                }
                Err(e) => {
                    failures.push(format!("{name} scenario 1/2: {e:#}"));
                    for k in [(1, "s1"), (2, "s2")] {
                        if want(k.0) {
                            res.insert(k.1.into(), json!({ "error": format!("{e:#}") }));
                        }
                    }
                }
            }
        }
        let mut one = |n: &str, r: Result<Value>| match r {
            Ok(v) => {
                res.insert(n.into(), v);
            }
            Err(e) => {
                failures.push(format!("{name} {n}: {e:#}"));
                res.insert(n.into(), json!({ "error": format!("{e:#}") }));
            }
        };
        if want(3) {
            one("s3", scenario_3(&b, kind).await);
        }
        if want(4) {
            if kind == Kind::Floor {
                one("s4", Ok(json!({ "na": "floor has no multi-instance mode" })));
            } else {
                one("s4", scenario_4(&b, kind).await);
            }
        }
        if want(5) {
            one("s5", scenario_5(&b, kind).await);
        }
        for (k, v) in &res {
            if v.get("setup").is_some_and(|s| s["subscribed"].as_u64() == Some(0)) {
                failures.push(format!("{name} {k}: no client could subscribe"));
            }
            if cfg.smoke {
                smoke_problems(name, k, v, &mut failures);
            }
        }
        results.insert(name.into(), Value::Object(res));
    }

    let results = Value::Object(results);
    report::print_tables(cfg, &results);
    let ok = failures.is_empty();
    let doc = json!({
        "tool": "herald-bench",
        "smoke": cfg.smoke,
        "config": {
            "clients": cfg.clients,
            "ramp_clients": cfg.ramp_clients,
            "duration_s": cfg.duration,
            "rate_one_campaign": cfg.rate_one,
            "rate_many_campaigns": cfg.rate_many,
            "campaigns_s3": cfg.campaigns,
            "ramp_rates": cfg.ramp_rates,
            "ramp_step_s": cfg.step,
            "p99_limit_ms": cfg.p99_limit_ms,
            "server_cpus": b.env.pin,
            "generator_cpus": cpus,
            "nofile": nofile,
        },
        "results": results,
        "failures": failures,
        "ok": ok,
    });
    let line = serde_json::to_string(&doc)?;
    if let Some(p) = &cli.json_out {
        std::fs::write(p, format!("{line}\n"))?;
    }
    if !failures.is_empty() {
        eprintln!("FAILURES:");
        for f in &failures {
            eprintln!("  - {f}");
        }
    }
    println!("{line}");
    if cli.keep_tmp {
        eprintln!("kept {}", tmp.display());
    } else {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald-bench: runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let r = rt.block_on(run(cli));
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("herald-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}
