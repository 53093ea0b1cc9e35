//! Logs and metrics.
//!
//! The tracing subscriber is process-global and installed once, by the
//! binary. Metrics live in a [`Metrics`] registry owned by each application,
//! so several gateways can run in one process (the tests do).

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global tracing subscriber. Call once, from the binary.
pub fn init_tracing(filter: &str, format: LogFormat) -> Result<(), String> {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::prelude::*;

    let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?.and(quiet_dependencies());
    let ansi = std::io::stderr().is_terminal();
    let writer = move || OneLine { ansi };
    let registry = tracing_subscriber::registry();
    let result = match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(writer).with_filter(filter))
            .try_init(),
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true).with_writer(writer).with_filter(filter))
            .try_init(),
    };
    result.map_err(|e| e.to_string())
}

/// Writes log lines to stderr, each one line whatever its fields hold: a
/// value from outside (an id, an event name, a header, an error quoting a
/// payload) cannot forge a line of its own. Line breaks and other control
/// characters inside a line are escaped (`\n`, `\x1b`, `\u{2028}`); only
/// the final newline stays. The escape character stays raw on a terminal,
/// where it carries the colours.
struct OneLine {
    ansi: bool,
}

/// `text` (one formatted log line) with every line break and control
/// character escaped, but its final newline.
fn one_line(text: &str, ansi: bool) -> String {
    let (body, newline) = match text.strip_suffix('\n') {
        Some(body) => (body, "\n"),
        None => (text, ""),
    };
    let mut line = String::with_capacity(text.len() + 8);
    for c in body.chars() {
        match c {
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            '\t' => line.push(c),
            '\x1b' if ansi => line.push(c),
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => line.extend(c.escape_unicode()),
            c => line.push(c),
        }
    }
    line.push_str(newline);
    line
}

impl std::io::Write for OneLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = one_line(&String::from_utf8_lossy(buf), self.ansi);
        std::io::stderr().lock().write_all(line.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Dependencies whose debug and trace logs carry what clients send (frames
/// with tokens, request lines with `?token=`) or what herald sends (the
/// hook's signed requests) stay at `info` whatever
/// `HERALD_LOG` says: secrets never reach the logs.
fn quiet_dependencies() -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::LevelFilter;
    [
        "tungstenite",
        "tokio_tungstenite",
        "engineioxide",
        "socketioxide",
        "hyper",
        "hyper_util",
        "axum",
        "tower_http",
        // The authorization hook's client: its requests carry the signature and a forwarded token.
        "reqwest",
    ]
    .into_iter()
    .fold(tracing_subscriber::filter::Targets::new().with_default(LevelFilter::TRACE), |targets, target| {
        targets.with_target(target, LevelFilter::INFO)
    })
}

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// herald's own metrics, all named `herald_…`.
pub struct Metrics {
    registry: Registry,
    /// Connected Socket.IO clients.
    pub connections: Gauge,
    /// Engine.IO sessions that have not sent their Socket.IO CONNECT yet.
    pub pending_sessions: Gauge,
    /// Current room subscriptions, by kind.
    pub subscriptions: Family<Labels1, Gauge>,
    /// Events appended to the event log, by type.
    pub events_published: Family<Labels1, Counter>,
    /// Rejected handshakes, by reason.
    pub auth_failures: Family<Labels1, Counter>,
    /// Acknowledged client events, by event and outcome.
    pub acks: Family<Labels2, Counter>,
    /// Publish API requests, by status code.
    pub publish_requests: Family<Labels1, Counter>,
    /// Event log (Redis) failures: refused or timed-out operations, lost connections.
    pub log_errors: Counter,
    /// Limits hit, by limit.
    pub limits_hit: Family<Labels1, Counter>,
    /// Events the in-memory replay log holds.
    pub replay_log_events: Gauge,
    /// Bytes of event objects the in-memory replay log holds.
    pub replay_log_bytes: Gauge,
    /// Log entries this instance read (every stream it follows).
    pub fleet_entries_read: Counter,
    /// Shards of the log this instance follows.
    pub fleet_shards_followed: Gauge,
    /// Authorization hook calls, by outcome (and checks answered without a call).
    pub access_hook_calls: Family<Labels1, Counter>,
    /// How long the authorization hook took to answer (or fail), in seconds.
    pub access_hook_duration: Histogram,
    /// Membership checks the authorization hook's cache answered.
    pub access_hook_cache_hits: Counter,
    /// The authorization hook's circuit: 0 closed, 1 half-open, 2 open.
    pub access_hook_circuit: Gauge,
    /// Authorization hook calls in flight.
    pub access_hook_in_flight: Gauge,
    /// Distinct membership checks waiting for the authorization hook (identical ones merged).
    pub access_hook_checks: Gauge,
    /// Rooms this instance keeps presence for (with a presence socket here, or leaving).
    pub presence_rooms: Gauge,
    /// Presence subscriptions (socket, room) on this instance.
    pub presence_subscriptions: Gauge,
    /// Presence events sent to sockets, by event.
    pub presence_messages: Family<Labels1, Counter>,
}

/// A fresh metric, registered under `name` (after the `herald_` prefix).
fn registered<M>(registry: &mut Registry, name: &str, help: &str) -> M
where
    M: Default + Clone + std::fmt::Debug + Send + Sync + 'static,
    M: prometheus_client::metrics::TypedMetric + prometheus_client::encoding::EncodeMetric,
{
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    /// A fresh registry.
    pub fn new() -> Arc<Self> {
        let mut r = Registry::with_prefix("herald");
        let log_errors: Counter =
            registered(&mut r, "log_errors", "Event log (Redis) failures: operations and lost connections");
        Arc::new(Metrics {
            connections: registered(&mut r, "connections", "Connected Socket.IO clients"),
            pending_sessions: registered(
                &mut r,
                "pending_sessions",
                "Engine.IO sessions that have not sent their Socket.IO CONNECT yet",
            ),
            subscriptions: registered(&mut r, "subscriptions", "Current room subscriptions by kind"),
            events_published: registered(&mut r, "events_published", "Events appended to the event log by type"),
            auth_failures: registered(&mut r, "auth_failures", "Rejected handshakes by reason"),
            acks: registered(&mut r, "acks", "Acknowledged client events by event and outcome"),
            publish_requests: registered(&mut r, "publish_requests", "Publish API requests by status code"),
            log_errors,
            limits_hit: registered(&mut r, "limits_hit", "Limits hit, by limit"),
            replay_log_events: registered(&mut r, "replay_log_events", "Events the in-memory replay log holds"),
            replay_log_bytes: registered(
                &mut r,
                "replay_log_bytes",
                "Bytes of event objects the in-memory replay log holds",
            ),
            fleet_entries_read: registered(
                &mut r,
                "fleet_entries_read",
                "Log entries this instance read, from every stream it follows",
            ),
            fleet_shards_followed: registered(
                &mut r,
                "fleet_shards_followed",
                "Shards of the log this instance follows",
            ),
            access_hook_calls: registered(
                &mut r,
                "access_hook_calls",
                "Authorization hook calls by outcome (circuit_open and overloaded: answered without a call)",
            ),
            access_hook_duration: {
                // 1 ms to about 4 s.
                let histogram = Histogram::new(exponential_buckets(0.001, 2.0, 13));
                r.register(
                    "access_hook_duration_seconds",
                    "How long the authorization hook took to answer or fail",
                    histogram.clone(),
                );
                histogram
            },
            access_hook_cache_hits: registered(
                &mut r,
                "access_hook_cache_hits",
                "Membership checks the authorization hook's cache answered",
            ),
            access_hook_circuit: registered(
                &mut r,
                "access_hook_circuit",
                "The authorization hook's circuit: 0 closed, 1 half-open, 2 open",
            ),
            access_hook_in_flight: registered(&mut r, "access_hook_in_flight", "Authorization hook calls in flight"),
            access_hook_checks: registered(
                &mut r,
                "access_hook_checks",
                "Distinct membership checks waiting for the authorization hook",
            ),
            presence_rooms: registered(
                &mut r,
                "presence_rooms",
                "Rooms this instance keeps presence for (with a presence socket here, or leaving)",
            ),
            presence_subscriptions: registered(
                &mut r,
                "presence_subscriptions",
                "Presence subscriptions (socket, room) on this instance",
            ),
            presence_messages: registered(&mut r, "presence_messages", "Presence events sent to sockets, by event"),
            registry: r,
        })
    }

    /// The metrics in Prometheus / OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// An error and its sources on one line (`a: b: c`), for logs.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_line_stays_one_line_whatever_its_values_hold() {
        let forged = "INFO revoked user=zz\nFAKE-LOG-LINE ERROR herald: admin logged in\r\u{85}\u{2028}\x1b[31m\0end\n";
        let line = one_line(forged, false);
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        assert!(line.ends_with("end\n"));
        assert!(line.contains("zz\\nFAKE-LOG-LINE"), "{line:?}");
        assert!(!line.chars().any(|c| c != '\n' && (c.is_control() || c == '\u{2028}')), "{line:?}");
        // On a terminal the escape character carries the colours.
        assert!(one_line("\x1b[32mINFO\x1b[0m x\n", true).starts_with('\x1b'));
        assert_eq!(one_line("plain \u{e9}t\u{e9}\tok\n", false), "plain \u{e9}t\u{e9}\tok\n");
    }
}
