//! Addressed events: an event's `audience`, the users it is for.
//!
//! A published event may carry `"audience": {"users": [...]}`: 1 to
//! [`MAX_AUDIENCE`] distinct user ids (the revoke API's rule, [`UserId`]).
//! It is then delivered only to the sockets of those users among the
//! sockets in its rooms, live and in a replay, on every instance; the
//! audience itself is never delivered. The log keeps it with the event
//! ([`Audience::encode`], [`Audience::decode`]).

use std::sync::Arc;

use serde::Deserialize;

use crate::users::UserId;

/// Most users one event may be addressed to.
pub const MAX_AUDIENCE: usize = 1_000;

/// The users an addressed event is for: 1 to [`MAX_AUDIENCE`] distinct user
/// ids, kept sorted so that a look-up is a binary search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience(Arc<[UserId]>);

/// `audience` as published.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IncomingAudience {
    pub users: Vec<UserId>,
}

/// Why a list of users is not an audience: the index of the failing user
/// (`None`: the list itself), and what is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidAudience {
    pub at: Option<usize>,
    pub message: &'static str,
}

impl Audience {
    /// An audience of `users` (already each a valid user id): refused when
    /// empty, over [`MAX_AUDIENCE`], or when a user is named twice (the
    /// second time is the one named).
    pub(crate) fn new(users: Vec<UserId>) -> Result<Audience, InvalidAudience> {
        if users.is_empty() || users.len() > MAX_AUDIENCE {
            return Err(InvalidAudience { at: None, message: "expected 1 to 1000 user ids" });
        }
        let mut order: Vec<usize> = (0..users.len()).collect();
        order.sort_by(|a, b| users[*a].cmp(&users[*b]).then(a.cmp(b)));
        if let Some(pair) = order.windows(2).find(|pair| users[pair[0]] == users[pair[1]]) {
            return Err(InvalidAudience { at: Some(pair[1]), message: "a user named twice" });
        }
        let mut users = users;
        users.sort();
        Ok(Audience(users.into()))
    }

    /// Whether `user` is in it.
    pub fn contains(&self, user: &str) -> bool {
        self.0.binary_search_by(|u| u.as_str().cmp(user)).is_ok()
    }

    /// Its users, sorted.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(UserId::as_str)
    }

    /// How the log keeps it: the user ids, space-separated (a user id has
    /// no whitespace).
    pub fn encode(&self) -> String {
        self.users().collect::<Vec<_>>().join(" ")
    }

    /// Reads what [`Audience::encode`] wrote; `None` for anything else.
    pub fn decode(s: &str) -> Option<Audience> {
        let users = s.split(' ').map(UserId::parse).collect::<Result<Vec<_>, _>>().ok()?;
        Audience::new(users).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(ids: &[&str]) -> Vec<UserId> {
        ids.iter().map(|id| UserId::parse(id).unwrap()).collect()
    }

    #[test]
    fn an_audience_is_1_to_1000_distinct_users() {
        assert_eq!(Audience::new(vec![]).unwrap_err().at, None);
        let many: Vec<String> = (0..=MAX_AUDIENCE).map(|i| format!("u{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(Audience::new(users(&many)).unwrap_err().at, None);
        assert!(Audience::new(users(&many[..MAX_AUDIENCE])).is_ok());
        assert_eq!(Audience::new(users(&["b", "a", "c", "a"])).unwrap_err().at, Some(3));
        assert_eq!(Audience::new(users(&["a", "b", "a"])).unwrap_err().at, Some(2));
    }

    #[test]
    fn membership_and_the_log_encoding() {
        let audience = Audience::new(users(&["zed", "auth0|5f7c", "bob@example.com"])).unwrap();
        for id in ["zed", "auth0|5f7c", "bob@example.com"] {
            assert!(audience.contains(id), "{id}");
        }
        for id in ["", "ze", "zedd", "alice"] {
            assert!(!audience.contains(id), "{id}");
        }
        assert_eq!(audience.encode(), "auth0|5f7c bob@example.com zed");
        assert_eq!(Audience::decode(&audience.encode()), Some(audience));
        for bad in ["", " ", "a  b", "a a"] {
            assert_eq!(Audience::decode(bad), None, "{bad:?}");
        }
    }
}
