//! The command line (`Cli`, what `--help` shows) and the settings a run uses (`Cfg`), with the
//! defaults of a full run and of `--smoke` resolved in one place (`resolve`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;

use crate::servers::Kind;

/// Load generator for herald (Socket.IO gateway), the Node reference and the floor server.
#[derive(Parser, Debug)]
#[command(name = "herald-bench", version)]
pub struct Cli {
    /// Scenarios to run: `all` or a comma-separated list of 1..8 (with --smoke, `all` is 1..7).
    #[arg(long, default_value = "all")]
    pub scenario: String,
    /// Servers to run against, comma-separated: herald,node,floor [default: all three; herald with --smoke].
    #[arg(long)]
    pub server: Option<String>,
    /// Clients in scenarios 1-4 [default: 10000; 200 with --smoke].
    #[arg(long)]
    pub clients: Option<u32>,
    /// Clients in scenario 5 (the ramp) [default: 2000; 200 with --smoke].
    #[arg(long)]
    pub ramp_clients: Option<u32>,
    /// Seconds of traffic in scenarios 2-4 [default: 60; 3 with --smoke].
    #[arg(long)]
    pub duration: Option<f64>,
    /// Events per second in scenarios 2, 3 and 4 [default: 5 for 2 and 4, 500 for 3].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds per step of the ramp (scenario 5) [default: 5; 2 with --smoke].
    #[arg(long)]
    pub step_duration: Option<f64>,
    /// Event rates of the ramp steps, comma-separated [default: 5,10,15,20,25,35,50,75,100,125,150,200,300,400,600,800,1600,3200; 25,50 with --smoke].
    #[arg(long)]
    pub ramp_rates: Option<String>,
    /// A ramp step passes when its p99 latency is below this (and nothing was lost).
    #[arg(long, default_value_t = 100.0)]
    pub p99_limit_ms: f64,
    /// Campaigns in scenarios 3 and 6 (clients are spread evenly over them).
    #[arg(long, default_value_t = 100)]
    pub campaigns: u32,
    /// Scenario 6: numbers of herald instances, comma-separated [default: 1,2,4; 2 with --smoke].
    #[arg(long)]
    pub fleet_instances: Option<String>,
    /// Scenario 6: log shard counts, comma-separated; 1 is one stream, the design before the
    /// sharded log [default: 64,1; 64 with --smoke].
    #[arg(long)]
    pub fleet_shards: Option<String>,
    /// Scenario 6: clients over all the instances [default: 10000; 200 with --smoke].
    #[arg(long)]
    pub fleet_clients: Option<u32>,
    /// Scenario 6: events per second of the mix, over every campaign [default: 100; 50 with --smoke].
    #[arg(long)]
    pub fleet_rate: Option<f64>,
    /// Scenario 6: seconds of each phase [default: 10; 2 with --smoke].
    #[arg(long)]
    pub fleet_phase: Option<f64>,
    /// Scenario 7: persistent clients (kept at this number while they churn) [default: 1000; 200 with --smoke].
    #[arg(long)]
    pub soak_clients: Option<u32>,
    /// Scenario 7: per second, this many clients of each kind: leaving, arriving, cut mid-handshake,
    /// cut mid-subscribe, dropped (RST) and coming back with `since` [default: 5; 3 with --smoke].
    #[arg(long)]
    pub soak_churn: Option<u32>,
    /// Scenario 7: events per second, published one request at a time [default: 20; 10 with --smoke].
    #[arg(long)]
    pub soak_rate: Option<f64>,
    /// Scenario 7: seconds of churn [default: 600; 20 with --smoke].
    #[arg(long)]
    pub soak_duration: Option<f64>,
    /// Scenario 7: campaigns the clients are spread over (client i in `c<i % n>`).
    #[arg(long, default_value_t = 4)]
    pub soak_campaigns: u32,
    /// Scenario 8: presence subscribers of campaign c0 over two instances [default: 10000; 200 with --smoke].
    #[arg(long)]
    pub presence_clients: Option<u32>,
    /// Scenario 8: clients of the join/leave storm, all connecting within one second [default: 1000; 50 with --smoke].
    #[arg(long)]
    pub presence_storm: Option<u32>,
    /// Scenario 8: rounds of the fan-out comparison, each one session with presence and one
    /// without, in alternating order [default: 2; 1 with --smoke].
    #[arg(long)]
    pub presence_rounds: Option<u32>,
    /// Scenario 8: seconds of traffic per fan-out session, at `--rate` (5) ev/s [default: 20; 3 with --smoke].
    #[arg(long)]
    pub presence_duration: Option<f64>,
    /// Tiny run for CI: 200 clients, 2-3 s per scenario, herald only; exits non-zero on any loss,
    /// duplicate, protocol error, failed connection or failed publish. Never a timed assertion.
    #[arg(long)]
    pub smoke: bool,
    /// herald binary [default: `herald` next to this executable].
    #[arg(long)]
    pub herald_bin: Option<PathBuf>,
    /// Prepared copy of the Node reference (with node_modules).
    #[arg(long, default_value = "/tmp/node-baseline")]
    pub node_dir: PathBuf,
    #[arg(long, default_value = "node")]
    pub node_bin: String,
    /// Built floor server.
    #[arg(long, default_value = "/tmp/floor/target/release/floor")]
    pub floor_bin: PathBuf,
    #[arg(long, default_value = "redis-server")]
    pub redis_bin: String,
    /// CPUs the servers (and redis) are pinned to with taskset.
    #[arg(long, default_value = "0")]
    pub server_cpus: String,
    /// Do not pin the servers.
    #[arg(long)]
    pub no_pin: bool,
    /// Client handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Concurrent publish requests (keep-alive connections).
    #[arg(long, default_value_t = 16)]
    pub publishers: usize,
    /// WebSocket read buffer per client, bytes.
    #[arg(long, default_value_t = 4096)]
    pub read_buffer: usize,
    /// Keep the temporary directory (server logs, fixtures).
    #[arg(long)]
    pub keep_tmp: bool,
    /// Also write the final JSON line to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
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
    pub fleet: FleetCfg,
    pub soak: SoakCfg,
    pub presence: PresenceCfg,
    pub smoke: bool,
    pub settle: Duration,
    pub quiet: Duration,
    pub connect_concurrency: usize,
    pub publishers: usize,
    pub read_buffer: usize,
}

/// Scenario 6's settings.
pub struct FleetCfg {
    pub instances: Vec<usize>,
    pub shards: Vec<u32>,
    pub clients: u32,
    pub rate: f64,
    pub phase_s: f64,
}

/// Scenario 7's settings.
pub struct SoakCfg {
    pub clients: u32,
    pub churn: u32,
    pub rate: f64,
    pub duration_s: f64,
    pub campaigns: u32,
}

/// Scenario 8's settings.
pub struct PresenceCfg {
    pub clients: u32,
    pub storm: u32,
    pub rounds: u32,
    pub duration_s: f64,
}

fn list<T: std::str::FromStr>(what: &str, given: &Option<String>, default: &str) -> Result<Vec<T>> {
    let s = given.as_deref().unwrap_or(default);
    s.split(',').map(|x| x.trim().parse::<T>().map_err(|_| anyhow::anyhow!("bad {what} {x:?}"))).collect()
}

pub fn resolve(cli: &Cli) -> Result<Cfg> {
    let smoke = cli.smoke;
    let scenarios: Vec<u8> = if cli.scenario.trim() == "all" {
        // Scenario 8's short form would add about 22 s to the smoke run: it runs there only when named.
        if smoke { vec![1, 2, 3, 4, 5, 6, 7] } else { vec![1, 2, 3, 4, 5, 6, 7, 8] }
    } else {
        let mut v = Vec::new();
        for s in cli.scenario.split(',') {
            let n: u8 = s.trim().parse().with_context(|| format!("bad scenario {s:?}"))?;
            if !(1..=8).contains(&n) {
                bail!("scenario {n} does not exist (1..8)");
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
    let fleet = FleetCfg {
        instances: list("instance count", &cli.fleet_instances, if smoke { "2" } else { "1,2,4" })?,
        shards: list("shard count", &cli.fleet_shards, if smoke { "64" } else { "64,1" })?,
        clients: cli.fleet_clients.unwrap_or(if smoke { 200 } else { 10_000 }),
        rate: cli.fleet_rate.unwrap_or(if smoke { 50.0 } else { 100.0 }),
        phase_s: cli.fleet_phase.unwrap_or(if smoke { 2.0 } else { 10.0 }),
    };
    if fleet.instances.iter().any(|n| !(1..=16).contains(n))
        || fleet.shards.iter().any(|s| !(1..=1024).contains(s))
        || fleet.clients == 0
        || !rate_check(fleet.rate)
        || !rate_check(fleet.phase_s)
    {
        bail!("scenario 6 needs 1..16 instances, 1..1024 shards, clients, and a positive rate and phase");
    }
    let soak = SoakCfg {
        clients: cli.soak_clients.unwrap_or(if smoke { 200 } else { 1_000 }),
        churn: cli.soak_churn.unwrap_or(if smoke { 3 } else { 5 }),
        rate: cli.soak_rate.unwrap_or(if smoke { 10.0 } else { 20.0 }),
        duration_s: cli.soak_duration.unwrap_or(if smoke { 20.0 } else { 600.0 }),
        campaigns: cli.soak_campaigns,
    };
    if soak.clients == 0
        || !(1..=1000).contains(&soak.campaigns)
        || soak.churn > soak.clients
        || !rate_check(soak.rate)
        || !rate_check(soak.duration_s)
    {
        bail!(
            "scenario 7 needs clients, 1..1000 campaigns, a churn of at most the clients, a positive rate and duration"
        );
    }
    let presence = PresenceCfg {
        clients: cli.presence_clients.unwrap_or(if smoke { 200 } else { 10_000 }),
        storm: cli.presence_storm.unwrap_or(if smoke { 50 } else { 1_000 }),
        rounds: cli.presence_rounds.unwrap_or(if smoke { 1 } else { 2 }),
        duration_s: cli.presence_duration.unwrap_or(if smoke { 3.0 } else { 20.0 }),
    };
    if presence.clients < 2 || presence.storm == 0 || presence.rounds == 0 || !rate_check(presence.duration_s) {
        bail!("scenario 8 needs at least 2 clients, a storm, a round and a positive duration");
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
        fleet,
        soak,
        presence,
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
