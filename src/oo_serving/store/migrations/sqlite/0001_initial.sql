-- A user's model: LinUCB state as float64 arrays, and the counters /stats reports.
CREATE TABLE user_model (
    user_id           TEXT    NOT NULL PRIMARY KEY,
    policy            TEXT    NOT NULL,
    a_inv             BLOB    NOT NULL,  -- d*d float64, little-endian, row-major
    b                 BLOB    NOT NULL,  -- d float64
    pulls             INTEGER NOT NULL,
    reward_count      INTEGER NOT NULL,
    cumulative_reward REAL    NOT NULL,
    last_updated_ms   INTEGER NOT NULL
) WITHOUT ROWID;

-- The decision log: every /score, with what offline evaluation needs.
CREATE TABLE decision (
    user_id        TEXT    NOT NULL,
    seq            INTEGER NOT NULL,  -- the user's pull number: 1, 2, 3, ...
    event_id       TEXT    NOT NULL,
    ts_ms          INTEGER NOT NULL,
    tip_id         TEXT    NOT NULL,
    features       TEXT    NOT NULL,  -- JSON: the chosen candidate's raw features
    x              BLOB    NOT NULL,  -- the chosen vector, d float64
    score          REAL    NOT NULL,
    policy         TEXT    NOT NULL,
    propensity     REAL    NOT NULL,
    model_version  INTEGER NOT NULL,  -- the user's reward_count when decided
    candidate_ids  TEXT    NOT NULL,  -- JSON array of the ids offered, in order
    candidate_x    BLOB    NOT NULL,  -- n*d float64, row-major, same order
    reward         REAL,
    rewarded_ms    INTEGER,
    PRIMARY KEY (user_id, seq)
);
CREATE UNIQUE INDEX decision_event ON decision (user_id, event_id);
CREATE INDEX decision_tip ON decision (user_id, tip_id, seq);
