//! The membership and hierarchy store: who is in which campaign, which
//! campaign a settlement or structure belongs to, and (the one table herald
//! writes) whose access was revoked when.
//!
//! [`SqlStore`] reads and writes them over SQLite (the embedded default,
//! created and migrated on start) or PostgreSQL (where the relations may be
//! views over the application's own tables).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::health::Probe;
use crate::rooms::{CampaignId, SettlementId, StructureId};

/// The demo data development mode seeds into an empty store.
pub const DEMO_USER: &str = "demo-user";
pub const DEMO_CAMPAIGN: &str = "demo-campaign";
pub const DEMO_SETTLEMENT: &str = "demo-settlement";
pub const DEMO_STRUCTURE: &str = "demo-structure";

/// The store failed or is unreachable.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL scheme (use sqlite:// or postgres://)")]
    UnsupportedUrl,
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("relation {0} is missing: create it, or start with HERALD_DATABASE_MIGRATE=true")]
    MissingRelation(&'static str),
}

/// Runs the same query on either pool (`$1`-style parameters work in both).
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match $store {
            SqlStore::Sqlite($pool) => $body,
            SqlStore::Postgres($pool) => $body,
        }
    };
}

/// The SQL store.
#[derive(Debug, Clone)]
pub enum SqlStore {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

async fn open_and_migrate_sqlite(
    options: SqliteConnectOptions,
    max_connections: u32,
) -> Result<SqlitePool, StoreError> {
    let pool = SqlitePoolOptions::new().max_connections(max_connections).connect_with(options).await?;
    if let Err(e) = sqlx::migrate!("./migrations/sqlite").run(&pool).await {
        pool.close().await;
        return Err(e.into());
    }
    Ok(pool)
}

/// The relations herald reads, and the one it writes (user revocations).
const RELATIONS: [&str; 4] = ["campaign_members", "settlements", "structures", "herald_user_revocations"];

impl SqlStore {
    /// Connects. SQLite files are created if missing and always migrated;
    /// PostgreSQL is migrated only when `migrate` is set, and otherwise checked
    /// for the three relations.
    pub async fn connect(url: &str, max_connections: u32, migrate: bool) -> Result<Self, StoreError> {
        let store = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(5));
            // Several instances may start at once on one file. Opening it in
            // WAL mode and migrating both need a lock SQLite may refuse at once
            // (and it has no migration lock), so a loser retries; the winner's
            // work makes the retry a no-op.
            let mut attempt = 0;
            let pool = loop {
                match open_and_migrate_sqlite(options.clone(), max_connections).await {
                    Ok(pool) => break pool,
                    Err(e) if attempt < 40 => {
                        attempt += 1;
                        tracing::debug!(error = %e, attempt, "opening the sqlite store raced another instance; retrying");
                        tokio::time::sleep(Duration::from_millis(25 + 25 * attempt)).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            SqlStore::Sqlite(pool)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect(url)
                .await?;
            if migrate {
                sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            }
            SqlStore::Postgres(pool)
        } else {
            return Err(StoreError::UnsupportedUrl);
        };
        store.check_relations().await?;
        Ok(store)
    }

    async fn check_relations(&self) -> Result<(), StoreError> {
        for relation in RELATIONS {
            // The names are constants, never input.
            let sql = format!("SELECT 1 FROM {relation} LIMIT 0");
            let result = on_pool!(self, |pool| sqlx::query(&sql).execute(pool).await.map(drop));
            if result.is_err() {
                return Err(StoreError::MissingRelation(relation));
            }
        }
        Ok(())
    }

    /// Whether this is the embedded SQLite store.
    pub fn is_sqlite(&self) -> bool {
        matches!(self, SqlStore::Sqlite(_))
    }

    /// In an empty store, adds a demo campaign `demo-campaign` with settlement
    /// `demo-settlement` and structure `demo-structure`, and `demo-user` as a
    /// member. Returns whether it added them.
    pub async fn seed_demo_if_empty(&self) -> Result<bool, StoreError> {
        let SqlStore::Sqlite(pool) = self else {
            return Ok(false);
        };
        let mut tx = pool.begin().await?;
        let (members,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM campaign_members").fetch_one(&mut *tx).await?;
        let (settlements,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM settlements").fetch_one(&mut *tx).await?;
        if members > 0 || settlements > 0 {
            return Ok(false);
        }
        sqlx::query("INSERT INTO campaign_members (campaign_id, user_id) VALUES (?, ?)")
            .bind(DEMO_CAMPAIGN)
            .bind(DEMO_USER)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO settlements (id, campaign_id) VALUES (?, ?)")
            .bind(DEMO_SETTLEMENT)
            .bind(DEMO_CAMPAIGN)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO structures (id, settlement_id) VALUES (?, ?)")
            .bind(DEMO_STRUCTURE)
            .bind(DEMO_SETTLEMENT)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Closes the pool.
    pub async fn close(&self) {
        on_pool!(self, |pool| pool.close().await)
    }
}

// What the gateway asks of the store.
impl SqlStore {
    /// Whether `user` is a member of `campaign`.
    pub async fn is_member(&self, campaign: &CampaignId, user: &str) -> Result<bool, StoreError> {
        let sql = "SELECT 1 FROM campaign_members WHERE campaign_id = $1 AND user_id = $2 LIMIT 1";
        let row: Option<(i32,)> =
            on_pool!(self, |pool| sqlx::query_as(sql).bind(campaign.as_str()).bind(user).fetch_optional(pool).await?);
        Ok(row.is_some())
    }

    /// The campaign a settlement belongs to, if the settlement exists.
    pub async fn settlement_campaign(&self, settlement: &SettlementId) -> Result<Option<CampaignId>, StoreError> {
        let sql = "SELECT campaign_id FROM settlements WHERE id = $1";
        let row: Option<(String,)> =
            on_pool!(self, |pool| sqlx::query_as(sql).bind(settlement.as_str()).fetch_optional(pool).await?);
        // A stored id that is not a valid id can never be a room: no access.
        Ok(row.and_then(|(id,)| CampaignId::parse(&id).ok()))
    }

    /// The settlement a structure belongs to, if the structure exists.
    pub async fn structure_settlement(&self, structure: &StructureId) -> Result<Option<SettlementId>, StoreError> {
        let sql = "SELECT settlement_id FROM structures WHERE id = $1";
        let row: Option<(String,)> =
            on_pool!(self, |pool| sqlx::query_as(sql).bind(structure.as_str()).fetch_optional(pool).await?);
        Ok(row.and_then(|(id,)| SettlementId::parse(&id).ok()))
    }

    /// When `user`'s access was last revoked, if at or after `since`
    /// (seconds since the epoch).
    pub async fn user_revoked_at(&self, user: &str, since: u64) -> Result<Option<u64>, StoreError> {
        let since = i64::try_from(since).unwrap_or(i64::MAX);
        let sql = "SELECT revoked_at FROM herald_user_revocations WHERE user_id = $1 AND revoked_at >= $2";
        let row: Option<(i64,)> =
            on_pool!(self, |pool| sqlx::query_as(sql).bind(user).bind(since).fetch_optional(pool).await?);
        Ok(row.and_then(|(at,)| u64::try_from(at).ok()))
    }

    /// Records that `user`'s access was revoked `at` (keeping the latest),
    /// and forgets revocations older than `forget_before`.
    pub async fn revoke_user(&self, user: &str, at: u64, forget_before: u64) -> Result<(), StoreError> {
        let (at, forget_before) =
            (i64::try_from(at).unwrap_or(i64::MAX), i64::try_from(forget_before).unwrap_or(i64::MAX));
        // `excluded` is the row that was refused; the later time wins (SQLite's
        // MAX and PostgreSQL's GREATEST are spelled differently).
        let latest = if self.is_sqlite() { "MAX" } else { "GREATEST" };
        let upsert = format!(
            "INSERT INTO herald_user_revocations (user_id, revoked_at) VALUES ($1, $2) ON CONFLICT (user_id) \
             DO UPDATE SET revoked_at = {latest}(herald_user_revocations.revoked_at, excluded.revoked_at)"
        );
        let forget = "DELETE FROM herald_user_revocations WHERE revoked_at < $1";
        on_pool!(self, |pool| {
            sqlx::query(forget).bind(forget_before).execute(pool).await?;
            sqlx::query(&upsert).bind(user).bind(at).execute(pool).await?;
        });
        Ok(())
    }

    /// `/readyz`'s probe of the store: it answers.
    pub fn probe(&self) -> Probe {
        let store = self.clone();
        Arc::new(move || {
            let store = store.clone();
            Box::pin(async move { store.ping().await.map_err(|e| crate::telemetry::error_chain(&e)) })
        })
    }

    /// Checks that the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        // Not just the connection: the relations herald reads must answer.
        self.check_relations().await
    }
}
