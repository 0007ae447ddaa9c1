"""The test harness's port allocator (tests/ports.py): distinct, bindable, outside the ephemeral range."""
import socket

from .ports import _bindable, _ephemeral_low, free_port


def test_ports_are_distinct_bindable_and_not_ephemeral():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < _ephemeral_low() for p in ports)
    for p in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_bound_port_is_not_handed_out():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        assert not _bindable(held.getsockname()[1])
    assert _bindable(free_port())
