-- The three relations herald reads. IF NOT EXISTS keeps tables an operator
-- (or a test fixture) created before herald first started.
CREATE TABLE IF NOT EXISTS campaign_members (
    campaign_id TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    PRIMARY KEY (campaign_id, user_id)
);

CREATE TABLE IF NOT EXISTS settlements (
    id          TEXT PRIMARY KEY,
    campaign_id TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS structures (
    id            TEXT PRIMARY KEY,
    settlement_id TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS campaign_members_by_user ON campaign_members (user_id);
