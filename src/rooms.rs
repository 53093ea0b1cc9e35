//! Room names and the ids inside them, validated at the edge.
//!
//! An id is 1 to 128 characters of `[A-Za-z0-9_-]`; once a value is one of
//! these newtypes it is valid, so nothing downstream checks again.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use ts_rs::TS;

/// Longest id accepted, in bytes (all accepted characters are ASCII).
pub const MAX_ID_LEN: usize = 128;

/// Why a string is not an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expected an id matching ^[A-Za-z0-9_-]{{1,128}}$")]
pub struct InvalidId;

fn check_id(s: &str) -> Result<(), InvalidId> {
    let ok = !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(InvalidId) }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, TS)]
        pub struct $name(#[ts(type = "string")] Arc<str>);

        impl $name {
            /// Validates `s` as an id.
            pub fn parse(s: &str) -> Result<Self, InvalidId> {
                check_id(s)?;
                Ok(Self(Arc::from(s)))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A campaign's id.
    CampaignId
);
id_type!(
    /// A settlement's id.
    SettlementId
);
id_type!(
    /// A structure's id.
    StructureId
);
id_type!(
    /// The id of any entity an `entity_updated` event speaks of.
    EntityId
);

/// The three kinds of room a client can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoomKind {
    Campaign,
    Settlement,
    Structure,
}

impl RoomKind {
    /// Every kind, in hierarchy order.
    pub const ALL: [RoomKind; 3] = [RoomKind::Campaign, RoomKind::Settlement, RoomKind::Structure];

    /// The kind as it appears in room names, event names and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RoomKind::Campaign => "campaign",
            RoomKind::Settlement => "settlement",
            RoomKind::Structure => "structure",
        }
    }

    /// The payload field that carries the id (`campaignId`, ...).
    pub fn id_field(self) -> &'static str {
        match self {
            RoomKind::Campaign => "campaignId",
            RoomKind::Settlement => "settlementId",
            RoomKind::Structure => "structureId",
        }
    }

    /// Builds the room of this kind for a validated id string.
    pub fn room(self, id: &str) -> Result<Room, InvalidId> {
        Ok(match self {
            RoomKind::Campaign => Room::Campaign(CampaignId::parse(id)?),
            RoomKind::Settlement => Room::Settlement(SettlementId::parse(id)?),
            RoomKind::Structure => Room::Structure(StructureId::parse(id)?),
        })
    }
}

/// A room: `campaign:<id>`, `settlement:<id>` or `structure:<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Room {
    Campaign(CampaignId),
    Settlement(SettlementId),
    Structure(StructureId),
}

impl Room {
    /// The room's kind.
    pub fn kind(&self) -> RoomKind {
        match self {
            Room::Campaign(_) => RoomKind::Campaign,
            Room::Settlement(_) => RoomKind::Settlement,
            Room::Structure(_) => RoomKind::Structure,
        }
    }

    /// The id inside the room name.
    pub fn id(&self) -> &str {
        match self {
            Room::Campaign(id) => id.as_str(),
            Room::Settlement(id) => id.as_str(),
            Room::Structure(id) => id.as_str(),
        }
    }

    /// Parses a room name such as `campaign:c1`.
    pub fn parse(name: &str) -> Option<Room> {
        let (kind, id) = name.split_once(':')?;
        let kind = RoomKind::ALL.into_iter().find(|k| k.as_str() == kind)?;
        kind.room(id).ok()
    }
}

impl fmt::Display for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind().as_str(), self.id())
    }
}

/// The Socket.IO room every socket of a user is in (not a subscription
/// room: the `user:` kind is not one clients can name), so that a
/// revocation, or an addressed event, finds the user's sockets.
pub(crate) fn user_room(user: &str) -> String {
    format!("user:{user}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_contract_pattern() {
        assert!(CampaignId::parse("c1").is_ok());
        assert!(CampaignId::parse("A-z_09").is_ok());
        assert!(CampaignId::parse(&"a".repeat(128)).is_ok());
        for bad in ["", "../x", "a:b", "a*", "é", "a b", &"a".repeat(129)] {
            assert_eq!(CampaignId::parse(bad), Err(InvalidId), "{bad:?}");
        }
    }

    #[test]
    fn room_names_round_trip() {
        let room = RoomKind::Settlement.room("s1").unwrap();
        assert_eq!(room.to_string(), "settlement:s1");
        assert_eq!(Room::parse("settlement:s1"), Some(room));
        assert_eq!(Room::parse("settlement:s:1"), None);
        assert_eq!(Room::parse("guild:g1"), None);
    }
}
