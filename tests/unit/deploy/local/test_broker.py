"""deploy/local/broker.py's free_port: below the kernel's ephemeral range (where no
socket binding port 0, or connecting, can be given it), bindable, never the same twice."""

from __future__ import annotations

import socket

from deploy.local.broker import _HANDED_OUT, _ephemeral_low, free_port


def test_ports_are_below_the_ephemeral_range_bindable_and_never_repeated():
    low = _ephemeral_low()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(1024 <= p < low for p in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))


def test_a_port_something_listens_on_is_skipped(monkeypatch):
    """The draw lands on a port a listener holds first, then on a free one: the free one
    comes back."""
    low = _ephemeral_low()
    with socket.socket() as listener:
        for taken in range(low - 1, 1024, -1):  # a free port below the range, bound here
            try:
                listener.bind(("127.0.0.1", taken))
                break
            except OSError:
                continue
        listener.listen()
        free = next(p for p in range(taken - 1, 1024, -1) if _bindable(p) and p not in _HANDED_OUT)
        draws = iter([taken, free])
        monkeypatch.setattr("deploy.local.broker.random.randrange", lambda *_: next(draws))
        assert free_port() == free


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
