-- Policies are plug-ins: a user's model is the policy's own encoding of its state
-- (Policy.encode), opaque to the store, with the version of that encoding. linucb-v1's
-- encoding is A⁻¹'s bytes followed by b's, so each existing row converts exactly to
-- state = a_inv || b (bytea concatenation), state_version = 1. `state` is NULL, as
-- `a_inv` was, for a row made before its first write fills it in the same transaction.
--
-- The UPDATE rewrites every model row inside the migration's transaction, which blocks
-- writes meanwhile: on a very large table, plan the upgrade for a quiet time.
ALTER TABLE user_model
    ADD COLUMN state         bytea,    -- the policy's encoding of the user's state
    ADD COLUMN state_version integer;  -- the format of `state`, the policy's to read
UPDATE user_model SET state = a_inv || b, state_version = 1 WHERE a_inv IS NOT NULL;
ALTER TABLE user_model DROP COLUMN a_inv, DROP COLUMN b;

-- The decision log keeps every candidate's raw features and the request's context, so
-- that any policy can be rebuilt or evaluated from it. Rows logged before stay NULL.
ALTER TABLE decision
    ADD COLUMN candidate_features bytea,  -- n*4 float64, RAW_FEATURES, candidate order
    ADD COLUMN context            jsonb;  -- the request's context, e.g. the hour

-- The population statistics of the policies that pool them: one row per policy and
-- process (shard), summed on read; see Store.add_pooled.
CREATE TABLE pooled (
    policy     text   NOT NULL,
    shard      text   NOT NULL,
    count      bigint NOT NULL,  -- rewards counted
    stats      bytea  NOT NULL,  -- float64, little-endian, the policy's own layout
    updated_ms bigint NOT NULL,
    PRIMARY KEY (policy, shard)
);
