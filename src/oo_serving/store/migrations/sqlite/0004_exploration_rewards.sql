-- Exploration, reward semantics and shadow policies.
--
-- Each decision keeps the probability with which every candidate was to be shown, the
-- serving policy's own (greedy) preference, and each shadow policy's choice, so that the
-- log can evaluate other policies (`oo-serving evaluate`). Rows logged before stay NULL:
-- they were deterministic (probability 1 on the chosen candidate).
ALTER TABLE decision ADD COLUMN candidate_p BLOB;     -- n float64, candidate order, sums to 1
ALTER TABLE decision ADD COLUMN greedy INTEGER;       -- index the policy preferred
ALTER TABLE decision ADD COLUMN shadow TEXT;          -- JSON {policy: index}
-- How the decision's rewards were kept (OO_REWARD_AGGREGATION) and learned
-- (OO_REWARD_WAIT): `reward` is the kept value, `learned` whether the model holds it,
-- `learned_at` the user's reward_count just after it was learned (how many updates
-- later a correction applies, for a policy that forgets).
ALTER TABLE decision ADD COLUMN reward_n INTEGER NOT NULL DEFAULT 0;
ALTER TABLE decision ADD COLUMN learned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE decision ADD COLUMN learned_at INTEGER;
ALTER TABLE decision ADD COLUMN reward_source TEXT;   -- 'client' or 'default'
UPDATE decision SET reward_n = 1, learned = 1, reward_source = 'client'
WHERE reward IS NOT NULL;

-- The states of the shadow policies (OO_SHADOW_POLICIES) for the user, in one value
-- the service encodes; NULL: none yet.
ALTER TABLE user_model ADD COLUMN shadows BLOB;

-- How far `oo-serving sweep` has applied the default reward: decisions logged before
-- `until_ms` have been swept.
CREATE TABLE sweep_mark (
    name     TEXT    NOT NULL PRIMARY KEY,
    until_ms INTEGER NOT NULL
) WITHOUT ROWID;
