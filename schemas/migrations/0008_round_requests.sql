-- 0008: an operator's request to start a training round now (the console's "start a round
-- now", `trainer/rounds/requests.py` is the only writer).
--
-- round_requests  one row per request. The training loop takes the open request before it
--                 asks its trigger (new ratings, timer): it marks the request taken, then
--                 runs the round, then links the round it ran. A loop killed in between
--                 resumes the running round and starts no second one for the same
--                 request. At most one request is open at a time (partial unique index):
--                 pressing the button twice asks once.
CREATE TABLE round_requests (
    id           bigserial PRIMARY KEY,
    requested_by text NOT NULL,
    reason       text NOT NULL CHECK (reason <> ''),
    requested_at timestamptz NOT NULL DEFAULT now(),
    taken_at     timestamptz,
    round_id     bigint REFERENCES training_rounds (id),
    CHECK (round_id IS NULL OR taken_at IS NOT NULL)
);
CREATE UNIQUE INDEX round_requests_one_open ON round_requests ((true)) WHERE taken_at IS NULL;
