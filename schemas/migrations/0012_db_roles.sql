-- 0012: the components' database roles (schemas/db_roles.py; docs/deploy.md, "Database
-- roles").
--
-- db_roles  one row per component whose NOLOGIN group role holds that component's least
--           privileges (`alignloop db roles` records it). feedback.db.migrate re-applies
--           the grants of schemas/db_roles.py to these roles after every migration it runs,
--           so a table added later is granted as it is created. No row: every process
--           connects as the owner (the embedded `alignloop up` does).
CREATE TABLE db_roles (
    component  text PRIMARY KEY CHECK (component IN ('serving', 'ingest', 'trainer',
                                                     'controller')),
    role_name  text NOT NULL UNIQUE,
    granted_at timestamptz NOT NULL DEFAULT now()
);
