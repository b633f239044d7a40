-- `oo-serving prune --older-than-days` finds old decisions by time: without this index
-- each batch scanned the whole log while holding the write lock. Times only grow, so
-- new entries go at the index's right edge.
CREATE INDEX decision_ts ON decision (ts_ms);
