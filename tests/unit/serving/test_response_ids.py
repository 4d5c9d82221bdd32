from pathlib import Path

import pytest

from serving.response_ids import (
    PREFIX,
    IssuedResponse,
    ResponseIdSigner,
    load_or_create_secret,
    parse_secrets,
)

T = 1_800_000_000  # an issue time: 2027-01-15


def test_issued_ids_verify_for_their_caller_and_are_unique():
    signer = ResponseIdSigner(b"k" * 32)
    ids = {signer.new_id("web", "ann", 3, now=T) for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith(PREFIX) and len(i) == len(PREFIX) + 40 for i in ids)
    assert {signer.verify(i, "web", "ann") for i in ids} == {IssuedResponse(n=3, issued_at=T)}


@pytest.mark.parametrize(
    ("principal", "user"),
    [("other", "ann"), ("web", "bob"), ("web", None), ("web", "ann\0"), ("webann", None)],
)
def test_an_id_is_nobody_elses(principal, user):
    """Another key, another end user, or no user where one was served: not this id."""
    signer = ResponseIdSigner(b"k" * 32)
    assert signer.verify(signer.new_id("web", "ann", 1), principal, user) is None


def test_an_id_served_without_a_user_needs_no_user():
    signer = ResponseIdSigner(b"k" * 32)
    rid = signer.new_id("web", None, 2, now=T)
    assert signer.verify(rid, "web", None) == IssuedResponse(n=2, issued_at=T)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda i: i[:-1] + ("0" if i[-1] != "0" else "1"),  # mac digit changed
        lambda i: i[:12] + ("0" if i[12] != "0" else "1") + i[13:],  # nonce digit changed
        lambda i: i[: len(PREFIX) + 15] + "9" + i[len(PREFIX) + 16 :],  # n raised to 9
        lambda i: i + "0",  # too long
        lambda i: i[:-1],  # too short
        lambda i: i.replace(PREFIX, "cmpl-"),  # wrong prefix
        lambda i: "",
        lambda i: i[:-1] + "é",  # right length, not ASCII (compare_digest would raise)
        lambda i: i[:-1] + "\ud800",  # a lone surrogate (cannot even be encoded)
        lambda i: i.upper().replace(PREFIX.upper(), PREFIX),  # upper-case hex
    ],
)
def test_tampered_ids_are_rejected(mutate):
    signer = ResponseIdSigner(b"k" * 32)
    assert signer.verify(mutate(signer.new_id("web", None, 1)), "web", None) is None


def test_rotation_keeps_old_ids_valid():
    old, new = b"o" * 32, b"n" * 32
    before = ResponseIdSigner(old).new_id("web", "ann", 1)
    rotated = ResponseIdSigner(*parse_secrets(f"{new.decode()}, {old.decode()}"))
    assert rotated.verify(before, "web", "ann") is not None
    after = rotated.new_id("web", "ann", 1)
    assert ResponseIdSigner(new).verify(after, "web", "ann") is not None
    assert ResponseIdSigner(old).verify(after, "web", "ann") is None  # the first one signs


def test_n_out_of_range_refused():
    signer = ResponseIdSigner(b"k" * 32)
    for n in (0, 256):
        with pytest.raises(ValueError):
            signer.new_id("web", None, n)


def test_short_secret_refused():
    with pytest.raises(ValueError):
        ResponseIdSigner(b"short")
    with pytest.raises(ValueError):
        ResponseIdSigner()


def test_secret_created_once_and_private(tmp_path: Path):
    path = tmp_path / "secrets" / "key"
    first = load_or_create_secret(path)
    assert load_or_create_secret(path) == first
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(first) >= 32
