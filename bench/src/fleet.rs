//! Scenario 6, the fleet: herald instances over a private Redis Cluster of three masters. Each
//! instance holds the subscribers of its own campaigns (campaign `c` on instance `c % n`), and
//! each event is published through the instance that serves its campaign. For every number of
//! instances and every shard count (the sharded log, and `1`: one stream, herald's design
//! before the log was sharded), on fresh servers, three kinds of phase:
//! - idle: nothing is published; each instance's baseline CPU;
//! - mix: the fixed mix over every campaign; per instance, the log entries it read against the
//!   events its sockets needed, and its CPU per delivered event; per Redis node, commands/s;
//! - others (one per instance, when there are several): only the mix's events that instance's
//!   sockets do not want, at their rate in the mix; its CPU above idle is what the mix's
//!   unwanted events cost it, reported as a share of its CPU in the mix.
//!
//! CPU times are read from `/proc/<pid>/task/*/schedstat` (nanoseconds, where clock ticks would
//! be too coarse), and the instances ping their clients every 10 minutes instead of every 25 s,
//! so that a burst of pings does not fall into one phase and not the one it is compared with.

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::results::{Setup, Traffic, compact, round1, round2};
use crate::servers;
use crate::session::{Bench, Session};
use crate::stats;

/// What scenario 6 measured: one run per (shards, instances).
#[derive(Debug, Serialize)]
pub struct Fleet {
    pub campaigns: u32,
    pub clients: u32,
    pub events_per_s: f64,
    pub phase_s: f64,
    pub runs: Vec<FleetRun>,
}

#[derive(Debug, Serialize)]
pub struct FleetRun {
    pub shards: u32,
    pub instances: usize,
    pub setup: Setup,
    pub mix: Traffic,
    /// The "others" phases, one per instance (none with one instance).
    pub others: Vec<Traffic>,
    pub per_instance: Vec<FleetInstance>,
    pub redis_nodes: Vec<FleetNode>,
    /// The largest `read_over_needed` of the instances (target: within 2).
    pub read_over_needed_max: Option<f64>,
    /// The largest `unwanted_cpu_pct` of the instances (target: under 5).
    pub unwanted_cpu_pct_max: Option<f64>,
    /// The busiest Redis node's commands/s over the idlest's, in the mix (target: within 2).
    pub node_commands_max_over_min: Option<f64>,
}

/// One instance, in the mix (and, for the unwanted CPU, its "others" phase).
#[derive(Debug, Serialize)]
pub struct FleetInstance {
    pub shards_followed: Option<u64>,
    pub entries_read: Option<u64>,
    pub events_needed: u64,
    pub read_over_needed: Option<f64>,
    pub deliveries: u64,
    pub cpu_s: Option<f64>,
    pub cpu_us_per_delivery: Option<f64>,
    pub idle_cpu_pct: Option<f64>,
    /// CPU above idle in its "others" phase; can be slightly negative when it is within noise.
    pub unwanted_cpu_s: Option<f64>,
    pub unwanted_cpu_pct: Option<f64>,
}

/// One Redis master, in the mix.
#[derive(Debug, Serialize)]
pub struct FleetNode {
    pub port: u16,
    pub commands_per_s: Option<f64>,
    pub cpu_pct: Option<f64>,
}

/// Runs every (shards, instances) of the settings, each on fresh servers.
pub async fn scenario_6(b: &Bench) -> Result<Fleet> {
    let f = &b.cfg.fleet;
    let mut runs = Vec::new();
    for &shards in &f.shards {
        for &n in &f.instances {
            eprintln!("  [herald] scenario 6: {n} instance(s), {shards} shard(s), Redis Cluster of 3 masters");
            runs.push(one_run(b, shards, n).await?);
        }
    }
    Ok(Fleet { campaigns: b.cfg.campaigns, clients: f.clients, events_per_s: f.rate, phase_s: f.phase_s, runs })
}

async fn one_run(b: &Bench, shards: u32, n: usize) -> Result<FleetRun> {
    let (f, camps) = (&b.cfg.fleet, b.cfg.campaigns);
    let owner = move |c: u32| (c as usize) % n;
    let mut s = Session::start_on_cluster(b, n, camps, shards).await?;
    s.publish_through(owner);
    let setup = s.connect(f.clients, |i| (i % camps, owner(i % camps))).await;
    eprintln!("    setup: {}", compact(&setup));

    let r0 = Reading::take(&s).await;
    tokio::time::sleep(std::time::Duration::from_secs_f64(f.phase_s)).await;
    let r1 = Reading::take(&s).await;
    let idle_rate: Vec<Option<f64>> = (0..n).map(|k| r1.cpu_rate_since(&r0, k)).collect();

    let all: Vec<u32> = (0..camps).collect();
    let r0 = Reading::take(&s).await;
    let mix = s.traffic(f.rate, f.phase_s, &all).await;
    let r1 = Reading::take(&s).await;
    let by_instance = s.last_phase_by_instance();
    eprintln!("    mix: {}", compact(&mix));

    let mut per_instance = Vec::new();
    for k in 0..n {
        let cpu = r1.cpu[k].zip(r0.cpu[k]).map(|(a, b)| a - b);
        let entries = r1.entries[k].zip(r0.entries[k]).map(|(a, b)| a.saturating_sub(b));
        let (deliveries, needed) = by_instance[k];
        per_instance.push(FleetInstance {
            shards_followed: r1.followed[k],
            entries_read: entries,
            events_needed: needed,
            read_over_needed: entries.filter(|_| needed > 0).map(|e| round2(e as f64 / needed as f64)),
            deliveries,
            cpu_s: cpu.map(round2),
            cpu_us_per_delivery: cpu.filter(|_| deliveries > 0).map(|c| round2(c * 1e6 / deliveries as f64)),
            idle_cpu_pct: idle_rate[k].map(|r| round2(100.0 * r)),
            unwanted_cpu_s: None,
            unwanted_cpu_pct: None,
        });
    }
    let secs = r1.at.duration_since(r0.at).as_secs_f64();
    let redis_nodes: Vec<FleetNode> = s
        .redis_nodes()
        .iter()
        .enumerate()
        .map(|(j, node)| FleetNode {
            port: node.port,
            commands_per_s: r1.commands[j].zip(r0.commands[j]).map(|(a, b)| round1((a - b) / secs)),
            cpu_pct: r1.redis_cpu[j].zip(r0.redis_cpu[j]).map(|(a, b)| round1(100.0 * (a - b) / secs)),
        })
        .collect();

    let mut others = Vec::new();
    if n > 1 {
        for (k, inst) in per_instance.iter_mut().enumerate() {
            let theirs: Vec<u32> = all.iter().copied().filter(|&c| owner(c) != k).collect();
            let rate = f.rate * theirs.len() as f64 / camps as f64;
            let r0 = Reading::take(&s).await;
            let t = s.traffic(rate, f.phase_s, &theirs).await;
            let r1 = Reading::take(&s).await;
            let elapsed = r1.at.duration_since(r0.at).as_secs_f64();
            let above_idle = r1.cpu[k].zip(r0.cpu[k]).zip(idle_rate[k]).map(|((a, b), idle)| a - b - idle * elapsed);
            inst.unwanted_cpu_s = above_idle.map(round2);
            inst.unwanted_cpu_pct =
                above_idle.zip(inst.cpu_s).filter(|(_, mix)| *mix > 0.0).map(|(u, mix)| round1(100.0 * u / mix));
            eprintln!("    others of instance {k}: {} ev/s, unwanted CPU {:?} s", round1(rate), inst.unwanted_cpu_s);
            others.push(t);
        }
    }
    s.stop().await;

    let max = |v: Vec<Option<f64>>| v.into_iter().flatten().reduce(f64::max);
    let cmds: Vec<f64> = redis_nodes.iter().filter_map(|r| r.commands_per_s).collect();
    let (highest, lowest) = (cmds.iter().copied().reduce(f64::max), cmds.iter().copied().reduce(f64::min));
    Ok(FleetRun {
        shards,
        instances: n,
        read_over_needed_max: max(per_instance.iter().map(|i| i.read_over_needed).collect()),
        unwanted_cpu_pct_max: if n > 1 { max(per_instance.iter().map(|i| i.unwanted_cpu_pct).collect()) } else { None },
        node_commands_max_over_min: highest.zip(lowest).filter(|(_, lo)| *lo > 0.0).map(|(hi, lo)| round2(hi / lo)),
        setup,
        mix,
        others,
        per_instance,
        redis_nodes,
    })
}

/// Every instance's CPU time and fleet metrics, and every Redis node's command count and CPU
/// time, at one moment.
struct Reading {
    at: Instant,
    cpu: Vec<Option<f64>>,
    entries: Vec<Option<u64>>,
    followed: Vec<Option<u64>>,
    commands: Vec<Option<f64>>,
    redis_cpu: Vec<Option<f64>>,
}

impl Reading {
    async fn take(s: &Session<'_>) -> Reading {
        let mut r = Reading {
            at: Instant::now(),
            cpu: Vec::new(),
            entries: Vec::new(),
            followed: Vec::new(),
            commands: Vec::new(),
            redis_cpu: Vec::new(),
        };
        for inst in s.instances() {
            r.cpu.push(stats::proc_cpu_fine_s(inst.proc.pid));
            let text = inst.metrics().await;
            let metric = |name: &str| text.as_deref().and_then(|t| servers::metric_value(t, name));
            r.entries.push(metric("herald_fleet_entries_read_total"));
            r.followed.push(metric("herald_fleet_shards_followed"));
        }
        for node in s.redis_nodes() {
            r.commands.push(servers::info_number(node.port, "stats", "total_commands_processed").await);
            r.redis_cpu.push(stats::proc_cpu_fine_s(node.proc.pid));
        }
        r
    }

    /// Instance `k`'s CPU seconds per second since `before`.
    fn cpu_rate_since(&self, before: &Reading, k: usize) -> Option<f64> {
        let secs = self.at.duration_since(before.at).as_secs_f64();
        self.cpu[k].zip(before.cpu[k]).filter(|_| secs > 0.0).map(|(a, b)| (a - b) / secs)
    }
}
