//! Membership from the application itself: the authorization hook
//! (`HERALD_ACCESS_URL`). Each check the cache cannot answer is a signed
//! `POST` to the application, which says allow (with the room's campaign)
//! or deny. The contract (versioned) is in the README.
//!
//! Failure is explicit and bounded: a call has a deadline
//! (`HERALD_ACCESS_TIMEOUT`, a free slot included), at most
//! `HERALD_ACCESS_MAX_IN_FLIGHT` calls are in flight, identical concurrent
//! checks (same user, same room) share one call, and after repeated failures
//! the circuit breaker (`circuit.rs`) stops calling for a while. A check that gets no usable
//! answer is a [`HookFailure`] (the client is told `Unavailable`), never a
//! denial.
//!
//! A call runs in a task of its own, so a subscribe that goes away (its
//! socket closed) neither cancels the call other subscribes wait for nor
//! leaves its entry behind: the task removes its entry however it ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use hmac::{Hmac, Mac};
use moka::future::Cache;
use parking_lot::Mutex;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::circuit::{Circuit, Outcome};
use super::{AccessError, Credential, Decision, Membership, MembershipFuture, cache};
use crate::auth::unix_now;
use crate::rooms::{CampaignId, Room};
use crate::telemetry::Metrics;

/// The version of the request and answer herald speaks.
pub const HOOK_VERSION: u32 = 1;
/// The header carrying the request's time (Unix seconds).
pub const TIMESTAMP_HEADER: &str = "X-Herald-Timestamp";
/// The header carrying `v1=<hex HMAC-SHA256 over "<timestamp>.<body>">`.
pub const SIGNATURE_HEADER: &str = "X-Herald-Signature";
/// Largest answer herald reads; a longer one is malformed.
const MAX_ANSWER_BYTES: usize = 16 * 1024;
/// Distinct checks that may wait for the hook at once, per call slot; past
/// it a check is answered [`HookFailure::Overloaded`] at once (each waits at
/// most the timeout, so this bounds what a flood of distinct checks holds).
const PENDING_PER_SLOT: usize = 64;

/// Why the hook gave no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HookFailure {
    #[error("no answer within the timeout")]
    Timeout,
    #[error("the request failed (connection refused, reset, or TLS)")]
    Request,
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("the answer is not the contract's JSON")]
    Malformed,
    #[error("the circuit is open after repeated failures")]
    CircuitOpen,
    #[error("every call slot stayed taken for the whole timeout")]
    Overloaded,
}

impl HookFailure {
    /// Its `outcome` label in `herald_access_hook_calls_total`.
    pub fn outcome(self) -> &'static str {
        match self {
            HookFailure::Timeout => "timeout",
            HookFailure::Request => "request_error",
            HookFailure::Status(_) => "bad_status",
            HookFailure::Malformed => "malformed",
            HookFailure::CircuitOpen => "circuit_open",
            HookFailure::Overloaded => "overloaded",
        }
    }
}

/// The hook's settings (see `config::AccessHookSettings`).
pub struct HookSettings {
    pub url: reqwest::Url,
    pub secret: SecretString,
    pub timeout: Duration,
    pub max_in_flight: usize,
    pub forward_token: bool,
    pub circuit_failures: u32,
    pub circuit_backoff: Duration,
    /// How long an answer is cached (`HERALD_MEMBERSHIP_CACHE_TTL`).
    pub cache_ttl: Duration,
}

/// A check: who, which room.
type Key = (Arc<str>, Room);
/// A call other checks of the same key wait for.
type SharedCall = Shared<BoxFuture<'static, Result<Decision, HookFailure>>>;

/// Membership answered by the application over HTTP, cached.
pub struct HookMembership {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    url: reqwest::Url,
    secret: SecretString,
    timeout: Duration,
    forward_token: bool,
    slots: Semaphore,
    /// Most entries in `calls`.
    max_pending: usize,
    circuit: Circuit,
    answers: Cache<Key, Decision>,
    /// The calls in flight, one per key (the single flight), each with its number.
    calls: Mutex<HashMap<Key, (u64, SharedCall)>>,
    /// The number of the next call.
    next_call: AtomicU64,
    /// Bumped by each forget: a call that started before one does not cache its answer.
    forgets: AtomicU64,
    metrics: Arc<Metrics>,
}

/// The answer's body.
#[derive(Deserialize)]
struct Answer {
    allow: bool,
    #[serde(rename = "campaignId")]
    campaign_id: Option<String>,
}

/// `v1=<hex HMAC-SHA256 of "<timestamp>.<body>" keyed with the secret>`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(3 + digest.len() * 2);
    out.push_str("v1=");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

impl HookMembership {
    /// A hook client; it calls nothing until the first check.
    pub fn new(settings: HookSettings, metrics: Arc<Metrics>) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            // A redirect would resend the check elsewhere (and a POST would become a GET).
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        let inner = Inner {
            http,
            url: settings.url,
            secret: settings.secret,
            timeout: settings.timeout,
            forward_token: settings.forward_token,
            slots: Semaphore::new(settings.max_in_flight),
            max_pending: settings.max_in_flight.saturating_mul(PENDING_PER_SLOT),
            circuit: Circuit::new(settings.circuit_failures, settings.circuit_backoff, metrics.clone()),
            answers: cache(settings.cache_ttl),
            calls: Mutex::new(HashMap::new()),
            next_call: AtomicU64::new(0),
            forgets: AtomicU64::new(0),
            metrics,
        };
        Ok(HookMembership { inner: Arc::new(inner) })
    }

    /// A function that tells the circuit's state, for `/readyz`.
    pub fn circuit_reporter(&self) -> Arc<dyn Fn() -> &'static str + Send + Sync> {
        let inner = self.inner.clone();
        Arc::new(move || inner.circuit.state().as_str())
    }

    /// Joins the call in flight for `key`, or starts one (none when too
    /// many checks wait already).
    fn join_or_call(&self, key: Key, token: Option<&Credential>) -> Result<SharedCall, HookFailure> {
        let mut calls = self.inner.calls.lock();
        if let Some((_, call)) = calls.get(&key) {
            return Ok(call.clone());
        }
        if calls.len() >= self.inner.max_pending {
            self.inner.metrics.access_hook_calls.get_or_create(&[("outcome", HookFailure::Overloaded.outcome())]).inc();
            return Err(HookFailure::Overloaded);
        }
        let inner = self.inner.clone();
        let token = token.filter(|_| inner.forward_token).map(|c| c.0.clone());
        let number = inner.next_call.fetch_add(1, Ordering::SeqCst);
        let task = tokio::spawn(Inner::run(inner, key.clone(), number, token));
        // The task does not panic (no unwrap on what the hook sends); were it
        // to, its entry is still removed (the guard) and its waiters see a failure.
        let call = task.map(|joined| joined.unwrap_or(Err(HookFailure::Request))).boxed().shared();
        calls.insert(key, (number, call.clone()));
        self.inner.metrics.access_hook_checks.set(calls.len() as i64);
        Ok(call)
    }
}

/// Removes a call's entry when its task ends, however it ends (unless a
/// forget removed it already, and another call of the key took its place).
struct Entry<'a> {
    inner: &'a Inner,
    key: &'a Key,
    number: u64,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let mut calls = self.inner.calls.lock();
        if calls.get(self.key).is_some_and(|(number, _)| *number == self.number) {
            calls.remove(self.key);
        }
        self.inner.metrics.access_hook_checks.set(calls.len() as i64);
    }
}

/// Counts a call in flight while it lives.
struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.access_hook_in_flight.dec();
    }
}

impl Inner {
    /// One call, in its own task: asks the hook, caches the answer (unless
    /// a forget came meanwhile), then removes its entry.
    async fn run(
        self: Arc<Self>,
        key: Key,
        number: u64,
        token: Option<Arc<SecretString>>,
    ) -> Result<Decision, HookFailure> {
        let _entry = Entry { inner: &self, key: &key, number };
        let forgets = self.forgets.load(Ordering::SeqCst);
        let result = self.call(&key, token.as_deref()).await;
        self.metrics
            .access_hook_calls
            .get_or_create(&[(
                "outcome",
                match &result {
                    Ok(Decision::Allowed(_)) => "allow",
                    Ok(Decision::Denied) => "deny",
                    Err(failure) => failure.outcome(),
                },
            )])
            .inc();
        match &result {
            Ok(decision) => {
                if self.forgets.load(Ordering::SeqCst) == forgets {
                    self.answers.insert(key.clone(), decision.clone()).await;
                }
            }
            // No call made: the circuit's opening was logged, and a full house shows in the metrics.
            Err(failure @ (HookFailure::CircuitOpen | HookFailure::Overloaded)) => {
                tracing::debug!(user = &*key.0, room = %key.1, %failure, "authorization hook not called")
            }
            Err(failure) => tracing::warn!(user = &*key.0, room = %key.1, %failure, "authorization hook call failed"),
        }
        result
    }

    /// A revocation of `user`: the calls in flight for the user stop being
    /// joined (a check from now on makes a call of its own), and no call in
    /// flight caches its answer.
    fn forget_calls_of(&self, user: &Arc<str>) {
        self.forgets.fetch_add(1, Ordering::SeqCst);
        let mut calls = self.calls.lock();
        calls.retain(|(u, _), _| u != user);
        self.metrics.access_hook_checks.set(calls.len() as i64);
    }

    /// Through the circuit, a free slot and the deadline.
    async fn call(&self, key: &Key, token: Option<&SecretString>) -> Result<Decision, HookFailure> {
        if !self.circuit.admit() {
            return Err(HookFailure::CircuitOpen);
        }
        let deadline = Instant::now() + self.timeout;
        let Ok(Ok(_slot)) = tokio::time::timeout_at(deadline, self.slots.acquire()).await else {
            self.circuit.record(Outcome::NotCalled);
            return Err(HookFailure::Overloaded);
        };
        self.metrics.access_hook_in_flight.inc();
        let _in_flight = InFlight(&self.metrics);
        let started = Instant::now();
        let result =
            tokio::time::timeout_at(deadline, self.request(key, token)).await.unwrap_or(Err(HookFailure::Timeout));
        self.metrics.access_hook_duration.observe(started.elapsed().as_secs_f64());
        self.circuit.record(if result.is_ok() { Outcome::Answered } else { Outcome::Failed });
        result
    }

    /// The signed request, and its answer read.
    async fn request(&self, (user, room): &Key, token: Option<&SecretString>) -> Result<Decision, HookFailure> {
        let body = json!({
            "version": HOOK_VERSION,
            "userId": &**user,
            "room": { "kind": room.kind().as_str(), "id": room.id() },
        })
        .to_string();
        let timestamp = unix_now();
        let mut request = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, timestamp)
            .header(SIGNATURE_HEADER, signature(self.secret.expose_secret().as_bytes(), timestamp, body.as_bytes()));
        if let Some(token) = token {
            request = request.bearer_auth(token.expose_secret());
        }
        // The error is not logged: it would quote the URL (which may hold credentials).
        let mut response = request.body(body).send().await.map_err(|_| HookFailure::Request)?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(HookFailure::Status(response.status().as_u16()));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|_| HookFailure::Request)? {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(HookFailure::Malformed);
            }
            bytes.extend_from_slice(&chunk);
        }
        decision(room, &bytes)
    }
}

/// Reads an answer: `{"allow": false}`, or `{"allow": true, "campaignId":
/// "…"}` with a valid campaign id (for a campaign room, its own).
fn decision(room: &Room, bytes: &[u8]) -> Result<Decision, HookFailure> {
    let answer: Answer = serde_json::from_slice(bytes).map_err(|_| HookFailure::Malformed)?;
    if !answer.allow {
        return Ok(Decision::Denied);
    }
    let campaign = answer.campaign_id.as_deref().map(CampaignId::parse);
    match (campaign, room) {
        (Some(Ok(campaign)), Room::Campaign(id)) if campaign != *id => Err(HookFailure::Malformed),
        (Some(Ok(campaign)), _) => Ok(Decision::Allowed(campaign)),
        _ => Err(HookFailure::Malformed),
    }
}

impl Membership for HookMembership {
    fn check<'a>(
        &'a self,
        user: &'a Arc<str>,
        room: &'a Room,
        token: Option<&'a Credential>,
    ) -> MembershipFuture<'a, Result<Decision, AccessError>> {
        Box::pin(async move {
            let key = (user.clone(), room.clone());
            if let Some(decision) = self.inner.answers.get(&key).await {
                self.inner.metrics.access_hook_cache_hits.inc();
                return Ok(decision);
            }
            let call = self.join_or_call(key, token).map_err(AccessError::Unavailable)?;
            call.await.map_err(AccessError::Unavailable)
        })
    }

    fn wants_token(&self) -> bool {
        self.inner.forward_token
    }

    fn forget<'a>(&'a self, campaign: &'a CampaignId, user: &'a Arc<str>) -> MembershipFuture<'a, ()> {
        Box::pin(async move {
            self.inner.forget_calls_of(user);
            let (user, campaign) = (user.clone(), campaign.clone());
            // Every room of the campaign, and (their campaign unknown) the user's denials.
            let _ = self.inner.answers.invalidate_entries_if(move |(u, _), decision| {
                *u == user && (*decision == Decision::Denied || *decision == Decision::Allowed(campaign.clone()))
            });
        })
    }

    fn forget_user(&self, user: &Arc<str>) {
        self.inner.forget_calls_of(user);
        let user = user.clone();
        let _ = self.inner.answers.invalidate_entries_if(move |(u, _), _| *u == user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rooms::RoomKind;

    #[test]
    fn the_signature_is_hmac_sha256_over_timestamp_dot_body() {
        // Computed apart: python3 -c 'import hmac,hashlib; print(hmac.new(b"Jefe",
        // b"1700000000.{\"version\":1}", hashlib.sha256).hexdigest())'
        assert_eq!(
            signature(b"Jefe", 1_700_000_000, br#"{"version":1}"#),
            "v1=11c6a57e329385bb25185175112f9105b5e1927c400fbcc7bc64da526d7232c5"
        );
    }

    #[test]
    fn answers_are_read_strictly() {
        let campaign = RoomKind::Campaign.room("c1").unwrap();
        let settlement = RoomKind::Settlement.room("s1").unwrap();
        let c1 = CampaignId::parse("c1").unwrap();
        assert_eq!(decision(&settlement, br#"{"allow":true,"campaignId":"c1"}"#), Ok(Decision::Allowed(c1.clone())));
        assert_eq!(decision(&campaign, br#"{"allow":true,"campaignId":"c1","extra":1}"#), Ok(Decision::Allowed(c1)));
        assert_eq!(decision(&settlement, br#"{"allow":false}"#), Ok(Decision::Denied));
        for bad in [
            &br#"{"allow":true}"#[..],
            br#"{"allow":true,"campaignId":"c2"}"#,
            br#"{"allow":true,"campaignId":"../x"}"#,
            br#"{"allow":"yes"}"#,
            br#"{}"#,
            b"allow",
            b"",
        ] {
            assert_eq!(decision(&campaign, bad), Err(HookFailure::Malformed), "{}", String::from_utf8_lossy(bad));
        }
    }
}
