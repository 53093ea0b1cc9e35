//! A run: the process's limits and CPUs, the servers' environment and fixtures, every scenario
//! against every server, then the tables and the JSON document on stdout.

use std::collections::BTreeMap;

use anyhow::{Context, Result};

use crate::cli::{Cli, resolve};
use crate::results::{Document, RunConfig, ServerResults};
use crate::servers::{self, Env, Kind};
use crate::session::Bench;
use crate::{report, scenarios, soak};

/// Runs the chosen scenarios against the chosen servers; `Ok(false)` when any check failed.
pub async fn run(cli: Cli) -> Result<bool> {
    let cfg = resolve(&cli)?;
    let nofile = raise_nofile();
    let need = cfg.clients.max(cfg.ramp_clients).max(cfg.fleet.clients).max(cfg.soak.clients) as u64 + 200;
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
    let mut users = cfg.clients.max(cfg.ramp_clients).max(cfg.fleet.clients);
    if cfg.scenarios.contains(&8) {
        users = users.max(cfg.presence.clients + cfg.presence.storm);
    }
    let mut rows = servers::membership_rows(users, cfg.campaigns);
    if cfg.scenarios.contains(&7) {
        rows.extend(soak::membership_rows(&cfg.soak));
    }
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
    let mut results = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    for &kind in &cfg.servers {
        let name = kind.name();
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
            results.insert(name, ServerResults::Missing { error: m });
            continue;
        }
        eprintln!("== {name}");
        let res = scenarios::on_server(&b, kind, &mut failures).await;
        scenarios::check(cfg, name, &res, &mut failures);
        results.insert(name, ServerResults::Ran(Box::new(res)));
    }

    report::print_tables(cfg, &results);
    let ok = failures.is_empty();
    let doc = Document {
        tool: "herald-bench",
        smoke: cfg.smoke,
        config: RunConfig {
            clients: cfg.clients,
            ramp_clients: cfg.ramp_clients,
            duration_s: cfg.duration,
            rate_one_campaign: cfg.rate_one,
            rate_many_campaigns: cfg.rate_many,
            campaigns_s3: cfg.campaigns,
            ramp_rates: cfg.ramp_rates.clone(),
            ramp_step_s: cfg.step,
            p99_limit_ms: cfg.p99_limit_ms,
            server_cpus: b.env.pin.clone(),
            generator_cpus: cpus,
            nofile,
        },
        results,
        failures,
        ok,
    };
    let line = serde_json::to_string(&doc)?;
    if let Some(p) = &cli.json_out {
        std::fs::write(p, format!("{line}\n"))?;
    }
    if !doc.failures.is_empty() {
        eprintln!("FAILURES:");
        for f in &doc.failures {
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
