-- 0005: server-side request failures the feedback ingestor stores from `alignloop.policy`.
--
-- One row per `RequestFailed` event (a chat completion that failed with a 5xx or an engine
-- error, attributed to the policy version serving it), keyed by event id. The canary
-- controller compares the canary's failure rate with the stable version's since the canary
-- started (the 5xx guardrail, deploy/canary_data.py).

CREATE TABLE request_failures (
    event_id    uuid PRIMARY KEY,
    seq         bigserial NOT NULL UNIQUE,
    version     text NOT NULL,
    status      integer NOT NULL,
    error       text NOT NULL,
    producer    text NOT NULL,
    occurred_at timestamptz NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX request_failures_version ON request_failures (version, occurred_at);
