-- 0001: what the feedback ingestor writes.
--
-- Every table the ingestor fills has a `seq` column (bigserial): ingestors serialise their
-- batch transactions on an advisory lock, so `seq` order is commit order and "everything
-- with seq <= N" is a consistent snapshot for dataset builders (their watermark).
-- Feedback may arrive before the interaction it rates, so no foreign key points from
-- feedback to interactions; queries join on response_id.

CREATE TABLE interactions (
    response_id       text PRIMARY KEY,
    event_id          uuid NOT NULL UNIQUE,
    seq               bigserial NOT NULL UNIQUE,
    user_id           text,
    policy_version    text NOT NULL,
    model             text NOT NULL,
    messages          jsonb NOT NULL,
    -- The last user message, for people reading rows; grouping uses prompt_hash.
    prompt_text       text NOT NULL,
    -- sha256 of the canonical JSON of `messages`: answers to the same prompt share it.
    prompt_hash       text NOT NULL,
    prompt_tokens     integer NOT NULL,
    completion_tokens integer NOT NULL,
    latency_ms        double precision NOT NULL,
    ttft_ms           double precision,
    stream            boolean NOT NULL,
    sampling          jsonb NOT NULL,
    occurred_at       timestamptz NOT NULL,
    ingested_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX interactions_prompt_hash ON interactions (prompt_hash);
CREATE INDEX interactions_policy_version ON interactions (policy_version);

CREATE TABLE interaction_choices (
    response_id       text NOT NULL REFERENCES interactions (response_id) ON DELETE CASCADE,
    choice_index      integer NOT NULL,
    text              text NOT NULL,
    finish_reason     text,
    completion_tokens integer NOT NULL,
    PRIMARY KEY (response_id, choice_index)
);

-- Every rating event ever received (the history).
CREATE TABLE feedback_events (
    seq          bigserial PRIMARY KEY,
    event_id     uuid NOT NULL UNIQUE,
    feedback_id  uuid NOT NULL,
    response_id  text NOT NULL,
    choice_index integer NOT NULL,
    user_id      text,
    -- user_id with NULL (anonymous) mapped to '' so it can be part of a key.
    user_key     text NOT NULL,
    rating       text NOT NULL CHECK (rating IN ('up', 'down')),
    comment      text,
    occurred_at  timestamptz NOT NULL,
    ingested_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX feedback_events_answer ON feedback_events (response_id, choice_index, user_key);

-- The latest rating per (answer, user): replaced only by a newer event (occurred_at, then
-- event_id as tie-break), whatever order events arrive in.
CREATE TABLE feedback_current (
    response_id    text NOT NULL,
    choice_index   integer NOT NULL,
    user_key       text NOT NULL,
    user_id        text,
    rating         text NOT NULL CHECK (rating IN ('up', 'down')),
    event_id       uuid NOT NULL,
    feedback_id    uuid NOT NULL,
    comment        text,
    occurred_at    timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- The policy this rating is counted under in policy_stats; NULL while the interaction
    -- it rates has not been ingested yet (the rating is "pending").
    counted_policy text,
    PRIMARY KEY (response_id, choice_index, user_key)
);
CREATE INDEX feedback_current_pending ON feedback_current (response_id)
    WHERE counted_policy IS NULL;

CREATE TABLE preferences (
    seq                  bigserial PRIMARY KEY,
    event_id             uuid NOT NULL UNIQUE,
    preference_id        uuid NOT NULL,
    user_id              text,
    chosen_response_id   text,
    rejected_response_id text,
    messages             jsonb,
    chosen               text,
    rejected             text,
    occurred_at          timestamptz NOT NULL,
    ingested_at          timestamptz NOT NULL DEFAULT now()
);

-- Live A/B counters per policy version, maintained by the ingestor in its batch transaction.
CREATE TABLE policy_stats (
    policy_version text PRIMARY KEY,
    served         bigint NOT NULL DEFAULT 0,  -- answers (choices) served
    rated          bigint NOT NULL DEFAULT 0,  -- answers with at least one current rating
    ups            bigint NOT NULL DEFAULT 0,  -- current ratings that are up
    downs          bigint NOT NULL DEFAULT 0,  -- current ratings that are down
    updated_at     timestamptz NOT NULL DEFAULT now()
);
