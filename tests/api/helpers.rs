//! `spawn_app()`: a real gateway on port 0 with its own database, and the
//! helpers tests use to talk to it from outside.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald::Application;
use herald::config::Config;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

use crate::client::{Client, ConnectError};
use crate::hook_server::{HOOK_SECRET, HookServer};

pub const JWT_SECRET: &str = "test-jwt-secret-do-not-use-anywhere";
pub const PUBLISH_TOKEN: &str = "test-publish-token-do-not-use";

/// Where a test's membership store lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A fresh SQLite file.
    Sqlite,
    /// A fresh schema in `HERALD_TEST_DATABASE_URL`.
    Postgres,
}

/// A running gateway.
pub struct TestApp {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub database_url: String,
    /// The authorization hook herald asks, in hook mode.
    pub hook: Option<HookServer>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

/// Whether gateways ask an authorization hook (`HERALD_TEST_MEMBERSHIP=hook`)
/// instead of reading the store's relations: the hook (a real HTTP server in
/// the test process, see `hook_server`) answers from the same database, so
/// every test runs alike in both modes.
pub fn hook_mode() -> bool {
    std::env::var("HERALD_TEST_MEMBERSHIP").is_ok_and(|v| v == "hook")
}

/// Points `config` at `hook`, with the test secret.
pub fn use_hook(config: &mut Config, hook: &HookServer) {
    config.access.access_url = Some(hook.url());
    config.access.access_secret = Some(HOOK_SECRET.into());
}

/// The fixture: campaigns c1 (alice, bob) and c2 (carol); settlements s1 in
/// c1 and s2 in c2; structures st1 in s1 and st2 in s2.
pub const FIXTURE: &str = "
INSERT INTO campaign_members (campaign_id, user_id) VALUES ('c1', 'alice'), ('c1', 'bob'), ('c2', 'carol');
INSERT INTO settlements (id, campaign_id) VALUES ('s1', 'c1'), ('s2', 'c2');
INSERT INTO structures (id, settlement_id) VALUES ('st1', 's1'), ('st2', 's2');
";

/// Whether this is a CI run, where a test never skips: `CI` set to anything
/// but empty, `false` or `0`.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "false" | "0"))
}

/// The PostgreSQL URL for store tests, or `None` (said loudly; fatal in CI).
pub fn postgres_url() -> Option<String> {
    match std::env::var("HERALD_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                !in_ci(),
                "HERALD_TEST_DATABASE_URL is not set, and this is CI: the PostgreSQL store tests must run"
            );
            eprintln!("SKIPPED: HERALD_TEST_DATABASE_URL is not set; the PostgreSQL store test did not run");
            None
        }
    }
}

/// A gateway on SQLite with the fixture and default settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(Backend::Sqlite, |_| {}).await
}

/// A gateway on SQLite whose sockets may send 1 event per second, 3 at
/// once, and are disconnected after `strikes` refusals in a row.
pub async fn spawn_rate_limited_app(strikes: u32) -> TestApp {
    spawn_app_with(Backend::Sqlite, |c| {
        c.limits.client_event_rate = 1.0;
        c.limits.client_event_burst = 3.0;
        c.limits.rate_limit_strikes = strikes;
    })
    .await
}

/// A gateway on `backend`, with the fixture, after `tweak` has changed its config.
pub async fn spawn_app_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let database_url = match backend {
        Backend::Sqlite => format!("sqlite://{}", dir.path().join("herald.db").display()),
        Backend::Postgres => fresh_postgres_schema().await,
    };
    let hook = test_hook(&database_url).await;
    start_app(dir, database_url, true, hook, tweak).await
}

/// A gateway on SQLite with the fixture whose membership comes from an
/// authorization hook (whatever `HERALD_TEST_MEMBERSHIP` says), after `tweak`.
pub async fn spawn_hooked_app(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let database_url = format!("sqlite://{}", dir.path().join("herald.db").display());
    let hook = HookServer::start(&database_url).await;
    start_app(dir, database_url, true, Some(hook), tweak).await
}

/// The hook a test's gateway asks, in hook mode.
async fn test_hook(database_url: &str) -> Option<HookServer> {
    if hook_mode() { Some(HookServer::start(database_url).await) } else { None }
}

/// A gateway on an existing database (one that another, possibly stopped,
/// app used: the caller keeps it alive), without inserting the fixture.
pub async fn spawn_app_on(database_url: &str, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let hook = test_hook(database_url).await;
    start_app(dir, database_url.to_owned(), false, hook, tweak).await
}

async fn start_app(
    dir: tempfile::TempDir,
    database_url: String,
    fixture: bool,
    hook: Option<HookServer>,
    tweak: impl FnOnce(&mut Config),
) -> TestApp {
    let config = test_config(&database_url, |c| {
        if let Some(hook) = &hook {
            use_hook(c, hook);
        }
        tweak(c);
    });
    let app = Application::build(config).await.expect("the gateway builds");
    let addr = app.local_addr().unwrap();
    if fixture {
        run_sql(&database_url, FIXTURE).await;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp { addr, http: reqwest::Client::new(), database_url, hook, stop: Some(stop), task: Some(task), _dir: dir }
}

/// A test gateway's config on `database_url` (port 0, the test secrets,
/// migrations), after `tweak`.
pub fn test_config(database_url: &str, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut config = Config::defaults();
    config.listen = "127.0.0.1:0".into();
    config.auth.jwt_secret = Some(JWT_SECRET.into());
    config.publish.publish_token = Some(PUBLISH_TOKEN.into());
    config.store.database_url = database_url.to_owned();
    config.store.database_migrate = true;
    tweak(&mut config);
    config
}

async fn fresh_postgres_schema() -> String {
    let base = postgres_url().expect("checked by the caller");
    let schema = format!("herald_test_{}", uuid_like());
    let pool = sqlx::PgPool::connect(&base).await.expect("PostgreSQL answers");
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&pool).await.expect("create schema");
    pool.close().await;
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-c%20search_path%3D{schema}")
}

fn uuid_like() -> String {
    let n: u64 = rand::random();
    format!("{n:016x}")
}

/// Runs SQL statements against the test's database.
pub async fn run_sql(url: &str, sql: &str) {
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.expect("sqlite opens");
        sqlx::raw_sql(sql).execute(&pool).await.expect("fixture SQL runs");
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("postgres opens");
        sqlx::raw_sql(sql).execute(&pool).await.expect("fixture SQL runs");
        pool.close().await;
    }
}

/// A token for `sub` signed with the test secret, valid for an hour.
pub fn token(sub: &str) -> String {
    token_with(&Header::default(), json!({ "sub": sub, "exp": now() + 3600 }), JWT_SECRET.as_bytes())
}

/// A token with any header, claims and HMAC key.
pub fn token_with(header: &Header, claims: Value, key: &[u8]) -> String {
    jsonwebtoken::encode(header, &claims, &EncodingKey::from_secret(key)).unwrap()
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Connects with `auth: { token }`.
    pub async fn connect(&self, sub: &str) -> Client {
        self.try_connect(Some(json!({ "token": token(sub) })), "").await.expect("connects")
    }

    /// Connects with the given auth payload and query string.
    pub async fn try_connect(&self, auth: Option<Value>, query: &str) -> Result<Client, ConnectError> {
        Client::connect(self.addr, auth, query).await
    }

    /// Publishes a body with the right token.
    pub async fn publish(&self, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url("/v1/events"))
            .bearer_auth(PUBLISH_TOKEN)
            .json(body)
            .send()
            .await
            .expect("publish request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.http.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap()
    }

    /// Stops the gateway and waits for it to finish.
    pub async fn stop(mut self) -> Duration {
        let started = std::time::Instant::now();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server ran");
        }
        started.elapsed()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A metric's value in the `/metrics` text (`name{labels} value`), or 0.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Event bodies for tests.
pub mod bodies {
    use serde_json::{Value, json};

    pub fn settlement_updated(campaign: &str, settlement: &str) -> Value {
        json!({"type": "settlement_updated", "payload": {"campaignId": campaign, "settlementId": settlement, "operation": "update"}})
    }

    pub fn structure_updated(campaign: &str, settlement: &str, structure: &str) -> Value {
        json!({"type": "structure_updated", "payload": {"campaignId": campaign, "settlementId": settlement, "structureId": structure, "operation": "create"}})
    }

    pub fn state_invalidated(campaign: &str) -> Value {
        json!({"type": "state_invalidated", "payload": {"campaignId": campaign, "scope": "campaign"}})
    }

    pub fn world_time_changed(campaign: &str) -> Value {
        json!({"type": "world_time_changed", "payload": {"campaignId": campaign, "previousTime": null, "newTime": "2026-11-25T17:00:00Z", "elapsed": 3600}})
    }

    pub fn entity_updated(campaign: &str, entity_type: &str, entity: &str) -> Value {
        json!({"type": "entity_updated", "payload": {"entityType": entity_type, "entityId": entity, "campaignId": campaign, "changedFields": ["name"]}})
    }
}
