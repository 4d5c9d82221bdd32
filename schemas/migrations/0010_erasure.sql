-- 0010: erasure and retention (feedback/erasure.py; docs/feedback.md, "Privacy").
--
-- user_tombstones   one row per erased user. `user_hash` is the hex sha256 of the user id
--                   as the feedback tables store it (interactions.user_id,
--                   feedback_events.user_key), so the tombstone does not keep the id itself
--                   in clear. The ingestor's writer drops, inside its batch transaction, every
--                   interaction, rating and preference whose user has a tombstone: a
--                   redelivered or late event cannot bring the user's rows back.
-- erased_responses  the response ids of the erased users' answers (random ids, no user in
--                   them): ratings and preferences by *other* users that name an erased
--                   answer are dropped too, now and when they arrive later.
-- user_id_keying    at most one row: the fingerprint of the key user ids are stored under
--                   (keyed hashes, feedback/user_ids.py); no row while ids are stored as
--                   received. A process with another key, or none, is refused.
--
-- The indexes let erasure find a user's rows, and the retention purge old rows, without
-- scanning the tables.

CREATE TABLE user_tombstones (
    user_hash text PRIMARY KEY,
    erased_at timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL,
    reason    text NOT NULL CHECK (reason <> '')
);

CREATE TABLE erased_responses (
    response_id text PRIMARY KEY,
    erased_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE user_id_keying (
    only_row    boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    fingerprint text NOT NULL,
    since       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX interactions_user_id ON interactions (user_id);
CREATE INDEX interactions_occurred_at ON interactions (occurred_at);
CREATE INDEX feedback_events_user_key ON feedback_events (user_key);
CREATE INDEX feedback_events_occurred_at ON feedback_events (occurred_at);
CREATE INDEX feedback_current_user_key ON feedback_current (user_key);
CREATE INDEX feedback_current_occurred_at ON feedback_current (occurred_at);
CREATE INDEX preferences_user_id ON preferences (user_id);
CREATE INDEX preferences_chosen_response_id ON preferences (chosen_response_id);
CREATE INDEX preferences_rejected_response_id ON preferences (rejected_response_id);
CREATE INDEX preferences_occurred_at ON preferences (occurred_at);
