//! The soak's clients. A member is a persistent client doing what the README's recipe does
//! with the stock socket.io-client: it keeps the last offset it received and, whenever its
//! connection is gone (dropped by the driver, or closed by the server), comes back after
//! socket.io-client's default backoff and re-subscribes with `since`. The driver tells it to
//! drop its connection (an RST), to leave (Socket.IO DISCONNECT, then a close), or to finish
//! (count what it was still owed, then leave). A throwaway connection is cut at one point of
//! its handshake or subscribe, with a FIN or an RST.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::ledger::{Ack, Ledger, Tally};
use crate::proto::{self, Ws};
use crate::stats::SeqSet;

/// One campaign's events, as the publisher has sent them.
#[derive(Default)]
pub struct Feed {
    /// Seqs below it have been (or are being) published.
    pub begun: AtomicU64,
    /// The last seq answered 202, plus one.
    pub accepted_hi: AtomicU64,
    pub failed: Arc<Mutex<SeqSet>>,
}

/// Counts of what happened to connections, and the first error of each kind.
#[derive(Default)]
pub struct Events {
    /// A member's connect or subscribe failed (it tries again).
    pub connect_failures: AtomicU64,
    pub first_connect_error: Mutex<Option<String>>,
    /// A member's connection closed by the server.
    pub server_closes: AtomicU64,
    /// A throwaway that failed before its cut point.
    pub throwaway_failures: AtomicU64,
    pub first_throwaway_error: Mutex<Option<String>>,
    pub protocol_errors: AtomicU64,
    pub first_protocol_error: Mutex<Option<String>>,
    /// Members told to finish while they were not subscribed.
    pub not_back: AtomicU64,
    /// Seqs still owed to members when they finished.
    pub owed_at_end: AtomicU64,
    pub throwaways_in_flight: AtomicU64,
}

fn note(count: &AtomicU64, first: &Mutex<Option<String>>, what: String) {
    count.fetch_add(1, Relaxed);
    let mut g = first.lock().unwrap_or_else(|e| e.into_inner());
    if g.is_none() {
        *g = Some(what.chars().take(200).collect());
    }
}

impl Events {
    fn protocol_error(&self, what: &str) {
        note(&self.protocol_errors, &self.first_protocol_error, proto::short(what));
    }
}

/// What every client shares.
pub struct Ctx {
    pub key: jsonwebtoken::EncodingKey,
    pub ws_config: WebSocketConfig,
    pub addrs: Vec<SocketAddr>,
    pub feeds: Vec<Feed>,
    pub tally: Arc<Tally>,
    pub events: Events,
    /// Handshakes in flight at once.
    pub sem: Semaphore,
    /// Per instance: members connected (Socket.IO), and subscribed.
    pub connected: Vec<AtomicU64>,
    pub subscribed: Vec<AtomicU64>,
}

/// What the driver tells a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    Stay,
    /// Reset its connection (RST); it comes back by itself.
    Drop,
    /// Socket.IO DISCONNECT, a close, and gone.
    Leave,
    /// Count what it is still owed, then leave (even members) or reset (odd ones).
    Finish,
}

const DOWN: u8 = 0;
const CONNECTED: u8 = 1;
const SUBSCRIBED: u8 = 2;

pub struct Member {
    pub id: u32,
    /// Its user is `s<user>`, a member of campaign `c<campaign>`.
    pub user: u32,
    pub campaign: u32,
    pub inst: usize,
    state: AtomicU8,
    /// Its ledger's next owed seq (0 before its first ack).
    expect: AtomicU64,
    cmd: watch::Sender<Cmd>,
}

impl Member {
    /// A member and the receiver its task reads its commands from.
    pub fn new(id: u32, user: u32, campaign: u32, inst: usize) -> (Arc<Member>, watch::Receiver<Cmd>) {
        let (cmd, rx) = watch::channel(Cmd::Stay);
        let state = AtomicU8::new(DOWN);
        (Arc::new(Member { id, user, campaign, inst, state, expect: AtomicU64::new(0), cmd }), rx)
    }

    pub fn subscribed(&self) -> bool {
        self.state.load(Relaxed) == SUBSCRIBED
    }

    /// The next seq of its campaign it is owed.
    pub fn expect(&self) -> u64 {
        self.expect.load(Relaxed)
    }

    pub fn tell(&self, c: Cmd) {
        self.cmd.send_replace(c);
    }

    fn set_state(&self, ctx: &Ctx, to: u8) {
        let from = self.state.swap(to, Relaxed);
        for (level, count) in [(CONNECTED, &ctx.connected[self.inst]), (SUBSCRIBED, &ctx.subscribed[self.inst])] {
            match (from >= level, to >= level) {
                (false, true) => count.fetch_add(1, Relaxed),
                (true, false) => count.fetch_sub(1, Relaxed),
                _ => 0,
            };
        }
    }
}

/// How a connection of a member ended.
enum End {
    Dropped,
    ServerClosed,
    Failed(String),
    Left,
}

/// A member's life: connections until it leaves.
pub async fn run(ctx: Arc<Ctx>, m: Arc<Member>, mut cmd: watch::Receiver<Cmd>) {
    let feed = &ctx.feeds[m.campaign as usize];
    let mut ledger = Ledger::new(ctx.tally.clone(), feed.failed.clone());
    let mut failures: u32 = 0;
    loop {
        let end = connection(&ctx, &m, &mut ledger, &mut cmd).await;
        m.set_state(&ctx, DOWN);
        match end {
            End::Left => return,
            End::Dropped => failures = 0,
            End::ServerClosed => {
                ctx.events.server_closes.fetch_add(1, Relaxed);
                failures = 0;
            }
            End::Failed(e) => {
                note(&ctx.events.connect_failures, &ctx.events.first_connect_error, e);
                failures += 1;
            }
        }
        // socket.io-client's default: 1 s, doubling per failed attempt up to 5 s, ±50%
        let base_ms = (1000u64 << failures.min(3)).min(5000);
        let pause = Duration::from_millis(base_ms / 2 + fastrand::u64(0..=base_ms));
        let woken = tokio::select! {
            _ = tokio::time::sleep(pause) => None,
            r = cmd.changed() => Some(r.map(|_| *cmd.borrow_and_update()).unwrap_or(Cmd::Leave)),
        };
        match woken {
            Some(Cmd::Leave) => return,
            Some(Cmd::Finish) => {
                ctx.events.not_back.fetch_add(1, Relaxed);
                return;
            }
            _ => {}
        }
    }
}

fn subscribe_frame(campaign: u32, since: Option<&str>) -> String {
    match since {
        Some(o) => format!("421[\"subscribe_campaign\",{{\"campaignId\":\"c{campaign}\",\"since\":\"{o}\"}}]"),
        None => format!("421[\"subscribe_campaign\",{{\"campaignId\":\"c{campaign}\"}}]"),
    }
}

/// The ack of the subscribe, `431[{..}]`: `Ok(what it said)`, or `Err` for a refusal or an
/// answer that does not fit the subscribe.
fn read_ack(rest: &str, with_since: bool) -> Result<Ack, String> {
    let v: serde_json::Value =
        serde_json::from_str(rest).map_err(|_| format!("malformed ack {}", proto::short(rest)))?;
    let a = v.get(0).ok_or_else(|| format!("empty ack {}", proto::short(rest)))?;
    if a.get("success").and_then(|s| s.as_bool()) != Some(true) {
        return Err(format!("subscribe refused: {}", proto::short(rest)));
    }
    match (with_since, a.get("recovered").and_then(|r| r.as_bool())) {
        (false, None) => Ok(Ack::Fresh),
        (true, Some(true)) => Ok(Ack::Recovered),
        (true, Some(false)) => Ok(Ack::Unrecovered),
        _ => Err(format!("ack does not fit the subscribe (since: {with_since}): {}", proto::short(rest))),
    }
}

/// One connection: connect, subscribe (with `since` when it has an offset), receive, until the
/// driver or the server ends it.
async fn connection(ctx: &Ctx, m: &Member, ledger: &mut Ledger, cmd: &mut watch::Receiver<Cmd>) -> End {
    let addr = ctx.addrs[m.inst];
    let user = format!("s{}", m.user);
    let setup = async {
        let _permit = ctx.sem.acquire().await.map_err(|e| e.to_string())?;
        let mut ws = proto::open(addr, ctx.ws_config).await?;
        proto::send_connect(&mut ws, &ctx.key, &user).await?;
        proto::connected(&mut ws).await?;
        Ok::<Ws, String>(ws)
    };
    let mut ws = match tokio::time::timeout(Duration::from_secs(30), setup).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return End::Failed(e),
        Err(_) => return End::Failed("connect timed out (30 s)".into()),
    };
    m.set_state(ctx, CONNECTED);
    let since = ledger.since().map(str::to_owned);
    if ws.send(Message::text(subscribe_frame(m.campaign, since.as_deref()))).await.is_err() {
        return End::ServerClosed;
    }
    ledger.subscribing();
    let feed = &ctx.feeds[m.campaign as usize];
    let ack_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut acked = false;
    loop {
        tokio::select! {
            r = cmd.changed() => {
                let c = r.map(|_| *cmd.borrow_and_update()).unwrap_or(Cmd::Leave);
                match c {
                    Cmd::Stay => {}
                    Cmd::Drop => {
                        reset(ws);
                        return End::Dropped;
                    }
                    Cmd::Leave => return leave(ws).await,
                    Cmd::Finish => {
                        if acked {
                            let owed = ledger.missing_to(feed.accepted_hi.load(Relaxed));
                            ctx.events.owed_at_end.fetch_add(owed, Relaxed);
                        } else {
                            ctx.events.not_back.fetch_add(1, Relaxed);
                        }
                        if m.id.is_multiple_of(2) {
                            return leave(ws).await;
                        }
                        reset(ws);
                        return End::Left;
                    }
                }
            }
            _ = tokio::time::sleep_until(ack_deadline), if !acked => {
                return End::Failed("no subscribe ack within 30 s".into());
            }
            msg = ws.next() => {
                let t = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => {
                        ctx.events.protocol_error("binary frame");
                        continue;
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return End::ServerClosed,
                    Some(Ok(_)) => continue,
                };
                let s = t.as_str();
                if s == "2" {
                    if ws.send(Message::text("3")).await.is_err() {
                        return End::ServerClosed;
                    }
                } else if s.starts_with("42") {
                    on_delivery(ctx, m, ledger, s);
                    m.expect.store(ledger.expect().unwrap_or(0), Relaxed);
                } else if let Some(rest) = s.strip_prefix("431") {
                    if acked {
                        ctx.events.protocol_error(s);
                        continue;
                    }
                    match read_ack(rest, since.is_some()) {
                        Ok(ack) => {
                            ledger.acked(ack, feed.begun.load(Relaxed));
                            m.expect.store(ledger.expect().unwrap_or(0), Relaxed);
                            acked = true;
                            m.set_state(ctx, SUBSCRIBED);
                        }
                        Err(e) => return End::Failed(e),
                    }
                } else if s.starts_with("41") || s.starts_with('1') {
                    return End::ServerClosed;
                } else if !(s == "6" || s.starts_with('3')) {
                    ctx.events.protocol_error(s);
                }
            }
        }
    }
}

fn on_delivery(ctx: &Ctx, m: &Member, ledger: &mut Ledger, t: &str) {
    let Some((_, seq, campaign)) = proto::parse_delivery(t) else {
        return ctx.events.protocol_error(t);
    };
    if campaign != m.campaign as u64 {
        return ctx.events.protocol_error("a delivery for a campaign the client is not subscribed to");
    }
    let Some(offset) = proto::offset_of(t) else {
        return ctx.events.protocol_error("a delivery without a usable offset");
    };
    if let Err(e) = ledger.delivered(seq, offset) {
        ctx.events.protocol_error(e);
    }
}

/// An RST: SO_LINGER 0, then the socket is closed.
fn reset(ws: Ws) {
    let _ = ws.get_ref().set_zero_linger();
}

/// Socket.IO DISCONNECT (`41`), then a WebSocket close.
async fn leave(mut ws: Ws) -> End {
    let _ = ws.send(Message::text("41")).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    End::Left
}

/// Where a throwaway connection is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// After the Engine.IO open packet, before any Socket.IO CONNECT (a pending session).
    Opened,
    /// At once after sending CONNECT.
    ConnectSent,
    /// After CONNECT's answer, before any subscribe.
    Connected,
    /// At once after sending a subscribe, before its ack.
    SubscribeSent,
}

/// One throwaway connection of user `s<user>` to instance `inst`, cut at `cut` with a FIN, or
/// with an RST when `rst`.
pub async fn throwaway(ctx: Arc<Ctx>, inst: usize, user: u32, campaign: u32, cut: Cut, rst: bool) {
    ctx.events.throwaways_in_flight.fetch_add(1, Relaxed);
    let go = async {
        let mut ws = proto::open(ctx.addrs[inst], ctx.ws_config).await?;
        if cut != Cut::Opened {
            proto::send_connect(&mut ws, &ctx.key, &format!("s{user}")).await?;
        }
        if matches!(cut, Cut::Connected | Cut::SubscribeSent) {
            proto::connected(&mut ws).await?;
        }
        if cut == Cut::SubscribeSent {
            ws.send(Message::text(subscribe_frame(campaign, None)))
                .await
                .map_err(|e| format!("send subscribe: {e}"))?;
        }
        Ok::<Ws, String>(ws)
    };
    match tokio::time::timeout(Duration::from_secs(30), go).await {
        Ok(Ok(ws)) if rst => reset(ws),
        Ok(Ok(ws)) => drop(ws),
        Ok(Err(e)) => note(&ctx.events.throwaway_failures, &ctx.events.first_throwaway_error, format!("{cut:?}: {e}")),
        Err(_) => {
            note(&ctx.events.throwaway_failures, &ctx.events.first_throwaway_error, format!("{cut:?}: timed out"))
        }
    }
    ctx.events.throwaways_in_flight.fetch_sub(1, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_must_fit_its_subscribe() {
        assert_eq!(read_ack(r#"[{"success":true}]"#, false), Ok(Ack::Fresh));
        assert_eq!(read_ack(r#"[{"success":true,"recovered":true}]"#, true), Ok(Ack::Recovered));
        assert_eq!(read_ack(r#"[{"success":true,"recovered":false}]"#, true), Ok(Ack::Unrecovered));
        assert!(read_ack(r#"[{"success":true}]"#, true).is_err());
        assert!(read_ack(r#"[{"success":true,"recovered":true}]"#, false).is_err());
        assert!(read_ack(r#"[{"success":false,"error":"Unauthorized"}]"#, false).is_err());
        assert!(read_ack("[", false).is_err());
    }

    #[test]
    fn a_subscribe_passes_since_when_there_is_one() {
        assert_eq!(subscribe_frame(3, None), r#"421["subscribe_campaign",{"campaignId":"c3"}]"#);
        assert_eq!(
            subscribe_frame(0, Some("1-2-3")),
            r#"421["subscribe_campaign",{"campaignId":"c0","since":"1-2-3"}]"#
        );
    }
}
