//! The authorization hook's circuit breaker: after `threshold` consecutive
//! failed calls herald stops calling (open) for `backoff`, then lets one call
//! through (half-open): its success closes the circuit, its failure opens it
//! again. Each change is logged and shown in `herald_access_hook_circuit`.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::telemetry::Metrics;

/// The circuit's state, as `/readyz` and the logs name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    HalfOpen,
    Open,
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::HalfOpen => "half-open",
            CircuitState::Open => "open",
        }
    }

    fn gauge(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Calls go through; `failures` in a row so far.
    Closed { failures: u32 },
    /// No call until `until`.
    Open { until: Instant },
    /// One call (the probe) is in flight; no other.
    HalfOpen,
}

impl State {
    fn public(self) -> CircuitState {
        match self {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen => CircuitState::HalfOpen,
        }
    }
}

/// How a call that went through ended, for the circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The hook answered (allow or deny).
    Answered,
    /// The hook failed (timeout, connection, status, malformed answer).
    Failed,
    /// No call was made after all (no free slot): says nothing of the hook.
    NotCalled,
}

pub struct Circuit {
    state: Mutex<State>,
    threshold: u32,
    backoff: Duration,
    metrics: Arc<Metrics>,
}

impl Circuit {
    pub fn new(threshold: u32, backoff: Duration, metrics: Arc<Metrics>) -> Self {
        metrics.access_hook_circuit.set(CircuitState::Closed.gauge());
        Circuit { state: Mutex::new(State::Closed { failures: 0 }), threshold: threshold.max(1), backoff, metrics }
    }

    pub fn state(&self) -> CircuitState {
        self.state.lock().public()
    }

    /// May a call go out now? Once the backoff has passed, the first
    /// caller gets through as the probe.
    pub fn admit(&self) -> bool {
        let mut state = self.state.lock();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } if Instant::now() >= until => {
                self.set(&mut state, State::HalfOpen);
                true
            }
            State::Open { .. } | State::HalfOpen => false,
        }
    }

    /// Records how an admitted call ended.
    pub fn record(&self, outcome: Outcome) {
        let mut state = self.state.lock();
        let next = match (outcome, *state) {
            (Outcome::Answered, _) => State::Closed { failures: 0 },
            (Outcome::Failed, State::Closed { failures }) if failures + 1 < self.threshold => {
                State::Closed { failures: failures + 1 }
            }
            (Outcome::Failed, State::Open { until }) => State::Open { until },
            (Outcome::Failed, _) => State::Open { until: Instant::now() + self.backoff },
            // A probe that could not go out: the next caller probes.
            (Outcome::NotCalled, State::HalfOpen) => State::Open { until: Instant::now() },
            (Outcome::NotCalled, other) => other,
        };
        self.set(&mut state, next);
    }

    fn set(&self, state: &mut State, next: State) {
        let (before, after) = (state.public(), next.public());
        *state = next;
        if before != after {
            self.metrics.access_hook_circuit.set(after.gauge());
            match after {
                CircuitState::Open => tracing::warn!(
                    backoff = ?self.backoff,
                    "authorization hook circuit open: subscribes are answered Unavailable without a call"
                ),
                CircuitState::HalfOpen => tracing::info!("authorization hook circuit half-open: one call probes it"),
                CircuitState::Closed => tracing::info!("authorization hook circuit closed: the hook answers again"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn opens_after_the_threshold_probes_after_the_backoff_and_closes_on_an_answer() {
        let metrics = Metrics::new();
        let circuit = Circuit::new(3, Duration::from_millis(50), metrics.clone());
        for _ in 0..2 {
            assert!(circuit.admit());
            circuit.record(Outcome::Failed);
        }
        assert_eq!(circuit.state(), CircuitState::Closed);
        // An answer in between starts the count again.
        circuit.record(Outcome::Answered);
        for _ in 0..3 {
            assert!(circuit.admit());
            circuit.record(Outcome::Failed);
        }
        assert_eq!((circuit.state(), metrics.access_hook_circuit.get()), (CircuitState::Open, 2));
        assert!(!circuit.admit());
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(circuit.admit(), "the probe");
        assert!(!circuit.admit(), "one probe at a time");
        assert_eq!(metrics.access_hook_circuit.get(), 1);
        circuit.record(Outcome::Failed);
        assert!(!circuit.admit(), "a failed probe opens it again");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(circuit.admit());
        circuit.record(Outcome::NotCalled);
        assert!(circuit.admit(), "a probe that did not go out lets the next caller probe");
        circuit.record(Outcome::Answered);
        assert_eq!((circuit.state(), metrics.access_hook_circuit.get()), (CircuitState::Closed, 0));
    }
}
