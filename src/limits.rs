//! Per-instance and per-socket limits: how many connections, how many
//! subscriptions per socket, and how fast a socket may send events (a token
//! bucket). Each limit is a setting, and each hit is counted in a metric.

use std::time::Instant;

use clap::Args;

/// The limits in force (settings: `HERALD_MAX_CONNECTIONS`, …).
#[derive(Debug, Clone, Copy, Args)]
pub struct Limits {
    /// Most connections per instance; past it, new handshakes are refused.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,

    /// Most rooms one socket may be subscribed to.
    #[arg(long, env = "HERALD_MAX_SUBSCRIPTIONS", default_value_t = 128)]
    pub max_subscriptions: usize,

    /// Client events per second one socket may send, on average (a token bucket).
    #[arg(long, env = "HERALD_CLIENT_EVENT_RATE", default_value_t = 20.0)]
    pub client_event_rate: f64,

    /// Client events one socket may send at once (the bucket's size).
    #[arg(long, env = "HERALD_CLIENT_EVENT_BURST", default_value_t = 200.0)]
    pub client_event_burst: f64,

    /// Rate-limited events in a row after which the socket is disconnected.
    #[arg(long, env = "HERALD_RATE_LIMIT_STRIKES", default_value_t = 100)]
    pub rate_limit_strikes: u32,
}

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
    /// Consecutive refusals.
    strikes: u32,
}

/// What the bucket says about one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Refused; the count of refusals in a row.
    Refused(u32),
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64) -> Self {
        TokenBucket { tokens: burst, rate, burst, last: Instant::now(), strikes: 0 }
    }

    /// Takes a token for one event, if there is one.
    pub fn admit(&mut self) -> Admission {
        self.admit_at(Instant::now())
    }

    fn admit_at(&mut self, now: Instant) -> Admission {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = 0;
            Admission::Allowed
        } else {
            self.strikes = self.strikes.saturating_add(1);
            Admission::Refused(self.strikes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut b = TokenBucket { tokens: 3.0, rate: 2.0, burst: 3.0, last: start, strikes: 0 };
        for _ in 0..3 {
            assert_eq!(b.admit_at(start), Admission::Allowed);
        }
        assert_eq!(b.admit_at(start), Admission::Refused(1));
        assert_eq!(b.admit_at(start), Admission::Refused(2));
        // Half a second refills one token at 2/s.
        assert_eq!(b.admit_at(start + Duration::from_millis(500)), Admission::Allowed);
        assert_eq!(b.admit_at(start + Duration::from_millis(500)), Admission::Refused(1));
        // Never more than the burst.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.admit_at(later), Admission::Allowed);
        }
        assert_eq!(b.admit_at(later), Admission::Refused(1));
    }
}
