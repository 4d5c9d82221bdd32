-- 0004: policy health events the feedback ingestor stores from `alignloop.policy`.
--
-- One row per `AdapterLoadFailed` event (a serving replica could not load a version's
-- adapter), keyed by event id so redeliveries insert nothing. No foreign key to
-- policy_versions: the event stream and the registry are not ordered with each other, and a
-- failure report for a version the registry does not know is still worth keeping.
-- The canary controller counts a canary's rows since its canary start (deploy/canary_data.py).

CREATE TABLE adapter_load_failures (
    event_id    uuid PRIMARY KEY,
    seq         bigserial NOT NULL UNIQUE,
    version     text NOT NULL,
    adapter_uri text,
    error       text NOT NULL,
    producer    text NOT NULL,
    occurred_at timestamptz NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX adapter_load_failures_version ON adapter_load_failures (version, occurred_at);
