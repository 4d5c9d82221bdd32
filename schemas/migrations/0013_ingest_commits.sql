-- 0013: when each ingest batch committed (feedback/ingest/writer.py, the last statement of
-- write_batch).
--
-- `ingested_at` columns default to now(), which is the transaction's START: a batch that
-- waits for the write lock or takes long to write looks younger than it was when its rows
-- became visible. This table records, per batch transaction, clock_timestamp() taken after
-- every other statement of the batch, i.e. just before COMMIT (the commit's own WAL flush
-- is the only part left out). A row stored by that transaction is found through its system
-- column: `ingest_commits.xact::xid = t.xmin` (feedback_events rows are never updated, so
-- their xmin stays the inserting transaction's; a row written in the per-event savepoint
-- fallback carries the subtransaction's xid and has no match). benchmarks/feedback.py
-- measures end-to-end lag to this time. One small row per batch, no personal data, kept a
-- day: each stamp also deletes the stamps older than that (through the index below), so the
-- table stays about one day of batches without a purge job.

CREATE TABLE ingest_commits (
    xact         xid8 PRIMARY KEY,
    committed_at timestamptz NOT NULL,
    events       integer NOT NULL
);

CREATE INDEX ingest_commits_committed_at ON ingest_commits (committed_at);
