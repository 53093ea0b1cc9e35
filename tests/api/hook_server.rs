//! A real authorization hook for herald to call: an HTTP server on port 0 in
//! the test process (axum), which checks each request's signature and
//! timestamp as an application would, and answers from the test's database
//! (the same `campaign_members`, `settlements` and `structures` the SQL
//! store reads), so that a test runs alike in both modes. It counts what it
//! gets, and can be made slow, failing (503) or stopped and started again
//! on its port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::helpers::now;

/// The secret herald signs with in the tests.
pub const HOOK_SECRET: &str = "test-hook-secret-do-not-use-anywhere";
/// How old a request may be (the example's window too).
pub const MAX_AGE_SECS: u64 = 30;

/// Which store the answers come from.
#[derive(Clone)]
enum Source {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

#[derive(Default)]
struct Counters {
    /// Requests whose signature and timestamp were good.
    calls: AtomicUsize,
    /// Requests refused (401): bad or missing signature, old timestamp.
    refused: AtomicUsize,
    /// Requests answered 503 while failing.
    failed: AtomicUsize,
    /// Signed requests being answered now, and the most at once.
    current: AtomicUsize,
    most_at_once: AtomicUsize,
}

struct Shared {
    source: Source,
    counters: Counters,
    /// Milliseconds every answer waits first.
    delay_ms: AtomicU64,
    /// While set, every signed request is answered 503.
    failing: std::sync::atomic::AtomicBool,
    /// The `Authorization` headers received, in order.
    authorizations: Mutex<Vec<Option<String>>>,
}

/// A running (or stopped) hook server.
pub struct HookServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl HookServer {
    /// A hook answering from the database at `database_url` (connected on first use).
    pub async fn start(database_url: &str) -> HookServer {
        let source = if database_url.starts_with("sqlite:") {
            Source::Sqlite(sqlx::SqlitePool::connect_lazy(database_url).expect("sqlite URL"))
        } else {
            Source::Postgres(sqlx::PgPool::connect_lazy(database_url).expect("postgres URL"))
        };
        let shared = Arc::new(Shared {
            source,
            counters: Counters::default(),
            delay_ms: AtomicU64::new(0),
            failing: Default::default(),
            authorizations: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut server = HookServer { addr, shared, stop: None, task: None };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let router = axum::Router::new().route("/access", axum::routing::post(answer)).with_state(self.shared.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(stop);
        self.task = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        }));
    }

    /// The URL herald is given.
    pub fn url(&self) -> String {
        format!("http://{}/access", self.addr)
    }

    /// The most signed requests it answered at once.
    pub fn most_at_once(&self) -> usize {
        self.shared.counters.most_at_once.load(Ordering::SeqCst)
    }

    /// Requests answered 503 (while failing).
    pub fn failed(&self) -> usize {
        self.shared.counters.failed.load(Ordering::SeqCst)
    }

    pub fn calls(&self) -> usize {
        self.shared.counters.calls.load(Ordering::SeqCst)
    }

    pub fn refused(&self) -> usize {
        self.shared.counters.refused.load(Ordering::SeqCst)
    }

    /// Every answer waits `delay` first.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// While `failing`, every signed request is answered 503.
    pub fn set_failing(&self, failing: bool) {
        self.shared.failing.store(failing, Ordering::SeqCst);
    }

    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.shared.authorizations.lock().clone()
    }

    /// Stops listening (connections are refused) until [`HookServer::restart`].
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.expect("the hook's port is free again");
        self.serve(listener);
    }
}

impl Drop for HookServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// `v1=<hex HMAC-SHA256 over "<timestamp>.<body>">`, computed here apart from herald.
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("v1={hex}")
}

/// Whether the request is herald's and fresh: a timestamp within
/// [`MAX_AGE_SECS`] of now, and its signature (compared in constant time).
fn verified(headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(timestamp), Some(signature)) = (header("x-herald-timestamp"), header("x-herald-signature")) else {
        return false;
    };
    let Ok(at) = timestamp.parse::<u64>() else { return false };
    if now().abs_diff(at) > MAX_AGE_SECS {
        return false;
    }
    let Some(hex) = signature.strip_prefix("v1=") else { return false };
    let Some(bytes) = (0..hex.len())
        .step_by(2)
        .map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&bytes).is_ok()
}

async fn answer(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if !verified(&headers, &body) {
        shared.counters.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED.into_response();
    }
    shared.counters.calls.fetch_add(1, Ordering::SeqCst);
    let now_answering = shared.counters.current.fetch_add(1, Ordering::SeqCst) + 1;
    shared.counters.most_at_once.fetch_max(now_answering, Ordering::SeqCst);
    let response = signed_answer(&shared, &headers, &body).await;
    shared.counters.current.fetch_sub(1, Ordering::SeqCst);
    response
}

/// The answer to a request whose signature was good.
async fn signed_answer(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Response {
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    shared.authorizations.lock().push(authorization);
    // Decided first, then slow: a slow answer tells what was true when the call came.
    let answer = decide(shared, body).await;
    let delay = shared.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if shared.failing.load(Ordering::SeqCst) {
        shared.counters.failed.fetch_add(1, Ordering::SeqCst);
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    match answer {
        Ok(Some(answer)) => axum::Json(answer).into_response(),
        Ok(None) => StatusCode::BAD_REQUEST.into_response(),
        // The application's database failed: so does the hook.
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The answer to a request, from the database (`None`: not the contract's request).
async fn decide(shared: &Shared, body: &[u8]) -> Result<Option<Value>, sqlx::Error> {
    let Ok(request) = serde_json::from_slice::<Value>(body) else { return Ok(None) };
    let (Some(1), Some(user), Some(kind), Some(id)) = (
        request["version"].as_u64(),
        request["userId"].as_str(),
        request["room"]["kind"].as_str(),
        request["room"]["id"].as_str(),
    ) else {
        return Ok(None);
    };
    let Some(campaign) = campaign_of(&shared.source, kind, id).await? else {
        return Ok(Some(json!({ "allow": false })));
    };
    Ok(Some(if is_member(&shared.source, &campaign, user).await? {
        json!({ "allow": true, "campaignId": campaign })
    } else {
        json!({ "allow": false })
    }))
}

const CAMPAIGN_OF: &str = "SELECT $1";
const CAMPAIGN_OF_SETTLEMENT: &str = "SELECT campaign_id FROM settlements WHERE id = $1";
const CAMPAIGN_OF_STRUCTURE: &str =
    "SELECT s.campaign_id FROM structures t JOIN settlements s ON s.id = t.settlement_id WHERE t.id = $1";

async fn campaign_of(source: &Source, kind: &str, id: &str) -> Result<Option<String>, sqlx::Error> {
    let sql = match kind {
        "campaign" => CAMPAIGN_OF,
        "settlement" => CAMPAIGN_OF_SETTLEMENT,
        "structure" => CAMPAIGN_OF_STRUCTURE,
        _ => return Ok(None),
    };
    match source {
        Source::Sqlite(pool) => sqlx::query_scalar(sql).bind(id).fetch_optional(pool).await,
        Source::Postgres(pool) => {
            let sql = if kind == "campaign" { "SELECT $1::text" } else { sql };
            sqlx::query_scalar(sql).bind(id).fetch_optional(pool).await
        }
    }
}

async fn is_member(source: &Source, campaign: &str, user: &str) -> Result<bool, sqlx::Error> {
    const SQL: &str = "SELECT 1 FROM campaign_members WHERE campaign_id = $1 AND user_id = $2";
    let row: Option<i32> = match source {
        Source::Sqlite(pool) => sqlx::query_scalar(SQL).bind(campaign).bind(user).fetch_optional(pool).await?,
        Source::Postgres(pool) => sqlx::query_scalar(SQL).bind(campaign).bind(user).fetch_optional(pool).await?,
    };
    Ok(row.is_some())
}
