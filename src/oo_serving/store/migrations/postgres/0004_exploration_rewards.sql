-- Exploration, reward semantics and shadow policies.
--
-- Each decision keeps the probability with which every candidate was to be shown, the
-- serving policy's own (greedy) preference, and each shadow policy's choice, so that the
-- log can evaluate other policies (`oo-serving evaluate`). Rows logged before stay NULL:
-- they were deterministic (probability 1 on the chosen candidate).
-- How the decision's rewards were kept (OO_REWARD_AGGREGATION) and learned
-- (OO_REWARD_WAIT): `reward` is the kept value, `learned` whether the model holds it,
-- `learned_at` the user's reward_count just after it was learned (how many updates
-- later a correction applies, for a policy that forgets).
ALTER TABLE decision
    ADD COLUMN candidate_p   bytea,                          -- n float64, candidate order
    ADD COLUMN greedy        integer,                        -- index the policy preferred
    ADD COLUMN shadow        jsonb,                          -- {policy: index}
    ADD COLUMN reward_n      integer NOT NULL DEFAULT 0,
    ADD COLUMN learned       boolean NOT NULL DEFAULT false,
    ADD COLUMN learned_at    bigint,
    ADD COLUMN reward_source text;                           -- 'client' or 'default'
-- The UPDATE rewrites every rewarded decision inside the migration's transaction: on a
-- very large log, plan the upgrade for a quiet time.
UPDATE decision SET reward_n = 1, learned = true, reward_source = 'client'
WHERE reward IS NOT NULL;

-- The states of the shadow policies (OO_SHADOW_POLICIES) for the user, in one value
-- the service encodes; NULL: none yet.
ALTER TABLE user_model ADD COLUMN shadows bytea;

-- How far `oo-serving sweep` has applied the default reward: decisions logged before
-- `until_ms` have been swept.
CREATE TABLE sweep_mark (
    name     text   NOT NULL PRIMARY KEY,
    until_ms bigint NOT NULL
);
