//! User ids: the one rule every user id follows, whether a token's `sub`,
//! the revoke API's `userId` or an addressed event's audience carries it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest user id accepted, in bytes.
pub const MAX_USER_ID_LEN: usize = 256;

/// A user id, as tokens (`sub`) and the revoke API (`userId`) carry it: 1 to
/// 256 bytes, no whitespace and no control character. Looser than the room
/// id rule, since identity providers' subjects hold `|`, `@`, `:` or `.`
/// (`auth0|5f7c…`, an email); strict enough that a user id never breaks a
/// log line or a room name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct UserId(Arc<str>);

/// Why a string is not a user id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expected a user id: 1 to 256 bytes, no whitespace or control character")]
pub struct InvalidUserId;

impl UserId {
    pub fn parse(s: &str) -> Result<UserId, InvalidUserId> {
        let ok = !s.is_empty() && s.len() <= MAX_USER_ID_LEN && !s.chars().any(|c| c.is_whitespace() || c.is_control());
        if ok { Ok(UserId(Arc::from(s))) } else { Err(InvalidUserId) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id, shared.
    pub fn into_shared(self) -> Arc<str> {
        self.0
    }
}

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        UserId::parse(&s).map_err(serde::de::Error::custom)
    }
}
