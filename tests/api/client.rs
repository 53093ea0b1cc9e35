//! A small raw Socket.IO v5 client over WebSocket, for tests: it speaks the
//! wire protocol directly, so tests can also send what a real client never
//! would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

type Acks = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A connected test client.
pub struct Client {
    out: mpsc::UnboundedSender<Message>,
    events: mpsc::UnboundedReceiver<(String, Value)>,
    acks: Acks,
    next_ack: u64,
    closed: Arc<tokio::sync::Notify>,
    is_closed: Arc<std::sync::atomic::AtomicBool>,
    /// How many events had arrived when the latest ack arrived.
    events_at_ack: Arc<std::sync::atomic::AtomicUsize>,
    /// Whether the server sent a Socket.IO DISCONNECT packet (`41`).
    disconnect_packet: Arc<std::sync::atomic::AtomicBool>,
    /// The Socket.IO session id the server gave.
    pub sid: String,
}

/// How a connection attempt ended when it did not connect.
#[derive(Debug, PartialEq)]
pub enum ConnectError {
    /// The server answered CONNECT_ERROR with this message.
    Refused(String),
    /// Anything else (transport failure, timeout, unexpected frame).
    Other(String),
}

const STEP: Duration = Duration::from_secs(5);

impl Client {
    /// Connects to `/socket.io/` on `addr`. `auth` goes in the CONNECT packet;
    /// `query` is appended to the handshake URL (e.g. `token=...`).
    pub async fn connect(addr: SocketAddr, auth: Option<Value>, query: &str) -> Result<Client, ConnectError> {
        Self::connect_inner(addr, auth, query, None).await
    }

    /// Connects like [`Client::connect`], with a small receive buffer and a
    /// switch: while it is `true`, the client stops reading from its socket,
    /// like a client that is too slow for its events (or never reads).
    pub async fn connect_stallable(
        addr: SocketAddr,
        auth: Option<Value>,
    ) -> Result<(Client, tokio::sync::watch::Sender<bool>), ConnectError> {
        let (stall, stalled) = tokio::sync::watch::channel(false);
        let client = Self::connect_inner(addr, auth, "", Some(stalled)).await?;
        Ok((client, stall))
    }

    async fn connect_inner(
        addr: SocketAddr,
        auth: Option<Value>,
        query: &str,
        mut stalled: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Result<Client, ConnectError> {
        let url = format!(
            "ws://{addr}/socket.io/?EIO=4&transport=websocket{}{query}",
            if query.is_empty() { "" } else { "&" }
        );
        let other = |e: &dyn std::fmt::Display| ConnectError::Other(e.to_string());
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| other(&e))?;
        if stalled.is_some() {
            // A fixed, small receive buffer: the server's writes back up soon.
            socket.set_recv_buffer_size(8 * 1024).map_err(|e| other(&e))?;
        }
        let handshake = async {
            let stream = socket.connect(addr).await.map_err(|e| other(&e))?;
            tokio_tungstenite::client_async(url.as_str(), stream).await.map_err(|e| other(&e))
        };
        let (ws, _) = tokio::time::timeout(STEP, handshake)
            .await
            .map_err(|_| ConnectError::Other("handshake timed out".into()))??;
        let (mut sink, mut stream) = ws.split();
        // Engine.IO open packet.
        let open = next_text(&mut stream).await?;
        if !open.starts_with('0') {
            return Err(ConnectError::Other(format!("expected an open packet, got {open}")));
        }
        let connect = match &auth {
            Some(a) => format!("40{a}"),
            None => "40".to_owned(),
        };
        sink.send(Message::text(connect)).await.map_err(|e| ConnectError::Other(e.to_string()))?;
        let sid = loop {
            let frame = next_text(&mut stream).await?;
            if frame == "2" {
                sink.send(Message::text("3")).await.map_err(|e| ConnectError::Other(e.to_string()))?;
                continue;
            }
            if let Some(body) = frame.strip_prefix("40") {
                let v: Value = serde_json::from_str(body).map_err(|e| ConnectError::Other(e.to_string()))?;
                break v["sid"].as_str().unwrap_or_default().to_owned();
            }
            if let Some(body) = frame.strip_prefix("44") {
                let v: Value = serde_json::from_str(body).map_err(|e| ConnectError::Other(e.to_string()))?;
                return Err(ConnectError::Refused(v["message"].as_str().unwrap_or_default().to_owned()));
            }
            return Err(ConnectError::Other(format!("unexpected frame {frame}")));
        };

        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let (events_tx, events) = mpsc::unbounded_channel();
        let acks: Acks = Arc::default();
        let closed = Arc::new(tokio::sync::Notify::new());
        let is_closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let events_at_ack = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let disconnect_packet = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                if sink.send(msg).await.is_err() {
                    break;
                }
            }
        });
        {
            let out = out.clone();
            let acks = acks.clone();
            let closed = closed.clone();
            let is_closed = is_closed.clone();
            let events_at_ack = events_at_ack.clone();
            let disconnect_packet = disconnect_packet.clone();
            tokio::spawn(async move {
                let mut events_seen = 0;
                loop {
                    if let Some(stalled) = stalled.as_mut() {
                        while *stalled.borrow_and_update() {
                            if stalled.changed().await.is_err() {
                                break;
                            }
                        }
                    }
                    let Some(Ok(msg)) = stream.next().await else { break };
                    let Message::Text(text) = msg else {
                        if matches!(msg, Message::Close(_)) {
                            break;
                        }
                        continue;
                    };
                    let text = text.as_str();
                    if text == "2" {
                        let _ = out.send(Message::text("3"));
                    } else if let Some(body) = text.strip_prefix("42") {
                        if let Ok(Value::Array(mut items)) = serde_json::from_str::<Value>(body) {
                            let name = items.first().and_then(Value::as_str).unwrap_or_default().to_owned();
                            let arg = if items.len() > 1 { items.remove(1) } else { Value::Null };
                            let _ = events_tx.send((name, arg));
                            events_seen += 1;
                        }
                    } else if let Some(body) = text.strip_prefix("43") {
                        let digits: String = body.chars().take_while(char::is_ascii_digit).collect();
                        let id: u64 = digits.parse().unwrap_or(u64::MAX);
                        let args: Value = serde_json::from_str(&body[digits.len()..]).unwrap_or(Value::Null);
                        let first = args.get(0).cloned().unwrap_or(Value::Null);
                        events_at_ack.store(events_seen, std::sync::atomic::Ordering::SeqCst);
                        if let Some(tx) = acks.lock().unwrap().remove(&id) {
                            let _ = tx.send(first);
                        }
                    } else if text.starts_with("41") {
                        disconnect_packet.store(true, std::sync::atomic::Ordering::SeqCst);
                        break;
                    } else if text.starts_with('1') {
                        break;
                    }
                }
                is_closed.store(true, std::sync::atomic::Ordering::SeqCst);
                closed.notify_waiters();
            });
        }
        Ok(Client { out, events, acks, next_ack: 0, closed, is_closed, events_at_ack, disconnect_packet, sid })
    }

    /// Sends an event without an ack id.
    pub fn emit(&self, event: &str, data: Value) {
        self.send_raw(&format!("42{}", json!([event, data])));
    }

    /// Sends an engine.io text frame as is.
    pub fn send_raw(&self, frame: &str) {
        let _ = self.out.send(Message::text(frame.to_owned()));
    }

    /// Sends a binary WebSocket frame.
    pub fn send_binary(&self, bytes: Vec<u8>) {
        let _ = self.out.send(Message::binary(bytes));
    }

    /// Sends an event with an ack id and waits for the ack's first argument.
    pub async fn emit_with_ack(&mut self, event: &str, data: Value) -> Value {
        self.try_emit_with_ack(event, data).await.unwrap_or_else(|| panic!("no ack for {event} within {STEP:?}"))
    }

    /// Like `emit_with_ack`, but `None` when no ack comes.
    pub async fn try_emit_with_ack(&mut self, event: &str, data: Value) -> Option<Value> {
        self.try_emit_with_ack_within(event, data, STEP).await
    }

    /// Like `try_emit_with_ack`, waiting up to `wait` for the ack.
    pub async fn try_emit_with_ack_within(&mut self, event: &str, data: Value, wait: Duration) -> Option<Value> {
        let id = self.next_ack;
        self.next_ack += 1;
        let (tx, rx) = oneshot::channel();
        self.acks.lock().unwrap().insert(id, tx);
        self.send_raw(&format!("42{id}{}", json!([event, data])));
        tokio::time::timeout(wait, rx).await.ok()?.ok()
    }

    /// Sends an event with an ack id now and returns the ack to come (`None`
    /// after `wait`). The future borrows nothing: several can be in flight.
    pub fn emit_in_flight(
        &mut self,
        event: &str,
        data: Value,
        wait: Duration,
    ) -> impl std::future::Future<Output = Option<Value>> + Send + 'static + use<> {
        let id = self.next_ack;
        self.next_ack += 1;
        let (tx, rx) = oneshot::channel();
        self.acks.lock().unwrap().insert(id, tx);
        self.send_raw(&format!("42{id}{}", json!([event, data])));
        async move { tokio::time::timeout(wait, rx).await.ok()?.ok() }
    }

    /// Subscribes to `kind:<id>` and returns the ack.
    pub async fn subscribe(&mut self, kind: &str, id: &str) -> Value {
        self.emit_with_ack(&format!("subscribe_{kind}"), json!({ format!("{kind}Id"): id })).await
    }

    /// Subscribes to `kind:<id>` with `since` (any JSON, to send malformed
    /// ones too) and returns the ack.
    pub async fn subscribe_since(&mut self, kind: &str, id: &str, since: Value) -> Value {
        self.emit_with_ack(&format!("subscribe_{kind}"), json!({ format!("{kind}Id"): id, "since": since })).await
    }

    /// Unsubscribes from `kind:<id>` and returns the ack.
    pub async fn unsubscribe(&mut self, kind: &str, id: &str) -> Value {
        self.emit_with_ack(&format!("unsubscribe_{kind}"), json!({ format!("{kind}Id"): id })).await
    }

    /// The next event, or `None` after `wait`.
    pub async fn next_event(&mut self, wait: Duration) -> Option<(String, Value)> {
        tokio::time::timeout(wait, self.events.recv()).await.ok().flatten()
    }

    /// The next event, which must come within a few seconds.
    pub async fn expect_event(&mut self) -> (String, Value) {
        self.next_event(STEP).await.expect("an event within 5 s")
    }

    /// Asserts that no event arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Some(e) = self.next_event(wait).await {
            panic!("expected no event, got {e:?}");
        }
    }

    /// Whether the server closed the connection.
    /// How many events arrived before the latest ack (in the order the
    /// frames came).
    pub fn events_before_last_ack(&self) -> usize {
        self.events_at_ack.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the server ended the Socket.IO session with a DISCONNECT
    /// packet (final for a stock client) rather than closing the transport.
    pub fn got_disconnect_packet(&self) -> bool {
        self.disconnect_packet.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn is_closed(&self) -> bool {
        self.is_closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until the server closes the connection, at most `wait`.
    pub async fn closed_within(&self, wait: Duration) -> bool {
        let notified = self.closed.notified();
        if self.is_closed() {
            return true;
        }
        tokio::time::timeout(wait, notified).await.is_ok() || self.is_closed()
    }

    /// The next event, waiting as long as it takes; `None` once the
    /// connection is closed and every event that came before was taken.
    pub async fn recv_event(&mut self) -> Option<(String, Value)> {
        self.events.recv().await
    }

    /// An event that has already arrived, without waiting.
    pub fn try_next_event(&mut self) -> Option<(String, Value)> {
        self.events.try_recv().ok()
    }

    /// A future that resolves when the connection closes; it borrows nothing,
    /// so it can race a call that borrows the client (an ack awaited while a
    /// cut may come).
    pub fn on_close(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let closed = self.closed.clone();
        let is_closed = self.is_closed.clone();
        async move {
            loop {
                // Registered before the check: notify_waiters wakes it even if not yet polled.
                let notified = closed.notified();
                if is_closed.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                notified.await;
            }
        }
    }

    /// Closes the connection from this side.
    pub fn close(&self) {
        let _ = self.out.send(Message::Close(None));
    }
}

async fn next_text<S>(stream: &mut S) -> Result<String, ConnectError>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match tokio::time::timeout(STEP, stream.next()).await {
            Err(_) => return Err(ConnectError::Other("timed out waiting for a frame".into())),
            Ok(None) => return Err(ConnectError::Other("connection closed".into())),
            Ok(Some(Err(e))) => return Err(ConnectError::Other(e.to_string())),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(t.as_str().to_owned()),
            Ok(Some(Ok(Message::Close(_)))) => {
                return Err(ConnectError::Other("connection closed".into()));
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}
