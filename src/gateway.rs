//! The Socket.IO side: the handshake (JWT auth) and the client events
//! (`subscribe_*`, `unsubscribe_*`), with their acks.
//!
//! Handlers are generic over the adapter; only start-up names it. They are
//! registered inside the connect middleware, before the CONNECT packet goes
//! out, so an event a client sends right after connecting is never dropped
//! for want of a handler; such an event waits until the connect handler has
//! run (socketioxide marks the socket connected only after sending CONNECT).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use socketioxide::ParserError;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;
use socketioxide::extract::{AckSender, Event, SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::socket::DisconnectReason;
use socketioxide_core::adapter::DefinedAdapter;
use tokio::sync::Notify;

use crate::access::{Access, Decision};
use crate::auth::{Unauthorized, User, Verifier, find_token};
use crate::delivery::{Delivery, Joined};
use crate::expiry::{Expiring, Expiry};
use crate::limits::{Admission, Limits, TokenBucket};
use crate::log::Offset;
use crate::rooms::{Room, RoomKind};
use crate::session::{JoinRefused, Session};
use crate::store::MembershipStore;
use crate::telemetry::Metrics;
use crate::transport::Transports;

/// An ack: `{ "success": true }` (with `"recovered"` for a subscription with
/// `since`) or `{ "success": false, "error": "…" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Reply {
    pub success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
}

/// Why a client event failed, as told to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Malformed payload.
    InvalidPayload,
    /// Not a member, or no such id.
    Unauthorized,
    /// The store failed; details are logged, not sent.
    Internal,
    /// No such client event.
    UnknownEvent,
    /// Past the socket's event rate.
    RateLimited,
    /// Past the socket's subscription cap.
    TooManySubscriptions,
}

impl Refusal {
    fn message(self) -> &'static str {
        match self {
            Refusal::InvalidPayload => "Invalid payload",
            Refusal::Unauthorized => "Unauthorized",
            Refusal::Internal => "Internal error",
            Refusal::UnknownEvent => "Unknown event",
            Refusal::RateLimited => "Rate limited",
            Refusal::TooManySubscriptions => "Too many subscriptions",
        }
    }

    fn outcome(self) -> &'static str {
        match self {
            Refusal::InvalidPayload => "invalid",
            Refusal::Unauthorized => "unauthorized",
            Refusal::Internal => "error",
            Refusal::UnknownEvent => "unknown",
            Refusal::RateLimited => "rate_limited",
            Refusal::TooManySubscriptions => "too_many_subscriptions",
        }
    }
}

impl Reply {
    fn ok(recovered: Option<bool>) -> Reply {
        Reply { success: true, error: None, recovered }
    }

    fn refused(why: Refusal) -> Reply {
        Reply { success: false, error: Some(why.message()), recovered: None }
    }
}

/// Subscribe or unsubscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Subscribe,
    Unsubscribe,
}

fn event_name(action: Action, kind: RoomKind) -> &'static str {
    match (action, kind) {
        (Action::Subscribe, RoomKind::Campaign) => "subscribe_campaign",
        (Action::Subscribe, RoomKind::Settlement) => "subscribe_settlement",
        (Action::Subscribe, RoomKind::Structure) => "subscribe_structure",
        (Action::Unsubscribe, RoomKind::Campaign) => "unsubscribe_campaign",
        (Action::Unsubscribe, RoomKind::Settlement) => "unsubscribe_settlement",
        (Action::Unsubscribe, RoomKind::Structure) => "unsubscribe_structure",
    }
}

/// The events a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientEvent {
    Room(Action, RoomKind),
    RefreshToken,
}

impl ClientEvent {
    fn parse(name: &str) -> Option<ClientEvent> {
        if name == "refresh_token" {
            return Some(ClientEvent::RefreshToken);
        }
        RoomKind::ALL
            .into_iter()
            .flat_map(|kind| [Action::Subscribe, Action::Unsubscribe].map(|action| (action, kind)))
            .find(|&(action, kind)| event_name(action, kind) == name)
            .map(|(action, kind)| ClientEvent::Room(action, kind))
    }

    fn name(self) -> &'static str {
        match self {
            ClientEvent::Room(action, kind) => event_name(action, kind),
            ClientEvent::RefreshToken => "refresh_token",
        }
    }
}

/// Reads the room out of a `{ "<kind>Id": "<id>" }` payload.
pub fn parse_room_request(kind: RoomKind, data: &Result<Value, ParserError>) -> Result<Room, Refusal> {
    let Ok(Value::Object(map)) = data else {
        return Err(Refusal::InvalidPayload);
    };
    let Some(Value::String(id)) = map.get(kind.id_field()) else {
        return Err(Refusal::InvalidPayload);
    };
    kind.room(id).map_err(|_| Refusal::InvalidPayload)
}

/// Reads the optional `since` of a subscription: absent, or an offset herald
/// could have made.
pub fn parse_since(data: &Result<Value, ParserError>) -> Result<Option<Offset>, Refusal> {
    match data.as_ref().ok().and_then(|v| v.get("since")) {
        None => Ok(None),
        Some(Value::String(s)) => Offset::parse(s).map(Some).ok_or(Refusal::InvalidPayload),
        Some(_) => Err(Refusal::InvalidPayload),
    }
}

/// Why a verified token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenRefused {
    /// Issued before a revocation of its user.
    Revoked,
    /// The store could not say.
    StoreFailed,
}

impl TokenRefused {
    fn reason(self) -> &'static str {
        match self {
            TokenRefused::Revoked => "revoked",
            TokenRefused::StoreFailed => "store_error",
        }
    }
}

/// Why a handshake was refused (the `connect_error` message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("Unauthorized")]
    Unauthorized,
    #[error("Too many connections")]
    TooManyConnections,
}

impl From<Unauthorized> for HandshakeError {
    fn from(_: Unauthorized) -> Self {
        HandshakeError::Unauthorized
    }
}

/// How long an event that arrived before its socket's connect handler ran
/// waits for it. The handler runs within microseconds of the CONNECT packet;
/// it never runs when socketioxide could not send that packet (the socket is
/// then closed), and the event is dropped.
const READY_WAIT: Duration = Duration::from_secs(10);

/// A socket in the gateway's [`Expiry`].
struct ExpiringSocket<A: Adapter> {
    socket: SocketRef<A>,
    metrics: Arc<Metrics>,
    transports: Arc<Transports>,
}

impl<A: Adapter> Expiring for ExpiringSocket<A> {
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
pub struct Gateway<S> {
    verifier: Verifier,
    pub(crate) access: Access<S>,
    metrics: Arc<Metrics>,
    transports: Arc<Transports>,
    limits: Limits,
    /// Clock leeway added to a token's `exp` before its socket is cut.
    token_leeway: Duration,
    expiry: Expiry,
    /// Woken each time a socket's connect handler has run (see [`SessionState::ready`]).
    sockets_ready: Notify,
}

impl<S: MembershipStore> Gateway<S> {
    /// A gateway that verifies tokens with `verifier`, checks rooms with
    /// `access` and enforces `limits`. Starts the token expiry timer, so it
    /// runs inside a Tokio runtime.
    pub fn new(
        verifier: Verifier,
        access: Access<S>,
        metrics: Arc<Metrics>,
        transports: Arc<Transports>,
        limits: Limits,
        token_leeway: Duration,
    ) -> Arc<Self> {
        Arc::new(Gateway {
            verifier,
            access,
            metrics,
            transports,
            limits,
            token_leeway,
            expiry: Expiry::start(),
            sockets_ready: Notify::new(),
        })
    }

    fn limit_hit(&self, limit: &'static str) {
        self.metrics.limits_hit.get_or_create(&[("limit", limit)]).inc();
    }

    /// Takes a token from the socket's bucket; disconnects a socket that
    /// keeps going past the limit.
    fn admit<A: Adapter>(&self, s: &SocketRef<A>) -> Result<(), Refusal> {
        let Some(session) = Session::of(s) else { return Ok(()) };
        let admission = session.bucket.lock().map(|mut b| b.admit()).unwrap_or(Admission::Allowed);
        match admission {
            Admission::Allowed => Ok(()),
            Admission::Refused(strikes) => {
                self.limit_hit("event_rate");
                if strikes == self.limits.rate_limit_strikes {
                    self.limit_hit("event_rate_disconnect");
                    tracing::info!(
                        socket = session.number,
                        strikes,
                        "disconnecting a socket that ignores the rate limit"
                    );
                    // Final (a DISCONNECT packet): coming back would be wrong.
                    session.close(s);
                    let _ = s.clone().disconnect();
                }
                Err(Refusal::RateLimited)
            }
        }
    }

    /// Installs the handlers on the default namespace of `io`. The result is
    /// the adapter's initialisation (a future to await, for Redis).
    pub fn attach<A: Adapter + DefinedAdapter>(
        self: &Arc<Self>,
        io: &SocketIo<A>,
        delivery: Delivery<A>,
    ) -> A::InitRes {
        let on_connect = {
            let gw = self.clone();
            move |s: SocketRef<A>| {
                let gw = gw.clone();
                async move { gw.connected(&s) }
            }
        };
        let authenticate = {
            let gw = self.clone();
            move |s: SocketRef<A>, TryData(auth): TryData<Value>| {
                let gw = gw.clone();
                let delivery = delivery.clone();
                async move { gw.authenticate(&s, auth.ok().as_ref(), delivery).await }
            }
        };
        io.ns("/", on_connect.with(authenticate))
    }

    /// The connect middleware: verifies the token, keeps the user in the
    /// socket's extensions and registers the event handlers.
    async fn authenticate<A: Adapter>(
        self: &Arc<Self>,
        s: &SocketRef<A>,
        auth: Option<&Value>,
        delivery: Delivery<A>,
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
            user.expires_at.saturating_add(self.token_leeway.as_secs()),
            self.expiry.next_id(),
            TokenBucket::new(self.limits.client_event_rate, self.limits.client_event_burst),
            self.metrics.clone(),
        ));
        // Every socket of a user is in the user's room, so a revocation finds them.
        s.join(user_room(&user.id));
        s.extensions.insert(user);
        self.register_handlers(s, delivery);
        Ok(())
    }

    /// One handler answers every client event (a socket keeps one handler
    /// rather than one per event name: less memory per connection).
    fn register_handlers<A: Adapter>(self: &Arc<Self>, s: &SocketRef<A>, delivery: Delivery<A>) {
        let gw = self.clone();
        s.on_fallback(move |s: SocketRef<A>, Event(event): Event, TryData(data): TryData<Value>, ack: AckSender<A>| {
            let gw = gw.clone();
            let delivery = delivery.clone();
            async move {
                if !gw.ready(&s).await {
                    tracing::debug!("an event for a socket whose connect never completed; dropped");
                    return;
                }
                let client_event = ClientEvent::parse(&event);
                let mut ack = Some(ack);
                let reply = match (gw.admit(&s), client_event) {
                    (Err(refused), _) => Err(refused),
                    (Ok(()), Some(ClientEvent::Room(Action::Subscribe, kind))) => {
                        gw.subscribe(&s, kind, &data, &delivery, &mut ack).await
                    }
                    (Ok(()), Some(ClientEvent::Room(Action::Unsubscribe, kind))) => {
                        gw.unsubscribe(&s, kind, &data).map(|()| None)
                    }
                    (Ok(()), Some(ClientEvent::RefreshToken)) => gw.refresh(&s, &data).await.map(|()| None),
                    (Ok(()), None) => {
                        tracing::debug!(event = truncate(&event, 64), "unknown client event");
                        Err(Refusal::UnknownEvent)
                    }
                };
                gw.count_ack(client_event.map_or("unknown", ClientEvent::name), reply.map(drop));
                // A subscription is acked as soon as the socket is in the room
                // (see `Joined`). Without an ack id this sends nothing; a
                // failure means the socket is gone.
                if let Some(ack) = ack {
                    let _ = ack.send(&reply.map_or_else(Reply::refused, Reply::ok));
                }
            }
        });
    }

    /// Waits until the socket's connect handler has run; false if it did not
    /// within [`READY_WAIT`].
    async fn ready<A: Adapter>(&self, s: &SocketRef<A>) -> bool {
        let Some(session) = Session::of(s) else { return false };
        if session.ready.load(Ordering::SeqCst) {
            return true;
        }
        let give_up = tokio::time::Instant::now() + READY_WAIT;
        loop {
            // Registered before the flag is read again, so a wake in between is not missed.
            let notified = self.sockets_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
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
                tracing::error!(error = %crate::telemetry::error_chain(&*e), "the user revocation lookup failed");
                Err(TokenRefused::StoreFailed)
            }
        }
    }

    /// `refresh_token`: a valid token for the same user moves the socket's deadline.
    async fn refresh<A: Adapter>(&self, s: &SocketRef<A>, data: &Result<Value, ParserError>) -> Result<(), Refusal> {
        let token = match data {
            Ok(Value::Object(map)) => match map.get("token") {
                Some(Value::String(t)) => t.clone(),
                _ => return Err(Refusal::InvalidPayload),
            },
            _ => return Err(Refusal::InvalidPayload),
        };
        let (Some(current), Some(session)) = (s.extensions.get::<User>(), Session::of(s)) else {
            return Err(Refusal::Unauthorized);
        };
        let fresh = self.verifier.verify(&token).await.map_err(|_| Refusal::Unauthorized)?;
        if fresh.id != current.id {
            tracing::info!(user = &*current.id, "token refresh refused: another user's token");
            return Err(Refusal::Unauthorized);
        }
        if let Err(why) = self.admits(&fresh).await {
            tracing::info!(user = &*current.id, reason = why.reason(), "token refresh refused");
            return Err(Refusal::Unauthorized);
        }
        session.deadline.store(fresh.expires_at.saturating_add(self.token_leeway.as_secs()), Ordering::SeqCst);
        s.extensions.insert(fresh);
        tracing::info!(user = &*current.id, "token refreshed");
        Ok(())
    }

    /// Cuts the socket when its token expires (plus the leeway), unless a
    /// refresh moved the deadline meanwhile.
    fn watch_expiry<A: Adapter>(&self, s: &SocketRef<A>) {
        let Some(session) = Session::of(s) else { return };
        let deadline = session.deadline.load(Ordering::SeqCst);
        let entry =
            ExpiringSocket { socket: s.clone(), metrics: self.metrics.clone(), transports: self.transports.clone() };
        self.expiry.arm(session.timer, deadline, Box::new(entry));
        // It may have gone before it was armed: its disconnect handler found nothing to disarm.
        if !s.connected() {
            self.expiry.disarm(session.timer);
        }
    }

    fn count_ack(&self, event: &'static str, reply: Result<(), Refusal>) {
        let outcome = match reply {
            Ok(()) => "success",
            Err(why) => why.outcome(),
        };
        self.metrics.acks.get_or_create(&[("event", event), ("outcome", outcome)]).inc();
    }

    fn connected<A: Adapter>(self: &Arc<Self>, s: &SocketRef<A>) {
        self.metrics.connections.inc();
        let user = s.extensions.get::<User>().map(|u| u.id);
        tracing::info!(
            user = user.as_deref().unwrap_or("?"),
            socket = Session::of(s).map(|session| session.number),
            transport = ?s.transport_type(),
            "connected"
        );
        let gw = self.clone();
        s.on_disconnect(move |s: SocketRef<A>, reason: DisconnectReason| {
            let gw = gw.clone();
            async move { gw.disconnected(&s, reason) }
        });
        self.watch_expiry(s);
        if let Some(session) = Session::of(s) {
            session.ready.store(true, Ordering::SeqCst);
            self.sockets_ready.notify_waiters();
        }
    }

    fn disconnected<A: Adapter>(&self, s: &SocketRef<A>, reason: DisconnectReason) {
        self.metrics.connections.dec();
        let rooms = Session::subscriptions(s).len();
        let number = Session::of(s).map(|session| {
            self.expiry.disarm(session.timer);
            session.close(s);
            session.number
        });
        let user = s.extensions.get::<User>().map(|u| u.id);
        tracing::info!(user = user.as_deref().unwrap_or("?"), socket = number, ?reason, rooms, "disconnected");
    }

    async fn subscribe<A: Adapter>(
        &self,
        s: &SocketRef<A>,
        kind: RoomKind,
        data: &Result<Value, ParserError>,
        delivery: &Delivery<A>,
        ack: &mut Option<AckSender<A>>,
    ) -> Result<Option<bool>, Refusal> {
        let room = parse_room_request(kind, data)?;
        let since = parse_since(data)?;
        let user = s.extensions.get::<User>().ok_or(Refusal::Unauthorized)?;
        let session = Session::of(s).ok_or(Refusal::Unauthorized)?;
        let revocations = session.revocations();
        let campaign = match self.access.check(&user.id, &room).await {
            Ok(Decision::Allowed(campaign)) => campaign,
            Ok(Decision::Denied) => {
                tracing::info!(user = &*user.id, room = %room, "subscription refused");
                return Err(Refusal::Unauthorized);
            }
            Err(e) => {
                tracing::error!(
                    user = &*user.id,
                    room = %room,
                    error = %crate::telemetry::error_chain(&*e),
                    "membership lookup failed"
                );
                return Err(Refusal::Internal);
            }
        };
        let subscriptions = Session::subscriptions(s);
        let already = subscriptions.contains(&room);
        if !already && subscriptions.len() >= self.limits.max_subscriptions {
            self.limit_hit("subscriptions");
            return Err(Refusal::TooManySubscriptions);
        }
        // The ack goes out from inside the join, before any later event.
        let sender = ack.take();
        let joined = Joined::new(move |result| {
            if let Some(sender) = sender {
                let _ = sender.send(&result.map_or_else(|why| Reply::refused(join_refusal(why)), Reply::ok));
            }
        });
        let ticket = session.ticket(campaign, revocations);
        let recovered = delivery.join(s, &room, since, &ticket, &joined).await.map_err(join_refusal)?;
        tracing::info!(
            user = &*user.id,
            room = %room,
            subscriptions = subscriptions.len() + usize::from(!already),
            ?recovered,
            "subscribed"
        );
        Ok(recovered)
    }

    fn unsubscribe<A: Adapter>(
        &self,
        s: &SocketRef<A>,
        kind: RoomKind,
        data: &Result<Value, ParserError>,
    ) -> Result<(), Refusal> {
        let room = parse_room_request(kind, data)?;
        if Session::of(s).is_some_and(|session| session.leave(s, &room)) {
            let user = s.extensions.get::<User>().map(|u| u.id);
            tracing::info!(user = user.as_deref().unwrap_or("?"), room = %room, "unsubscribed");
        }
        Ok(())
    }
}

/// The room every socket of a user is in (not a subscription room: the
/// `user:` kind is not one clients can name).
pub(crate) fn user_room(user: &str) -> String {
    format!("user:{user}")
}

/// The refusal a subscribe answers when its join did not happen.
fn join_refusal(why: JoinRefused) -> Refusal {
    match why {
        // Gone while the store answered, or cut meanwhile.
        JoinRefused::Closed => Refusal::Internal,
        JoinRefused::Revoked => Refusal::Unauthorized,
    }
}

/// At most `max` characters of a client-chosen string, for logs.
fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn room_requests_are_validated() {
        let ok: Result<Value, ParserError> = Ok(json!({"campaignId": "c1"}));
        assert_eq!(parse_room_request(RoomKind::Campaign, &ok).unwrap().to_string(), "campaign:c1");
        for bad in [
            json!("c1"),
            json!({}),
            json!({"campaignId": 1}),
            json!({"campaignId": "../x"}),
            json!({"campaignId": "a".repeat(129)}),
            json!({"campaignId": "a:b"}),
            json!({"settlementId": "s1"}),
        ] {
            assert_eq!(parse_room_request(RoomKind::Campaign, &Ok(bad)), Err(Refusal::InvalidPayload));
        }
    }

    #[test]
    fn client_event_names_round_trip() {
        let names = [
            "subscribe_campaign",
            "subscribe_settlement",
            "subscribe_structure",
            "unsubscribe_campaign",
            "unsubscribe_settlement",
            "unsubscribe_structure",
            "refresh_token",
        ];
        for name in names {
            assert_eq!(ClientEvent::parse(name).map(ClientEvent::name), Some(name));
        }
        for unknown in ["", "subscribe", "subscribe_world", "Subscribe_campaign", "refresh_token "] {
            assert_eq!(ClientEvent::parse(unknown), None, "{unknown:?}");
        }
    }
}
