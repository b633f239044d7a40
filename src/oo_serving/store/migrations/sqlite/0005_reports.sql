-- Reports computed from the log and kept for the dashboard: `oo-serving evaluate` saves
-- its result here (kind 'evaluate'), and /dashboard shows the latest one. `body` is the
-- report as JSON text. Only the newest reports of each kind are kept (Store.save_report).
CREATE TABLE report (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT    NOT NULL,
    created_ms INTEGER NOT NULL,  -- when it was computed, Unix ms
    body       TEXT    NOT NULL   -- JSON object
);
CREATE INDEX report_kind_created ON report (kind, created_ms);
