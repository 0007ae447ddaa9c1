"""tools/demo.py ends clean: no un-awaited coroutine, no unclosed file, no traceback, and no process of its
own (Azurite, servers) left running, whether it finishes or is stopped with SIGTERM half-way."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from replicator.azure.azurite import azurite_binary

from ..processes import alive

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "tools", "demo.py")

pytestmark = pytest.mark.skipif(azurite_binary() is None, reason="azurite is not installed")


def processes_using(folder: str) -> list[str]:
    """Command lines of live processes that name `folder` (Azurite gets --location inside it)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if not alive(int(pid)):
            continue
        if folder in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def demo(folder, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-W", "always::ResourceWarning", "-W", "always::RuntimeWarning", DEMO,
                             "--dir", str(folder), "--size", "64"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, **kw)


def test_demo_finishes_clean(tmp_path):
    folder = tmp_path / "demo"
    p = demo(folder)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, out + err
    assert "OK: qemu-img agrees byte for byte" in out
    for bad in ("never awaited", "Traceback", "unclosed file", "Unclosed client session"):
        assert bad not in err, err
    assert processes_using(str(folder)) == []


def test_demo_stopped_half_way_leaves_nothing_running(tmp_path):
    # The Azure stage lasts a few seconds on a 64 MiB disk: signal as soon as Azurite is seen, and if the
    # demo still outran the signal (it exits 0 with its handlers already reset), try again.
    for attempt in range(3):
        folder = tmp_path / f"demo{attempt}"
        p = demo(folder)
        line = ""
        while "Azure:" not in line:                 # Azurite is starting now
            line = p.stdout.readline()
            assert line, p.stderr.read()
        deadline = time.time() + 60
        while not any("azurite" in c for c in processes_using(str(folder))) and time.time() < deadline:
            time.sleep(0.02)
        assert processes_using(str(folder)), "Azurite should be running now"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
        if p.returncode == 0 and "OK: qemu-img agrees byte for byte" in out:
            continue                                # finished before the signal landed
        assert p.returncode == 128 + signal.SIGTERM, err
        break
    else:
        pytest.fail("the demo always finished before SIGTERM reached it")
    deadline = time.time() + 10
    while processes_using(str(folder)) and time.time() < deadline:
        time.sleep(0.2)
    assert processes_using(str(folder)) == []
