//! The scenarios (1 and 2 share their clients; 3, 4 and 5) and the smoke checks. Each scenario
//! starts its own session, so it begins on freshly started servers.

use anyhow::Result;
use serde_json::{Value, json};

use crate::servers::Kind;
use crate::session::{Bench, Session, per_conn};

pub async fn scenarios_1_2(b: &Bench, kind: Kind, want1: bool, want2: bool) -> Result<(Option<Value>, Option<Value>)> {
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

pub async fn scenario_3(b: &Bench, kind: Kind) -> Result<Value> {
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

pub async fn scenario_4(b: &Bench, kind: Kind) -> Result<Value> {
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

pub async fn scenario_5(b: &Bench, kind: Kind) -> Result<Value> {
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
pub fn smoke_problems(server: &str, name: &str, v: &Value, out: &mut Vec<String>) {
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
