-- 0006: PPO training rounds and their per-iteration metrics (trainer/round_records.py is
-- the only writer).
--
-- training_rounds  one row per round the periodic trainer started. `status` is 'running'
--                  until the round ends, then exactly one terminal status:
--                    registered  a candidate policy version was registered (candidate_version)
--                    rejected    the candidate failed an evaluation gate
--                    failed      an error, or not enough data to train on
--                    aborted     training diverged (NaN/inf, exploding KL)
--                  `reason` says why it ended so. At most one round runs at a time (partial
--                  unique index): a killed trainer finds its round still 'running' and
--                  resumes it instead of starting a second one.
-- training_steps   the metrics of each PPO iteration of a round (mean reward, KL to the
--                  reference, KL coefficient, clip fraction, losses, ...). A resumed round
--                  re-records an iteration it had recorded before: upsert on the key.
--
-- JSON columns never hold NaN/Infinity as numbers (jsonb cannot): the writer stores
-- non-finite floats as the strings 'NaN', 'Infinity', '-Infinity', which
-- `(metrics ->> 'x')::double precision` reads back as the float values.

CREATE TABLE training_rounds (
    id                   bigserial PRIMARY KEY,
    status               text NOT NULL DEFAULT 'running' CHECK (status IN
                             ('running', 'registered', 'rejected', 'failed', 'aborted')),
    trigger              text NOT NULL,   -- why it started, e.g. '250 new ratings >= 200'
    reason               text,            -- why it ended as it did (NULL while running)
    reward_model_version text REFERENCES reward_models (version),
    parent_version       text REFERENCES policy_versions (version),  -- the stable it started from
    -- The policy version the round produced. No foreign key: a rejected round may name the
    -- adapter it evaluated without it ever being registered.
    candidate_version    text,
    watermark            jsonb,           -- feedback.datasets.Watermark of its training data
    config               jsonb NOT NULL,
    metrics              jsonb NOT NULL DEFAULT '{}'::jsonb,  -- evaluation metrics
    started_at           timestamptz NOT NULL DEFAULT now(),
    finished_at          timestamptz,
    CHECK ((status = 'running') = (finished_at IS NULL)),
    CHECK (status = 'running' OR reason IS NOT NULL),
    CHECK (status <> 'registered' OR candidate_version IS NOT NULL)
);
CREATE UNIQUE INDEX training_rounds_one_running ON training_rounds ((true))
    WHERE status = 'running';

CREATE TABLE training_steps (
    round_id   bigint NOT NULL REFERENCES training_rounds (id),
    iteration  integer NOT NULL CHECK (iteration >= 0),
    metrics    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),  -- when this iteration was (re-)recorded
    PRIMARY KEY (round_id, iteration)
);
