-- `oo-serving prune --older-than-days` finds old decisions by time: without this index
-- each batch scanned the whole log while holding the write lock. Times only grow, so
-- new entries go at the index's right edge.
CREATE INDEX IF NOT EXISTS decision_ts ON decision (ts_ms);
-- It is built inside the migration's transaction, which blocks writes to the log while
-- it builds: on a large log, build it first with CREATE INDEX CONCURRENTLY decision_ts
-- ON decision (ts_ms), and this statement is then skipped.
