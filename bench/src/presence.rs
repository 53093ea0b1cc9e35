//! Scenario 8, presence (issue 24), herald only: two instances over one private Redis, with
//! `--presence-clients` subscribers of campaign c0 (client i on instance `i mod 2`).
//! - fan-out, presence on against off: `--presence-rounds` rounds, each one session whose
//!   clients subscribe with `presence: true` and one whose clients do not (on/off, then off/on,
//!   so that neither always runs first), each on fresh servers with scenario 2's traffic
//!   (`--rate` ev/s to c0 for `--presence-duration` s): CPU per delivery and p99, and the
//!   presence events the clients received meanwhile;
//! - the join/leave storm, in the first session with presence: after a quiet window (each
//!   instance's and Redis's idle rate), `--presence-storm` more clients (users beyond the
//!   subscribers') connect and subscribe with presence, started evenly over one second, then
//!   leave (DISCONNECT, then a WebSocket close) evenly over one second; the storm window runs
//!   until `HERALD_PRESENCE_TIMEOUT` (3 s) and two rounds after the last one left, so that the
//!   leaves are told too. Redis commands (`total_commands_processed`, and `INFO commandstats`
//!   per command), each instance's CPU (utime + stime) above its idle rate, and the presence
//!   events every existing subscriber received in the window.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::proto::{self, PRESENCE_EVENTS};
use crate::results::{Setup, Traffic, compact, round1, round2};
use crate::servers;
use crate::session::{Bench, Session};
use crate::stats;

/// herald's defaults: a round a second, a user missing for 3 s is told as gone.
const ROUND: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(3);

/// What scenario 8 measured.
#[derive(Debug, Serialize)]
pub struct Presence {
    pub instances: usize,
    pub clients: u32,
    pub events_per_s: f64,
    pub duration_s: f64,
    /// Every fan-out session, in the order they ran.
    pub fanout: Vec<FanoutRun>,
    /// Mean over the sessions with presence and over those without.
    pub cpu_us_per_delivery_on: Option<f64>,
    pub cpu_us_per_delivery_off: Option<f64>,
    /// (on − off) / off, in % (target: under 5).
    pub presence_cpu_overhead_pct: Option<f64>,
    pub p99_ms_on: Option<f64>,
    pub p99_ms_off: Option<f64>,
    pub storm: Storm,
}

#[derive(Debug, Serialize)]
pub struct FanoutRun {
    pub presence: bool,
    pub setup: Setup,
    pub traffic: Traffic,
    /// Presence events received by the clients during the traffic phase (all kinds).
    pub presence_events: u64,
}

#[derive(Debug, Serialize)]
pub struct Storm {
    pub clients: u32,
    pub joined: u64,
    pub failed: u64,
    /// Joined, then lost their connection before leaving.
    pub dropped: u64,
    pub first_error: Option<String>,
    /// From the first connect to the last subscribe ack.
    pub join_s: f64,
    pub leave_s: f64,
    /// From the first connect to the end of the window (two rounds after the presence timeout).
    pub window_s: f64,
    pub idle_s: f64,
    pub redis_commands: Option<u64>,
    pub redis_idle_commands_per_s: Option<f64>,
    /// Commands in the window minus the idle rate over it.
    pub redis_commands_above_idle: Option<f64>,
    /// The change of `INFO commandstats` calls over the window, per command.
    pub redis_commandstats: BTreeMap<String, u64>,
    pub redis_cpu_s: Option<f64>,
    pub per_instance: Vec<StormInstance>,
    /// Presence events received in the window by each existing subscriber.
    pub existing_clients: usize,
    pub events_per_client_max: u64,
    pub events_per_client_mean: f64,
    /// By kind (`presence_joined`, `presence_left`, `presence_count`): max and mean per client.
    pub by_kind: BTreeMap<&'static str, KindCount>,
    /// Existing subscribers that lost their connection during the storm.
    pub disconnects: u64,
}

#[derive(Debug, Serialize)]
pub struct StormInstance {
    pub cpu_s: Option<f64>,
    pub idle_cpu_pct: Option<f64>,
    pub cpu_above_idle_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct KindCount {
    pub max: u64,
    pub mean: f64,
}

pub async fn scenario_8(b: &Bench) -> Result<Presence> {
    let p = &b.cfg.presence;
    let mut fanout = Vec::new();
    let mut storm = None;
    for round in 0..p.rounds {
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for on in order {
            let mut s = Session::start_on_redis(b, 2, 1, vec![]).await?;
            let run = fanout_session(b, &mut s, on).await;
            let run = match run {
                Ok(r) if on && storm.is_none() => match join_leave_storm(b, &s).await {
                    Ok(st) => {
                        storm = Some(st);
                        Ok(r)
                    }
                    Err(e) => Err(e),
                },
                other => other,
            };
            s.stop().await;
            fanout.push(run?);
        }
    }
    let storm = storm.context("no session with presence ran")?;
    let mean = |on: bool, f: &dyn Fn(&Traffic) -> Option<f64>| {
        let v: Vec<f64> = fanout.iter().filter(|r| r.presence == on).filter_map(|r| f(&r.traffic)).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let us = |t: &Traffic| t.server_cpu_us_per_delivery;
    let p99 = |t: &Traffic| Some(t.latency_ms.p99_ms);
    let (on, off) = (mean(true, &us), mean(false, &us));
    Ok(Presence {
        instances: 2,
        clients: p.clients,
        events_per_s: b.cfg.rate_one,
        duration_s: p.duration_s,
        cpu_us_per_delivery_on: on.map(round2),
        cpu_us_per_delivery_off: off.map(round2),
        presence_cpu_overhead_pct: on.zip(off).filter(|(_, off)| *off > 0.0).map(|(a, b)| round1(100.0 * (a - b) / b)),
        p99_ms_on: mean(true, &p99).map(round2),
        p99_ms_off: mean(false, &p99).map(round2),
        fanout,
        storm,
    })
}

fn presence_events(s: &Session<'_>) -> u64 {
    s.clients().iter().flat_map(|c| c.presence_events.iter()).map(|n| n.load(Relaxed)).sum()
}

async fn fanout_session(b: &Bench, s: &mut Session<'_>, on: bool) -> Result<FanoutRun> {
    let p = &b.cfg.presence;
    let what = if on { "with presence" } else { "without presence" };
    eprintln!("  [herald] scenario 8: {} clients of c0 {what}, 2 instances + redis", p.clients);
    s.subscribe_with_presence(on);
    let setup = s.connect(p.clients, |i| (0, (i % 2) as usize)).await;
    eprintln!("    setup: {}", compact(&setup));
    if setup.subscribed == 0 {
        anyhow::bail!("no client could subscribe: {:?}", setup.first_connect_error);
    }
    // Let the joins of the setup be told (and the room switch to counts) before the traffic.
    tokio::time::sleep(TIMEOUT).await;
    let before = presence_events(s);
    let traffic = s.traffic(b.cfg.rate_one, p.duration_s, &[0]).await.with_rss_per_conn(&setup);
    let presence_events = presence_events(s) - before;
    eprintln!("    traffic {what}: {}", compact(&traffic));
    Ok(FanoutRun { presence: on, setup, traffic, presence_events })
}

/// Every instance's CPU time and Redis's command counts and CPU time at one moment.
struct Reading {
    at: Instant,
    cpu: Vec<Option<f64>>,
    commands: Option<f64>,
    commandstats: BTreeMap<String, u64>,
    redis_cpu: Option<f64>,
}

impl Reading {
    async fn take(s: &Session<'_>) -> Result<Reading> {
        let node = s.redis_nodes().first().context("scenario 8 runs on a private Redis")?;
        let stats_text = servers::command(node.port, &["INFO", "commandstats"]).await.unwrap_or_default();
        Ok(Reading {
            at: Instant::now(),
            cpu: s.instances().iter().map(|i| stats::proc_cpu_s(i.proc.pid)).collect(),
            commands: servers::info_number(node.port, "stats", "total_commands_processed").await,
            commandstats: commandstats(&stats_text),
            redis_cpu: stats::proc_cpu_s(node.proc.pid),
        })
    }

    fn secs_since(&self, before: &Reading) -> f64 {
        self.at.duration_since(before.at).as_secs_f64()
    }
}

/// `cmdstat_<name>:calls=<n>,...` lines of `INFO commandstats`: calls per command.
fn commandstats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.strip_prefix("calls=")?.split(',').next()?.parse().ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

fn per_client(s: &Session<'_>) -> Vec<[u64; 3]> {
    s.clients().iter().map(|c| std::array::from_fn(|k| c.presence_events[k].load(Relaxed))).collect()
}

async fn join_leave_storm(b: &Bench, s: &Session<'_>) -> Result<Storm> {
    let p = &b.cfg.presence;
    let n = p.storm;
    let idle = if b.cfg.smoke { Duration::from_secs(1) } else { Duration::from_secs(5) };
    eprintln!("  [herald] scenario 8: storm of {n} presence clients joining, then leaving, each within a second");
    let existing: Vec<bool> = s.clients().iter().map(|c| c.subscribed.load(Relaxed)).collect();
    let disc0 = s.shared().disconnects.load(Relaxed);
    let r0 = Reading::take(s).await?;
    tokio::time::sleep(idle).await;
    let r1 = Reading::take(s).await?;
    let counts0 = per_client(s);

    let cfg = s.client_cfg();
    let (leave_tx, leave_rx) = watch::channel(false);
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let t0 = tokio::time::Instant::now();
    let spread = move |j: u32| Duration::from_secs_f64(j as f64 / n as f64);
    let mut tasks = Vec::new();
    for j in 0..n {
        let addr = s.instances()[(j % 2) as usize].addr;
        let user = format!("u{}", p.clients + j);
        let (key, ws_config, mut leave) = (cfg.key.clone(), cfg.ws_config, leave_rx.clone());
        let (acked, failed, dropped, first_error) =
            (acked.clone(), failed.clone(), dropped.clone(), first_error.clone());
        let start = t0 + spread(j);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start).await;
            let joined = tokio::time::timeout(Duration::from_secs(60), join(addr, &key, ws_config, &user)).await;
            let mut ws = match joined.unwrap_or_else(|_| Err("setup timed out".into())) {
                Ok(ws) => ws,
                Err(e) => {
                    failed.fetch_add(1, Relaxed);
                    first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                    return None;
                }
            };
            acked.fetch_add(1, Relaxed);
            // Hold the subscription (answering pings) until told to leave.
            loop {
                tokio::select! {
                    _ = leave.changed() => break,
                    m = ws.next() => match m {
                        Some(Ok(Message::Text(t))) if t.as_str() == "2" => {
                            let _ = ws.send(Message::text("3")).await;
                        }
                        Some(Ok(_)) => {}
                        _ => {
                            dropped.fetch_add(1, Relaxed);
                            return None;
                        }
                    },
                }
            }
            tokio::time::sleep(spread(j)).await;
            let _ = ws.send(Message::text("41")).await;
            let _ = ws.close(None).await;
            Some(tokio::time::Instant::now())
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    while acked.load(Relaxed) + failed.load(Relaxed) < n as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let join_s = t0.elapsed().as_secs_f64();
    eprintln!("    {} joined, {} failed, in {:.2} s; leaving", acked.load(Relaxed), failed.load(Relaxed), join_s);
    let _ = leave_tx.send(true);
    let mut last_leave = None;
    let t_leave = tokio::time::Instant::now();
    for t in tasks {
        if let Ok(Some(left)) = t.await {
            last_leave = Some(last_leave.map_or(left, |l: tokio::time::Instant| l.max(left)));
        }
    }
    let leave_s = last_leave.map_or(0.0, |l| l.duration_since(t_leave).as_secs_f64());
    tokio::time::sleep(TIMEOUT + 2 * ROUND).await;
    let r2 = Reading::take(s).await?;
    let counts1 = per_client(s);

    let idle_s = r1.secs_since(&r0);
    let window_s = r2.secs_since(&r1);
    let commands = r2.commands.zip(r1.commands).map(|(a, b)| a - b);
    let idle_rate = r1.commands.zip(r0.commands).map(|(a, b)| (a - b) / idle_s);
    let per_instance = (0..s.instances().len())
        .map(|k| {
            let idle_rate = r1.cpu[k].zip(r0.cpu[k]).map(|(a, b)| (a - b) / idle_s);
            let cpu = r2.cpu[k].zip(r1.cpu[k]).map(|(a, b)| a - b);
            StormInstance {
                cpu_s: cpu.map(round2),
                idle_cpu_pct: idle_rate.map(|r| round2(100.0 * r)),
                cpu_above_idle_s: cpu.zip(idle_rate).map(|(c, r)| round2(c - r * window_s)),
            }
        })
        .collect();
    let deltas: Vec<[u64; 3]> = counts1
        .iter()
        .zip(&counts0)
        .zip(&existing)
        .filter(|(_, was)| **was)
        .map(|((a, b), _)| std::array::from_fn(|k| a[k] - b[k]))
        .collect();
    let m = deltas.len().max(1) as f64;
    let totals: Vec<u64> = deltas.iter().map(|d| d.iter().sum()).collect();
    let by_kind = PRESENCE_EVENTS
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let max = deltas.iter().map(|d| d[k]).max().unwrap_or(0);
            let mean = round2(deltas.iter().map(|d| d[k]).sum::<u64>() as f64 / m);
            (*name, KindCount { max, mean })
        })
        .collect();
    let redis_commandstats = r2
        .commandstats
        .iter()
        .map(|(name, calls)| (name.clone(), calls - r1.commandstats.get(name).copied().unwrap_or(0)))
        .filter(|(_, d)| *d > 0)
        .collect();
    let storm = Storm {
        clients: n,
        joined: acked.load(Relaxed),
        failed: failed.load(Relaxed),
        dropped: dropped.load(Relaxed),
        first_error: first_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        join_s: round2(join_s),
        leave_s: round2(leave_s),
        window_s: round2(window_s),
        idle_s: round2(idle_s),
        redis_commands: commands.map(|c| c as u64),
        redis_idle_commands_per_s: idle_rate.map(round1),
        redis_commands_above_idle: commands.zip(idle_rate).map(|(c, r)| round1(c - r * window_s)),
        redis_commandstats,
        redis_cpu_s: r2.redis_cpu.zip(r1.redis_cpu).map(|(a, b)| round2(a - b)),
        per_instance,
        existing_clients: deltas.len(),
        events_per_client_max: totals.iter().copied().max().unwrap_or(0),
        events_per_client_mean: round2(totals.iter().sum::<u64>() as f64 / m),
        by_kind,
        disconnects: s.shared().disconnects.load(Relaxed) - disc0,
    };
    eprintln!("    storm: {}", compact(&storm));
    Ok(storm)
}

/// The checks on what scenario 8 measured: every storm client joined and stayed until it left,
/// no existing subscriber
/// was disconnected by the storm, and a session without presence received no presence event.
/// The fan-out's own losses and errors are checked with every scenario's (`scenarios::check`).
pub fn problems(server: &str, v: &Presence, smoke: bool, out: &mut Vec<String>) {
    let st = &v.storm;
    if st.failed > 0 {
        out.push(format!("{server} s8: {} of {} storm clients failed: {:?}", st.failed, st.clients, st.first_error));
    }
    if st.dropped > 0 {
        out.push(format!("{server} s8: {} storm clients lost their connection before leaving", st.dropped));
    }
    if smoke && st.disconnects > 0 {
        out.push(format!("{server} s8: {} subscribers disconnected during the storm", st.disconnects));
    }
    for r in v.fanout.iter().filter(|r| !r.presence && r.presence_events > 0) {
        out.push(format!("{server} s8: {} presence events to clients subscribed without presence", r.presence_events));
    }
}

/// One storm client: connects as `user` and subscribes to c0 with presence.
async fn join(
    addr: std::net::SocketAddr,
    key: &jsonwebtoken::EncodingKey,
    ws_config: tokio_tungstenite::tungstenite::protocol::WebSocketConfig,
    user: &str,
) -> Result<proto::Ws, String> {
    let mut ws = proto::open(addr, ws_config).await?;
    proto::send_connect(&mut ws, key, user).await?;
    proto::connected(&mut ws).await?;
    ws.send(Message::text(proto::subscribe_frame(0, true))).await.map_err(|e| format!("send subscribe: {e}"))?;
    loop {
        let t = proto::next_text(&mut ws).await?;
        if t == "2" {
            ws.send(Message::text("3")).await.map_err(|e| format!("send pong: {e}"))?;
        } else if let Some(rest) = t.strip_prefix("431") {
            return if proto::ack_ok(&rest) {
                Ok(ws)
            } else {
                Err(format!("subscribe refused: {}", proto::short(&rest)))
            };
        } else if proto::presence_kind(&t).is_none() {
            return Err(format!("expected the subscribe ack, got {}", proto::short(&t)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_calls_per_command() {
        let text = "# Commandstats\r\ncmdstat_evalsha:calls=12,usec=340,usec_per_call=28.33,rejected_calls=0\r\n\
                    cmdstat_info:calls=3,usec=90\r\ncmdstat_bad:usec=1\r\n";
        let m = commandstats(text);
        assert_eq!(m.get("evalsha"), Some(&12));
        assert_eq!(m.get("info"), Some(&3));
        assert_eq!(m.len(), 2);
    }
}
