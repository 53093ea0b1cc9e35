//! The scenarios (1 and 2 share their clients; 3, 4 and 5; 6 is in `fleet`, 7 in `soak`, 8 in `presence`), the chosen ones run against one
//! server (`on_server`), and the checks on what they measured (`check`). Each scenario starts
//! its own session, so it begins on freshly started servers.

use anyhow::Result;

use crate::cli::Cfg;
use crate::fleet;
use crate::presence;
use crate::results::{
    Measured, Outcome, Ramp, Scenario1, Scenario4, Scenarios, Step, Traffic, TrafficScenario, compact,
};
use crate::servers::Kind;
use crate::session::{Bench, Session};
use crate::soak;

/// Runs the chosen scenarios against `kind`. A scenario that could not be run has its error as
/// its entry, and in `failures`.
pub async fn on_server(b: &Bench, kind: Kind, failures: &mut Vec<String>) -> Scenarios {
    let name = kind.name();
    let want = |n: u8| b.cfg.scenarios.contains(&n);
    let mut res = Scenarios::default();
    if want(1) || want(2) {
        match scenarios_1_2(b, kind, want(1), want(2)).await {
            Ok((s1, s2)) => {
                res.s1 = s1.map(Outcome::Done);
                res.s2 = s2.map(Outcome::Done);
            }
            Err(e) => {
                failures.push(format!("{name} scenario 1/2: {e:#}"));
                let error = format!("{e:#}");
                res.s1 = want(1).then(|| Outcome::Error { error: error.clone() });
                res.s2 = want(2).then_some(Outcome::Error { error });
            }
        }
    }
    if want(3) {
        res.s3 = Some(outcome(failures, name, "s3", scenario_3(b, kind).await));
    }
    if want(4) {
        res.s4 = Some(if kind == Kind::Floor {
            Outcome::NotApplicable { na: "floor has no multi-instance mode".into() }
        } else {
            outcome(failures, name, "s4", scenario_4(b, kind).await)
        });
    }
    if want(5) {
        res.s5 = Some(outcome(failures, name, "s5", scenario_5(b, kind).await));
    }
    if want(6) {
        res.s6 = Some(if kind == Kind::Herald {
            outcome(failures, name, "s6", fleet::scenario_6(b).await)
        } else {
            Outcome::NotApplicable { na: "scenario 6 measures herald's sharded event log".into() }
        });
    }
    if want(7) {
        res.s7 = Some(if kind == Kind::Herald {
            outcome(failures, name, "s7", soak::scenario_7(b).await)
        } else {
            Outcome::NotApplicable { na: "scenario 7 checks herald's own gauges and fleet".into() }
        });
    }
    if want(8) {
        res.s8 = Some(if kind == Kind::Herald {
            outcome(failures, name, "s8", presence::scenario_8(b).await)
        } else {
            Outcome::NotApplicable { na: "scenario 8 measures herald's presence".into() }
        });
    }
    res
}

fn outcome<T>(failures: &mut Vec<String>, server: &str, key: &str, r: Result<T>) -> Outcome<T> {
    match r {
        Ok(v) => Outcome::Done(v),
        Err(e) => {
            failures.push(format!("{server} {key}: {e:#}"));
            Outcome::Error { error: format!("{e:#}") }
        }
    }
}

async fn scenarios_1_2(
    b: &Bench,
    kind: Kind,
    want1: bool,
    want2: bool,
) -> Result<(Option<Scenario1>, Option<TrafficScenario>)> {
    let n = b.cfg.clients;
    let mut s = Session::start(b, kind, 1, 1).await?;
    eprintln!("  [{}] scenario 1/2: connecting {n} clients to campaign c0", kind.name());
    let setup = s.connect(n, |_| (0, 0)).await;
    eprintln!("  [{}] setup: {}", kind.name(), compact(&setup));
    let mut s1 = Scenario1 {
        campaigns: 1,
        setup: setup.clone(),
        rss_after_traffic_kib: None,
        rss_after_traffic_per_conn_kib: None,
    };
    let mut s2 = None;
    if want2 {
        eprintln!("  [{}] scenario 2: {} ev/s for {} s", kind.name(), b.cfg.rate_one, b.cfg.duration);
        let t = s.traffic(b.cfg.rate_one, b.cfg.duration, &[0]).await.with_rss_per_conn(&setup);
        s1.rss_after_traffic_kib = t.rss_after_kib;
        s1.rss_after_traffic_per_conn_kib = t.rss_after_per_conn_kib;
        eprintln!("  [{}] traffic: {}", kind.name(), compact(&t));
        s2 = Some(TrafficScenario { setup, traffic: t });
    }
    s.stop().await;
    Ok((want1.then_some(s1), s2))
}

async fn scenario_3(b: &Bench, kind: Kind) -> Result<TrafficScenario> {
    let camps = b.cfg.campaigns;
    let mut s = Session::start(b, kind, 1, camps).await?;
    eprintln!("  [{}] scenario 3: {} clients over {camps} campaigns", kind.name(), b.cfg.clients);
    let setup = s.connect(b.cfg.clients, |i| (i % camps, 0)).await;
    eprintln!("  [{}] setup: {}", kind.name(), compact(&setup));
    let list: Vec<u32> = (0..camps).collect();
    let t = s.traffic(b.cfg.rate_many, b.cfg.duration, &list).await.with_rss_per_conn(&setup);
    eprintln!("  [{}] traffic: {}", kind.name(), compact(&t));
    s.stop().await;
    Ok(TrafficScenario { setup, traffic: t })
}

async fn scenario_4(b: &Bench, kind: Kind) -> Result<Scenario4> {
    let mut s = Session::start(b, kind, 2, 1).await?;
    eprintln!("  [{}] scenario 4: {} clients over 2 instances + redis", kind.name(), b.cfg.clients);
    let setup = s.connect(b.cfg.clients, |i| (0, (i % 2) as usize)).await;
    eprintln!("  [{}] setup: {}", kind.name(), compact(&setup));
    let t = s.traffic(b.cfg.rate_one, b.cfg.duration, &[0]).await.with_rss_per_conn(&setup);
    eprintln!("  [{}] traffic: {}", kind.name(), compact(&t));
    s.stop().await;
    Ok(Scenario4 { instances: 2, publish_to: "instance 0 (near)", setup, traffic: t })
}

/// Whether a ramp step passed, and if not, why.
fn step_passes(t: &Traffic, limit_ms: f64) -> (bool, Vec<String>) {
    let mut why = Vec::new();
    for (n, what) in [
        (t.lost, "lost"),
        (t.duplicates, "duplicates"),
        (t.publish_errors, "publish errors"),
        (t.disconnects, "disconnects"),
    ] {
        if n > 0 {
            why.push(format!("{n} {what}"));
        }
    }
    let p99 = t.latency_ms.p99_ms;
    if p99 >= limit_ms {
        why.push(format!("p99 {p99} ms >= {limit_ms} ms"));
    }
    let (target, achieved) = (t.target_events_per_s, t.publish_events_per_s);
    if achieved < 0.9 * target {
        why.push(format!("publisher reached only {achieved} of {target} ev/s"));
    }
    (why.is_empty(), why)
}

async fn scenario_5(b: &Bench, kind: Kind) -> Result<Ramp> {
    let n = b.cfg.ramp_clients;
    let mut s = Session::start(b, kind, 1, 1).await?;
    eprintln!("  [{}] scenario 5: ramp with {n} clients", kind.name());
    let setup = s.connect(n, |_| (0, 0)).await;
    eprintln!("  [{}] setup: {}", kind.name(), compact(&setup));
    let mut steps: Vec<Step> = Vec::new();
    let mut stopped = None;
    for &rate in &b.cfg.ramp_rates {
        let t = s.traffic(rate, b.cfg.step, &[0]).await;
        let (ok, why) = step_passes(&t, b.cfg.p99_limit_ms);
        eprintln!(
            "  [{}] step {rate} ev/s: {:?} deliveries/s, p99 {:?} ms, lost {}, gen CPU {:?}% -> {}",
            kind.name(),
            t.deliveries_per_s,
            t.latency_ms.p99_ms,
            t.lost,
            t.generator_cpu_pct,
            if ok { "pass".to_string() } else { format!("FAIL ({})", why.join(", ")) }
        );
        steps.push(Step { traffic: t, pass: ok, fail_reasons: why.clone() });
        if !ok {
            stopped = Some(format!("{rate} ev/s: {}", why.join(", ")));
            break;
        }
    }
    s.stop().await;
    let best = steps.iter().rev().find(|st| st.pass).map(|st| &st.traffic);
    Ok(Ramp {
        p99_limit_ms: b.cfg.p99_limit_ms,
        max_sustained_deliveries_per_s: best.map(|t| t.deliveries_per_s),
        max_sustained_events_per_s: best.map(|t| t.target_events_per_s),
        generator_bound_at_max: best.map(|t| t.generator_bound),
        generator_cpu_pct_at_max: best.map(|t| t.generator_cpu_pct),
        stopped_at: stopped,
        setup,
        steps,
    })
}

/// The checks on what one server's scenarios measured: a scenario where no client subscribed
/// is a failure; with `--smoke`, so is anything lost, duplicated, refused or malformed. The
/// soak's checks (`soak::problems`) apply to every run.
pub fn check(cfg: &Cfg, server: &str, res: &Scenarios, failures: &mut Vec<String>) {
    for m in res.measured() {
        if m.setup.subscribed == 0 {
            failures.push(format!("{server} {}: no client could subscribe", m.key));
        }
        if cfg.smoke {
            smoke_problems(server, &m, failures);
        }
    }
    if let Some(v) = res.s7.as_ref().and_then(Outcome::done) {
        soak::problems(server, v, cfg.smoke, failures);
    }
    if let Some(v) = res.s8.as_ref().and_then(Outcome::done) {
        presence::problems(server, v, cfg.smoke, failures);
    }
}

fn smoke_problems(server: &str, m: &Measured<'_>, out: &mut Vec<String>) {
    let name = m.key;
    let nonzero = |what: &str, x: u64| (x > 0).then(|| format!("{server} {name}: {what} = {x}"));
    out.extend(nonzero("connect_failures", m.setup.connect_failures));
    if m.setup.subscribed == 0 {
        out.push(format!("{server} {name}: no client subscribed"));
    }
    for t in &m.traffic {
        for (what, x) in [
            ("lost", t.lost),
            ("duplicates", t.duplicates),
            ("protocol_errors", t.protocol_errors),
            ("publish_errors", t.publish_errors),
            ("disconnects", t.disconnects),
        ] {
            out.extend(nonzero(what, x));
        }
        if t.deliveries == 0 {
            out.push(format!("{server} {name}: no delivery"));
        }
    }
}
