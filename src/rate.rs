//! How fast a socket may send events: a token bucket per socket, with the
//! strikes that make a flooding socket's disconnection (enforced by the
//! gateway; the rate, burst and strikes are settings, see [`crate::config`]).

use std::time::Instant;

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
    /// Refusals not yet made up for by admitted events: each refusal adds
    /// one, each admission takes one away. Counting only refusals in a row
    /// would let a flood that the server reads slower than `strikes` per
    /// token go on for ever (each refilled token reset the count).
    strikes: u32,
}

/// What the bucket says about one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Refused; the strikes so far.
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
            self.strikes = self.strikes.saturating_sub(1);
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
        // Half a second refills one token at 2/s; an admission takes a strike away.
        assert_eq!(b.admit_at(start + Duration::from_millis(500)), Admission::Allowed);
        assert_eq!(b.admit_at(start + Duration::from_millis(500)), Admission::Refused(2));
        // Never more than the burst.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.admit_at(later), Admission::Allowed);
        }
        assert_eq!(b.admit_at(later), Admission::Refused(1));
    }

    #[test]
    fn a_flood_read_slowly_still_strikes_out() {
        // 20/s: a token every 50 ms. The server reads the flood at 1,000 events/s,
        // so only 50 refusals fall between two tokens: it must still add up.
        let start = Instant::now();
        let mut b = TokenBucket::new(20.0, 200.0);
        b.last = start;
        let mut struck = None;
        for i in 0..5_000u64 {
            if let Admission::Refused(n) = b.admit_at(start + Duration::from_millis(i)) {
                struck = struck.or((n == 100).then_some(i));
            }
        }
        let at = struck.expect("the flood reached 100 strikes");
        assert!(at < 500, "within half a second of the burst: {at} ms");
    }

    #[test]
    fn a_socket_at_under_twice_the_rate_is_limited_but_never_struck_out() {
        // 30 events/s against 20/s for a minute: a third refused, never 100 strikes.
        let start = Instant::now();
        let mut b = TokenBucket::new(20.0, 200.0);
        b.last = start;
        let mut most = 0;
        for i in 0..1_800u64 {
            if let Admission::Refused(n) = b.admit_at(start + Duration::from_micros(i * 33_333)) {
                most = most.max(n);
            }
        }
        assert!(most > 0 && most < 100, "{most}");
    }
}
