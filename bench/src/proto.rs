//! One simulated client: raw Engine.IO v4 / Socket.IO v5 over one WebSocket, one task.
//!
//! open `0{..}` -> `40{"token":..}` -> `40{"sid":..}` -> `421["subscribe_campaign",{..}]` ->
//! `431[{"success":true}]`, then every `42["<type>",{..}]` is a delivery: its `sentAtNs` and `seq`
//! give the latency and feed the client's sequence set (lost / duplicate detection). Pings `2`
//! are answered with `3`. Nothing the server sends is trusted: malformed input is counted as a
//! protocol error, never a panic.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::stats::{SeqSet, Shared, now_ns};

pub struct ClientCfg {
    pub key: jsonwebtoken::EncodingKey,
    pub ws_config: WebSocketConfig,
    pub setup_timeout: Duration,
    pub sem: Arc<Semaphore>,
    pub shared: Arc<Shared>,
}

pub struct Client {
    pub idx: u32,
    /// Subscribes to campaign `c<campaign>`.
    pub campaign: u32,
    /// Histogram group (scenario 4: the instance it is connected to).
    pub group: u8,
    pub addr: SocketAddr,
    pub subscribed: AtomicBool,
    pub seen: Mutex<SeqSet>,
    /// Subscribes with `presence: true` (scenario 8).
    pub presence: bool,
    /// Presence events received: `presence_joined`, `presence_left`, `presence_count`.
    pub presence_events: [AtomicU64; 3],
}

/// The presence events a client counts, in the order of [`Client::presence_events`].
pub const PRESENCE_EVENTS: [&str; 3] = ["presence_joined", "presence_left", "presence_count"];

/// Which of [`PRESENCE_EVENTS`] a `42["<type>",..]` frame is, if it is one.
pub fn presence_kind(t: &str) -> Option<usize> {
    let rest = t.strip_prefix("42[\"")?;
    PRESENCE_EVENTS.iter().position(|e| rest.strip_prefix(e).is_some_and(|r| r.starts_with('"')))
}

/// The `subscribe_campaign` frame with ack id 1, with `presence: true` when asked.
pub fn subscribe_frame(campaign: u32, presence: bool) -> String {
    let flag = if presence { ",\"presence\":true" } else { "" };
    format!("421[\"subscribe_campaign\",{{\"campaignId\":\"c{campaign}\"{flag}}}]")
}

/// Whether the text after `431` is a successful subscribe ack.
pub fn ack_ok(rest: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(rest)
        .ok()
        .and_then(|v| v.get(0).and_then(|a| a.get("success")).and_then(|s| s.as_bool()))
        .unwrap_or(false)
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
}

pub fn sign_token(key: &jsonwebtoken::EncodingKey, sub: &str) -> Result<String, String> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let claims = Claims { sub, iat: now, exp: now + 24 * 3600 };
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, key)
        .map_err(|e| format!("sign token: {e}"))
}

pub type Ws = WebSocketStream<TcpStream>;

/// The generator's WebSocket settings: a `read_buffer`-byte read buffer, frames written at once.
pub fn ws_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

pub async fn run(cfg: Arc<ClientCfg>, c: Arc<Client>) {
    let shared = &cfg.shared;
    let permit = cfg.sem.clone().acquire_owned().await;
    let res = tokio::time::timeout(cfg.setup_timeout, setup(&cfg, &c)).await;
    drop(permit);
    let mut ws = match res {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return shared.connect_failed(e),
        Err(_) => return shared.connect_failed("setup timed out".into()),
    };
    c.subscribed.store(true, Relaxed);
    shared.subscribed.fetch_add(1, Relaxed);
    shared.setup_done.notify_one();

    while let Some(m) = ws.next().await {
        match m {
            Ok(Message::Text(t)) => {
                let s = t.as_str();
                if s == "2" {
                    if ws.send(Message::text("3")).await.is_err() {
                        break;
                    }
                } else if s.starts_with("42") {
                    on_event(&c, shared, s);
                } else if s.starts_with("41") || s.starts_with('1') {
                    break; // server-side disconnect
                } else if s == "6" || s.starts_with("3") {
                    // noop / stray pong
                } else {
                    shared.protocol_error(s);
                }
            }
            Ok(Message::Close(_)) => break,
            Ok(Message::Binary(_)) => shared.protocol_error("binary frame"),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    c.subscribed.store(false, Relaxed);
    if !shared.stopping.load(Relaxed) {
        shared.disconnects.fetch_add(1, Relaxed);
    }
}

pub async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Binary(_))) => return Err("unexpected binary frame".into()),
            Some(Ok(Message::Close(_))) | None => return Err("closed by server".into()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("websocket: {e}")),
        }
    }
}

pub fn short(s: &str) -> String {
    s.chars().take(120).collect()
}

/// Next (source address, port) slot for loopback connections; see [`connect_tcp`].
static NEXT_SOURCE: AtomicU64 = AtomicU64::new(0);

/// Connects to `to`. On loopback, the source address and port are chosen here, not by the
/// kernel: with ~20,000 connections to one destination, the kernel's ephemeral-port search in
/// connect() (`__inet_hash_connect`) becomes the generator's main cost and slows the setup rate
/// by an order of magnitude. Slots cycle over 127.0.0.2-127.0.0.251 x ports 10000-59999, so
/// successive sessions of one run do not reuse a recent 4-tuple.
async fn connect_tcp(to: SocketAddr) -> Result<TcpStream, String> {
    let SocketAddr::V4(v4) = to else {
        return TcpStream::connect(to).await.map_err(|e| format!("tcp connect: {e}"));
    };
    if !v4.ip().is_loopback() {
        return TcpStream::connect(to).await.map_err(|e| format!("tcp connect: {e}"));
    }
    let mut last = String::new();
    for _ in 0..64 {
        let k = NEXT_SOURCE.fetch_add(1, Relaxed);
        let ip = std::net::Ipv4Addr::new(127, 0, 0, 2 + ((k / 50_000) % 250) as u8);
        let from = SocketAddr::from((ip, 10_000 + (k % 50_000) as u16));
        let sock = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        let _ = sock.set_reuseaddr(true);
        if let Err(e) = sock.bind(from) {
            last = format!("bind {from}: {e}");
            continue; // in use (e.g. a listener on 0.0.0.0): next slot
        }
        match sock.connect(to).await {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable || e.kind() == std::io::ErrorKind::AddrInUse => {
                last = format!("tcp connect from {from}: {e}");
            }
            Err(e) => return Err(format!("tcp connect: {e}")),
        }
    }
    Err(last)
}

/// TCP (see [`connect_tcp`]), the WebSocket upgrade, and the Engine.IO open packet.
pub async fn open(addr: SocketAddr, ws_config: WebSocketConfig) -> Result<Ws, String> {
    let tcp = connect_tcp(addr).await?;
    let _ = tcp.set_nodelay(true);
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(ws_config))
        .await
        .map_err(|e| format!("websocket handshake: {e}"))?;
    let open = next_text(&mut ws).await?;
    if !open.starts_with("0{") {
        return Err(format!("expected an open packet, got {}", short(&open)));
    }
    Ok(ws)
}

/// Sends the Socket.IO CONNECT with a token for user `user`.
pub async fn send_connect(ws: &mut Ws, key: &jsonwebtoken::EncodingKey, user: &str) -> Result<(), String> {
    let token = sign_token(key, user)?;
    ws.send(Message::text(format!("40{{\"token\":\"{token}\"}}"))).await.map_err(|e| format!("send connect: {e}"))
}

/// Waits for the answer to CONNECT (answering pings): `40{sid}`, or `44` (connect_error).
pub async fn connected(ws: &mut Ws) -> Result<(), String> {
    loop {
        let t = next_text(ws).await?;
        if t == "2" {
            ws.send(Message::text("3")).await.map_err(|e| format!("send pong: {e}"))?;
        } else if t.starts_with("40") {
            return Ok(());
        } else if let Some(rest) = t.strip_prefix("44") {
            return Err(format!("connect_error {}", short(rest)));
        } else {
            return Err(format!("expected 40{{sid}}, got {}", short(&t)));
        }
    }
}

async fn setup(cfg: &ClientCfg, c: &Client) -> Result<Ws, String> {
    let mut ws = open(c.addr, cfg.ws_config).await?;
    send_connect(&mut ws, &cfg.key, &format!("u{}", c.idx)).await?;
    connected(&mut ws).await?;
    ws.send(Message::text(subscribe_frame(c.campaign, c.presence)))
        .await
        .map_err(|e| format!("send subscribe: {e}"))?;
    loop {
        let t = next_text(&mut ws).await?;
        if t == "2" {
            ws.send(Message::text("3")).await.map_err(|e| format!("send pong: {e}"))?;
        } else if let Some(rest) = t.strip_prefix("431") {
            if ack_ok(rest) {
                return Ok(ws);
            }
            return Err(format!("subscribe refused: {}", short(rest)));
        } else if t.starts_with("42") {
            on_event(c, &cfg.shared, &t);
        } else {
            return Err(format!("expected the subscribe ack, got {}", short(&t)));
        }
    }
}

fn num_after(t: &str, key: &str) -> Option<u64> {
    let i = t.find(key)? + key.len();
    let rest = &t[i..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest[..digits].parse().ok()
}

/// `(sentAtNs, seq, campaign number)` of a delivered `42["<type>",{..}]` frame.
pub fn parse_delivery(t: &str) -> Option<(u64, u64, u64)> {
    if !t.starts_with("42[\"") {
        return None;
    }
    let sent = num_after(t, "\"sentAtNs\":")?;
    let seq = num_after(t, "\"seq\":")?;
    let camp = num_after(t, "\"campaignId\":\"c")?;
    Some((sent, seq, camp))
}

/// The `offset` of a delivered event object: herald's fixed-width digits and dashes, nothing
/// else (it is sent back in a subscribe's `since`).
pub fn offset_of(t: &str) -> Option<&str> {
    let key = "\"offset\":\"";
    let rest = &t[t.rfind(key)? + key.len()..];
    let o = &rest[..rest.find('"')?];
    (!o.is_empty() && o.len() <= 64 && o.bytes().all(|b| b.is_ascii_digit() || b == b'-')).then_some(o)
}

fn on_event(c: &Client, shared: &Shared, t: &str) {
    let now = now_ns();
    if let Some(k) = presence_kind(t) {
        if !c.presence {
            shared.protocol_error("a presence event for a client subscribed without presence");
        }
        c.presence_events[k].fetch_add(1, Relaxed);
        return;
    }
    let Some((sent, seq, camp)) = parse_delivery(t) else {
        return shared.protocol_error(t);
    };
    if camp != c.campaign as u64 {
        return shared.protocol_error("delivery for a campaign the client is not subscribed to");
    }
    let fresh = c.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(seq);
    match fresh {
        Some(true) => {
            shared.deliveries.fetch_add(1, Relaxed);
            shared.last_delivery_ns.fetch_max(now, Relaxed);
            let us = now.saturating_sub(sent) / 1000;
            if let Some(h) = shared.hist.get(c.group as usize) {
                h.lock().unwrap_or_else(|e| e.into_inner()).saturating_record(us.max(1));
            }
        }
        Some(false) => {
            shared.duplicates.fetch_add(1, Relaxed);
        }
        None => shared.protocol_error("seq out of range"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_delivery() {
        let t = r#"42["entity_updated",{"type":"entity_updated","timestamp":"2026-01-01T00:00:00.000Z","payload":{"entityType":"campaign","entityId":"e1","campaignId":"c42","entityData":{"sentAtNs":123456,"seq":7}},"offset":"1-2-3"}]"#;
        assert_eq!(parse_delivery(t), Some((123456, 7, 42)));
        assert_eq!(offset_of(t), Some("1-2-3"));
        assert_eq!(offset_of(r#"42["x",{"offset":"1-2\",\"since\":\"3"}]"#), None);
        assert_eq!(offset_of(r#"42["x",{"offset":""}]"#), None);
        assert_eq!(parse_delivery("42[\"x\",{}]"), None);
        assert_eq!(parse_delivery("43[\"x\"]"), None);
        assert_eq!(parse_delivery(r#"42["x",{"sentAtNs":"a","seq":1,"campaignId":"c1"}]"#), None);
    }

    #[test]
    fn tells_presence_events_and_builds_subscribes() {
        assert_eq!(
            presence_kind(r#"42["presence_joined",{"room":"campaign:c0","userId":"u1","connections":1}]"#),
            Some(0)
        );
        assert_eq!(presence_kind(r#"42["presence_left",{"room":"campaign:c0","userId":"u1"}]"#), Some(1));
        assert_eq!(presence_kind(r#"42["presence_count",{"room":"campaign:c0","count":7}]"#), Some(2));
        assert_eq!(presence_kind(r#"42["presence_counter",{}]"#), None);
        assert_eq!(presence_kind(r#"42["entity_updated",{"presence_count":1}]"#), None);
        assert_eq!(subscribe_frame(3, false), r#"421["subscribe_campaign",{"campaignId":"c3"}]"#);
        assert_eq!(subscribe_frame(0, true), r#"421["subscribe_campaign",{"campaignId":"c0","presence":true}]"#);
        assert!(ack_ok(r#"[{"success":true,"presenceCount":10000}]"#));
        assert!(!ack_ok(r#"[{"success":false}]"#));
        assert!(!ack_ok("nonsense"));
    }
}
