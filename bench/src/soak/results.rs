//! What scenario 7 measured, as types (the JSON's field names), and the checks that fail it.

use std::sync::atomic::Ordering::Relaxed;

use serde::Serialize;

use super::ledger::Counts;
use super::member::Ctx;
use crate::servers::{Instance, metric_value};

/// What scenario 7 measured.
#[derive(Debug, Serialize)]
pub struct Soak {
    pub instances: usize,
    pub clients: u32,
    pub campaigns: u32,
    pub churn_per_s: u32,
    pub events_per_s: f64,
    pub duration_s: f64,
    pub shard_linger_s: u64,
    /// The first connect and subscribe of every member.
    pub setup_s: f64,
    pub initial_subscribed: u64,
    pub samples: Vec<Sample>,
    pub churn: Churn,
    pub events_accepted: u64,
    pub publish_errors: u64,
    pub first_publish_error: Option<String>,
    pub max_publish_lag_ms: f64,
    /// What the members received, over the whole run.
    pub counts: Counts,
    /// Seqs still owed to members at the end, after the drain (counted as lost).
    pub owed_at_end: u64,
    pub drain_s: f64,
    /// Members not subscribed when told to finish.
    pub not_back: u64,
    pub connect_failures: u64,
    pub first_connect_error: Option<String>,
    pub server_closes: u64,
    pub throwaway_failures: u64,
    pub first_throwaway_error: Option<String>,
    pub protocol_errors: u64,
    pub first_protocol_error: Option<String>,
    /// After the churn, every member back: per instance, the gauges and what the generator holds.
    pub held: Vec<Held>,
    /// How long after the drain they matched (`None`: never, within 15 s).
    pub held_match_after_s: Option<f64>,
    /// After every client closed: per instance (the gauges, with shards followed once the linger
    /// is over).
    pub end: Vec<Gauges>,
    /// How long after the last close connections, subscriptions and pending sessions were all 0
    /// (`None`: not within 22 s).
    pub end_zero_after_s: Option<f64>,
    /// How long after the last close no shard was followed (`None`: not within 22 s).
    pub shards_zero_after_s: Option<f64>,
    pub rss_end_kib: Vec<Option<u64>>,
    pub generator_cpu_pct: f64,
}

/// The churn the driver made.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Churn {
    pub left: u64,
    pub arrived: u64,
    pub cut_mid_handshake: u64,
    pub cut_mid_subscribe: u64,
    pub dropped: u64,
    /// A leave or a drop found no subscribed member to pick.
    pub skipped: u64,
}

/// An instance's gauges (`None`: not there, or not read).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Gauges {
    pub connections: Option<u64>,
    pub subscriptions: Option<u64>,
    pub pending_sessions: Option<u64>,
    pub shards_followed: Option<u64>,
}

impl Gauges {
    pub async fn read(inst: &Instance) -> Gauges {
        let text = inst.metrics().await;
        let m = |name: &str| text.as_deref().and_then(|t| metric_value(t, name));
        Gauges {
            connections: m("herald_connections"),
            subscriptions: m("herald_subscriptions"),
            pending_sessions: m("herald_pending_sessions"),
            shards_followed: m("herald_fleet_shards_followed"),
        }
    }

    pub fn sockets_zero(&self) -> bool {
        [self.connections, self.subscriptions, self.pending_sessions].iter().all(|g| *g == Some(0))
    }
}

/// An instance's gauges against the members the generator holds on it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Held {
    #[serde(flatten)]
    pub gauges: Gauges,
    pub generator_connected: u64,
    pub generator_subscribed: u64,
}

impl Held {
    pub fn matches(&self) -> bool {
        self.gauges.connections == Some(self.generator_connected)
            && self.gauges.subscriptions == Some(self.generator_subscribed)
            && self.gauges.pending_sessions == Some(0)
    }
}

/// One reading during the churn.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub per_instance: Vec<InstanceSample>,
    pub throwaways_in_flight: u64,
    pub events_accepted: u64,
    pub counts: Counts,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct InstanceSample {
    pub rss_kib: Option<u64>,
    /// Its CPU time since the previous sample, in % of one core.
    pub cpu_pct: Option<f64>,
    #[serde(flatten)]
    pub held: Held,
}

/// Per instance, its gauges against the members the generator holds on it.
pub fn held(ctx: &Ctx, gauges: &[Gauges]) -> Vec<Held> {
    gauges
        .iter()
        .enumerate()
        .map(|(k, g)| Held {
            gauges: *g,
            generator_connected: ctx.connected[k].load(Relaxed),
            generator_subscribed: ctx.subscribed[k].load(Relaxed),
        })
        .collect()
}

/// What makes the soak fail: anything duplicated, lost or out of order, a gauge that is not
/// what the generator holds after the churn or not 0 after the last close, any failed connect,
/// publish or protocol exchange; with `--smoke`, also a connection the server closed.
pub fn problems(server: &str, v: &Soak, smoke: bool, out: &mut Vec<String>) {
    let c = &v.counts;
    let mut nonzero = |what: &str, x: u64| {
        if x > 0 {
            out.push(format!("{server} s7: {what} = {x}"));
        }
    };
    nonzero("duplicates", c.duplicates);
    nonzero("silent gaps (events)", c.silent_events);
    nonzero("out of order", c.out_of_order);
    nonzero("owed at the end", v.owed_at_end);
    nonzero("not back at the end", v.not_back);
    nonzero("publish errors", v.publish_errors);
    nonzero("protocol errors", v.protocol_errors);
    nonzero("connect failures", v.connect_failures);
    nonzero("throwaway failures", v.throwaway_failures);
    if smoke {
        nonzero("connections closed by the server", v.server_closes);
    }
    if v.initial_subscribed < v.clients as u64 {
        out.push(format!("{server} s7: {} of {} clients subscribed at the start", v.initial_subscribed, v.clients));
    }
    if c.deliveries == 0 {
        out.push(format!("{server} s7: no delivery"));
    }
    if v.held_match_after_s.is_none() {
        out.push(format!("{server} s7: after the churn, the gauges are not what the generator holds: {:?}", v.held));
    }
    if v.end_zero_after_s.is_none() || v.shards_zero_after_s.is_none() {
        out.push(format!("{server} s7: after every client closed, gauges not all 0: {:?}", v.end));
    }
}
