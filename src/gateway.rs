//! The Socket.IO side: the handshake (JWT auth) and the client events
//! (`subscribe_*`, `unsubscribe_*`), with their acks.
//!
//! Handlers are generic over the adapter; only start-up names it. They are
//! registered inside the connect middleware, before the CONNECT packet goes
//! out, so an event a client sends right after connecting is never dropped
//! for want of a handler.

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use socketioxide::ParserError;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;
use socketioxide::extract::{AckSender, Event, SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::socket::DisconnectReason;
use socketioxide_core::adapter::DefinedAdapter;

use crate::access::{Access, Decision};
use crate::auth::{Unauthorized, User, Verifier, find_token};
use crate::delivery::Delivery;
use crate::replay::Offset;
use crate::rooms::{Room, RoomKind};
use crate::store::MembershipStore;
use crate::telemetry::Metrics;

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
}

impl Refusal {
    fn message(self) -> &'static str {
        match self {
            Refusal::InvalidPayload => "Invalid payload",
            Refusal::Unauthorized => "Unauthorized",
            Refusal::Internal => "Internal error",
            Refusal::UnknownEvent => "Unknown event",
        }
    }

    fn outcome(self) -> &'static str {
        match self {
            Refusal::InvalidPayload => "invalid",
            Refusal::Unauthorized => "unauthorized",
            Refusal::Internal => "error",
            Refusal::UnknownEvent => "unknown",
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

/// The gateway's shared state.
pub struct Gateway<S> {
    verifier: Verifier,
    access: Access<S>,
    metrics: Arc<Metrics>,
}

impl<S: MembershipStore> Gateway<S> {
    /// A gateway that verifies tokens with `verifier` and checks rooms with `access`.
    pub fn new(verifier: Verifier, access: Access<S>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Gateway { verifier, access, metrics })
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
                async move { gw.authenticate(&s, auth.ok().as_ref(), delivery) }
            }
        };
        io.ns("/", on_connect.with(authenticate))
    }

    /// The connect middleware: verifies the token, keeps the user in the
    /// socket's extensions and registers the event handlers.
    fn authenticate<A: Adapter>(
        self: &Arc<Self>,
        s: &SocketRef<A>,
        auth: Option<&Value>,
        delivery: Delivery<A>,
    ) -> Result<(), Unauthorized> {
        let Some(token) = find_token(auth, s.req_parts().uri.query()) else {
            self.metrics.auth_failures.get_or_create(&[("reason", "missing")]).inc();
            tracing::info!(socket = %s.id, reason = "missing token", "handshake rejected");
            return Err(Unauthorized);
        };
        let user = match self.verifier.verify(&token) {
            Ok(user) => user,
            Err(e) => {
                self.metrics.auth_failures.get_or_create(&[("reason", "invalid")]).inc();
                tracing::info!(socket = %s.id, reason = "invalid token", "handshake rejected");
                return Err(e);
            }
        };
        s.extensions.insert(user);
        self.register_handlers(s, delivery);
        Ok(())
    }

    fn register_handlers<A: Adapter>(self: &Arc<Self>, s: &SocketRef<A>, delivery: Delivery<A>) {
        for kind in RoomKind::ALL {
            for action in [Action::Subscribe, Action::Unsubscribe] {
                let gw = self.clone();
                let delivery = delivery.clone();
                s.on(
                    event_name(action, kind),
                    move |s: SocketRef<A>, TryData(data): TryData<Value>, ack: AckSender<A>| {
                        let gw = gw.clone();
                        let delivery = delivery.clone();
                        async move {
                            let reply = match action {
                                Action::Subscribe => gw.subscribe(&s, kind, &data, &delivery).await,
                                Action::Unsubscribe => gw.unsubscribe(&s, kind, &data).map(|()| None),
                            };
                            gw.count_ack(event_name(action, kind), reply.map(drop));
                            // Without an ack id this sends nothing; a failure means the socket is gone.
                            let _ = ack.send(&reply.map_or_else(Reply::refused, Reply::ok));
                        }
                    },
                );
            }
        }
        let gw = self.clone();
        s.on_fallback(move |s: SocketRef<A>, Event(event): Event, ack: AckSender<A>| {
            let gw = gw.clone();
            async move {
                tracing::debug!(socket = %s.id, event = %truncate(&event, 64), "unknown client event");
                gw.count_ack("unknown", Err(Refusal::UnknownEvent));
                let _ = ack.send(&Reply::refused(Refusal::UnknownEvent));
            }
        });
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
            socket = %s.id,
            transport = ?s.transport_type(),
            "connected"
        );
        let gw = self.clone();
        s.on_disconnect(move |s: SocketRef<A>, reason: DisconnectReason| {
            let gw = gw.clone();
            async move { gw.disconnected(&s, reason) }
        });
    }

    fn disconnected<A: Adapter>(&self, s: &SocketRef<A>, reason: DisconnectReason) {
        self.metrics.connections.dec();
        let rooms = s.rooms();
        for room in &rooms {
            if let Some(room) = Room::parse(room) {
                self.metrics.subscriptions.get_or_create(&[("kind", room.kind().as_str())]).dec();
            }
        }
        let user = s.extensions.get::<User>().map(|u| u.id);
        tracing::info!(
            user = user.as_deref().unwrap_or("?"),
            socket = %s.id,
            ?reason,
            rooms = rooms.len(),
            "disconnected"
        );
    }

    async fn subscribe<A: Adapter>(
        &self,
        s: &SocketRef<A>,
        kind: RoomKind,
        data: &Result<Value, ParserError>,
        delivery: &Delivery<A>,
    ) -> Result<Option<bool>, Refusal> {
        let room = parse_room_request(kind, data)?;
        let since = parse_since(data)?;
        let user = s.extensions.get::<User>().ok_or(Refusal::Unauthorized)?;
        match self.access.check(&user.id, &room).await {
            Ok(Decision::Allowed) => {}
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
        }
        // The socket may have gone while the store answered.
        if !s.connected() {
            return Err(Refusal::Internal);
        }
        let name = room.to_string();
        let rooms = s.rooms();
        let already = rooms.iter().any(|r| *r == name);
        let recovered = delivery.join(s, &room, since).await;
        if !already && s.connected() {
            self.metrics.subscriptions.get_or_create(&[("kind", kind.as_str())]).inc();
        }
        tracing::info!(user = &*user.id, room = %room, subscriptions = rooms.len() + 1, ?recovered, "subscribed");
        Ok(recovered)
    }

    fn unsubscribe<A: Adapter>(
        &self,
        s: &SocketRef<A>,
        kind: RoomKind,
        data: &Result<Value, ParserError>,
    ) -> Result<(), Refusal> {
        let room = parse_room_request(kind, data)?;
        let name = room.to_string();
        if s.rooms().iter().any(|r| *r == name) {
            s.leave(name);
            self.metrics.subscriptions.get_or_create(&[("kind", kind.as_str())]).dec();
            let user = s.extensions.get::<User>().map(|u| u.id);
            tracing::info!(user = user.as_deref().unwrap_or("?"), room = %room, "unsubscribed");
        }
        Ok(())
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
}
