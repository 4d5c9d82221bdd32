import pytest

from feedback.principal_weights import principal_weights


def test_a_flooding_key_is_brought_down_to_the_cap():
    # 900 vs 100 with a cap of 0.5: T = 100 / (1 - 0.5) = 200, the flood carries 100.
    w = principal_weights({"flood": 900, "web": 100}, cap=0.5)
    assert w == {"flood": pytest.approx(100 / 900), "web": 1.0}


def test_capping_one_can_push_the_next_over_the_cap():
    # cap 0.4 on 600 / 300 / 100: capping `a` alone gives T = 400 / 0.6 = 666.7, and `b`
    # (300) is then over 0.4 T = 266.7; capping both: T = 100 / (1 - 0.8) = 500, each 200.
    w = principal_weights({"a": 600, "b": 300, "c": 100}, cap=0.4)
    assert w["a"] * 600 == pytest.approx(200) and w["b"] * 300 == pytest.approx(200)
    assert w["c"] == 1.0
    shares = {p: w[p] * n / 500 for p, n in {"a": 600, "b": 300, "c": 100}.items()}
    assert max(shares.values()) == pytest.approx(0.4)


def test_within_the_cap_or_alone_nothing_changes():
    assert principal_weights({"a": 50, "b": 50}, cap=0.5) == {"a": 1.0, "b": 1.0}
    assert principal_weights({"only": 10_000}, cap=0.1) == {"only": 1.0}
    assert principal_weights({"a": 90, "b": 10}, cap=1.0) == {"a": 1.0, "b": 1.0}
    assert principal_weights({}, cap=0.5) == {}


def test_the_smallest_is_never_capped():
    # cap 0.3 on 1000 / 10 / 10: `a` and `b` are capped (T = 10 / (1 - 0.6) = 25, each
    # carries 7.5), `c` keeps its 10 (0.4 of the total: a cap below 1/3 cannot hold for 3).
    w = principal_weights({"a": 1000, "b": 10, "c": 10}, cap=0.3)
    assert w["a"] * 1000 == pytest.approx(7.5) and w["b"] * 10 == pytest.approx(7.5)
    assert w["c"] == 1.0


@pytest.mark.parametrize("cap", [0.0, -0.1, 1.5])
def test_bad_caps_are_refused(cap):
    with pytest.raises(ValueError):
        principal_weights({"a": 1}, cap=cap)
