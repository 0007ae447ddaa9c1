"""Loopback ports for the servers the tests start.

bind(0) and close hands out a port that is free now and free again at once: two calls of one test could
return the same port (a clean-clone run gave a replica the port of a host's admin API), and an outgoing
connection may take it as its source port before the server binds it. So each test process takes its
ports in turn from a range below the kernel's ephemeral ports that is its own pytest-xdist worker's,
starting at a random place (two runs on one machine rarely meet), and never hands one out twice.
"""
from __future__ import annotations

import os
import random
import socket
import threading

WORKERS = 8                     # ranges for gw0..gw7; more workers share them (the bind check still holds)
SPAN = 1500                     # ports per worker


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _worker() -> int:
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(name[2:]) % WORKERS if name.startswith("gw") and name[2:].isdigit() else 0


_lock = threading.Lock()
_given: set[int] = set()
_low = _ephemeral_low() - WORKERS * SPAN
_start = _low + _worker() * SPAN
_turn = random.randrange(SPAN)


def free_port() -> int:
    """A port on 127.0.0.1 that is free now and that this process has not handed out before."""
    global _turn
    if _low < 1024:             # an unusual ephemeral range: the kernel's choice is all there is
        return _kernel_port()
    with _lock:
        for _ in range(SPAN):
            port = _start + _turn % SPAN
            _turn += 1
            if port not in _given and _bindable(port):
                _given.add(port)
                return port
    return _kernel_port()


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _kernel_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with _lock:
            if port not in _given:
                _given.add(port)
                return port
