//! Human-readable tables, one per scenario, rows per server (stdout).

use serde_json::Value;

use crate::cli::Cfg;

fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur
}

fn num(v: &Value, path: &[&str], decimals: usize) -> String {
    match at(v, path) {
        Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() => format!("{x:.decimals$}"),
            _ => n.to_string(),
        },
        Value::Bool(b) => if *b { "yes" } else { "no" }.to_string(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

fn mib(v: &Value, path: &[&str]) -> String {
    match at(v, path).as_f64() {
        Some(k) => format!("{:.1}", k / 1024.0),
        None => "-".into(),
    }
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

fn special(v: &Value) -> Option<String> {
    if let Some(e) = v.get("error") {
        return Some(format!("ERROR: {}", e.as_str().unwrap_or("?").lines().next().unwrap_or("")));
    }
    v.get("na").map(|na| format!("n/a: {}", na.as_str().unwrap_or("")))
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

fn traffic_row(server: &str, t: &Value) -> Vec<String> {
    vec![
        server.to_string(),
        num(t, &["target_events_per_s"], 0),
        num(t, &["subscribers"], 0),
        num(t, &["events_accepted"], 0),
        num(t, &["deliveries_per_s"], 0),
        num(t, &["latency_ms", "p50_ms"], 2),
        num(t, &["latency_ms", "p90_ms"], 2),
        num(t, &["latency_ms", "p99_ms"], 2),
        num(t, &["latency_ms", "max_ms"], 2),
        num(t, &["lost"], 0),
        num(t, &["duplicates"], 0),
        num(t, &["server_cpu_us_per_delivery"], 2),
        num(t, &["server_cpu_pct"], 1),
        num(t, &["generator_cpu_pct"], 1),
    ]
}

pub fn print_tables(cfg: &Cfg, results: &Value) {
    let Some(map) = results.as_object() else { return };
    // rows in the order the servers ran
    let servers: Vec<(String, &Value)> =
        cfg.servers.iter().filter_map(|k| map.get(k.name()).map(|v| (k.name().to_string(), v))).collect();
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
            let v = &r["s1"];
            if let Some(s) = special(r).or_else(|| special(v)) {
                t.rows.push(vec![format!("{name}: {s}")]);
                continue;
            }
            t.rows.push(vec![
                name.clone(),
                num(v, &["setup", "subscribed"], 0),
                num(v, &["setup", "connect_failures"], 0),
                num(v, &["setup", "setup_s"], 2),
                num(v, &["setup", "connections_per_s"], 0),
                mib(v, &["setup", "rss_before_kib"]),
                mib(v, &["setup", "rss_subscribed_kib"]),
                num(v, &["setup", "rss_per_conn_kib"], 2),
                mib(v, &["rss_after_traffic_kib"]),
                num(v, &["rss_after_traffic_per_conn_kib"], 2),
            ]);
        }
        t.print();
    }

    for (n, key, title) in [
        (
            2,
            "s2",
            format!(
                "Scenario 2: {} subscribers in one campaign, {} ev/s for {} s",
                cfg.clients, cfg.rate_one, cfg.duration
            ),
        ),
        (
            3,
            "s3",
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
            let v = &r[key];
            match special(r).or_else(|| special(v)) {
                Some(s) => t.rows.push(vec![format!("{name}: {s}")]),
                None => t.rows.push(traffic_row(name, &v["traffic"])),
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
            let v = &r["s4"];
            if let Some(s) = special(r).or_else(|| special(v)) {
                t.rows.push(vec![format!("{name}: {s}")]);
                split.rows.push(vec![format!("{name}: {s}")]);
                continue;
            }
            let tr = &v["traffic"];
            t.rows.push(traffic_row(name, tr));
            split.rows.push(vec![
                name.clone(),
                num(tr, &["latency_near_ms", "p50_ms"], 2),
                num(tr, &["latency_near_ms", "p99_ms"], 2),
                num(tr, &["latency_far_ms", "p50_ms"], 2),
                num(tr, &["latency_far_ms", "p99_ms"], 2),
                num(tr, &["cross_instance_p50_ms"], 2),
                num(tr, &["redis_cpu_s"], 2),
                num(tr, &["disconnects"], 0),
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
            let v = &r["s5"];
            if let Some(s) = special(r).or_else(|| special(v)) {
                t.rows.push(vec![format!("{name}: {s}")]);
                summary.rows.push(vec![format!("{name}: {s}")]);
                continue;
            }
            for st in v["steps"].as_array().into_iter().flatten() {
                t.rows.push(vec![
                    name.clone(),
                    num(st, &["target_events_per_s"], 0),
                    num(st, &["deliveries_per_s"], 0),
                    num(st, &["latency_ms", "p50_ms"], 2),
                    num(st, &["latency_ms", "p99_ms"], 2),
                    num(st, &["latency_ms", "max_ms"], 2),
                    num(st, &["lost"], 0),
                    num(st, &["server_cpu_us_per_delivery"], 2),
                    num(st, &["server_cpu_pct"], 1),
                    num(st, &["generator_cpu_pct"], 1),
                    num(st, &["pass"], 0),
                ]);
            }
            summary.rows.push(vec![
                name.clone(),
                num(v, &["max_sustained_deliveries_per_s"], 0),
                num(v, &["max_sustained_events_per_s"], 0),
                num(v, &["generator_cpu_pct_at_max"], 1),
                num(v, &["generator_bound_at_max"], 0),
                v["stopped_at"].as_str().unwrap_or("(all steps passed)").to_string(),
            ]);
        }
        t.print();
        summary.print();
    }
    println!();
}
