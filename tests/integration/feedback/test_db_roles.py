"""Least-privilege database roles on a real server (schemas/db_roles.py, feedback.db,
``alignloop db``): each component's own code path works when it connects as a LOGIN role in
its group, the writes it has no business doing are refused, only the owner changes the
schema, and a component never migrates.

Roles are cluster-wide, so every name here carries a random prefix, and the module drops
the database and then its roles when it ends. The owner is an ordinary role (not the
superuser the other tests use) owning the database, as on a managed Postgres.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from deploy.canary.controller import CanaryController
from deploy.canary.stats import CanaryConfig
from deploy.console import views
from deploy.ops import db_cli
from deploy.policies import leases, registry
from feedback import datasets
from feedback.db import Migration, MigrationRefused, connect, load_migrations, migrate
from feedback.erasure import erase_user, purge_older_than
from feedback.ingest.writer import prepare_session, store_events
from feedback.user_ids import UserIds
from schemas import db_roles
from schemas.events import RequestFailed
from serving.routing import RoutingTable, RoutingWatcher, read_table
from tests.fixtures.polling import wait_until
from tests.fixtures.postgres import (
    ADMIN_URL,
    create_database,
    drop_database,
    make_feedback,
    make_interaction,
)
from trainer.rounds import records, requests

DENIED = psycopg.errors.InsufficientPrivilege
OLD = datetime.now(UTC) - timedelta(days=30)


@dataclasses.dataclass
class Cluster:
    prefix: str
    owner_url: str
    urls: dict[str, str]  # component -> URL of its LOGIN role

    def connect(self, component: str) -> psycopg.Connection:
        return connect(self.urls[component], autocommit=True)


def _as(url: str, user: str) -> str:
    return psycopg.conninfo.make_conninfo(url, user=user)


def _drop_roles(prefix: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        names = admin.execute(
            "SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)"
            " ORDER BY rolcanlogin DESC, rolname",
            (prefix + "_",),
        ).fetchall()
        for (name,) in names:
            admin.execute(psycopg.sql.SQL("DROP ROLE {}").format(psycopg.sql.Identifier(name)))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A database owned by ``<prefix>_owner`` (LOGIN CREATEROLE, no superuser), migrated by
    it; the group roles made and granted by ``alignloop db roles --create`` and one LOGIN
    role per component by ``alignloop db login``, as an operator would."""
    prefix = f"alt{uuid.uuid4().hex[:10]}"
    owner = f"{prefix}_owner"
    try:
        url = create_database()
    except psycopg.OperationalError as exc:
        pytest.skip(f"no Postgres at {ADMIN_URL}: {exc}")
    dbname = str(psycopg.conninfo.conninfo_to_dict(url)["dbname"])
    try:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            ident = psycopg.sql.Identifier
            admin.execute(psycopg.sql.SQL("CREATE ROLE {} LOGIN CREATEROLE").format(ident(owner)))
            admin.execute(
                psycopg.sql.SQL("ALTER DATABASE {} OWNER TO {}").format(ident(dbname), ident(owner))
            )
        owner_url = _as(url, owner)
        assert db_cli.main(["migrate", "--database-url", owner_url]) == 0
        assert (
            db_cli.main(["roles", "--prefix", prefix, "--create", "--database-url", owner_url]) == 0
        )
        urls: dict[str, str] = {}
        for component in db_roles.COMPONENTS:
            name = f"{prefix}_{component}_login"
            assert (
                db_cli.main(["login", name, "--component", component, "--database-url", owner_url])
                == 0
            )
            urls[component] = _as(url, name)
        yield Cluster(prefix, owner_url, urls)
    finally:
        drop_database(url)
        _drop_roles(prefix)


def test_logins_are_members_of_their_groups_with_a_scram_password(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"{cluster.prefix}_ops_login"
    monkeypatch.setenv("ROLE_PASSWORD", "correct horse battery staple")
    argv = ["login", name, "--component", "controller", "--password-env", "ROLE_PASSWORD"]
    assert db_cli.main([*argv, "--database-url", cluster.owner_url]) == 0
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        row = admin.execute(
            "SELECT rolcanlogin, rolpassword, pg_has_role(rolname, %s, 'MEMBER') FROM pg_authid"
            " WHERE rolname = %s",
            (f"{cluster.prefix}_controller", name),
        ).fetchone()
    assert row is not None and row[0] and row[2]
    assert row[1].startswith("SCRAM-SHA-256$4096:")  # the verifier, never the cleartext
    # A group is NOLOGIN: only the LOGIN roles in it connect.
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        groups = admin.execute(
            "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY(%s) ORDER BY 1",
            ([db_roles.group_role(cluster.prefix, c) for c in db_roles.COMPONENTS],),
        ).fetchall()
    assert len(groups) == 4 and not any(can for _, can in groups)


def test_serving_reads_and_follows_the_routing_table_and_writes_nothing(cluster: Cluster) -> None:
    seen: list[RoutingTable] = []
    watcher = RoutingWatcher(cluster.urls["serving"], seen.append, refresh_s=30)
    watcher.start()
    try:
        wait_until(watcher.ready.is_set, 20, "the serving role's first routing read")
        with cluster.connect("controller") as conn:
            registry.hold(conn, actor="alice", reason="a routing change serving must see")
            registry.resume(conn, actor="alice")
        wait_until(lambda: len(seen) >= 2, 20, "the NOTIFY of the controller's change")
    finally:
        watcher.stop()
    with cluster.connect("serving") as conn:
        assert migrate(conn) == []  # every process calls it at start: a read, nothing pending
        assert read_table(conn).stable == "base"
        for statement in (
            "INSERT INTO feedback_events (event_id, feedback_id, response_id, choice_index,"
            " user_key, rating, occurred_at) VALUES (gen_random_uuid(), gen_random_uuid(),"
            " 'r', 0, '', 'up', now())",
            "DELETE FROM interactions",
            "SELECT count(*) FROM interactions",  # no reading users' conversations either
            "UPDATE policy_routing SET held = true",
            "INSERT INTO leases (name, holder) VALUES ('x', 'y')",
        ):
            with pytest.raises(DENIED):
                conn.execute(statement)


def test_ingest_writes_batches_drops_erased_users_and_purges(cluster: Cluster) -> None:
    with cluster.connect("ingest") as conn:
        assert migrate(conn) == []
        UserIds().check(conn)
        prepare_session(conn)
        kept = make_interaction(policy="base", user="ingest-kept")
        old = make_interaction(policy="base", user="ingest-old").model_copy(
            update={"occurred_at": OLD}
        )
        failed = RequestFailed(producer="test", version="base", status=500, error="boom")
        vote = make_feedback(kept.response_id, "up", user="ingest-kept")
        result = store_events(conn, [kept, old, vote, failed])
        assert (result.interactions, result.feedback) == (2, 1)
        with cluster.connect("controller") as operator:
            erase_user(operator, "ingest-gone", actor="alice", reason="asked to be forgotten")
        late = make_interaction(policy="base", user="ingest-gone")
        assert store_events(conn, [late]).interactions == 0  # the tombstone is read
        assert purge_older_than(conn, 7)["interactions"] == 1
        for statement in (
            "UPDATE policy_routing SET held = true",
            "UPDATE policy_versions SET metrics = '{}'",
            "INSERT INTO reward_models (version) VALUES ('rm')",
            "DELETE FROM user_tombstones",
            "UPDATE interactions SET user_id = 'someone else'",
            "SELECT count(*) FROM training_rounds",
        ):
            with pytest.raises(DENIED):
                conn.execute(statement)


def test_trainer_reads_data_records_rounds_and_only_registers_candidates(cluster: Cluster) -> None:
    with cluster.connect("controller") as operator:
        requests.request_round(operator, actor="alice", reason="train now")
    with cluster.connect("trainer") as conn:
        assert migrate(conn) == []
        request = requests.open_request(conn)
        assert request is not None and requests.take(conn, request.id)
        with datasets.snapshot(conn) as watermark:
            list(datasets.preference_pairs(conn, watermark))
            list(datasets.pointwise_labels(conn, watermark))
        parent = registry.routing_table(conn).stable_version
        r = records.start_round(conn, trigger="requested", config={}, parent_version=parent)
        records.record_step(conn, r.id, 0, {"reward": 0.5})
        records.record_step(conn, r.id, 0, {"reward": 0.6})  # a resumed round re-records
        registry.register_candidate(conn, "trainer-v1", "/adapters/trainer-v1", actor="trainer")
        records.finish_round(conn, r.id, "registered", "ok", candidate_version="trainer-v1")
        requests.link(conn, request.id, r.id)
        lease = leases.Lease.acquire(cluster.urls["trainer"], leases.TRAINER, heartbeat_s=60)
        lease.release()
        with pytest.raises(DENIED):  # a promotion is the controller's (or an operator's)
            registry.promote(conn, "trainer-v1", actor="trainer")
        for statement in (
            "UPDATE policy_routing SET held = true",
            "INSERT INTO interactions (response_id) VALUES ('x')",
            "DELETE FROM feedback_current",
            "INSERT INTO canary_strata (version) VALUES ('trainer-v1')",
        ):
            with pytest.raises(DENIED):
                conn.execute(statement)


def test_controller_runs_the_canary_the_console_and_erasure(cluster: Cluster) -> None:
    with cluster.connect("trainer") as trainer:
        registry.register_candidate(trainer, "ctl-v1", "/adapters/ctl-v1", actor="trainer")
    config = dataclasses.replace(CanaryConfig.demo(), min_stage_duration_s=0, min_duration_s=0)
    with cluster.connect("controller") as conn:
        assert migrate(conn) == []
        lease = leases.Lease.acquire(cluster.urls["controller"], leases.CONTROLLER, heartbeat_s=60)
        try:
            controller = CanaryController(config, settle_seconds=0)
            controller.tick(conn)  # starts the canary of the oldest candidate
            canary = registry.routing_table(conn).canary_version
            assert canary is not None
            controller.tick(conn)  # reads the feedback tables, records its decision
            views.policies(conn)
            views.canary(conn)
            views.training(conn)
            views.traffic(conn)
            registry.promote(conn, canary, actor="alice", reason="by hand")
        finally:
            lease.release()
        assert registry.routing_table(conn).stable_version == canary
        assert erase_user(conn, "nobody", actor="alice", reason="a request")["interactions"] == 0
        for statement in (
            "INSERT INTO interactions (response_id) VALUES ('x')",
            "UPDATE training_rounds SET reason = 'x'",
            "INSERT INTO reward_models (version) VALUES ('rm')",
            "UPDATE feedback_current SET rating = 'up'",
            "DELETE FROM policy_audit",
        ):
            with pytest.raises(DENIED):
                conn.execute(statement)


@pytest.mark.parametrize("component", db_roles.COMPONENTS)
def test_only_the_owner_changes_the_schema(cluster: Cluster, component: str) -> None:
    with cluster.connect(component) as conn:
        for statement in (
            "DROP TABLE policy_routing",
            "ALTER TABLE interactions ADD COLUMN x int",
            "TRUNCATE leases",
            "CREATE TABLE mine (a int)",
            "DROP TABLE schema_migrations",
        ):
            with pytest.raises(DENIED):
                conn.execute(statement)


def test_a_component_refuses_to_migrate_and_the_owners_migration_grants_new_tables(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = Migration(9001, "role_test", "CREATE TABLE role_test (a int);")
    with cluster.connect("serving") as conn:
        with pytest.raises(MigrationRefused, match=r"9001_role_test.*alignloop db migrate"):
            migrate(conn, [*load_migrations(), extra])
        assert conn.execute("SELECT to_regclass('role_test')").fetchone() == (None,)
    monkeypatch.setitem(db_roles.GRANTS, "role_test", {"serving": "SELECT"})
    with connect(cluster.owner_url, autocommit=True) as owner:
        assert migrate(owner, [*load_migrations(), extra]) == [9001]
    with cluster.connect("serving") as conn:
        assert conn.execute("SELECT count(*) FROM role_test").fetchone() == (0,)
        with pytest.raises(DENIED):
            conn.execute("INSERT INTO role_test VALUES (1)")
    with cluster.connect("ingest") as conn, pytest.raises(DENIED):
        conn.execute("SELECT count(*) FROM role_test")


def test_a_component_does_not_create_the_schema_of_an_empty_database(cluster: Cluster) -> None:
    url = create_database()
    try:
        login = psycopg.conninfo.conninfo_to_dict(cluster.urls["ingest"])["user"]
        empty = psycopg.conninfo.make_conninfo(url, user=login)
        with connect(empty, autocommit=True) as conn, pytest.raises(MigrationRefused):
            migrate(conn)
    finally:
        drop_database(url)


def test_a_role_in_no_group_is_told_to_get_one(cluster: Cluster) -> None:
    stranger = f"{cluster.prefix}_stranger"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(
            psycopg.sql.SQL("CREATE ROLE {} LOGIN").format(psycopg.sql.Identifier(stranger))
        )
    url = _as(cluster.owner_url, stranger)
    with (
        connect(url, autocommit=True) as conn,
        pytest.raises(MigrationRefused, match="no alignloop"),
    ):
        migrate(conn)
