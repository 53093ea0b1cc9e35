//! Who may join which room, and whether a user's token outlived a
//! revocation of the user; with a short-lived cache in front of each answer.
//!
//! Where membership answers come from is the [`Membership`] seam: the
//! store's relations ([`StoreMembership`]: the campaign membership check,
//! through the settlement and structure hierarchy, the default), or the
//! application itself over HTTP ([`HookMembership`], `HERALD_ACCESS_URL`,
//! in [`hook`]). User revocations are herald's own table in the store,
//! whichever the source.
//!
//! Every lookup (membership, hierarchy, user revocation) is cached for the
//! configured TTL, positive and negative answers alike, so a removed member
//! can subscribe at most until its entry expires (a revocation forgets it at
//! once). Concurrent misses for one key share a single store query (or hook
//! call).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;
use secrecy::SecretString;

use crate::auth::{User, unix_now};
use crate::rooms::{CampaignId, Room, SettlementId, StructureId};
use crate::store::{SqlStore, StoreError};

/// The answer to "may this user join this room?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A member of the campaign the room belongs to.
    Allowed(CampaignId),
    /// Not a member, or the id does not exist: the two are not told apart.
    Denied,
}

mod circuit;
pub mod hook;

pub use hook::{HookFailure, HookMembership, HookSettings};

/// A check could not be answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AccessError {
    /// The store failed (shared between concurrent waiters).
    #[error("the store failed")]
    Store(#[source] Arc<StoreError>),
    /// The authorization hook did not answer usably: an outage, never a denial.
    #[error("the authorization hook is unavailable: {0}")]
    Unavailable(HookFailure),
}

impl From<Arc<StoreError>> for AccessError {
    fn from(e: Arc<StoreError>) -> Self {
        AccessError::Store(e)
    }
}

/// The user's token, kept on a socket only when the membership source
/// wants it (`HERALD_ACCESS_FORWARD_TOKEN`).
#[derive(Clone)]
pub struct Credential(pub Arc<SecretString>);

const CACHE_CAPACITY: u64 = 100_000;

/// What a [`Membership`] call returns.
pub type MembershipFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where the answer to "may this user join this room?" comes from.
pub trait Membership: Send + Sync + 'static {
    /// May `user` join `room`? When allowed, the room's campaign. `token`
    /// is the user's token when [`Membership::wants_token`] says so.
    fn check<'a>(
        &'a self,
        user: &'a Arc<str>,
        room: &'a Room,
        token: Option<&'a Credential>,
    ) -> MembershipFuture<'a, Result<Decision, AccessError>>;

    /// Whether checks need the user's token.
    fn wants_token(&self) -> bool {
        false
    }

    /// Forgets what is cached of `user` in `campaign` (a revocation).
    fn forget<'a>(&'a self, campaign: &'a CampaignId, user: &'a Arc<str>) -> MembershipFuture<'a, ()>;

    /// Forgets what is cached of `user` anywhere (a user's revocation).
    fn forget_user(&self, user: &Arc<str>);
}

/// A cache whose entries live `ttl` (zero disables caching).
fn cache<K, V>(ttl: Duration) -> Cache<K, V>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let capacity = if ttl.is_zero() { 0 } else { CACHE_CAPACITY };
    Cache::builder()
        .max_capacity(capacity)
        .time_to_live(ttl.max(Duration::from_millis(1)))
        .support_invalidation_closures()
        .build()
}

/// Membership from the store's relations (`campaign_members`, `settlements`,
/// `structures`), cached.
pub struct StoreMembership {
    store: SqlStore,
    members: Cache<(CampaignId, Arc<str>), bool>,
    settlements: Cache<SettlementId, Option<CampaignId>>,
    structures: Cache<StructureId, Option<SettlementId>>,
}

impl StoreMembership {
    /// Reads `store`, caching each answer for `ttl`.
    pub fn new(store: SqlStore, ttl: Duration) -> Self {
        StoreMembership { store, members: cache(ttl), settlements: cache(ttl), structures: cache(ttl) }
    }

    async fn settlement_campaign(&self, id: &SettlementId) -> Result<Option<CampaignId>, AccessError> {
        Ok(self.settlements.try_get_with(id.clone(), async { self.store.settlement_campaign(id).await }).await?)
    }

    async fn structure_settlement(&self, id: &StructureId) -> Result<Option<SettlementId>, AccessError> {
        Ok(self.structures.try_get_with(id.clone(), async { self.store.structure_settlement(id).await }).await?)
    }

    /// The campaign a room belongs to (`None` when its settlement or
    /// structure does not exist).
    async fn campaign_of(&self, room: &Room) -> Result<Option<CampaignId>, AccessError> {
        Ok(match room {
            Room::Campaign(id) => Some(id.clone()),
            Room::Settlement(id) => self.settlement_campaign(id).await?,
            Room::Structure(id) => match self.structure_settlement(id).await? {
                Some(settlement) => self.settlement_campaign(&settlement).await?,
                None => None,
            },
        })
    }
}

impl Membership for StoreMembership {
    fn check<'a>(
        &'a self,
        user: &'a Arc<str>,
        room: &'a Room,
        _token: Option<&'a Credential>,
    ) -> MembershipFuture<'a, Result<Decision, AccessError>> {
        Box::pin(async move {
            let Some(campaign) = self.campaign_of(room).await? else {
                return Ok(Decision::Denied);
            };
            let member = self
                .members
                .try_get_with((campaign.clone(), user.clone()), async { self.store.is_member(&campaign, user).await })
                .await?;
            Ok(if member { Decision::Allowed(campaign) } else { Decision::Denied })
        })
    }

    fn forget<'a>(&'a self, campaign: &'a CampaignId, user: &'a Arc<str>) -> MembershipFuture<'a, ()> {
        Box::pin(async move { self.members.invalidate(&(campaign.clone(), user.clone())).await })
    }

    fn forget_user(&self, user: &Arc<str>) {
        let user = user.clone();
        let _ = self.members.invalidate_entries_if(move |(_, u), _| *u == user);
    }
}

/// Cached access checks: membership from its source, user revocations from the store.
#[derive(Clone)]
pub struct Access {
    membership: Arc<dyn Membership>,
    store: SqlStore,
    /// When each user's access was last revoked (within the retention).
    revoked_users: Cache<Arc<str>, Option<u64>>,
    /// How long a user revocation is remembered.
    revocation_ttl: Duration,
}

impl Access {
    /// Checks with `membership`; user revocations are kept in `store` for
    /// `revocation_ttl`, and what it says is cached for `ttl`.
    pub fn new(membership: Arc<dyn Membership>, store: SqlStore, ttl: Duration, revocation_ttl: Duration) -> Self {
        Access { membership, store, revoked_users: cache(ttl), revocation_ttl }
    }

    /// Whether `user`'s token outlived no revocation of the user: one issued
    /// at or before the latest revocation (or without `iat`) is refused.
    pub async fn admits(&self, user: &User) -> Result<bool, AccessError> {
        let since = unix_now().saturating_sub(self.revocation_ttl.as_secs());
        let revoked_at = self
            .revoked_users
            .try_get_with(user.id.clone(), async { self.store.user_revoked_at(&user.id, since).await })
            .await?;
        Ok(match revoked_at {
            Some(at) if at >= since => user.issued_at.is_some_and(|iat| iat > at),
            _ => true,
        })
    }

    /// Records in the store that `user`'s access was revoked `at` (and
    /// forgets the revocations older than the retention).
    pub async fn remember_user_revocation(&self, user: &Arc<str>, at: u64) -> Result<(), AccessError> {
        let forget_before = unix_now().saturating_sub(self.revocation_ttl.as_secs());
        self.store.revoke_user(user, at, forget_before).await.map_err(|e| AccessError::Store(Arc::new(e)))
    }

    /// Records in this instance's cache that `user`'s access was revoked
    /// `at` (the store has it: see [`Access::remember_user_revocation`]).
    pub async fn note_user_revocation(&self, user: &Arc<str>, at: u64) {
        self.membership.forget_user(user);
        let latest = self.revoked_users.get(user).await.flatten().map_or(at, |known| known.max(at));
        self.revoked_users.insert(user.clone(), Some(latest)).await;
    }

    /// May `user` join `room`? (`token`: the user's, when [`Access::wants_token`].)
    pub async fn check(
        &self,
        user: &Arc<str>,
        room: &Room,
        token: Option<&Credential>,
    ) -> Result<Decision, AccessError> {
        self.membership.check(user, room, token).await
    }

    /// Whether checks need the user's token (kept on each socket then).
    pub fn wants_token(&self) -> bool {
        self.membership.wants_token()
    }

    /// Forgets the cached membership of `user` in `campaign`.
    pub async fn forget_membership(&self, campaign: &CampaignId, user: &Arc<str>) {
        self.membership.forget(campaign, user).await;
    }
}
