-- A user's model. a_inv and b are NULL until the user's first write: a /score or
-- /reward first makes sure the row exists, then locks it (SELECT ... FOR UPDATE), so
-- even a user's very first requests are serialised by a row lock.
CREATE TABLE user_model (
    user_id           text             NOT NULL PRIMARY KEY,
    policy            text,
    a_inv             bytea,            -- d*d float64, little-endian, row-major
    b                 bytea,            -- d float64
    pulls             bigint           NOT NULL DEFAULT 0,
    reward_count      bigint           NOT NULL DEFAULT 0,
    cumulative_reward double precision NOT NULL DEFAULT 0,
    last_updated_ms   bigint
);

-- The decision log: every /score, with what offline evaluation needs.
CREATE TABLE decision (
    user_id        text             NOT NULL,
    seq            bigint           NOT NULL,  -- the user's pull number: 1, 2, 3, ...
    event_id       text             NOT NULL,
    ts_ms          bigint           NOT NULL,
    tip_id         text             NOT NULL,
    features       jsonb            NOT NULL,  -- the chosen candidate's raw features
    x              bytea            NOT NULL,  -- the chosen vector, d float64
    score          double precision NOT NULL,
    policy         text             NOT NULL,
    propensity     double precision NOT NULL,
    model_version  bigint           NOT NULL,  -- the user's reward_count when decided
    candidate_ids  text[]           NOT NULL,  -- the ids offered, in order
    candidate_x    bytea            NOT NULL,  -- n*d float64, row-major, same order
    reward         double precision,
    rewarded_ms    bigint,
    PRIMARY KEY (user_id, seq)
);
CREATE UNIQUE INDEX decision_event ON decision (user_id, event_id);
CREATE INDEX decision_tip ON decision (user_id, tip_id, seq);
