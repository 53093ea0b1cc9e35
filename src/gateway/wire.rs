//! What goes over the wire between a client and the gateway: the client
//! events herald knows, their payloads (validated here, at the edge), the
//! acks, and why a handshake or an event is refused.

use serde::Serialize;
use serde_json::Value;
use socketioxide::ParserError;
use ts_rs::TS;

use crate::auth::Unauthorized;
use crate::event_log::Offset;
use crate::presence::{PresenceAck, PresenceCount, PresenceJoined, PresenceLeft, PresenceMember};
use crate::rooms::{Room, RoomKind};

/// An ack, exactly as sent: `{ "success": true }` (with `"recovered"` for a
/// subscription with `since`, `"presence"` for one with `presence: true`) or `{ "success": false, "error": "…" }`.
/// herald-client's `SubscribeAck` is generated from it (see [`typescript`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS)]
#[serde(untagged)]
#[ts(rename = "Ack")]
pub enum Reply {
    Accepted {
        success: Literal<true>,
        #[serde(skip_serializing_if = "Option::is_none")]
        #[ts(optional)]
        recovered: Option<bool>,
        /// The room's presence members, for a subscription with `presence: true`.
        #[serde(skip_serializing_if = "Option::is_none")]
        #[ts(optional)]
        presence: Option<Vec<PresenceMember>>,
        /// Instead of `presence`, in a room told counts only: how many members.
        #[serde(rename = "presenceCount", skip_serializing_if = "Option::is_none")]
        #[ts(optional)]
        presence_count: Option<usize>,
    },
    Refused {
        success: Literal<false>,
        #[ts(inline)]
        error: Refusal,
    },
}

/// A boolean fixed by the type: `B` on the wire, the literal type `B` in
/// TypeScript.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Literal<const B: bool>;

impl<const B: bool> Serialize for Literal<B> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bool(B)
    }
}

impl<const B: bool> TS for Literal<B> {
    type WithoutGenerics = Self;
    type OptionInnerType = Self;

    fn name(_: &ts_rs::Config) -> String {
        B.to_string()
    }

    fn inline(cfg: &ts_rs::Config) -> String {
        Self::name(cfg)
    }
}

/// Why a client event failed, as told to the client: serialized as the
/// ack's `error` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, TS)]
pub enum Refusal {
    /// Malformed payload.
    #[serde(rename = "Invalid payload")]
    InvalidPayload,
    /// Not a member, or no such id.
    #[serde(rename = "Unauthorized")]
    Unauthorized,
    /// The store failed; details are logged, not sent.
    #[serde(rename = "Internal error")]
    Internal,
    /// The authorization hook did not answer (down, slow, failing, or its
    /// circuit open): retry later. Never a denial.
    #[serde(rename = "Unavailable")]
    Unavailable,
    /// No such client event.
    #[serde(rename = "Unknown event")]
    UnknownEvent,
    /// Past the socket's event rate.
    #[serde(rename = "Rate limited")]
    RateLimited,
    /// Past the socket's subscription cap.
    #[serde(rename = "Too many subscriptions")]
    TooManySubscriptions,
}

impl Refusal {
    pub(crate) fn outcome(self) -> &'static str {
        match self {
            Refusal::InvalidPayload => "invalid",
            Refusal::Unauthorized => "unauthorized",
            Refusal::Internal => "error",
            Refusal::Unavailable => "unavailable",
            Refusal::UnknownEvent => "unknown",
            Refusal::RateLimited => "rate_limited",
            Refusal::TooManySubscriptions => "too_many_subscriptions",
        }
    }
}

impl Reply {
    pub(crate) fn ok(recovered: Option<bool>) -> Reply {
        Reply::Accepted { success: Literal, recovered, presence: None, presence_count: None }
    }

    pub(crate) fn with_presence(recovered: Option<bool>, presence: PresenceAck) -> Reply {
        let (members, count) = match presence {
            PresenceAck::Members(members) => (Some(members), None),
            PresenceAck::Count(count) => (None, Some(count)),
        };
        Reply::Accepted { success: Literal, recovered, presence: members, presence_count: count }
    }

    pub(crate) fn refused(why: Refusal) -> Reply {
        Reply::Refused { success: Literal, error: why }
    }
}

/// Subscribe or unsubscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Subscribe,
    Unsubscribe,
}

pub(crate) fn event_name(action: Action, kind: RoomKind) -> &'static str {
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
pub(crate) enum ClientEvent {
    Room(Action, RoomKind),
    RefreshToken,
}

impl ClientEvent {
    pub(crate) fn parse(name: &str) -> Option<ClientEvent> {
        if name == "refresh_token" {
            return Some(ClientEvent::RefreshToken);
        }
        RoomKind::ALL
            .into_iter()
            .flat_map(|kind| [Action::Subscribe, Action::Unsubscribe].map(|action| (action, kind)))
            .find(|&(action, kind)| event_name(action, kind) == name)
            .map(|(action, kind)| ClientEvent::Room(action, kind))
    }

    pub(crate) fn name(self) -> &'static str {
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

/// Reads the optional `presence` of a subscription: absent, or a boolean.
pub fn parse_presence(data: &Result<Value, ParserError>) -> Result<bool, Refusal> {
    match data.as_ref().ok().and_then(|v| v.get("presence")) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(Refusal::InvalidPayload),
    }
}

/// Where the TypeScript declaration of the ack is committed.
pub const TYPESCRIPT_PATH: &str = "client/src/generated/acks.ts";

/// The TypeScript declaration of the ack ([`Reply`], as `Ack`), which
/// herald-client exports as `SubscribeAck` (a test fails when the committed
/// copy differs).
pub fn typescript() -> String {
    let cfg = ts_rs::Config::new();
    crate::events::typescript_file(
        "herald's Rust ack and presence types (src/gateway/wire.rs, src/presence/mod.rs)",
        [
            Reply::decl(&cfg),
            PresenceMember::decl(&cfg),
            PresenceJoined::decl(&cfg),
            PresenceLeft::decl(&cfg),
            PresenceCount::decl(&cfg),
        ],
    )
}

/// Why a verified token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenRefused {
    /// Issued before a revocation of its user.
    Revoked,
    /// The store could not say.
    StoreFailed,
}

impl TokenRefused {
    pub(crate) fn reason(self) -> &'static str {
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

/// At most `max` characters of a client-chosen string, for logs.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
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
    fn typescript_declarations_are_current() {
        crate::events::assert_typescript_current(TYPESCRIPT_PATH, &typescript());
    }

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
