//! Counters shared by the client tasks, the per-client sequence sets, latency histograms and
//! the `/proc` readings (RSS, CPU time) of the servers and of the generator itself.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the process-wide origin shared by the publisher and the receivers.
pub fn now_ns() -> u64 {
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A set of sequence numbers as a growable bitset: 300 events cost 40 bytes per client.
#[derive(Default)]
pub struct SeqSet {
    words: Vec<u64>,
}

impl SeqSet {
    /// Highest sequence number accepted (a server sending garbage cannot make us allocate more).
    pub const LIMIT: u64 = 1 << 24;

    /// `Some(true)` when new, `Some(false)` when already there, `None` when out of range.
    pub fn insert(&mut self, seq: u64) -> Option<bool> {
        if seq >= Self::LIMIT {
            return None;
        }
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let was = self.words[w] & (1 << b) != 0;
        self.words[w] |= 1 << b;
        Some(!was)
    }

    fn word(&self, w: usize) -> u64 {
        self.words.get(w).copied().unwrap_or(0)
    }

    /// How many members of `expected` in `lo..hi` are missing from `self`.
    pub fn missing_from(&self, expected: &SeqSet, lo: u64, hi: u64) -> u64 {
        count_bits(lo, hi, |w| expected.word(w) & !self.word(w))
    }

    pub fn count_in(&self, lo: u64, hi: u64) -> u64 {
        SeqSet::default().missing_from(self, lo, hi)
    }

    /// How many of `lo..hi` are in neither `self` nor `other`.
    pub fn absent_in(&self, other: &SeqSet, lo: u64, hi: u64) -> u64 {
        count_bits(lo, hi, |w| !(self.word(w) | other.word(w)))
    }
}

/// The set bits of `bits(w)` (the 64-bit word `w` of a set, seqs `64w..64w+64`) in `lo..hi`.
fn count_bits(lo: u64, hi: u64, bits: impl Fn(usize) -> u64) -> u64 {
    let mut n = 0;
    let mut s = lo;
    while s < hi {
        let w = (s / 64) as usize;
        let end_bit = (hi - (w as u64) * 64).min(64);
        let mut mask = if end_bit == 64 { u64::MAX } else { (1u64 << end_bit) - 1 };
        mask &= u64::MAX << (s % 64);
        n += (bits(w) & mask).count_ones() as u64;
        s = (w as u64 + 1) * 64;
    }
    n
}

/// Latency histogram in microseconds, 1 µs to 10 min, 3 significant figures.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Counters updated by every client task. Deliveries are counted once per (client, seq);
/// a second copy of the same seq is a duplicate.
pub struct Shared {
    pub deliveries: AtomicU64,
    pub duplicates: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub disconnects: AtomicU64,
    pub subscribed: AtomicU64,
    pub connect_failures: AtomicU64,
    pub last_delivery_ns: AtomicU64,
    pub stopping: std::sync::atomic::AtomicBool,
    /// One histogram per client group (scenario 4: 0 = publishing instance, 1 = far instance).
    pub hist: Vec<Mutex<Histogram<u64>>>,
    pub first_error: Mutex<Option<String>>,
    pub first_protocol_error: Mutex<Option<String>>,
    pub setup_done: tokio::sync::Notify,
}

impl Shared {
    pub fn new(groups: usize) -> Self {
        Shared {
            deliveries: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            subscribed: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
            stopping: std::sync::atomic::AtomicBool::new(false),
            hist: (0..groups).map(|_| Mutex::new(new_histogram())).collect(),
            first_error: Mutex::new(None),
            first_protocol_error: Mutex::new(None),
            setup_done: tokio::sync::Notify::new(),
        }
    }

    pub fn connect_failed(&self, why: String) {
        self.connect_failures.fetch_add(1, Relaxed);
        let mut g = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(why);
        }
        self.setup_done.notify_one();
    }

    pub fn protocol_error(&self, what: &str) {
        self.protocol_errors.fetch_add(1, Relaxed);
        let mut g = self.first_protocol_error.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(what.chars().take(200).collect());
        }
    }

    pub fn reset_histograms(&self) {
        for h in &self.hist {
            h.lock().unwrap_or_else(|e| e.into_inner()).reset();
        }
    }

    pub fn latency(&self, group: usize) -> Latency {
        let h = self.hist[group].lock().unwrap_or_else(|e| e.into_inner());
        Latency::from_hist(&h)
    }

    pub fn latency_all(&self) -> Latency {
        let mut all = new_histogram();
        for h in &self.hist {
            let h = h.lock().unwrap_or_else(|e| e.into_inner());
            let _ = all.add(&*h);
        }
        Latency::from_hist(&all)
    }
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn from_hist(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| (us as f64 / 1000.0 * 100.0).round() / 100.0;
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process, in seconds (clock-tick resolution).
pub fn proc_cpu_s(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some((ut + st) as f64 / clk_tck())
}

/// Time on CPU of a process's live threads, in seconds, with nanosecond resolution (the sum of
/// `/proc/<pid>/task/*/schedstat`), for phases too short for clock ticks. A thread that exits
/// between two readings takes its time with it: use it for long-lived threads (a runtime's).
pub fn proc_cpu_fine_s(pid: u32) -> Option<f64> {
    let mut ns: u64 = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        let Ok(s) = std::fs::read_to_string(path) else { continue };
        ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// VmRSS of a process, in KiB.
pub fn proc_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Sum over several pids (a fleet of instances); `None` if any is unreadable.
pub fn sum_cpu_s(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|p| proc_cpu_s(*p)).sum()
}

pub fn sum_rss_kib(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|p| proc_rss_kib(*p)).sum()
}

/// CPU time of this process (all threads), in seconds, with microsecond resolution.
pub fn self_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqset_insert_and_missing() {
        let mut exp = SeqSet::default();
        let mut seen = SeqSet::default();
        for s in 0..200 {
            exp.insert(s);
        }
        for s in (0..200).filter(|s| s % 3 != 0) {
            assert_eq!(seen.insert(s), Some(true));
        }
        assert_eq!(seen.insert(5), Some(false));
        assert_eq!(seen.insert(SeqSet::LIMIT), None);
        // multiples of 3 in 0..200: 67
        assert_eq!(seen.missing_from(&exp, 0, 200), 67);
        // multiples of 3 in 63..130: 63, 66, ..., 129 -> 23
        assert_eq!(seen.missing_from(&exp, 63, 130), 23);
        assert_eq!(seen.missing_from(&exp, 10, 10), 0);
        assert_eq!(exp.count_in(0, 1000), 200);
        assert_eq!(exp.count_in(64, 128), 64);
        // in neither: 200..300 and, below 200, the multiples of 3 that are not multiples of 5
        let mut fives = SeqSet::default();
        for s in (0..300).step_by(5) {
            fives.insert(s);
        }
        assert_eq!(seen.absent_in(&fives, 0, 300), 67 - 14 + 100 - 20);
        assert_eq!(seen.absent_in(&fives, 250, 250), 0);
        assert_eq!(SeqSet::default().absent_in(&SeqSet::default(), 5, 1000), 995);
    }

    #[test]
    fn fine_cpu_time_grows_with_work() {
        let pid = std::process::id();
        let before = proc_cpu_fine_s(pid).unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(proc_cpu_fine_s(pid).unwrap() - before >= 0.01, "{x}");
    }
}
