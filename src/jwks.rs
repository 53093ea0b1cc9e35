//! JWKS: the public keys of an identity provider, fetched from its URL and
//! kept fresh, for [`crate::auth::Verifier`].
//!
//! - A key verifies exactly one algorithm ([`keys::allowed_algorithm`]); a
//!   token is checked against the key named by its `kid`. Keys herald cannot
//!   use are skipped with a warning naming their `kid` ([`keys`]).
//! - The document is fetched at start, then again after the `Cache-Control:
//!   max-age` it came with, clamped to the configured bounds (without one, at
//!   the lower bound).
//! - A token with an unknown `kid` asks for a refetch. Those refetches are at
//!   most one per [`REFETCH_INTERVAL`]; one asked for sooner is made when the
//!   interval is over. The handshake waits, at most [`UNKNOWN_KID_WAIT`], only
//!   for a fetch that is under way or starts at once.
//! - A failed fetch (unreachable, not 2xx, too large, not a JWKS, no usable
//!   key) keeps the last good keys and is retried with backoff. Until a first
//!   fetch succeeds, every token is refused and [`Jwks::probe`] fails.
//!
//! Nothing about a token is logged here; fetch errors name the URL's host.

pub mod keys;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{ACCEPT, CACHE_CONTROL};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::health::Probe;
use crate::telemetry::error_chain;
use keys::{DocumentError, Key, KeySet, parse_document};

/// Refetches asked for by unknown `kid`s are at least this far apart, so
/// forged `kid`s cannot make herald hammer the provider.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// How long a handshake with an unknown `kid` may wait for a refetch.
pub const UNKNOWN_KID_WAIT: Duration = Duration::from_secs(2);
/// Largest JWKS document herald reads.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Connect timeout of one fetch.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of one whole fetch, the body included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry after a failed fetch; each further failure doubles it.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two retries.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Where and how often to fetch the JWKS.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    pub url: String,
    /// Bounds of the periodic refresh interval (the document's max-age is clamped to them).
    pub min_refresh: Duration,
    pub max_refresh: Duration,
}

/// The JWKS fetcher could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("HERALD_JWT_JWKS_URL is not a valid http or https URL")]
    Url,
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// One fetch failed.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("request failed")]
    Request(#[source] reqwest::Error),
    #[error("HTTP status {0}")]
    Status(reqwest::StatusCode),
    #[error("the document is larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge,
    #[error(transparent)]
    Document(#[from] DocumentError),
}

impl From<reqwest::Error> for FetchError {
    fn from(e: reqwest::Error) -> Self {
        // The URL may carry credentials or a tenant; the host is logged apart.
        FetchError::Request(e.without_url())
    }
}

/// What the fetcher publishes.
#[derive(Default)]
struct State {
    /// The usable keys by `kid`; `None` until a fetch succeeded.
    keys: Option<Arc<KeySet>>,
    /// When the latest finished fetch (good or not) started.
    attempt_started: Option<Instant>,
}

/// When fetches happen, besides the periodic one.
#[derive(Default)]
struct Schedule {
    /// When the fetch under way started.
    in_flight: Option<Instant>,
    /// A refetch asked for and not started yet: when it may start.
    pending: Option<Instant>,
    /// When the latest asked-for refetch started (or will start).
    last_refetch: Option<Instant>,
}

struct Shared {
    state: watch::Sender<State>,
    schedule: Mutex<Schedule>,
    wake: Notify,
    /// The URL's host (and port), for logs.
    host: String,
}

/// Aborts the fetcher when the last [`Jwks`] handle goes.
struct Fetcher(tokio::task::AbortHandle);

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The keys of a JWKS, kept fresh by a background task.
#[derive(Clone)]
pub struct Jwks {
    shared: Arc<Shared>,
    _fetcher: Arc<Fetcher>,
}

impl Jwks {
    /// Checks the URL and starts fetching (so it runs inside a Tokio runtime).
    pub fn start(settings: &JwksSettings) -> Result<Jwks, JwksError> {
        let url = Url::parse(&settings.url).map_err(|_| JwksError::Url)?;
        let host = match (url.scheme(), url.host_str(), url.port()) {
            ("http" | "https", Some(host), Some(port)) => format!("{host}:{port}"),
            ("http" | "https", Some(host), None) => host.to_owned(),
            _ => return Err(JwksError::Url),
        };
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(FETCH_TIMEOUT)
            // Fetches are minutes apart: a fresh connection each time.
            .pool_max_idle_per_host(0)
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                if attempt.previous().len() >= 5 {
                    attempt.error("too many redirects")
                } else if attempt.url().scheme() != "https" && attempt.previous().iter().any(|u| u.scheme() == "https")
                {
                    attempt.error("a redirect from https to http")
                } else {
                    attempt.follow()
                }
            }))
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(JwksError::Client)?;
        let shared = Arc::new(Shared {
            state: watch::Sender::new(State::default()),
            schedule: Mutex::new(Schedule::default()),
            wake: Notify::new(),
            host,
        });
        let refresh = (settings.min_refresh, settings.max_refresh.max(settings.min_refresh));
        let task = tokio::spawn(fetch_forever(shared.clone(), client, url, refresh));
        Ok(Jwks { shared, _fetcher: Arc::new(Fetcher(task.abort_handle())) })
    }

    /// The key named `kid`. An unknown `kid` asks for a refetch and waits
    /// for it when it is under way or starts at once.
    pub async fn key(&self, kid: &str) -> Option<Arc<Key>> {
        if let Some(key) = self.lookup(kid) {
            return Some(key);
        }
        let deadline = Instant::now() + UNKNOWN_KID_WAIT;
        // A fetch under way may bring it.
        let in_flight = self.lock_schedule().in_flight;
        if let Some(started) = in_flight {
            self.wait_for_fetch(started, deadline).await;
            if let Some(key) = self.lookup(kid) {
                return Some(key);
            }
        }
        let started = self.ask_refetch()?;
        tracing::debug!(host = %self.shared.host, "unknown kid: refetching the JWKS");
        self.wait_for_fetch(started, deadline).await;
        self.lookup(kid)
    }

    /// A readiness probe: fails until a first fetch succeeded.
    pub fn probe(&self) -> Probe {
        let shared = self.shared.clone();
        Arc::new(move || {
            let result = match shared.state.borrow().keys {
                Some(_) => Ok(()),
                None => Err(format!("no JWKS fetched from {} yet", shared.host)),
            };
            Box::pin(async move { result })
        })
    }

    fn lookup(&self, kid: &str) -> Option<Arc<Key>> {
        self.shared.state.borrow().keys.as_ref().and_then(|keys| keys.get(kid).cloned())
    }

    fn lock_schedule(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.shared.schedule.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks for a refetch, at once or when [`REFETCH_INTERVAL`] is over.
    /// Returns when it starts if that is now.
    fn ask_refetch(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut schedule = self.lock_schedule();
        if let Some(at) = schedule.pending {
            return (at <= now).then_some(at);
        }
        let at = schedule.last_refetch.map_or(now, |last| (last + REFETCH_INTERVAL).max(now));
        schedule.pending = Some(at);
        schedule.last_refetch = Some(at);
        drop(schedule);
        self.shared.wake.notify_one();
        (at <= now).then_some(at)
    }

    /// Waits until a fetch that started at `started` or later has finished.
    async fn wait_for_fetch(&self, started: Instant, deadline: Instant) {
        let mut state = self.shared.state.subscribe();
        let finished = state.wait_for(|s| s.attempt_started.is_some_and(|at| at >= started));
        let _ = tokio::time::timeout_at(deadline, finished).await;
    }
}

/// The fetcher: fetches when the periodic refresh or an asked-for refetch
/// is due, and publishes the result.
async fn fetch_forever(shared: Arc<Shared>, client: reqwest::Client, url: Url, refresh: (Duration, Duration)) {
    let lock = || shared.schedule.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut next = Instant::now();
    let mut failures: u32 = 0;
    let mut last_body: Option<Vec<u8>> = None;
    loop {
        loop {
            let due = lock().pending.map_or(next, |at| at.min(next));
            if due <= Instant::now() {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = shared.wake.notified() => {}
            }
        }
        let started = Instant::now();
        {
            let mut schedule = lock();
            schedule.in_flight = Some(started);
            if schedule.pending.is_some_and(|at| at <= started) {
                schedule.pending = None;
            }
        }
        let result = fetch(&client, &url).await.and_then(|(body, max_age)| {
            let keys = match &last_body {
                Some(last) if *last == body => None,
                _ => Some(parse_document(&body)?),
            };
            Ok((body, keys, max_age))
        });
        lock().in_flight = None;
        match result {
            Ok((body, keys, max_age)) => {
                failures = 0;
                next = started + refresh_after(max_age, refresh);
                shared.state.send_modify(|state| {
                    if let Some(keys) = keys {
                        let mut kids: Vec<&str> = keys.keys().map(String::as_str).collect();
                        kids.sort_unstable();
                        tracing::info!(host = %shared.host, kids = ?kids, "JWKS keys loaded");
                        state.keys = Some(Arc::new(keys));
                    }
                    state.attempt_started = Some(started);
                });
                last_body = Some(body);
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let retry = RETRY_FIRST.saturating_mul(1 << failures.min(16).saturating_sub(1)).min(RETRY_MAX);
                next = started + retry;
                let has_keys = shared.state.borrow().keys.is_some();
                let consequence =
                    if has_keys { "keeping the last good keys" } else { "no keys yet: every token is refused" };
                tracing::warn!(host = %shared.host, error = %error_chain(&e), ?retry, "JWKS fetch failed; {consequence}");
                shared.state.send_modify(|state| state.attempt_started = Some(started));
            }
        }
    }
}

/// Fetches the document, bounded in time and size, with its max-age.
async fn fetch(client: &reqwest::Client, url: &Url) -> Result<(Vec<u8>, Option<Duration>), FetchError> {
    let mut response = client.get(url.clone()).header(ACCEPT, "application/json").send().await?;
    if !response.status().is_success() {
        return Err(FetchError::Status(response.status()));
    }
    if response.content_length().is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64) {
        return Err(FetchError::TooLarge);
    }
    let directives: Vec<&str> =
        response.headers().get_all(CACHE_CONTROL).iter().filter_map(|v| v.to_str().ok()).collect();
    let max_age = max_age(&directives.join(","));
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, max_age))
}

/// When to refresh a document served with `max_age`: after it, within the
/// bounds; without one, at the lower bound.
fn refresh_after(max_age: Option<Duration>, (min, max): (Duration, Duration)) -> Duration {
    max_age.unwrap_or(min).clamp(min, max)
}

/// The `max-age` of a `Cache-Control` value; zero for `no-cache` and `no-store`.
pub fn max_age(cache_control: &str) -> Option<Duration> {
    let mut max_age = None;
    for directive in cache_control.split(',') {
        let (name, value) = match directive.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (directive.trim(), None),
        };
        if name.eq_ignore_ascii_case("no-cache") || name.eq_ignore_ascii_case("no-store") {
            return Some(Duration::ZERO);
        }
        if name.eq_ignore_ascii_case("max-age")
            && let Some(secs) = value.and_then(|v| v.parse::<u64>().ok())
        {
            max_age = Some(Duration::from_secs(secs));
        }
    }
    max_age
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_read_from_cache_control_and_clamped() {
        assert_eq!(max_age("public, max-age=3600, must-revalidate"), Some(Duration::from_secs(3600)));
        assert_eq!(max_age("MAX-AGE=\"60\""), Some(Duration::from_secs(60)));
        assert_eq!(max_age("max-age=60, no-cache"), Some(Duration::ZERO));
        assert_eq!(max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(max_age("public"), None);
        assert_eq!(max_age("max-age=soon"), None);
        assert_eq!(max_age(""), None);
        let bounds = (Duration::from_secs(60), Duration::from_secs(86_400));
        assert_eq!(refresh_after(Some(Duration::from_secs(3600)), bounds), Duration::from_secs(3600));
        assert_eq!(refresh_after(Some(Duration::ZERO), bounds), bounds.0);
        assert_eq!(refresh_after(Some(Duration::from_secs(999_999)), bounds), bounds.1);
        assert_eq!(refresh_after(None, bounds), bounds.0);
    }
}
