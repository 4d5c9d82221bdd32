from pathlib import Path

import pytest

from serving.response_ids import PREFIX, ResponseIdSigner, load_or_create_secret


def test_issued_ids_verify_and_are_unique():
    signer = ResponseIdSigner(b"k" * 32)
    ids = {signer.new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith(PREFIX) and signer.is_valid(i) for i in ids)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda i: i[:-1] + ("0" if i[-1] != "0" else "1"),  # mac digit changed
        lambda i: i[:12] + ("0" if i[12] != "0" else "1") + i[13:],  # nonce digit changed
        lambda i: i + "0",  # too long
        lambda i: i[:-1],  # too short
        lambda i: i.replace(PREFIX, "cmpl-"),  # wrong prefix
        lambda i: "",
        lambda i: i[:-1] + "é",  # right length, not ASCII (compare_digest would raise)
        lambda i: i[:-1] + "\ud800",  # a lone surrogate (cannot even be encoded)
    ],
)
def test_tampered_ids_are_rejected(mutate):
    signer = ResponseIdSigner(b"k" * 32)
    assert not signer.is_valid(mutate(signer.new_id()))


def test_other_secret_rejects():
    a, b = ResponseIdSigner(b"a" * 32), ResponseIdSigner(b"b" * 32)
    assert not b.is_valid(a.new_id())


def test_short_secret_refused():
    with pytest.raises(ValueError):
        ResponseIdSigner(b"short")


def test_secret_created_once_and_private(tmp_path: Path):
    path = tmp_path / "secrets" / "key"
    first = load_or_create_secret(path)
    assert load_or_create_secret(path) == first
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(first) >= 32
