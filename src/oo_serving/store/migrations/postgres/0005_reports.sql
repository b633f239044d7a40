-- Reports computed from the log and kept for the dashboard: `oo-serving evaluate` saves
-- its result here (kind 'evaluate'), and /dashboard shows the latest one. Only the newest
-- reports of each kind are kept (Store.save_report).
CREATE TABLE report (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       text   NOT NULL,
    created_ms bigint NOT NULL,  -- when it was computed, Unix ms
    body       jsonb  NOT NULL   -- JSON object
);
CREATE INDEX report_kind_created ON report (kind, created_ms);
