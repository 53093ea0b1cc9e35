//! The Socket.IO side: the handshake (JWT auth), each socket's lifetime
//! (connected, token expiry, disconnected) and, in [`handlers`], the client
//! events (`subscribe_*`, `unsubscribe_*`, `refresh_token`) with their acks;
//! what goes over the wire is in [`wire`].
//!
//! One adapter serves every socket: socketioxide's in-process one, which its
//! types (`SocketIo`, `SocketRef`, `AckSender`) name by default. A fleet
//! shares its events through the event log ([`crate::event_log`]), never through an
//! adapter, so nothing here is generic over it.
//!
//! The handlers are registered inside the connect middleware, before the CONNECT packet goes
//! out, so an event a client sends right after connecting is never dropped
//! for want of a handler; such an event waits until the connect handler has
//! run (socketioxide marks the socket connected only after sending CONNECT):
//! the ready gate.

mod handlers;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use socketioxide::SocketIo;
use socketioxide::extract::{SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::socket::DisconnectReason;
use tokio::sync::Notify;

use crate::access::{Access, Credential};
use crate::auth::{User, Verifier, find_token};
use crate::config::Limits;
use crate::delivery::Delivery;
use crate::expiry::{Expiring, Expiry};
use crate::pending::PendingSession;
use crate::presence::Presence;
use crate::rate::TokenBucket;
use crate::rooms::user_room;
use crate::session::Session;
use crate::telemetry::Metrics;
use crate::transport::Transports;

use wire::{HandshakeError, TokenRefused};

/// How long an event that arrived before its socket's connect handler ran
/// waits for it. The handler runs within microseconds of the CONNECT packet;
/// it never runs when socketioxide could not send that packet (the socket is
/// then closed), and the event is dropped.
const READY_WAIT: Duration = Duration::from_secs(10);

/// A socket in the gateway's [`Expiry`].
struct ExpiringSocket {
    socket: SocketRef,
    metrics: Arc<Metrics>,
    transports: Arc<Transports>,
}

impl Expiring for ExpiringSocket {
    fn deadline(&self) -> Option<u64> {
        if !self.socket.connected() {
            return None;
        }
        Session::of(&self.socket).map(|session| session.deadline.load(Ordering::SeqCst))
    }

    /// The connection is cut, not the Socket.IO session: the client comes
    /// back by itself, with a fresh token if its `auth` gives one.
    fn expire(self: Box<Self>) {
        let Some(session) = Session::of(&self.socket) else { return };
        if session.cut(&self.socket, &self.transports) {
            self.metrics.limits_hit.get_or_create(&[("limit", "token_expired")]).inc();
            tracing::info!(socket = session.number, "token expired; closing its connection");
        }
    }
}

/// The gateway's shared state.
pub struct Gateway {
    verifier: Verifier,
    pub(crate) access: Access,
    metrics: Arc<Metrics>,
    pub(crate) transports: Arc<Transports>,
    limits: Limits,
    /// Clock leeway added to a token's `exp` before its socket is cut.
    token_leeway: Duration,
    expiry: Expiry,
    /// Who is in which room, for the sockets that ask.
    pub(crate) presence: Presence,
    /// Woken each time a socket's connect handler has run (see [`SessionState::ready`]).
    sockets_ready: Notify,
}

impl Gateway {
    /// A gateway that verifies tokens with `verifier`, checks rooms with
    /// `access` and enforces `limits`. Starts the token expiry timer, so it
    /// runs inside a Tokio runtime.
    pub fn new(
        verifier: Verifier,
        access: Access,
        metrics: Arc<Metrics>,
        transports: Arc<Transports>,
        limits: Limits,
        token_leeway: Duration,
        presence: Presence,
    ) -> Arc<Self> {
        Arc::new(Gateway {
            verifier,
            access,
            metrics,
            transports,
            limits,
            token_leeway,
            expiry: Expiry::start(),
            presence,
            sockets_ready: Notify::new(),
        })
    }

    fn limit_hit(&self, limit: &'static str) {
        self.metrics.limits_hit.get_or_create(&[("limit", limit)]).inc();
    }

    /// Installs the handlers on the default namespace of `io`.
    pub fn attach(self: &Arc<Self>, io: &SocketIo, delivery: Delivery) {
        let on_connect = {
            let gw = self.clone();
            move |s: SocketRef, io: SocketIo| {
                let gw = gw.clone();
                async move { gw.connected(&s, &io) }
            }
        };
        let authenticate = {
            let gw = self.clone();
            move |s: SocketRef, TryData(auth): TryData<Value>| {
                let gw = gw.clone();
                let delivery = delivery.clone();
                async move { gw.authenticate(&s, auth.ok().as_ref(), delivery).await }
            }
        };
        io.ns("/", on_connect.with(authenticate));
    }

    /// The connect middleware: verifies the token, keeps the user in the
    /// socket's extensions and registers the event handlers.
    async fn authenticate(
        self: &Arc<Self>,
        s: &SocketRef,
        auth: Option<&Value>,
        delivery: Delivery,
    ) -> Result<(), HandshakeError> {
        if self.metrics.connections.get() >= self.limits.max_connections as i64 {
            self.limit_hit("connections");
            tracing::info!("handshake refused: too many connections");
            return Err(HandshakeError::TooManyConnections);
        }
        let Some(token) = find_token(auth, s.req_parts().uri.query()) else {
            self.metrics.auth_failures.get_or_create(&[("reason", "missing")]).inc();
            tracing::info!(reason = "missing token", "handshake rejected");
            return Err(HandshakeError::Unauthorized);
        };
        let user = match self.verifier.verify(&token).await {
            Ok(user) => user,
            Err(e) => {
                self.metrics.auth_failures.get_or_create(&[("reason", "invalid")]).inc();
                tracing::info!(reason = "invalid token", "handshake rejected");
                return Err(e.into());
            }
        };
        if let Err(why) = self.admits(&user).await {
            self.metrics.auth_failures.get_or_create(&[("reason", why.reason())]).inc();
            tracing::info!(user = &*user.id, reason = why.reason(), "handshake rejected");
            return Err(HandshakeError::Unauthorized);
        }
        s.extensions.insert(Session::new(
            user.id.clone(),
            user.expires_at.saturating_add(self.token_leeway.as_secs()),
            self.expiry.next_id(),
            TokenBucket::new(self.limits.client_event_rate, self.limits.client_event_burst),
            self.limits.max_subscriptions,
            self.presence.clone(),
            self.metrics.clone(),
        ));
        // Every socket of a user is in the user's room, so a revocation finds them.
        s.join(user_room(&user.id));
        s.extensions.insert(user);
        if self.access.wants_token() {
            let token = token.strip_prefix("Bearer ").unwrap_or(&token).to_owned();
            s.extensions.insert(Credential(Arc::new(token.into())));
        }
        self.register_handlers(s, delivery);
        Ok(())
    }

    /// Waits until the socket's connect handler has run; false if it did not
    /// within [`READY_WAIT`], or the socket is gone.
    async fn ready(&self, s: &SocketRef) -> bool {
        let Some(session) = Session::of(s) else { return false };
        if session.ready.load(Ordering::SeqCst) {
            return true;
        }
        let give_up = tokio::time::Instant::now() + READY_WAIT;
        loop {
            // Registered before the flags are read again, so a wake in between is not missed.
            let notified = self.sockets_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if session.released() {
                return false;
            }
            if session.ready.load(Ordering::SeqCst) {
                return true;
            }
            if tokio::time::timeout_at(give_up, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Refuses a verified token that a revocation of its user covers (issued
    /// at or before it). When the store cannot say, the token is refused.
    async fn admits(&self, user: &User) -> Result<(), TokenRefused> {
        match self.access.admits(user).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(TokenRefused::Revoked),
            Err(e) => {
                tracing::error!(error = %crate::telemetry::error_chain(&e), "the user revocation lookup failed");
                Err(TokenRefused::StoreFailed)
            }
        }
    }

    /// Cuts the socket when its token expires (plus the leeway), unless a
    /// refresh moved the deadline meanwhile. Disarmed when it is released.
    fn watch_expiry(&self, s: &SocketRef, session: &Session) {
        let deadline = session.deadline.load(Ordering::SeqCst);
        let entry =
            ExpiringSocket { socket: s.clone(), metrics: self.metrics.clone(), transports: self.transports.clone() };
        self.expiry.arm(session.timer, deadline, Box::new(entry));
    }

    /// The connect handler. socketioxide runs it in a task of its own once
    /// the CONNECT packet is queued, so the socket may be gone by then: a
    /// socket closed before its disconnect handler was registered never runs
    /// that handler (and one closed twice may have left the namespace before
    /// it runs). So the socket is counted and armed first, the handler
    /// registered next, and then, if the socket has already left the
    /// namespace, released here; [`Session::release`] makes sure that
    /// happens once, whoever gets there first.
    fn connected(self: &Arc<Self>, s: &SocketRef, io: &SocketIo) {
        let Some(session) = Session::of(s) else { return };
        if let Some(pending) = s.req_parts().extensions.get::<PendingSession>() {
            pending.settle();
        }
        self.metrics.connections.inc();
        self.watch_expiry(s, &session);
        let gw = self.clone();
        s.on_disconnect(move |s: SocketRef, reason: DisconnectReason| {
            let gw = gw.clone();
            async move { gw.disconnected(&s, Some(reason)) }
        });
        if !s.connected() || io.get_socket(s.id).is_none() {
            self.disconnected(s, None);
            return;
        }
        let user = s.extensions.get::<User>().map(|u| u.id);
        tracing::info!(
            user = user.as_deref().unwrap_or("?"),
            socket = session.number,
            transport = ?s.transport_type(),
            "connected"
        );
        session.ready.store(true, Ordering::SeqCst);
        self.sockets_ready.notify_waiters();
    }

    /// Releases what a gone socket held: its count, its timer, its rooms.
    /// Runs once per socket (from its disconnect handler, or from its
    /// connect handler when it was gone before that handler was registered).
    fn disconnected(&self, s: &SocketRef, reason: Option<DisconnectReason>) {
        let Some(session) = Session::of(s) else { return };
        if !session.release() {
            return;
        }
        self.metrics.connections.dec();
        self.expiry.disarm(session.timer);
        let rooms = session.subscriptions().len();
        session.close(s);
        // Subscribes waiting for the ready gate give up at once.
        self.sockets_ready.notify_waiters();
        let user = s.extensions.get::<User>().map(|u| u.id);
        match reason {
            Some(reason) => {
                tracing::info!(
                    user = user.as_deref().unwrap_or("?"),
                    socket = session.number,
                    ?reason,
                    rooms,
                    "disconnected"
                )
            }
            None => tracing::info!(
                user = user.as_deref().unwrap_or("?"),
                socket = session.number,
                rooms,
                "gone before its connect handler ran"
            ),
        }
    }
}
