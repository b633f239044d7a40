-- Policies are plug-ins: a user's model is the policy's own encoding of its state
-- (Policy.encode), opaque to the store, with the version of that encoding. linucb-v1's
-- encoding is A⁻¹'s bytes followed by b's, so each existing row converts exactly to
-- state = a_inv || b, state_version = 1.
--
-- The table is rebuilt (new table, copy, drop, rename) so that `state` is NOT NULL like
-- the columns it replaces. SQLite's `||` makes TEXT out of two BLOBs; the bytes are
-- joined as they are (the database is UTF-8, so nothing is converted), and CAST(... AS
-- BLOB) gives them back as a BLOB, NULs included. The statement after the copy makes
-- sure of it: it compares each copied state with its two old columns byte for byte and
-- aborts the migration (a CHECK constraint) if a single row differs.
CREATE TABLE user_model_0003 (
    user_id           TEXT    NOT NULL PRIMARY KEY,
    policy            TEXT    NOT NULL,
    state             BLOB    NOT NULL,  -- the policy's encoding of the user's state
    state_version     INTEGER NOT NULL,  -- the format of `state`, the policy's to read
    pulls             INTEGER NOT NULL,
    reward_count      INTEGER NOT NULL,
    cumulative_reward REAL    NOT NULL,
    last_updated_ms   INTEGER NOT NULL
) WITHOUT ROWID;

INSERT INTO user_model_0003 (user_id, policy, state, state_version, pulls, reward_count,
                             cumulative_reward, last_updated_ms)
SELECT user_id, policy, CAST(a_inv || b AS BLOB), 1, pulls, reward_count,
       cumulative_reward, last_updated_ms
FROM user_model;

CREATE TEMP TABLE migration_0003_exact (exact INTEGER NOT NULL CHECK (exact = 1));
INSERT INTO migration_0003_exact (exact)
SELECT typeof(n.state) = 'blob'
       AND length(n.state) = length(o.a_inv) + length(o.b)
       AND substr(n.state, 1, length(o.a_inv)) = o.a_inv
       AND substr(n.state, length(o.a_inv) + 1) = o.b
FROM user_model o JOIN user_model_0003 n ON n.user_id = o.user_id
-- A row whose old columns were not blobs (damage `oo-serving check` reports as
-- model_not_decodable) is copied as it is, and reported the same way after.
WHERE typeof(o.a_inv) = 'blob' AND typeof(o.b) = 'blob';
DROP TABLE migration_0003_exact;

DROP TABLE user_model;
ALTER TABLE user_model_0003 RENAME TO user_model;

-- The decision log keeps every candidate's raw features and the request's context, so
-- that any policy can be rebuilt or evaluated from it. Rows logged before stay NULL.
ALTER TABLE decision ADD COLUMN candidate_features BLOB;  -- n*4 float64, RAW_FEATURES
ALTER TABLE decision ADD COLUMN context TEXT;             -- JSON object, e.g. the hour

-- The population statistics of the policies that pool them: one row per policy and
-- process (shard), summed on read; see Store.add_pooled.
CREATE TABLE pooled (
    policy     TEXT    NOT NULL,
    shard      TEXT    NOT NULL,
    count      INTEGER NOT NULL,  -- rewards counted
    stats      BLOB    NOT NULL,  -- float64, little-endian, the policy's own layout
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (policy, shard)
) WITHOUT ROWID;
