-- The expiry of user revocations (DELETE ... WHERE revoked_at < ?, run with
-- every new one) reads this index instead of scanning the table.
CREATE INDEX IF NOT EXISTS herald_user_revocations_by_time ON herald_user_revocations (revoked_at);
