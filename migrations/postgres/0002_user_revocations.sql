-- User-level revocations (POST /v1/access/revoke with a userId alone): a
-- token of that user issued at or before revoked_at (seconds since the epoch)
-- is refused. herald writes this table and forgets rows older than
-- HERALD_REVOCATION_TTL.
CREATE TABLE IF NOT EXISTS herald_user_revocations (
    user_id    TEXT PRIMARY KEY,
    revoked_at BIGINT NOT NULL
);
