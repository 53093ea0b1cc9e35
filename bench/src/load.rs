//! The publisher: `POST /v1/events` at a fixed rate from a few keep-alive connections.
//!
//! Event `i` of a phase is due at `t0 + i / rate`, goes to campaign `campaigns[i % C]` through
//! the instance `route[c]` (instance 0 unless a scenario routes by campaign) with sequence
//! number `base[c] + i / C`, and carries `sentAtNs` (taken just before the request is
//! written) and `seq` in `entityData`, which herald passes through unchanged. Worker `w` sends
//! the events `i ≡ w (mod workers)`, so up to `workers` requests are in flight; a late event is
//! sent at once and its lateness is reported (`max_publish_lag_ms`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::stats::{SeqSet, now_ns};

pub struct Publisher {
    pub http: reqwest::Client,
    pub url: String,
    pub auth: String,
}

impl Publisher {
    pub fn new(base: &str, token: &str, workers: usize) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(workers)
            .timeout(Duration::from_secs(120))
            .build()?;
        Ok(Publisher { http, url: format!("{base}/v1/events"), auth: format!("Bearer {token}") })
    }

    /// Publishes one `entity_updated` of campaign `c<campaign>` carrying `sentAtNs` and `seq`;
    /// `Ok` when the server answered 202.
    pub async fn publish(&self, campaign: u32, sent_ns: u64, seq: u64) -> Result<(), String> {
        let body = format!(
            "[{{\"type\":\"entity_updated\",\"payload\":{{\"entityType\":\"campaign\",\"entityId\":\"e1\",\
             \"campaignId\":\"c{campaign}\",\"entityData\":{{\"sentAtNs\":{sent_ns},\"seq\":{seq}}}}}}}]"
        );
        let res = self
            .http
            .post(&self.url)
            .header("authorization", &self.auth)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        match res {
            Ok(r) if r.status().as_u16() == 202 => {
                let _ = r.bytes().await;
                Ok(())
            }
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                Err(format!("HTTP {status}: {}", text.chars().take(200).collect::<String>()))
            }
            Err(e) => Err(format!("request failed: {e}")),
        }
    }
}

pub struct PhasePlan<'a> {
    pub campaigns: &'a [u32],
    pub base: &'a [u64],
    /// Per campaign number: the index of the publisher its events go through.
    pub route: &'a [usize],
    pub rate: f64,
    pub duration: Duration,
    pub workers: usize,
}

#[derive(Default)]
pub struct PhaseOutcome {
    pub planned: u64,
    pub accepted: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub t0_ns: u64,
    pub end_ns: u64,
    pub max_lag_ms: f64,
    /// Per campaign number: the seq range `[lo, hi)` this phase used.
    pub lo: Vec<u64>,
    pub hi: Vec<u64>,
}

struct Counters {
    accepted: AtomicU64,
    errors: AtomicU64,
    max_lag_ns: AtomicU64,
    end_ns: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// Publishes one phase; `accepted[c]` gets the seqs the server answered 202 for.
pub async fn publish_phase(
    publishers: &[Arc<Publisher>],
    accepted: &Arc<Vec<Mutex<SeqSet>>>,
    plan: PhasePlan<'_>,
) -> PhaseOutcome {
    let n = ((plan.rate * plan.duration.as_secs_f64()).round() as u64).max(1);
    let ncamp = plan.campaigns.len() as u64;
    let mut lo = plan.base.to_vec();
    let mut hi = plan.base.to_vec();
    for (j, &c) in plan.campaigns.iter().enumerate() {
        let j = j as u64;
        let count = if j < n { (n - j).div_ceil(ncamp) } else { 0 };
        lo[c as usize] = plan.base[c as usize];
        hi[c as usize] = plan.base[c as usize] + count;
    }
    let counters = Arc::new(Counters {
        accepted: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        max_lag_ns: AtomicU64::new(0),
        end_ns: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });
    let t0 = tokio::time::Instant::now();
    let t0_ns = now_ns();
    let interval_ns = 1e9 / plan.rate;
    let campaigns: Arc<Vec<u32>> = Arc::new(plan.campaigns.to_vec());
    let base: Arc<Vec<u64>> = Arc::new(plan.base.to_vec());
    let route: Arc<Vec<Arc<Publisher>>> = Arc::new(plan.route.iter().map(|&k| publishers[k].clone()).collect());
    let workers = plan.workers.max(1) as u64;
    let mut handles = Vec::new();
    for w in 0..workers.min(n) {
        let (route, accepted, counters, campaigns, base) =
            (route.clone(), accepted.clone(), counters.clone(), campaigns.clone(), base.clone());
        handles.push(tokio::spawn(async move {
            let mut i = w;
            while i < n {
                let due = t0 + Duration::from_nanos((i as f64 * interval_ns) as u64);
                tokio::time::sleep_until(due).await;
                let c = campaigns[(i % ncamp) as usize];
                let p = &route[c as usize];
                let seq = base[c as usize] + i / ncamp;
                let sent = now_ns();
                let lag = sent.saturating_sub(t0_ns + (i as f64 * interval_ns) as u64);
                counters.max_lag_ns.fetch_max(lag, Relaxed);
                match p.publish(c, sent, seq).await {
                    Ok(()) => {
                        accepted[c as usize].lock().unwrap_or_else(|e| e.into_inner()).insert(seq);
                        counters.accepted.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        counters.errors.fetch_add(1, Relaxed);
                        let mut g = counters.first_error.lock().unwrap_or_else(|e| e.into_inner());
                        if g.is_none() {
                            *g = Some(e);
                        }
                    }
                }
                counters.end_ns.fetch_max(now_ns(), Relaxed);
                i += workers;
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    let first_error = counters.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
    PhaseOutcome {
        planned: n,
        accepted: counters.accepted.load(Relaxed),
        errors: counters.errors.load(Relaxed),
        first_error,
        t0_ns,
        end_ns: counters.end_ns.load(Relaxed).max(t0_ns),
        max_lag_ms: counters.max_lag_ns.load(Relaxed) as f64 / 1e6,
        lo,
        hi,
    }
}
