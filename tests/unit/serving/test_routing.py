"""The sticky routing identity (`serving.routing.routing_key`), which serving hashes and the
canary simulation (tests/fixtures/canary_sim.py) reuses."""

from __future__ import annotations

from serving.routing import RoutingTable, bucket, choose_version, routing_key


def test_the_identity_is_the_key_and_the_user_else_the_key_and_the_address() -> None:
    assert routing_key("web-app", "alice") == "web-app\0user:alice"
    assert routing_key("web-app", None, "10.0.0.7") == "web-app\0addr:10.0.0.7"
    assert routing_key("web-app", None) == "web-app\0addr:unknown"
    # The same end-user name under two keys is two identities, each with its own bucket.
    assert bucket("salt", routing_key("a", "u")) != bucket("salt", routing_key("b", "u"))


def test_a_user_keeps_its_arm_while_the_weight_grows() -> None:
    users = [routing_key("product", f"user-{i}") for i in range(400)]
    arms = {}
    for weight in (0.05, 0.25, 0.5, 1.0):
        table = RoutingTable(1, "stable", "canary", weight)
        now = {u: choose_version(table, "salt", u) for u in users}
        assert all(now[u] == "canary" for u, arm in arms.items() if arm == "canary")
        share = sum(v == "canary" for v in now.values()) / len(users)
        assert abs(share - weight) < 0.1
        arms = now
