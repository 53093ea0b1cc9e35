-- The membership fixture every test suite shares (the Rust tests, client-compat,
-- client, the examples through test-support): run after herald's migrations.
--   c1: alice, bob     s1 (st1, st3), s3
--   c2: carol          s2 (st2)
INSERT INTO campaign_members (campaign_id, user_id) VALUES ('c1', 'alice'), ('c1', 'bob'), ('c2', 'carol');
INSERT INTO settlements (id, campaign_id) VALUES ('s1', 'c1'), ('s3', 'c1'), ('s2', 'c2');
INSERT INTO structures (id, settlement_id) VALUES ('st1', 's1'), ('st3', 's1'), ('st2', 's2');
