"""What a careless operator meets around a replica store: read-only commands create nothing, a point the
store does not hold is refused before a byte is copied, two processes creating one disk at once (a seed
import beside another) end in one clear refusal and one good disk, a creator killed half-way blocks nobody,
and a server that cannot listen leaves neither its runner nor its thread behind."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from replicator.errors import UsageError
from replicator.replica import ReplicaStore
from replicator.targets import LocalTarget
from replicator.transport import AuthorizationEntry
from replicator.transport.server import ReplicaServer, ServerThread
from replicator.vhdx import VhdxDisk

from ..operator.helpers import assert_one_line_error, random_vhdx, replicator
from .conftest import MiB, Primary, image_bytes, run, tree

BIN = os.path.dirname(sys.executable)


def test_opening_a_store_creates_nothing(tmp_path):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for root in (missing, empty):
        store = ReplicaStore(str(root))
        assert store.disk_ids() == [] and store.sweep_leftovers() == []
        with pytest.raises(UsageError, match="holds no disk"):
            store.disk(uuid.uuid4())
        LocalTarget(str(root))
    assert not missing.exists() and os.listdir(empty) == []
    for args in (("points", "list", "--root", empty), ("points", "export", "--root", empty, str(uuid.uuid4()),
                                                       "--out", tmp_path / "out.vhdx")):
        assert replicator(*args).returncode != 0
    assert not missing.exists() and os.listdir(empty) == [] and not (tmp_path / "out.vhdx").exists()


def test_a_point_the_store_does_not_hold_is_refused_before_copying(tmp_path):
    store = ReplicaStore(str(tmp_path / "root"))
    p = Primary(size=16 * MiB)
    disk = store.ensure_disk(p.disk_id, p.size, block_size=MiB)
    up = disk.open_upload("a1")
    up.write(0, p.cycle())
    up.sync()
    up.close()
    disk.commit("a1")
    out = tmp_path / "point.vhdx"
    with pytest.raises(UsageError, match="no recovery point at generation 7"):
        disk.materialize(7, str(out))
    assert not out.exists()
    disk.materialize(1, str(out))
    with VhdxDisk.open(str(out)) as v:
        assert v.read(0, v.size) == bytes(p.data) == image_bytes(disk)


def _adopt(root, disk_id, source) -> subprocess.Popen:
    return subprocess.Popen([os.path.join(BIN, "replicator"), "seed", "import", "--replica-root", str(root),
                             "--from-existing", str(source), "--disk-id", str(disk_id)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stopped_while_creating(proc: subprocess.Popen, root, disk_id) -> None:
    """SIGSTOP `proc` once it holds the creation lock of disk_id (its pid written into the lock file)."""
    lock = os.path.join(root, "disks", f".new-{disk_id}.lock")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if open(lock).read() == str(proc.pid):
                proc.send_signal(signal.SIGSTOP)
                return
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    raise AssertionError(f"{proc.args} never took the lock: {proc.communicate()}")


def test_two_processes_creating_one_disk(tmp_path):
    root = tmp_path / "root"
    source = tmp_path / "restored.vhdx"
    data = random_vhdx(source, size=64 * MiB, data=32 * MiB)
    disk_id = uuid.uuid4()
    first = _adopt(root, disk_id, source)
    try:
        _stopped_while_creating(first, root, disk_id)
        second = replicator("seed", "import", "--replica-root", root, "--from-existing", source,
                            "--disk-id", disk_id, timeout=60)
        assert_one_line_error(second, 15, str(disk_id), "being created", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and "adopted" in out, err
    rd = ReplicaStore(str(root)).disk(disk_id)
    assert image_bytes(rd)[:len(data)] == data and rd.state.adopted
    assert sorted(os.listdir(root / "disks")) == [str(disk_id)]

    # a creator killed half-way leaves its lock file and folder; they block nobody and go with the next one
    other = uuid.uuid4()
    killed = _adopt(root, other, source)
    _stopped_while_creating(killed, root, other)
    killed.kill()
    killed.communicate()
    assert f".new-{other}.lock" in os.listdir(root / "disks")
    again = replicator("seed", "import", "--replica-root", root, "--from-existing", source, "--disk-id", other)
    assert again.returncode == 0, again.stderr
    assert sorted(os.listdir(root / "disks")) == sorted([str(disk_id), str(other)])
    assert image_bytes(ReplicaStore(str(root)).disk(other))[:len(data)] == data


def test_a_server_that_cannot_listen_leaves_nothing_running(pki, tmp_path):
    p = pki.pair("replica1")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        def server():
            return ReplicaServer([AuthorizationEntry("primary1", str(tmp_path / "root"))], port=port,
                                 certfile=p["cert"], keyfile=p["key"], cafile=p["ca"])
        s = server()
        with pytest.raises(OSError):
            run(s.start())
        assert s._runner is None
        before = set(threading.enumerate())
        thread = ServerThread(server())
        with pytest.raises(OSError):
            thread.start()
        assert not thread._thread.is_alive() and thread.loop.is_closed()
        assert set(threading.enumerate()) <= before
    assert tree(str(tmp_path)) == {}


def test_creators_racing_a_sweeper_keep_their_locks_and_their_disks(tmp_path):
    """A store's sweep (a replica server starting, another creation) running beside creations: no creator
    loses its lock file or its half-made disk under it, and every disk is created whole (the sweeper once
    unlinked a lock its creator had just taken, and the creator's clean-up then failed)."""
    root = str(tmp_path / "root")
    stop, errors = threading.Event(), []

    def sweeper():
        store = ReplicaStore(root)
        while not stop.is_set():
            try:
                store.sweep_leftovers()
            except Exception as e:            # noqa: BLE001 - what the test is about
                errors.append(f"sweep: {e!r}")

    def creator(n):
        store = ReplicaStore(root)
        for _ in range(n):
            key = uuid.uuid4()
            try:
                store.ensure_disk(key, 4 * MiB, block_size=MiB)
                assert store.disk(key).state.size == 4 * MiB
            except Exception as e:            # noqa: BLE001
                errors.append(f"create: {e!r}")

    sweepers = [threading.Thread(target=sweeper) for _ in range(2)]
    creators = [threading.Thread(target=creator, args=(25,)) for _ in range(2)]
    for t in sweepers + creators:
        t.start()
    for t in creators:
        t.join()
    stop.set()
    for t in sweepers:
        t.join()
    assert errors == []
    store = ReplicaStore(root)
    assert len(store.disk_ids()) == 50
    assert store.sweep_leftovers() == []
    assert not [n for n in os.listdir(os.path.join(root, "disks")) if n.startswith(".")]
