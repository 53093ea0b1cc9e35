//! A socket's transport, below Socket.IO: what herald does with a Socket.IO
//! request before socketioxide sees it, and how it ends a socket's
//! connection without ending its Socket.IO session.
//!
//! A Socket.IO DISCONNECT packet is final for the stock `socket.io-client`
//! (`"io server disconnect"`: it never reconnects). When herald cuts a socket
//! so that it comes back and recovers (a slow consumer, a lost event log, an
//! expired token), it ends the transport instead, and the client sees
//! `"transport close"` or `"transport error"` and reconnects by itself:
//!
//! - a WebSocket (opened directly, or upgraded from long-polling): its TCP
//!   connection is closed ([`Connection::close`]): engineioxide reads an Engine.IO
//!   `close` packet, closes the session, writes what was queued and a close
//!   frame, and drops the connection;
//! - long-polling: the Engine.IO session is ended with an Engine.IO `close`
//!   packet handed to engineioxide as if the client had posted it, so the
//!   client's next poll fails;
//! - in the middle of an upgrade, closing waits (at most [`CLOSE_GRACE`]) for
//!   the upgrade to finish, then cuts the WebSocket. The stock client pauses
//!   its polling once the server answered its probe; if the probe's
//!   WebSocket died then, it would stay paused, neither polling nor
//!   upgraded, until its ping timeout (45 s). Past the wait, both
//!   transports are ended.
//!
//! socketioxide 0.18 has no public way to do either (its `Socket::close` is
//! crate-private), so herald does it from the request side, where it owns the
//! connections ([`crate::listener`]) and the layer in front of socketioxide.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use parking_lot::Mutex;
use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;
use socketioxide::{ProtocolVersion, TransportType};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use crate::listener::Connection;
use crate::pending::{PendingRefused, PendingSessions};

/// Where the Socket.IO endpoint is served.
pub const SOCKET_IO_PATH: &str = "/socket.io";

/// How long a closed connection gets to write what was queued for it and a
/// close frame before it is reset. A peer that reads nothing is gone by then.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How often closing in the middle of an upgrade looks whether it finished.
const UPGRADE_POLL: Duration = Duration::from_millis(10);

/// The request headers the Socket.IO endpoint reads: the WebSocket key of an
/// upgrade, and the content type of a long-polling POST (herald itself reads
/// only the query string).
const SOCKET_IO_HEADERS: [header::HeaderName; 2] = [header::SEC_WEBSOCKET_KEY, header::CONTENT_TYPE];

/// The connection of a socket that opened as a WebSocket (in the extensions
/// of its handshake request, which the socket keeps).
#[derive(Clone)]
struct WebSocketConnection(Connection);

/// socketioxide's Socket.IO service: one Engine.IO engine serves every
/// Socket.IO request (each `SocketIoLayer::layer` call makes a new engine).
pub type Engine = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// The transports herald can close: the connections of upgraded sockets, and
/// the Socket.IO service to end polling sessions with; and the sessions
/// that have not connected yet.
pub struct Transports {
    /// The WebSocket connection of each socket that upgraded from
    /// long-polling, by session id (its handshake request was a poll).
    upgrades: Mutex<HashMap<Sid, Connection>>,
    engine: Engine,
    pending: PendingSessions,
}

impl Transports {
    /// Transports in front of `engine`, with the bounds of `pending`.
    pub fn new(engine: Engine, pending: PendingSessions) -> Arc<Transports> {
        Arc::new(Transports { upgrades: Mutex::default(), engine, pending })
    }

    /// Serves one Socket.IO request: prepared (see [`Transports::prepare`]),
    /// then handed to the engine, or refused.
    pub async fn serve(self: Arc<Self>, request: Request<Body>) -> Result<Response<Body>, Infallible> {
        match self.prepare(request) {
            Ok(request) => self.engine.clone().oneshot(request).await,
            Err(refused) => Ok(refused_handshake(refused)),
        }
    }

    /// Prepares a request for socketioxide: a Socket.IO request keeps only
    /// what it needs, and its connection is remembered where closing finds it.
    /// A handshake (a request without a session id) opens a session that
    /// counts as pending until its socket connects; past the bounds it is
    /// refused, and socketioxide never sees it.
    fn prepare(self: &Arc<Self>, mut request: Request<Body>) -> Result<Request<Body>, PendingRefused> {
        let connection = request.extensions_mut().remove::<Connection>();
        if !request.uri().path().starts_with(SOCKET_IO_PATH) {
            return Ok(request);
        }
        let mut request = detach_from_read_buffer(request);
        let Some(connection) = connection else { return Ok(request) };
        let (mut websocket, mut sid) = (false, None);
        for (key, value) in form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes()) {
            match &*key {
                "transport" => websocket = value == "websocket",
                "sid" => sid = Some(value.parse::<Sid>().ok()),
                _ => {}
            }
        }
        if sid.is_none() {
            let session = self.pending.admit(connection.peer())?;
            if websocket {
                // The session is this connection: it stops counting when the connection
                // closes, even if its handshake request is still held (socketioxide keeps a
                // session whose CONNECT was refused until the connect timeout).
                let session = session.clone();
                connection.on_close(move || session.settle());
            }
            request.extensions_mut().insert(session);
        }
        if websocket {
            connection.upgrading_to_websocket();
        }
        match (websocket, sid) {
            (true, Some(Some(sid))) => self.register_upgrade(sid, connection),
            (true, None) => {
                request.extensions_mut().insert(WebSocketConnection(connection));
            }
            _ => {}
        }
        Ok(request)
    }

    /// Remembers the WebSocket connection a polling session upgrades over,
    /// until that connection closes. The first one stays: a second upgrade
    /// of the same session is refused by engineioxide anyway.
    fn register_upgrade(self: &Arc<Self>, sid: Sid, connection: Connection) {
        {
            let mut upgrades = self.upgrades.lock();
            if upgrades.contains_key(&sid) {
                return;
            }
            upgrades.insert(sid, connection.clone());
        }
        let transports = Arc::downgrade(self);
        let registered = connection.clone();
        connection.on_close(move || {
            let Some(transports) = transports.upgrade() else { return };
            let mut upgrades = transports.upgrades.lock();
            if upgrades.get(&sid).is_some_and(|c| c.same(&registered)) {
                upgrades.remove(&sid);
            }
        });
    }

    /// Ends the socket's transport, not its Socket.IO session: the client
    /// sees its connection close and reconnects by itself.
    pub fn close_transport(self: &Arc<Self>, socket: &SocketRef) {
        if let Some(WebSocketConnection(connection)) = socket.req_parts().extensions.get::<WebSocketConnection>() {
            connection.close(CLOSE_GRACE);
            return;
        }
        let upgrade = self.upgrades.lock().get(&socket.id).cloned();
        let Some(connection) = upgrade else {
            self.end_polling_session(socket);
            return;
        };
        if socket.transport_type() == TransportType::Websocket {
            connection.close(CLOSE_GRACE);
            return;
        }
        // In the middle of an upgrade: let it finish, then close the WebSocket.
        let (transports, socket) = (self.clone(), socket.clone());
        tokio::spawn(async move {
            let give_up = tokio::time::Instant::now() + CLOSE_GRACE;
            while socket.transport_type() == TransportType::Polling && tokio::time::Instant::now() < give_up {
                tokio::time::sleep(UPGRADE_POLL).await;
            }
            if socket.transport_type() == TransportType::Polling {
                transports.end_polling_session(&socket);
            }
            connection.close(CLOSE_GRACE);
        });
    }

    /// Ends a polling session: the client's next poll fails.
    fn end_polling_session(&self, socket: &SocketRef) {
        let close = self.engine.clone().oneshot(close_request(socket.id, socket.protocol()));
        tokio::spawn(async move {
            let _ = close.await;
        });
    }
}

/// The answer to a handshake past the bounds on sessions not yet connected:
/// 429 for its address, 503 in all.
fn refused_handshake(why: PendingRefused) -> Response<Body> {
    let (status, text) = match why {
        PendingRefused::Address => {
            (StatusCode::TOO_MANY_REQUESTS, "too many sessions from this address wait for their CONNECT")
        }
        PendingRefused::Total => (StatusCode::SERVICE_UNAVAILABLE, "too many sessions wait for their CONNECT"),
    };
    tracing::info!(status = status.as_u16(), "handshake refused: {text}");
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    response
}

/// The Engine.IO `close` packet, posted on a polling session as its client would.
fn close_request(sid: Sid, protocol: ProtocolVersion) -> Request<Body> {
    // Engine.IO 3 frames each packet with its length.
    let (eio, packet) = match protocol {
        ProtocolVersion::V4 => ("3", "1:1"),
        _ => ("4", "1"),
    };
    let mut request = Request::new(Body::from(packet));
    *request.method_mut() = axum::http::Method::POST;
    if let Ok(uri) = format!("{SOCKET_IO_PATH}/?EIO={eio}&transport=polling&sid={sid}").parse() {
        *request.uri_mut() = uri;
    }
    request.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain;charset=UTF-8"));
    request
}

/// Keeps only what a Socket.IO request needs, in fresh allocations.
///
/// engineioxide keeps a socket's handshake request parts for as long as the
/// socket lives. hyper parses the URI and header values as slices of its
/// per-connection read buffer (16 KiB and more), so each connection kept its
/// whole read buffer alive; so did the `OriginalUri` that axum's router adds.
/// And the other headers (a browser sends a dozen, cookies included) were
/// kept for nothing.
fn detach_from_read_buffer(mut request: Request<Body>) -> Request<Body> {
    if let Ok(uri) = axum::http::Uri::try_from(request.uri().to_string()) {
        *request.uri_mut() = uri;
    }
    request.extensions_mut().remove::<axum::extract::OriginalUri>();
    let headers = std::mem::take(request.headers_mut());
    for name in SOCKET_IO_HEADERS {
        // The bytes of a header value are always a valid header value.
        if let Some(copy) = headers.get(&name).and_then(|value| HeaderValue::from_bytes(value.as_bytes()).ok()) {
            request.headers_mut().insert(name, copy);
        }
    }
    request
}
