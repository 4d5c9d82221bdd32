-- 0002: reward model versions, written by `alignloop train reward`.
--
-- Every round that gets as far as evaluating a candidate leaves a row: 'current' (the one
-- PPO uses; at most one), 'previous' (was current, replaced by a better one) or 'rejected'
-- (failed the version gate; `reason` says why). Files live under
-- state_dir/reward_models/<version>, checked by the sha256 of their manifest.

CREATE TABLE reward_models (
    version         text PRIMARY KEY,          -- rm-0001, rm-0002, ...
    number          integer NOT NULL UNIQUE,
    status          text NOT NULL CHECK (status IN ('current', 'previous', 'rejected')),
    parent_version  text REFERENCES reward_models (version),  -- warm-started from / compared to
    kind            text NOT NULL,             -- 'lora' (adapter on the base) or 'seq_cls'
    base_model      text,
    path            text NOT NULL,
    manifest_sha256 text NOT NULL,             -- sha256 of the version's MANIFEST.json
    -- The data snapshot: highest seq per feedback table (feedback.datasets.Watermark).
    watermark       jsonb NOT NULL,
    metrics         jsonb NOT NULL,            -- held-out metrics of this version
    parent_metrics  jsonb,                     -- the parent's, on the same held-out data
    reason          text NOT NULL,             -- why current / why rejected
    config          jsonb NOT NULL,
    train_stats     jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX reward_models_one_current ON reward_models ((true)) WHERE status = 'current';
