//! Per-instance and per-socket limits: how many connections, how many
//! subscriptions per socket, and how fast a socket may send events (a token
//! bucket). Each limit is a setting, and each hit is counted in a metric.

use std::time::{Duration, Instant};

/// The limits in force.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections per instance; past it, handshakes are refused.
    pub max_connections: usize,
    /// Rooms per socket; past it, a subscribe is refused.
    pub max_subscriptions: usize,
    /// Client events per second a socket may send, on average.
    pub event_rate: f64,
    /// How many client events a socket may send at once.
    pub event_burst: f64,
    /// Refused (rate-limited) events after which the socket is disconnected.
    pub strikes: u32,
    /// Clock leeway added to a token's `exp` before its socket is cut.
    pub token_leeway: Duration,
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
