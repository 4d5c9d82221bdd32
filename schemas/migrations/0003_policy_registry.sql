-- 0003: the policy registry (deploy/registry.py is the only writer).
--
-- policy_versions   one row per policy version; identity columns are immutable, `state`
--                   moves only along policy_transitions (checked by a trigger; the same
--                   table lives in deploy/registry.py and a test keeps the two equal).
-- policy_routing    a singleton row: what serving routes to (stable, canary + weight, held).
--                   Every update bumps `generation` and NOTIFYs channel `alignloop_routing`.
-- canary_strata     each traffic weight a canary ran at, with its start time: the strata of
--                   the canary's A/B test.
-- policy_audit      append-only: every change and every controller decision.
--
-- Invariants the database itself guarantees:
--   * at most one stable and at most one canary (partial unique indexes);
--   * at least one stable, and routing agreeing with the states, at every commit (a deferred
--     constraint trigger), so a promote must demote + promote in one transaction;
--   * no deletes of versions or audit rows.

CREATE TABLE policy_transitions (
    from_state text NOT NULL,
    to_state   text NOT NULL,
    PRIMARY KEY (from_state, to_state)
);
INSERT INTO policy_transitions (from_state, to_state) VALUES
    ('candidate', 'canary'),
    ('candidate', 'stable'),
    ('candidate', 'rejected'),
    ('canary', 'stable'),
    ('canary', 'rolled_back'),
    ('canary', 'rejected'),
    ('stable', 'retired'),
    ('stable', 'rolled_back'),
    ('retired', 'stable'),
    ('rolled_back', 'stable'),
    ('rolled_back', 'canary');

CREATE TABLE policy_versions (
    version              text PRIMARY KEY CHECK (version ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'),
    adapter_uri          text,            -- NULL only for `base` (the adapter-free base model)
    checksum             text,
    parent_version       text REFERENCES policy_versions (version),
    reward_model_version text,
    training_round       integer,
    metrics              jsonb NOT NULL DEFAULT '{}'::jsonb,
    state                text NOT NULL DEFAULT 'candidate' CHECK (state IN
                             ('candidate', 'canary', 'stable', 'rejected', 'rolled_back',
                              'retired')),
    created_by           text NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    state_changed_at     timestamptz NOT NULL DEFAULT now(),
    CHECK (adapter_uri IS NOT NULL OR version = 'base')
);
CREATE UNIQUE INDEX policy_versions_one_stable ON policy_versions ((true)) WHERE state = 'stable';
CREATE UNIQUE INDEX policy_versions_one_canary ON policy_versions ((true)) WHERE state = 'canary';
CREATE INDEX policy_versions_state ON policy_versions (state, state_changed_at);

CREATE TABLE policy_routing (
    id                boolean PRIMARY KEY DEFAULT true CHECK (id),
    stable_version    text NOT NULL REFERENCES policy_versions (version),
    canary_version    text REFERENCES policy_versions (version),
    canary_weight     double precision NOT NULL DEFAULT 0,
    canary_stage      integer,
    canary_started_at timestamptz,
    stage_started_at  timestamptz,
    held              boolean NOT NULL DEFAULT false,
    held_by           text,
    held_reason       text,
    generation        bigint NOT NULL DEFAULT 1,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((canary_version IS NULL AND canary_weight = 0 AND canary_stage IS NULL)
        OR (canary_version IS NOT NULL AND canary_weight > 0 AND canary_weight < 1
            AND canary_stage IS NOT NULL AND canary_started_at IS NOT NULL))
);

CREATE TABLE canary_strata (
    version    text NOT NULL REFERENCES policy_versions (version),
    stratum    integer NOT NULL,
    stage      integer NOT NULL,
    weight     double precision NOT NULL CHECK (weight > 0 AND weight < 1),
    started_at timestamptz NOT NULL,
    PRIMARY KEY (version, stratum)
);

CREATE TABLE policy_audit (
    id                 bigserial PRIMARY KEY,
    at                 timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor              text NOT NULL,
    action             text NOT NULL,
    version            text REFERENCES policy_versions (version),
    from_state         text,
    to_state           text,
    reason             text NOT NULL DEFAULT '',
    statistics         jsonb,
    routing_generation bigint
);
CREATE INDEX policy_audit_version ON policy_audit (version, id);

-- The seed: the base model (no adapter) is the first stable version.
INSERT INTO policy_versions (version, adapter_uri, state, created_by)
    VALUES ('base', NULL, 'stable', 'migration');
INSERT INTO policy_routing (stable_version) VALUES ('base');
INSERT INTO policy_audit (actor, action, version, from_state, to_state, reason,
                          routing_generation)
    VALUES ('migration', 'seed', 'base', NULL, 'stable', 'the base model is the first stable', 1);

-- Versions: new rows start as candidates; identity is immutable; states follow the table.
CREATE FUNCTION policy_versions_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'policy versions are never deleted (%)', OLD.version
            USING ERRCODE = 'check_violation';
    ELSIF TG_OP = 'INSERT' THEN
        IF NEW.state <> 'candidate' THEN
            RAISE EXCEPTION 'a new policy version starts as candidate, not %', NEW.state
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF (NEW.version, NEW.adapter_uri, NEW.checksum, NEW.parent_version,
        NEW.reward_model_version, NEW.training_round, NEW.created_by, NEW.created_at)
       IS DISTINCT FROM
       (OLD.version, OLD.adapter_uri, OLD.checksum, OLD.parent_version,
        OLD.reward_model_version, OLD.training_round, OLD.created_by, OLD.created_at) THEN
        RAISE EXCEPTION 'policy version % is immutable (only state and metrics change)',
            OLD.version USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        IF NOT EXISTS (SELECT 1 FROM policy_transitions
                       WHERE from_state = OLD.state AND to_state = NEW.state) THEN
            RAISE EXCEPTION 'illegal transition of %: % -> %', OLD.version, OLD.state, NEW.state
                USING ERRCODE = 'check_violation';
        END IF;
        NEW.state_changed_at := now();
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER policy_versions_guard BEFORE INSERT OR UPDATE OR DELETE ON policy_versions
    FOR EACH ROW EXECUTE FUNCTION policy_versions_guard();

-- At commit: exactly one stable, and routing names the stable and the canary.
CREATE FUNCTION policy_check_consistency() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    stable_v text;
    canary_v text;
    r policy_routing%ROWTYPE;
BEGIN
    SELECT version INTO stable_v FROM policy_versions WHERE state = 'stable';
    IF stable_v IS NULL THEN
        RAISE EXCEPTION 'no stable policy version: a promotion must demote and promote in '
                        'one transaction' USING ERRCODE = 'check_violation';
    END IF;
    SELECT version INTO canary_v FROM policy_versions WHERE state = 'canary';
    SELECT * INTO r FROM policy_routing;
    IF r.stable_version IS DISTINCT FROM stable_v
       OR r.canary_version IS DISTINCT FROM canary_v THEN
        RAISE EXCEPTION 'routing (stable %, canary %) disagrees with states (stable %, canary %)',
            r.stable_version, r.canary_version, stable_v, canary_v
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER policy_versions_consistent
    AFTER INSERT OR UPDATE ON policy_versions DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION policy_check_consistency();
CREATE CONSTRAINT TRIGGER policy_routing_consistent
    AFTER INSERT OR UPDATE ON policy_routing DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION policy_check_consistency();

-- Routing: every change bumps the generation and tells listening serving replicas.
CREATE FUNCTION policy_routing_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'the routing row is never deleted' USING ERRCODE = 'check_violation';
    END IF;
    NEW.generation := OLD.generation + 1;
    NEW.updated_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER policy_routing_bump BEFORE UPDATE OR DELETE ON policy_routing
    FOR EACH ROW EXECUTE FUNCTION policy_routing_bump();

CREATE FUNCTION policy_routing_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('alignloop_routing', json_build_object(
        'generation', NEW.generation,
        'stable_version', NEW.stable_version,
        'canary_version', NEW.canary_version,
        'canary_weight', NEW.canary_weight,
        'held', NEW.held)::text);
    RETURN NULL;
END $$;
CREATE TRIGGER policy_routing_notify AFTER UPDATE ON policy_routing
    FOR EACH ROW EXECUTE FUNCTION policy_routing_notify();

-- The audit log is append-only.
CREATE FUNCTION policy_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'policy_audit is append-only' USING ERRCODE = 'check_violation';
END $$;
CREATE TRIGGER policy_audit_append_only BEFORE UPDATE OR DELETE ON policy_audit
    FOR EACH ROW EXECUTE FUNCTION policy_audit_append_only();
