//! What the authorization hook costs on the subscribe path: the time from a
//! `subscribe_*` to its ack with a cold cache (`HERALD_MEMBERSHIP_CACHE_TTL=0s`,
//! so every subscribe is a membership check), membership from the SQL store
//! against membership from a hook, in the same run.
//!
//! ```sh
//! cargo run --release --example hook_latency            # 2000 subscribes per row
//! cargo run --release --example hook_latency -- 500
//! ```
//!
//! One process holds it all: two herald instances on one SQLite file (one
//! reading its relations, one asking the hook), the hook (axum, checking each
//! signature and answering from the same SQLite file with the same queries
//! the store makes), and raw Socket.IO clients over WebSocket. Each row is
//! one client subscribing again and again (latency alone; the two modes
//! alternate in rounds of 100, so that both see the same machine), or 32
//! clients of 32 users at once (under load: the hook's bounded calls in
//! flight and the store's pool both matter; one mode after the other).
//! Prints p50, p99 and max per row.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use futures_util::{SinkExt, StreamExt};
use herald::{Application, Config};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const JWT_SECRET: &str = "hook-latency-jwt-secret-not-for-use-anywhere";
const HOOK_SECRET: &str = "hook-latency-hook-secret-not-for-use-anywhere";
const USERS: usize = 32;
const ROUND: usize = 100;

/// Each user is a member of campaign `c<i>`, which has settlement `s<i>` and structure `st<i>`.
fn fixture() -> String {
    let mut sql = String::new();
    for i in 0..USERS {
        sql.push_str(&format!(
            "INSERT INTO campaign_members VALUES ('c{i}', 'u{i}');\
             INSERT INTO settlements VALUES ('s{i}', 'c{i}');\
             INSERT INTO structures VALUES ('st{i}', 's{i}');"
        ));
    }
    sql
}

// --- The hook ---------------------------------------------------------------

fn verified(headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(timestamp), Some(signature)) = (header("x-herald-timestamp"), header("x-herald-signature")) else {
        return false;
    };
    let Some(hex) = signature.strip_prefix("v1=") else { return false };
    let Some(bytes) = (0..hex.len())
        .step_by(2)
        .map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()) else { return false };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&bytes).is_ok()
}

const CAMPAIGN_OF_SETTLEMENT: &str = "SELECT campaign_id FROM settlements WHERE id = $1";
const CAMPAIGN_OF_STRUCTURE: &str =
    "SELECT s.campaign_id FROM structures t JOIN settlements s ON s.id = t.settlement_id WHERE t.id = $1";

async fn answer(State(pool): State<sqlx::SqlitePool>, headers: HeaderMap, body: Bytes) -> (StatusCode, String) {
    if !verified(&headers, &body) {
        return (StatusCode::UNAUTHORIZED, String::new());
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else { return (StatusCode::BAD_REQUEST, String::new()) };
    let (Some(user), Some(kind), Some(id)) =
        (request["userId"].as_str(), request["room"]["kind"].as_str(), request["room"]["id"].as_str())
    else {
        return (StatusCode::BAD_REQUEST, String::new());
    };
    let campaign: Result<Option<String>, sqlx::Error> = match kind {
        "campaign" => Ok(Some(id.to_owned())),
        "settlement" => sqlx::query_scalar(CAMPAIGN_OF_SETTLEMENT).bind(id).fetch_optional(&pool).await,
        _ => sqlx::query_scalar(CAMPAIGN_OF_STRUCTURE).bind(id).fetch_optional(&pool).await,
    };
    let Ok(campaign) = campaign else { return (StatusCode::SERVICE_UNAVAILABLE, String::new()) };
    let member = match &campaign {
        Some(c) => {
            sqlx::query_scalar::<_, i32>("SELECT 1 FROM campaign_members WHERE campaign_id = $1 AND user_id = $2")
                .bind(c)
                .bind(user)
                .fetch_optional(&pool)
                .await
                .map(|row| row.is_some())
        }
        None => Ok(false),
    };
    match (member, campaign) {
        (Ok(true), Some(c)) => (StatusCode::OK, json!({"allow": true, "campaignId": c}).to_string()),
        (Ok(_), _) => (StatusCode::OK, json!({"allow": false}).to_string()),
        (Err(_), _) => (StatusCode::SERVICE_UNAVAILABLE, String::new()),
    }
}

async fn start_hook(database_url: &str) -> anyhow::Result<SocketAddr> {
    let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(8).connect(database_url).await?;
    let router = axum::Router::new().route("/access", axum::routing::post(answer)).with_state(pool);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(addr)
}

// --- A raw Socket.IO client -----------------------------------------------------

struct Sio {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_ack: u64,
}

impl Sio {
    async fn connect(addr: SocketAddr, user: &str) -> anyhow::Result<Sio> {
        let exp = herald::auth::unix_now() + 3600;
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"sub": user, "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        )?;
        let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        let mut sio = Sio { ws, next_ack: 0 };
        ensure!(sio.text().await?.starts_with('0'), "no Engine.IO open packet");
        sio.ws.send(Message::text(format!("40{}", json!({ "token": token })))).await?;
        let connected = sio.text().await?;
        ensure!(connected.starts_with("40"), "connect refused: {connected}");
        Ok(sio)
    }

    /// The next text frame, answering pings on the way.
    async fn text(&mut self) -> anyhow::Result<String> {
        loop {
            match self.ws.next().await.context("closed")?? {
                Message::Text(t) if t.as_str() == "2" => self.ws.send(Message::text("3")).await?,
                Message::Text(t) => return Ok(t.to_string()),
                Message::Close(_) => bail!("closed"),
                _ => {}
            }
        }
    }

    /// Emits `event` with an ack id; returns the ack's argument.
    async fn call(&mut self, event: &str, data: Value) -> anyhow::Result<Value> {
        let id = self.next_ack;
        self.next_ack += 1;
        self.ws.send(Message::text(format!("42{id}{}", json!([event, data])))).await?;
        let prefix = format!("43{id}");
        loop {
            let frame = self.text().await?;
            if let Some(rest) = frame.strip_prefix(&prefix) {
                let args: Value = serde_json::from_str(rest)?;
                return Ok(args[0].clone());
            }
        }
    }
}

/// Subscribes `n` times to the user's room of `kind`, each ack timed.
async fn subscribes(sio: &mut Sio, user: usize, kind: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    let id = match kind {
        "campaign" => format!("c{user}"),
        "settlement" => format!("s{user}"),
        _ => format!("st{user}"),
    };
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let ack = sio.call(&format!("subscribe_{kind}"), json!({ format!("{kind}Id"): id })).await?;
        times.push(started.elapsed());
        ensure!(ack == json!({"success": true}), "{kind} {id}: {ack}");
    }
    Ok(times)
}

// --- The run ------------------------------------------------------------------------

async fn gateway(database_url: &str, hook: Option<SocketAddr>) -> anyhow::Result<SocketAddr> {
    let mut config = Config::defaults();
    config.listen = "127.0.0.1:0".into();
    config.store.database_url = database_url.to_owned();
    config.store.membership_cache_ttl = Duration::ZERO;
    config.auth.jwt_secret = Some(JWT_SECRET.into());
    config.publish.publish_token = Some("hook-latency-publish-token".into());
    config.limits.client_event_rate = 1e6;
    config.limits.client_event_burst = 1e6;
    if let Some(hook) = hook {
        config.access.access_url = Some(format!("http://{hook}/access"));
        config.access.access_secret = Some(HOOK_SECRET.into());
    }
    let app = Application::build(config).await?;
    let addr = app.local_addr()?;
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    Ok(addr)
}

fn row(label: &str, mut times: Vec<Duration>) {
    times.sort();
    let at = |p: usize| times[(times.len() * p / 100).min(times.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{label:<42} n={:<6} p50={:>7.3} ms  p99={:>7.3} ms  max={:>7.3} ms",
        times.len(),
        ms(at(50)),
        ms(at(99)),
        ms(times[times.len() - 1])
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(2000).max(ROUND);
    let dir = tempfile::tempdir()?;
    let database_url = format!("sqlite://{}", dir.path().join("membership.db").display());
    let sql_gateway = gateway(&database_url, None).await?;
    let pool = sqlx::SqlitePool::connect(&database_url).await?;
    sqlx::raw_sql(&fixture()).execute(&pool).await?;
    pool.close().await;
    let hook = start_hook(&database_url).await?;
    let hook_gateway = gateway(&database_url, Some(hook)).await?;
    println!("subscribe -> ack, cold cache (HERALD_MEMBERSHIP_CACHE_TTL=0s); SQLite store vs the hook over loopback");

    for kind in ["campaign", "structure"] {
        // One client: latency alone.
        let (mut sql, mut hooked) = (Sio::connect(sql_gateway, "u0").await?, Sio::connect(hook_gateway, "u0").await?);
        subscribes(&mut sql, 0, kind, 50).await?; // warm-up: connections, statements
        subscribes(&mut hooked, 0, kind, 50).await?;
        let (mut sql_times, mut hook_times) = (Vec::new(), Vec::new());
        for _ in 0..n / ROUND {
            sql_times.extend(subscribes(&mut sql, 0, kind, ROUND).await?);
            hook_times.extend(subscribes(&mut hooked, 0, kind, ROUND).await?);
        }
        row(&format!("{kind}, 1 client, SQL store"), sql_times);
        row(&format!("{kind}, 1 client, hook"), hook_times);

        // USERS clients at once, each its own user (no two checks merged).
        let (mut sql_times, mut hook_times) = (Vec::new(), Vec::new());
        for (addr, times) in [(sql_gateway, &mut sql_times), (hook_gateway, &mut hook_times)] {
            let mut clients = Vec::new();
            for user in 0..USERS {
                clients.push(Sio::connect(addr, &format!("u{user}")).await?);
            }
            let per_client = (n / USERS).max(ROUND);
            let runs = clients
                .into_iter()
                .enumerate()
                .map(|(user, mut sio)| async move { subscribes(&mut sio, user, kind, per_client).await });
            for result in futures_util::future::join_all(runs).await {
                times.extend(result?);
            }
        }
        row(&format!("{kind}, {USERS} clients at once, SQL store"), sql_times);
        row(&format!("{kind}, {USERS} clients at once, hook"), hook_times);
    }
    // Every subscribe was a call: no answer came from the cache.
    let metrics = reqwest::get(format!("http://{hook_gateway}/metrics")).await?.text().await?;
    let series = |name: &str| {
        metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok()).unwrap_or(0.0)
    };
    println!(
        "hook: {} calls answered allow, {} answers from the cache",
        series(r#"herald_access_hook_calls_total{outcome="allow"}"#),
        series("herald_access_hook_cache_hits_total")
    );
    Ok(())
}
