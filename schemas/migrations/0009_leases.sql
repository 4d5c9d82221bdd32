-- 0009: leases: one canary controller and one trainer at a time
-- (`deploy/policies/leases.py` is the only writer).
--
-- The lock itself is not this table: it is a session-level advisory lock
-- (pg_try_advisory_lock) that the holder keeps on a connection of its own, which Postgres
-- releases when that connection or the holder's process dies, so a crashed holder never
-- blocks the next one. This table says who holds what and since when, for operators and for
-- the refusal a second instance prints: the holder writes its row on acquiring, bumps
-- heartbeat_at every few seconds and sets released_at when it lets go. A row whose heartbeat
-- is old and released_at NULL is a holder that died (its lock is gone with its connection)
-- or one cut off from Postgres.
CREATE TABLE leases (
    name         text PRIMARY KEY,
    holder       text NOT NULL,            -- host:pid
    acquired_at  timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    released_at  timestamptz
);
