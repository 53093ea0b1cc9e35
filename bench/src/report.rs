//! Human-readable tables, one per scenario, rows per server (stdout). Past 500 lines: one
//! function per scenario's tables, all on the one `Table` and its formatting helpers.

use std::collections::BTreeMap;
use std::fmt::Display;

use crate::cli::Cfg;
use crate::proto::PRESENCE_EVENTS;
use crate::results::{Outcome, Scenarios, ServerResults, Traffic};
use crate::soak::Soak;
use crate::stats::Latency;

/// A figure with `decimals` decimals; "-" when there is none.
fn fixed(x: impl Into<Option<f64>>, decimals: usize) -> String {
    match x.into() {
        Some(x) if x.is_finite() => format!("{x:.decimals$}"),
        _ => "-".to_string(),
    }
}

fn int(x: impl Display) -> String {
    x.to_string()
}

fn yes_no(b: impl Into<Option<bool>>) -> String {
    match b.into() {
        Some(b) => if b { "yes" } else { "no" }.to_string(),
        None => "-".to_string(),
    }
}

fn mib(kib: Option<u64>) -> String {
    match kib {
        Some(k) => format!("{:.1}", k as f64 / 1024.0),
        None => "-".into(),
    }
}

fn p50(l: Option<Latency>) -> Option<f64> {
    l.map(|l| l.p50_ms)
}

fn p99(l: Option<Latency>) -> Option<f64> {
    l.map(|l| l.p99_ms)
}

struct Table {
    title: String,
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(title: String, head: &[&str]) -> Self {
        Table { title, head: head.iter().map(|s| s.to_string()).collect(), rows: Vec::new() }
    }

    fn print(&self) {
        println!("\n{}", self.title);
        let n = self.head.len();
        let mut w: Vec<usize> = self.head.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let s: Vec<String> =
                cells
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        if i == 0 { format!("{c:<width$}", width = w[i]) } else { format!("{c:>width$}", width = w[i]) }
                    })
                    .collect();
            println!("| {} |", s.join(" | "));
        };
        line(&self.head);
        println!("|{}|", w.iter().map(|x| "-".repeat(x + 2)).collect::<Vec<_>>().join("|"));
        for r in &self.rows {
            if r.len() == 1 {
                println!("| {} |", r[0]);
            } else {
                line(r);
            }
        }
    }
}

/// A server's entry for one scenario: its figures, or the message its row shows instead (why
/// the server or the scenario could not run, or why the scenario does not apply). `None` when
/// the scenario was not run.
fn entry<'a, T>(
    r: &'a ServerResults,
    pick: impl FnOnce(&'a Scenarios) -> &'a Option<Outcome<T>>,
) -> Option<Result<&'a T, String>> {
    let first_line = |e: &str| format!("ERROR: {}", e.lines().next().unwrap_or(""));
    let s = match r {
        ServerResults::Missing { error } => return Some(Err(first_line(error))),
        ServerResults::Ran(s) => s,
    };
    match pick(s).as_ref()? {
        Outcome::Done(v) => Some(Ok(v)),
        Outcome::Error { error } => Some(Err(first_line(error))),
        Outcome::NotApplicable { na } => Some(Err(format!("n/a: {na}"))),
    }
}

const TRAFFIC_HEAD: &[&str] = &[
    "server",
    "ev/s",
    "subs",
    "events",
    "deliv/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
    "lost",
    "dup",
    "srv µs/deliv",
    "srv CPU%",
    "gen CPU%",
];

fn traffic_row(server: &str, t: &Traffic) -> Vec<String> {
    vec![
        server.to_string(),
        fixed(t.target_events_per_s, 0),
        int(t.subscribers),
        int(t.events_accepted),
        fixed(t.deliveries_per_s, 0),
        fixed(t.latency_ms.p50_ms, 2),
        fixed(t.latency_ms.p90_ms, 2),
        fixed(t.latency_ms.p99_ms, 2),
        fixed(t.latency_ms.max_ms, 2),
        int(t.lost),
        int(t.duplicates),
        fixed(t.server_cpu_us_per_delivery, 2),
        fixed(t.server_cpu_pct, 1),
        fixed(t.generator_cpu_pct, 1),
    ]
}

pub fn print_tables(cfg: &Cfg, results: &BTreeMap<&str, ServerResults>) {
    // rows in the order the servers ran
    let servers: Vec<(String, &ServerResults)> =
        cfg.servers.iter().filter_map(|k| results.get(k.name()).map(|v| (k.name().to_string(), v))).collect();
    let servers = &servers;
    let want = |n: u8| cfg.scenarios.contains(&n);

    if want(1) {
        let mut t = Table::new(
            format!("Scenario 1: {} idle clients, all subscribed to one campaign (c0)", cfg.clients),
            &[
                "server",
                "subscribed",
                "failed",
                "setup s",
                "conn/s",
                "RSS before MiB",
                "RSS subscribed MiB",
                "KiB/conn",
                "RSS after S2 MiB",
                "KiB/conn after S2",
            ],
        );
        for (name, r) in servers.iter() {
            let v = match entry(r, |s| &s.s1) {
                None => continue,
                Some(Err(s)) => {
                    t.rows.push(vec![format!("{name}: {s}")]);
                    continue;
                }
                Some(Ok(v)) => v,
            };
            t.rows.push(vec![
                name.clone(),
                int(v.setup.subscribed),
                int(v.setup.connect_failures),
                fixed(v.setup.setup_s, 2),
                fixed(v.setup.connections_per_s, 0),
                mib(v.setup.rss_before_kib),
                mib(v.setup.rss_subscribed_kib),
                fixed(v.setup.rss_per_conn_kib, 2),
                mib(v.rss_after_traffic_kib),
                fixed(v.rss_after_traffic_per_conn_kib, 2),
            ]);
        }
        t.print();
    }

    for (n, title) in [
        (
            2,
            format!(
                "Scenario 2: {} subscribers in one campaign, {} ev/s for {} s",
                cfg.clients, cfg.rate_one, cfg.duration
            ),
        ),
        (
            3,
            format!(
                "Scenario 3: {} campaigns x {} subscribers, {} ev/s spread over them, {} s",
                cfg.campaigns,
                cfg.clients / cfg.campaigns,
                cfg.rate_many,
                cfg.duration
            ),
        ),
    ] {
        if !want(n) {
            continue;
        }
        let mut t = Table::new(title, TRAFFIC_HEAD);
        for (name, r) in servers.iter() {
            match entry(r, |s| if n == 2 { &s.s2 } else { &s.s3 }) {
                None => {}
                Some(Err(s)) => t.rows.push(vec![format!("{name}: {s}")]),
                Some(Ok(v)) => t.rows.push(traffic_row(name, &v.traffic)),
            }
        }
        t.print();
    }

    if want(4) {
        let mut t = Table::new(
            format!(
                "Scenario 4: scenario 2 over 2 instances + Redis ({} clients, half on each; published to instance 0)",
                cfg.clients
            ),
            TRAFFIC_HEAD,
        );
        let mut split = Table::new(
            "Scenario 4: near (publishing instance) vs far instance".into(),
            &["server", "near p50", "near p99", "far p50", "far p99", "far-near p50 ms", "redis CPU s", "disconnects"],
        );
        for (name, r) in servers.iter() {
            let v = match entry(r, |s| &s.s4) {
                None => continue,
                Some(Err(s)) => {
                    t.rows.push(vec![format!("{name}: {s}")]);
                    split.rows.push(vec![format!("{name}: {s}")]);
                    continue;
                }
                Some(Ok(v)) => v,
            };
            let tr = &v.traffic;
            t.rows.push(traffic_row(name, tr));
            split.rows.push(vec![
                name.clone(),
                fixed(p50(tr.latency_near_ms), 2),
                fixed(p99(tr.latency_near_ms), 2),
                fixed(p50(tr.latency_far_ms), 2),
                fixed(p99(tr.latency_far_ms), 2),
                fixed(tr.cross_instance_p50_ms, 2),
                fixed(tr.redis_cpu_s, 2),
                int(tr.disconnects),
            ]);
        }
        t.print();
        split.print();
    }

    if want(5) {
        let mut t = Table::new(
            format!(
                "Scenario 5: ramp, {} subscribers in one campaign, {} s per step (pass: p99 < {} ms, no loss)",
                cfg.ramp_clients, cfg.step, cfg.p99_limit_ms
            ),
            &[
                "server",
                "ev/s",
                "deliv/s",
                "p50 ms",
                "p99 ms",
                "max ms",
                "lost",
                "srv µs/deliv",
                "srv CPU%",
                "gen CPU%",
                "pass",
            ],
        );
        let mut summary = Table::new(
            "Scenario 5: highest delivery rate sustained".into(),
            &["server", "deliv/s", "at ev/s", "gen CPU% there", "generator-bound", "stopped at"],
        );
        for (name, r) in servers.iter() {
            let v = match entry(r, |s| &s.s5) {
                None => continue,
                Some(Err(s)) => {
                    t.rows.push(vec![format!("{name}: {s}")]);
                    summary.rows.push(vec![format!("{name}: {s}")]);
                    continue;
                }
                Some(Ok(v)) => v,
            };
            for st in &v.steps {
                let tr = &st.traffic;
                t.rows.push(vec![
                    name.clone(),
                    fixed(tr.target_events_per_s, 0),
                    fixed(tr.deliveries_per_s, 0),
                    fixed(tr.latency_ms.p50_ms, 2),
                    fixed(tr.latency_ms.p99_ms, 2),
                    fixed(tr.latency_ms.max_ms, 2),
                    int(tr.lost),
                    fixed(tr.server_cpu_us_per_delivery, 2),
                    fixed(tr.server_cpu_pct, 1),
                    fixed(tr.generator_cpu_pct, 1),
                    yes_no(st.pass),
                ]);
            }
            summary.rows.push(vec![
                name.clone(),
                fixed(v.max_sustained_deliveries_per_s, 0),
                fixed(v.max_sustained_events_per_s, 0),
                fixed(v.generator_cpu_pct_at_max, 1),
                yes_no(v.generator_bound_at_max),
                v.stopped_at.clone().unwrap_or_else(|| "(all steps passed)".to_string()),
            ]);
        }
        t.print();
        summary.print();
    }
    if want(6) {
        fleet_tables(cfg, servers);
    }
    if want(7) {
        soak_tables(cfg, servers);
    }
    if want(8) {
        presence_tables(cfg, servers);
    }
    println!();
}

fn fleet_tables(cfg: &Cfg, servers: &[(String, &ServerResults)]) {
    let f = &cfg.fleet;
    let mut t = Table::new(
        format!(
            "Scenario 6: herald instances on a 3-master Redis Cluster, {} clients over {} campaigns (campaign c \
             on instance c mod n), {} ev/s over every campaign, {} s phases; per instance",
            f.clients, cfg.campaigns, f.rate, f.phase_s
        ),
        &[
            "shards",
            "instances",
            "instance",
            "shards followed",
            "entries read",
            "events needed",
            "read/needed",
            "deliveries",
            "µs CPU/deliv",
            "idle CPU%",
            "unwanted CPU%",
        ],
    );
    let mut sum = Table::new(
        "Scenario 6: per run (targets: read/needed within 2, unwanted CPU under 5%, Redis nodes within 2x)".into(),
        &[
            "shards",
            "instances",
            "read/needed max",
            "unwanted CPU% max",
            "Redis commands/s per node",
            "busiest/idlest",
            "p50 ms",
            "p99 ms",
            "lost",
            "dup",
        ],
    );
    for (name, r) in servers {
        let v = match entry(r, |s| &s.s6) {
            None => continue,
            Some(Err(s)) => {
                sum.rows.push(vec![format!("{name}: {s}")]);
                continue;
            }
            Some(Ok(v)) => v,
        };
        for run in &v.runs {
            for (k, i) in run.per_instance.iter().enumerate() {
                t.rows.push(vec![
                    int(run.shards),
                    int(run.instances),
                    int(k),
                    i.shards_followed.map(int).unwrap_or_else(|| "-".into()),
                    i.entries_read.map(int).unwrap_or_else(|| "-".into()),
                    int(i.events_needed),
                    fixed(i.read_over_needed, 2),
                    int(i.deliveries),
                    fixed(i.cpu_us_per_delivery, 2),
                    fixed(i.idle_cpu_pct, 2),
                    fixed(i.unwanted_cpu_pct, 1),
                ]);
            }
            let nodes: Vec<String> = run.redis_nodes.iter().map(|n| fixed(n.commands_per_s, 0)).collect();
            let phases = std::iter::once(&run.mix).chain(&run.others);
            sum.rows.push(vec![
                int(run.shards),
                int(run.instances),
                fixed(run.read_over_needed_max, 2),
                fixed(run.unwanted_cpu_pct_max, 1),
                nodes.join(" / "),
                fixed(run.node_commands_max_over_min, 2),
                fixed(run.mix.latency_ms.p50_ms, 2),
                fixed(run.mix.latency_ms.p99_ms, 2),
                int(phases.clone().map(|p| p.lost).sum::<u64>()),
                int(phases.map(|p| p.duplicates).sum::<u64>()),
            ]);
        }
    }
    t.print();
    sum.print();
}

fn presence_tables(cfg: &Cfg, servers: &[(String, &ServerResults)]) {
    let p = &cfg.presence;
    let mut t = Table::new(
        format!(
            "Scenario 8: fan-out with presence on and off, {} subscribers of c0 over 2 instances + Redis, {} ev/s \
             for {} s per session, sessions in the order they ran",
            p.clients, cfg.rate_one, p.duration_s
        ),
        &[
            "server",
            "presence",
            "subs",
            "events",
            "deliv/s",
            "p50 ms",
            "p99 ms",
            "lost",
            "dup",
            "srv µs/deliv",
            "srv CPU%",
            "presence msgs",
        ],
    );
    let mut sum = Table::new(
        "Scenario 8: presence's cost in the fan-out (mean over the sessions; target: under 5%)".into(),
        &["server", "µs/deliv on", "µs/deliv off", "CPU overhead %", "p99 ms on", "p99 ms off"],
    );
    let mut st = Table::new(
        format!(
            "Scenario 8: storm of {} presence clients joining within a second, then leaving, in a room of {} \
             (window: first join to two rounds after the presence timeout; target: a few dozen presence messages \
             per member at most)",
            p.storm, p.clients
        ),
        &[
            "server",
            "joined",
            "join s",
            "leave s",
            "window s",
            "Redis cmds (above idle)",
            "Redis CPU s",
            "CPU s per instance (above idle)",
            "msgs/member max",
            "mean",
            "joined/left/count max",
        ],
    );
    for (name, r) in servers {
        let v = match entry(r, |s| &s.s8) {
            None => continue,
            Some(Err(e)) => {
                sum.rows.push(vec![format!("{name}: {e}")]);
                continue;
            }
            Some(Ok(v)) => v,
        };
        for run in &v.fanout {
            let tr = &run.traffic;
            t.rows.push(vec![
                name.clone(),
                yes_no(run.presence),
                int(tr.subscribers),
                int(tr.events_accepted),
                fixed(tr.deliveries_per_s, 0),
                fixed(tr.latency_ms.p50_ms, 2),
                fixed(tr.latency_ms.p99_ms, 2),
                int(tr.lost),
                int(tr.duplicates),
                fixed(tr.server_cpu_us_per_delivery, 2),
                fixed(tr.server_cpu_pct, 1),
                int(run.presence_events),
            ]);
        }
        sum.rows.push(vec![
            name.clone(),
            fixed(v.cpu_us_per_delivery_on, 2),
            fixed(v.cpu_us_per_delivery_off, 2),
            fixed(v.presence_cpu_overhead_pct, 1),
            fixed(v.p99_ms_on, 2),
            fixed(v.p99_ms_off, 2),
        ]);
        let s = &v.storm;
        let kinds = PRESENCE_EVENTS
            .iter()
            .map(|e| s.by_kind.get(e).map(|k| int(k.max)).unwrap_or_else(|| "-".into()))
            .collect::<Vec<_>>()
            .join(" / ");
        st.rows.push(vec![
            name.clone(),
            format!("{} of {}", s.joined, s.clients),
            fixed(s.join_s, 2),
            fixed(s.leave_s, 2),
            fixed(s.window_s, 1),
            format!("{} ({})", opt(s.redis_commands), fixed(s.redis_commands_above_idle, 0)),
            fixed(s.redis_cpu_s, 2),
            per_instance(&s.per_instance, |i| format!("{} ({})", fixed(i.cpu_s, 2), fixed(i.cpu_above_idle_s, 2))),
            int(s.events_per_client_max),
            fixed(s.events_per_client_mean, 2),
            kinds,
        ]);
    }
    t.print();
    sum.print();
    st.print();
}

/// "a / b" of one figure per instance.
fn per_instance<T>(xs: &[T], f: impl Fn(&T) -> String) -> String {
    xs.iter().map(f).collect::<Vec<_>>().join(" / ")
}

fn opt(x: Option<u64>) -> String {
    x.map(int).unwrap_or_else(|| "-".into())
}

/// A figure summed over the instances, "-" when one is missing.
fn summed(xs: impl Iterator<Item = Option<u64>>) -> String {
    opt(xs.sum())
}

fn soak_tables(cfg: &Cfg, servers: &[(String, &ServerResults)]) {
    let sc = &cfg.soak;
    let mut t = Table::new(
        format!(
            "Scenario 7: churn soak, {} clients over 2 instances + Redis, {} campaigns; each second {} leave, {} arrive, \
             {} are cut mid-handshake, {} mid-subscribe, {} dropped (back with since); {} ev/s for {} s. \
             Gauges summed over the instances: herald (generator)",
            sc.clients, sc.campaigns, sc.churn, sc.churn, sc.churn, sc.churn, sc.churn, sc.rate, sc.duration_s
        ),
        &[
            "t s",
            "RSS MiB",
            "CPU%",
            "connections",
            "subscriptions",
            "pending",
            "shards",
            "events",
            "deliveries",
            "dup",
            "silent",
            "declared",
        ],
    );
    let mut ends = Table::new(
        "Scenario 7: per instance, after the churn with every client back (want: the generator's count, pending 0) \
         and after every client closed (want: 0)"
            .into(),
        &[
            "instance",
            "connections",
            "subscriptions",
            "pending",
            "at the end: connections",
            "subscriptions",
            "pending",
            "shards followed",
        ],
    );
    let mut sum = Table::new("Scenario 7: totals".into(), &["figure", "value"]);
    for (name, r) in servers {
        let v: &Soak = match entry(r, |s| &s.s7) {
            None => continue,
            Some(Err(s)) => {
                sum.rows.push(vec![format!("{name}: {s}")]);
                continue;
            }
            Some(Ok(v)) => v,
        };
        for s in &v.samples {
            let pi = &s.per_instance;
            let (conn, gconn) = (
                summed(pi.iter().map(|i| i.held.gauges.connections)),
                pi.iter().map(|i| i.held.generator_connected).sum::<u64>(),
            );
            let (subs, gsubs) = (
                summed(pi.iter().map(|i| i.held.gauges.subscriptions)),
                pi.iter().map(|i| i.held.generator_subscribed).sum::<u64>(),
            );
            t.rows.push(vec![
                fixed(s.t_s, 0),
                per_instance(pi, |i| mib(i.rss_kib)),
                per_instance(pi, |i| fixed(i.cpu_pct, 0)),
                format!("{conn} ({gconn})"),
                format!("{subs} ({gsubs})"),
                summed(pi.iter().map(|i| i.held.gauges.pending_sessions)),
                per_instance(pi, |i| opt(i.held.gauges.shards_followed)),
                int(s.events_accepted),
                int(s.counts.deliveries),
                int(s.counts.duplicates),
                int(s.counts.silent_events),
                int(s.counts.declared_gaps),
            ]);
        }
        for (k, (h, e)) in v.held.iter().zip(&v.end).enumerate() {
            ends.rows.push(vec![
                int(k),
                format!("{} ({})", opt(h.gauges.connections), h.generator_connected),
                format!("{} ({})", opt(h.gauges.subscriptions), h.generator_subscribed),
                opt(h.gauges.pending_sessions),
                opt(e.connections),
                opt(e.subscriptions),
                opt(e.pending_sessions),
                opt(e.shards_followed),
            ]);
        }
        let rss_at =
            |t: f64| v.samples.iter().find(|s| s.t_s == t).map(|s| per_instance(&s.per_instance, |i| mib(i.rss_kib)));
        let c = &v.counts;
        let ch = &v.churn;
        let secs = |x: Option<f64>| x.map_or("never".to_string(), |s| format!("{s} s"));
        let mut row = |what: &str, value: String| sum.rows.push(vec![what.to_string(), value]);
        for (label, t) in [
            ("RSS MiB at 0 s", 0.0),
            ("RSS MiB at 1 min", 60.0),
            ("RSS MiB at 5 min", 300.0),
            ("RSS MiB at 10 min", 600.0),
        ] {
            if let Some(r) = rss_at(t) {
                row(label, r);
            }
        }
        row("RSS MiB after every client closed", per_instance(&v.rss_end_kib, |k| mib(*k)));
        row(
            "clients subscribed at the start (setup s)",
            format!("{} of {} ({} s)", v.initial_subscribed, v.clients, v.setup_s),
        );
        row(
            "events accepted (publish errors, max lag ms)",
            format!("{} ({}, {})", v.events_accepted, v.publish_errors, v.max_publish_lag_ms),
        );
        row("deliveries", int(c.deliveries));
        row("duplicates", int(c.duplicates));
        row("silent gaps (events)", format!("{} ({})", c.silent_gaps, c.silent_events));
        row("out of order; owed at the end", format!("{}; {}", c.out_of_order, v.owed_at_end));
        row("declared gaps, recovered: false (events)", format!("{} ({})", c.declared_gaps, c.declared_events));
        row("re-subscribes acked recovered: true", int(c.recovered));
        row(
            "re-subscribes with no offset yet (events missed)",
            format!("{} ({})", c.blind_resubscribes, c.blind_events),
        );
        row(
            "left / arrived / cut mid-handshake / cut mid-subscribe / dropped",
            format!(
                "{} / {} / {} / {} / {}",
                ch.left, ch.arrived, ch.cut_mid_handshake, ch.cut_mid_subscribe, ch.dropped
            ),
        );
        row(
            "closed by the server / connect failures / throwaway failures / protocol errors",
            format!("{} / {} / {} / {}", v.server_closes, v.connect_failures, v.throwaway_failures, v.protocol_errors),
        );
        row("gauges = generator after the churn", secs(v.held_match_after_s));
        row("gauges 0 after the last close", secs(v.end_zero_after_s));
        row("no shard followed after the last close", secs(v.shards_zero_after_s));
        row("generator CPU%", fixed(v.generator_cpu_pct, 1));
    }
    t.print();
    ends.print();
    sum.print();
}
