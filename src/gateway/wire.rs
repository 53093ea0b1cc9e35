//! What goes over the wire between a client and the gateway: the client
//! events herald knows, their payloads (validated here, at the edge), the
//! acks, and why a handshake or an event is refused.

use serde::Serialize;
use serde_json::Value;
use socketioxide::ParserError;

use crate::auth::Unauthorized;
use crate::log::Offset;
use crate::rooms::{Room, RoomKind};

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
    pub(crate) fn message(self) -> &'static str {
        match self {
            Refusal::InvalidPayload => "Invalid payload",
            Refusal::Unauthorized => "Unauthorized",
            Refusal::Internal => "Internal error",
            Refusal::UnknownEvent => "Unknown event",
            Refusal::RateLimited => "Rate limited",
            Refusal::TooManySubscriptions => "Too many subscriptions",
        }
    }

    pub(crate) fn outcome(self) -> &'static str {
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
    pub(crate) fn ok(recovered: Option<bool>) -> Reply {
        Reply { success: true, error: None, recovered }
    }

    pub(crate) fn refused(why: Refusal) -> Reply {
        Reply { success: false, error: Some(why.message()), recovered: None }
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
