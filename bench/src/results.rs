//! What a run measures, as types: the setup of a scenario's clients (`Setup`), one traffic phase
//! (`Traffic`), each scenario's result (scenario 6's, `Fleet`, is beside it in `fleet`, and 7's,
//! `Soak`, in `soak`, and 8's, `Presence`, in `presence`), and the JSON document a run prints (`Document`). The
//! field names are the JSON's (bench/README.md): the document is serialized once, at the edge
//! (the last stdout line, `--json-out`). A figure that could not be read is `None` (`null`).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::fleet::Fleet;
use crate::presence::Presence;
use crate::soak::Soak;
use crate::stats::Latency;

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// KiB per connection: (after − before) / `n`.
pub fn per_conn(before: Option<u64>, after: Option<u64>, n: u64) -> Option<f64> {
    match (before, after) {
        (Some(a), Some(b)) if n > 0 => Some(round2((b as f64 - a as f64) / n as f64)),
        _ => None,
    }
}

/// One line of JSON, for the progress lines on stderr.
pub fn compact(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("(unserializable: {e})"))
}

/// The clients of a scenario connecting and subscribing (`Session::connect`).
#[derive(Clone, Debug, Serialize)]
pub struct Setup {
    pub clients: u32,
    pub subscribed: u64,
    pub connect_failures: u64,
    pub first_connect_error: Option<String>,
    pub setup_s: f64,
    pub connections_per_s: f64,
    /// The servers' RSS before the first connect and once every client subscribed (and settled).
    pub rss_before_kib: Option<u64>,
    pub rss_subscribed_kib: Option<u64>,
    pub rss_per_conn_kib: Option<f64>,
    pub generator_rss_kib: Option<u64>,
}

/// One traffic phase and its drain (`Session::traffic`).
#[derive(Clone, Debug, Serialize)]
pub struct Traffic {
    pub target_events_per_s: f64,
    pub duration_s: f64,
    pub campaigns: usize,
    pub subscribers: usize,
    pub events_planned: u64,
    pub events_accepted: u64,
    pub publish_errors: u64,
    pub first_publish_error: Option<String>,
    pub publish_events_per_s: f64,
    pub max_publish_lag_ms: f64,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    pub deliveries_per_s: f64,
    pub lost: u64,
    pub drain_s: f64,
    pub duplicates: u64,
    pub protocol_errors: u64,
    pub first_protocol_error: Option<String>,
    pub disconnects: u64,
    pub latency_ms: Latency,
    /// Scenario 4 only: the clients of the publishing instance and of the other one.
    pub latency_near_ms: Option<Latency>,
    pub latency_far_ms: Option<Latency>,
    pub cross_instance_p50_ms: Option<f64>,
    pub server_cpu_s: Option<f64>,
    pub server_cpu_us_per_delivery: Option<f64>,
    pub server_cpu_pct: Option<f64>,
    pub redis_cpu_s: Option<f64>,
    pub generator_cpu_pct: f64,
    pub generator_bound: bool,
    pub rss_after_kib: Option<u64>,
    /// Set by the scenarios that measure it against their setup (`with_rss_per_conn`).
    pub rss_after_per_conn_kib: Option<f64>,
}

impl Traffic {
    /// `rss_after_per_conn_kib` against the RSS before `setup` and its subscribed clients.
    pub fn with_rss_per_conn(mut self, setup: &Setup) -> Self {
        self.rss_after_per_conn_kib = per_conn(setup.rss_before_kib, self.rss_after_kib, setup.subscribed);
        self
    }
}

/// Scenario 1: the setup, and the RSS once scenario 2's traffic is over (when it ran).
#[derive(Debug, Serialize)]
pub struct Scenario1 {
    pub campaigns: u32,
    pub setup: Setup,
    pub rss_after_traffic_kib: Option<u64>,
    pub rss_after_traffic_per_conn_kib: Option<f64>,
}

/// Scenarios 2 and 3: the setup and one traffic phase.
#[derive(Debug, Serialize)]
pub struct TrafficScenario {
    pub setup: Setup,
    pub traffic: Traffic,
}

/// Scenario 4: scenario 2 on two instances.
#[derive(Debug, Serialize)]
pub struct Scenario4 {
    pub instances: u32,
    pub publish_to: &'static str,
    pub setup: Setup,
    pub traffic: Traffic,
}

/// Scenario 5: the ramp, and the last step that passed.
#[derive(Debug, Serialize)]
pub struct Ramp {
    pub setup: Setup,
    pub p99_limit_ms: f64,
    pub steps: Vec<Step>,
    pub max_sustained_deliveries_per_s: Option<f64>,
    pub max_sustained_events_per_s: Option<f64>,
    pub generator_bound_at_max: Option<bool>,
    pub generator_cpu_pct_at_max: Option<f64>,
    /// The step that failed and why; `None` when every step passed.
    pub stopped_at: Option<String>,
}

/// A step of the ramp: its traffic phase, and whether it passed.
#[derive(Debug, Serialize)]
pub struct Step {
    #[serde(flatten)]
    pub traffic: Traffic,
    pub pass: bool,
    pub fail_reasons: Vec<String>,
}

/// A scenario's entry: what it measured, why it could not be run, or why it does not apply.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Outcome<T> {
    Done(T),
    Error { error: String },
    NotApplicable { na: String },
}

impl<T> Outcome<T> {
    pub fn done(&self) -> Option<&T> {
        match self {
            Outcome::Done(v) => Some(v),
            _ => None,
        }
    }
}

/// One server's entry in `results`.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ServerResults {
    /// Its binary (or prepared copy) is missing: nothing ran.
    Missing {
        error: String,
    },
    Ran(Box<Scenarios>),
}

/// The scenarios that were chosen, each run or failed.
#[derive(Debug, Default, Serialize)]
pub struct Scenarios {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s1: Option<Outcome<Scenario1>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s2: Option<Outcome<TrafficScenario>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3: Option<Outcome<TrafficScenario>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s4: Option<Outcome<Scenario4>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s5: Option<Outcome<Ramp>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s6: Option<Outcome<Fleet>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s7: Option<Outcome<Soak>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s8: Option<Outcome<Presence>>,
}

/// The setup and the traffic phases of one scenario that ran, for the checks.
pub struct Measured<'a> {
    pub key: &'static str,
    pub setup: &'a Setup,
    /// None for scenario 1 (its traffic is scenario 2's), every step for scenario 5.
    pub traffic: Vec<&'a Traffic>,
}

impl Scenarios {
    /// Every scenario that ran, in order.
    pub fn measured(&self) -> Vec<Measured<'_>> {
        let mut out = Vec::new();
        if let Some(v) = self.s1.as_ref().and_then(Outcome::done) {
            out.push(Measured { key: "s1", setup: &v.setup, traffic: vec![] });
        }
        for (key, o) in [("s2", &self.s2), ("s3", &self.s3)] {
            if let Some(v) = o.as_ref().and_then(Outcome::done) {
                out.push(Measured { key, setup: &v.setup, traffic: vec![&v.traffic] });
            }
        }
        if let Some(v) = self.s4.as_ref().and_then(Outcome::done) {
            out.push(Measured { key: "s4", setup: &v.setup, traffic: vec![&v.traffic] });
        }
        if let Some(v) = self.s5.as_ref().and_then(Outcome::done) {
            out.push(Measured { key: "s5", setup: &v.setup, traffic: v.steps.iter().map(|s| &s.traffic).collect() });
        }
        for r in self.s6.as_ref().and_then(Outcome::done).map(|f| f.runs.as_slice()).unwrap_or_default() {
            let traffic = std::iter::once(&r.mix).chain(&r.others).collect();
            out.push(Measured { key: "s6", setup: &r.setup, traffic });
        }
        for r in self.s8.as_ref().and_then(Outcome::done).map(|p| p.fanout.as_slice()).unwrap_or_default() {
            out.push(Measured { key: "s8", setup: &r.setup, traffic: vec![&r.traffic] });
        }
        out
    }
}

/// The settings of the run, as the document reports them.
#[derive(Debug, Serialize)]
pub struct RunConfig {
    pub clients: u32,
    pub ramp_clients: u32,
    pub duration_s: f64,
    pub rate_one_campaign: f64,
    pub rate_many_campaigns: f64,
    pub campaigns_s3: u32,
    pub ramp_rates: Vec<f64>,
    pub ramp_step_s: f64,
    pub p99_limit_ms: f64,
    pub server_cpus: Option<String>,
    pub generator_cpus: Vec<usize>,
    pub nofile: u64,
}

/// The JSON document: the last line on stdout.
#[derive(Debug, Serialize)]
pub struct Document {
    pub tool: &'static str,
    pub smoke: bool,
    pub config: RunConfig,
    /// By server name.
    pub results: BTreeMap<&'static str, ServerResults>,
    pub failures: Vec<String>,
    pub ok: bool,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn traffic() -> Traffic {
        Traffic {
            target_events_per_s: 25.0,
            duration_s: 2.0,
            campaigns: 1,
            subscribers: 3,
            events_planned: 50,
            events_accepted: 50,
            publish_errors: 0,
            first_publish_error: None,
            publish_events_per_s: 25.1,
            max_publish_lag_ms: 0.5,
            expected_deliveries: 150,
            deliveries: 150,
            deliveries_per_s: 74.6,
            lost: 0,
            drain_s: 0.01,
            duplicates: 0,
            protocol_errors: 0,
            first_protocol_error: None,
            disconnects: 0,
            latency_ms: Latency::default(),
            latency_near_ms: None,
            latency_far_ms: None,
            cross_instance_p50_ms: None,
            server_cpu_s: Some(0.2),
            server_cpu_us_per_delivery: None,
            server_cpu_pct: None,
            redis_cpu_s: None,
            generator_cpu_pct: 3.5,
            generator_bound: false,
            rss_after_kib: Some(2048),
            rss_after_per_conn_kib: None,
        }
    }

    #[test]
    fn a_ramp_step_is_its_traffic_with_pass_and_reasons_beside_it() {
        let step = Step { traffic: traffic(), pass: false, fail_reasons: vec!["2 lost".into()] };
        let v = serde_json::to_value(&step).unwrap();
        let mut want = serde_json::to_value(traffic()).unwrap();
        want["pass"] = json!(false);
        want["fail_reasons"] = json!(["2 lost"]);
        assert_eq!(v, want);
    }

    #[test]
    fn entries_that_did_not_run_are_their_error_or_why_not() {
        let ran = Scenarios {
            s3: Some(Outcome::Error { error: "redis-server not found".into() }),
            s4: Some(Outcome::NotApplicable { na: "floor has no multi-instance mode".into() }),
            ..Scenarios::default()
        };
        let results = BTreeMap::from([
            ("floor", ServerResults::Ran(Box::new(ran))),
            ("node", ServerResults::Missing { error: "node_modules not found".into() }),
        ]);
        assert_eq!(
            serde_json::to_value(&results).unwrap(),
            json!({
                "floor": { "s3": { "error": "redis-server not found" },
                           "s4": { "na": "floor has no multi-instance mode" } },
                "node": { "error": "node_modules not found" },
            })
        );
    }

    #[test]
    fn rss_per_connection_needs_both_readings_and_a_client() {
        assert_eq!(per_conn(Some(1000), Some(1300), 200), Some(1.5));
        assert_eq!(per_conn(Some(1000), None, 200), None);
        assert_eq!(per_conn(Some(1000), Some(1300), 0), None);
        let setup = Setup {
            clients: 200,
            subscribed: 200,
            connect_failures: 0,
            first_connect_error: None,
            setup_s: 0.5,
            connections_per_s: 400.0,
            rss_before_kib: Some(1000),
            rss_subscribed_kib: Some(1200),
            rss_per_conn_kib: Some(1.0),
            generator_rss_kib: None,
        };
        assert_eq!(traffic().with_rss_per_conn(&setup).rss_after_per_conn_kib, Some(5.24));
    }
}
