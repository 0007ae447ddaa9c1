"""Adversarial pass (session 7) over the replica store's creation locks and the export's background log and
metadata threads: planted files where the store or the tracker expects its own, processes killed or held,
a real file-size limit, and many cut/acknowledge/resync cycles checked byte for byte against replays.

Eight of these tests reproduced defects the pass found (symlinks, FIFOs and directories planted at a
creation lock's or a half-made disk's name, a lock removed during a creation, a FIFO at a pending log's
name, a directory among the logs); they pass since the fixes."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from replicator.errors import ImageLocked
from replicator.hrl import HrlReader, apply_chain
from replicator.replica import ReplicaStore
from replicator.tracking import TrackedDisk
from replicator.tracking.tracker import SPARE_LOG
from replicator.vhdx import VhdxDisk

from ..tracking.helpers import KiB, MiB, copy_file, make_vhdx, pattern, read_vhdx, sealed_log_paths, tracked

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 8 * MiB
REGION = 256 * KiB


def child(code: str, *args, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """A real process of its own running `code` (argv[1:] = args)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env, **kw)


def spawn(code: str, *args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def leftovers(store: ReplicaStore) -> list[str]:
    return sorted(n for n in os.listdir(store.base) if n.startswith("."))


# =============================================================================================== the store
_CREATOR = """
import sys, time
from replicator.errors import ImageLocked
from replicator.replica import ReplicaStore
root, key, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = ReplicaStore(root)
made = refused = 0
for _ in range(rounds):
    try:
        d = s.ensure_disk(key, 4 << 20)
        assert d.state.size == 4 << 20
        made += 1
    except ImageLocked as e:
        assert "\\n" not in str(e), e
        refused += 1
    s._disks.clear()
print(made, refused)
"""

_SWEEPER = """
import sys, time
from replicator.replica import ReplicaStore
s = ReplicaStore(sys.argv[1])
end = time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    s.sweep_leftovers()
    n += 1
    time.sleep(0.002)
print(n)
"""


def test_concurrent_creators_in_processes_beside_a_sweeper_make_one_good_disk(tmp_path):
    store = ReplicaStore(str(tmp_path / "store"))
    os.makedirs(store.base)
    keys = [str(uuid.uuid4()) for _ in range(2)]
    sweeper = spawn(_SWEEPER, store.root, 4)
    procs = [spawn(_CREATOR, store.root, keys[i % 2], 6) for i in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    sweeper.communicate(timeout=60)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        made, refused = map(int, out.split())
        assert made + refused == 6 and made >= 1, out
    store.sweep_leftovers()
    assert leftovers(store) == []
    assert store.disk_ids() == sorted(keys)
    for k in keys:
        with store.disk(k).open_image() as img:
            assert img.size == 4 * MiB


def test_a_creation_lock_held_for_ever_is_refused_in_one_line_within_seconds(tmp_path):
    store = ReplicaStore(str(tmp_path / "store"))
    os.makedirs(store.base)
    key = str(uuid.uuid4())
    holder = spawn("""
        import fcntl, os, sys, time
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(os.getpid()).encode())
        print("held", flush=True)
        time.sleep(60)
        """, os.path.join(store.base, f".new-{key}.lock"))
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(ImageLocked) as e:
            store.ensure_disk(key, 4 * MiB)
        took = time.monotonic() - t0
        assert 0.8 < took < 3, took
        msg = str(e.value)
        assert "\n" not in msg and f"pid {holder.pid}" in msg and key in msg, msg
        assert store.sweep_leftovers() == []            # a live creator's lock is not swept
    finally:
        holder.kill()
        holder.wait()
    store.ensure_disk(key, 4 * MiB)                     # the lock went with its process
    assert leftovers(store) == []


def test_a_creator_killed_half_way_blocks_nobody(tmp_path):
    store = ReplicaStore(str(tmp_path / "store"))
    key = str(uuid.uuid4())
    p = spawn("""
        import os, sys, time
        from replicator.replica import ReplicaStore
        from replicator.replica.store import DiskState
        s = ReplicaStore(sys.argv[1])
        def build(image):
            with open(image, "wb") as f:
                f.write(b"half" * 1000)
            print("half", flush=True)
            time.sleep(60)
        with s._creating(sys.argv[2]):
            s._create(sys.argv[2], build, DiskState(sys.argv[2], "", 4 << 20, 2 << 20))
        """, store.root, key)
    try:
        assert p.stdout.readline().strip() == "half"
        assert os.path.isdir(os.path.join(store.base, f".new-{key}"))
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    t0 = time.monotonic()
    d = store.ensure_disk(key, 4 * MiB)
    assert time.monotonic() - t0 < 1.0                 # no wait for a dead creator
    assert d.state.size == 4 * MiB and leftovers(store) == []


def test_a_symlink_planted_as_a_creation_lock_does_not_write_through(tmp_path):
    store = ReplicaStore(str(tmp_path / "store"))
    os.makedirs(store.base)
    key = str(uuid.uuid4())
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, os.path.join(store.base, f".new-{key}.lock"))
    try:
        store.ensure_disk(key, 4 * MiB)
    except ImageLocked:
        pass
    assert victim.read_text() == "precious\n"


def test_a_directory_named_like_a_creation_lock_does_not_stop_every_creation(tmp_path):
    store = ReplicaStore(str(tmp_path / "store"))
    os.makedirs(os.path.join(store.base, f".new-{uuid.uuid4()}.lock"))     # another disk id entirely
    store.ensure_disk(uuid.uuid4(), 4 * MiB)


def test_a_fifo_planted_as_the_creation_lock_is_refused_naming_it_or_replaced(tmp_path):
    store = ReplicaStore(str(tmp_path / "store"))
    os.makedirs(store.base)
    key = str(uuid.uuid4())
    lock = os.path.join(store.base, f".new-{key}.lock")
    os.mkfifo(lock)
    try:
        store.ensure_disk(key, 4 * MiB)
    except ImageLocked as e:
        assert lock in str(e) or ".new-" in str(e)
    except OSError as e:
        pytest.fail(f"raw {type(e).__name__}: {e}")
    finally:
        assert not os.path.exists(lock) or os.path.isdir(os.path.join(store.base, key))


def test_a_symlink_planted_as_a_half_made_disk_is_not_built_through(tmp_path):
    store = ReplicaStore(str(tmp_path / "store"))
    os.makedirs(store.base)
    outside = tmp_path / "outside"
    outside.mkdir()
    key = str(uuid.uuid4())
    os.symlink(outside, os.path.join(store.base, f".new-{key}"))
    try:
        store.ensure_disk(key, 4 * MiB)
    except OSError:
        pass
    assert os.listdir(outside) == []
    assert not os.path.islink(os.path.join(store.base, key))


def test_a_sweep_creates_nothing_through_a_dangling_symlink(tmp_path):
    store = ReplicaStore(str(tmp_path / "store"))
    os.makedirs(store.base)
    target = tmp_path / "made-by-sweep"
    os.symlink(target, os.path.join(store.base, f".new-{uuid.uuid4()}.lock"))
    store.sweep_leftovers()
    assert not target.exists()


def test_a_lock_removed_during_creation_does_not_fail_the_made_disk(tmp_path):
    store = ReplicaStore(str(tmp_path / "store"))
    key = str(uuid.uuid4())
    lock = os.path.join(store.base, f".new-{key}.lock")

    def build(image):
        from replicator.vhdx import create_vhdx
        create_vhdx(image, 4 * MiB).close()
        os.unlink(lock)                                 # a careless `rm disks/.new-*` meanwhile
    from replicator.replica.store import DiskState
    with store._creating(key):
        store._create(key, build, DiskState(key, "", 4 * MiB, 2 * MiB))
    assert store.disk(key).state.size == 4 * MiB


def test_a_full_store_volume_leaves_no_half_disk_and_no_lock(tmp_path):
    """A small tmpfs (in a mount namespace of our own) filled up: the creation fails in one line and leaves
    nothing behind; once space is freed the same creation succeeds."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code = textwrap.dedent("""
        import os, sys, uuid
        from replicator.replica import ReplicaStore
        mnt = sys.argv[1]
        s = ReplicaStore(os.path.join(mnt, "store"))
        os.makedirs(s.base)
        with open(os.path.join(mnt, "filler"), "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"f" * 4096)
            except OSError:
                pass
        key = str(uuid.uuid4())
        try:
            s.ensure_disk(key, 64 << 20, block_size=1 << 20)
            print("MADE")
        except Exception as e:
            print("ERR", type(e).__name__, str(e).count(chr(10)), e)
        print("LEFT", sorted(n for n in os.listdir(s.base) if n.startswith(".")), os.listdir(s.base))
        os.unlink(os.path.join(mnt, "filler"))
        d = s.ensure_disk(key, 64 << 20, block_size=1 << 20)
        print("THEN", d.state.size)
        """)
    r = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=2m tmpfs "$1" && exec "$2" -c "$3" "$1"',
                        "sh", str(mnt), sys.executable, code],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    if "ERR" not in r.stdout and "MADE" not in r.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[-200:]}")
    assert "MADE" not in r.stdout, r.stdout
    assert "LEFT [] []" in r.stdout, r.stdout + r.stderr
    assert "ERR" in r.stdout and r.stdout.split("ERR", 1)[1].split()[1] == "0", r.stdout
    assert "THEN 67108864" in r.stdout, r.stdout + r.stderr


# ================================================================================= the export's threads
def export_disk(tmp_path):
    """A disk as the export serves it: background log writer, background metadata commits, deferred file work;
    and its replica (a copy taken before tracking starts)."""
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE, fill=[(0, pattern(1, 2 * MiB)), (5 * MiB, pattern(2, MiB))])
    replica = copy_file(path, tmp_path / "replica.vhdx")
    t = tracked(path, region_size=REGION, log_thread=True)
    t.disk.background_commits()
    t.deferring = True
    return path, replica, t


def ship(t, sealed, replica, image):
    """As replicatord: the sealed log reads back sealed and exactly its bytes, replays to the disk as of the
    cut; then it is acknowledged and the deferred work runs (as the shim does after a control request)."""
    with HrlReader(sealed.path, SIZE) as r:
        assert r.header.eol_location == os.path.getsize(sealed.path)
    with VhdxDisk.open(replica, read_only=False) as rep:
        apply_chain(rep, [sealed.path])
    assert read_vhdx(replica) == image, f"{sealed.path} does not replay to the disk as of its cut"
    t.acknowledge(sealed.unique_id)
    t.run_deferred()


def do_cut(t):
    """The export's cut: three phases, seal without fsync, then the deferred state save."""
    image = t.read(0, SIZE)
    pending = t.cut_begin()
    assert pending is not None, t.reason
    t.cut_sync(pending, durable=False)
    sealed = t.cut_record(pending)
    assert sealed is not None, t.reason
    t._save_state()
    t.run_deferred()
    return sealed, image


def scribble(t, rnd, n=6):
    for _ in range(n):
        off = rnd.randrange(0, SIZE // 512) * 512
        kind = rnd.random()
        if kind < 0.15:
            t.write_zeroes(off, min(SIZE - off, rnd.choice([512, 64 * KiB, 700 * KiB])))
        else:
            ln = min(SIZE - off, rnd.choice([512, 4 * KiB, 100 * KiB, 300 * KiB]))
            t.write(off, pattern(rnd.randrange(1 << 30), ln))
        if rnd.random() < 0.3:
            t.flush()


def plant(spare: str, how: str, tmp_path) -> str | None:
    if os.path.isdir(spare) and not os.path.islink(spare):
        shutil.rmtree(spare)
    elif os.path.lexists(spare):
        os.unlink(spare)
    if how == "symlink":
        victim = tmp_path / f"victim-{time.monotonic_ns()}"
        victim.write_bytes(b"v" * 8192)
        os.symlink(victim, spare)
        return str(victim)
    if how == "dir":
        os.mkdir(spare)
        with open(os.path.join(spare, "inside"), "wb") as f:
            f.write(b"x")
    elif how == "fifo":
        os.mkfifo(spare)
    return None


def test_many_cycles_with_planted_spares_and_resyncs_replay_exactly(tmp_path):
    rnd = random.Random(7)
    path, replica, t = export_disk(tmp_path)
    victims = []
    try:
        for cycle in range(24):
            scribble(t, rnd)
            if cycle % 8 == 5:                          # a resync: the replica becomes the disk as of now
                image = t.read(0, SIZE)
                t.begin_resync()
                t.run_deferred()
                with VhdxDisk.open(replica, read_only=False) as rep:
                    rep.write(0, image)
                scribble(t, rnd, 3)                     # writes during the resync ship after it
                t.end_resync()
                t.run_deferred()
                assert not t.resync_required, t.reason
            sealed, image = do_cut(t)
            ship(t, sealed, replica, image)
            how = ["symlink", "dir", "fifo", None][cycle % 4]
            v = plant(t.sidecar.spare_path, how, tmp_path) if how else None
            if v:
                victims.append(v)
            assert not t.resync_required, t.reason
        for v in victims:
            assert open(v, "rb").read() == b"v" * 8192, f"{v} written through the planted spare"
        assert sorted(os.listdir(t.sidecar.logs_dir)) in (sorted([t.state.active_log]),
                                                          sorted([t.state.active_log, SPARE_LOG]))
    finally:
        t.close()
    # a clean close: the last log is sealed and pending, and it too replays to the disk
    logs = sealed_log_paths(path)
    with VhdxDisk.open(replica, read_only=False) as rep:
        apply_chain(rep, logs)
    assert read_vhdx(replica) == read_vhdx(path)


def test_a_pending_log_replaced_by_a_fifo_does_not_hang_the_next_open(tmp_path):
    path, replica, t = export_disk(tmp_path)
    t.write(0, pattern(5, 64 * KiB))
    do_cut(t)
    t.close()
    first = sealed_log_paths(path)[0]
    os.unlink(first)
    os.mkfifo(first)
    try:
        r = child("""
            import sys
            from replicator.tracking import TrackedDisk
            t = TrackedDisk(sys.argv[1])
            print(t.resync_required, t.reason)
            t.close()
            """, path, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("TrackedDisk() hung on a FIFO at a pending log's name")
    assert r.stdout.startswith("True"), r.stdout + r.stderr


def test_a_directory_among_the_logs_does_not_break_the_deferred_work(tmp_path):
    path, replica, t = export_disk(tmp_path)
    try:
        os.mkdir(os.path.join(t.sidecar.logs_dir, "00-operator-notes"))     # sorts before the logs
        t.write(0, pattern(6, 64 * KiB))
        t.begin_resync()
        t.run_deferred()
    finally:
        t.deferring = False
        t._deferred.clear()
        t.close()


_FSIZE_CHILD = """
import os, resource, signal, sys
from replicator.hrl import writer
from replicator.tracking import TrackedDisk
path, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
t = TrackedDisk(path, region_size=256 << 10, max_log_share=100.0, log_thread=True)
t.disk.background_commits()
t.deferring = True
assert not t.resync_required, t.reason
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
cuts = 0
def cut():
    global cuts
    image = t.read(0, t.size)
    p = t.cut_begin()
    if p is None:
        return None
    t.cut_sync(p, durable=False)
    s = t.cut_record(p)
    t._save_state(); t.run_deferred()
    if s is not None:
        cuts += 1
        with open(os.path.join(out, f"{cuts}.img"), "wb") as f:
            f.write(image)
        print("SEALED", cuts, s.path, flush=True)
    return s
# a first small log that seals fine
t.write(0, bytes([7]) * (256 << 10))
assert cut() is not None, t.reason
# the next log is the spare-less first file again: fill it so the cut's metadata block crosses the limit
fe = writer.HEADER_SIZE + writer.GROW
piece = 1 << 20
i = 0
while t.log is not None and t.log.cursor + piece + 2 * t.log.metadata_size < fe:
    t.write((i % 8) * piece, bytes([i % 251 + 1]) * piece)
    i += 1
if t.log is not None:
    rest = (fe - t.log.cursor - t.log.metadata_size // 2) // 512 * 512
    if rest > 0:
        t.write(1 << 20, bytes([99]) * rest if rest <= (7 << 20) else bytes([99]) * (7 << 20))
aimed = t.log is not None and t.log.cursor <= fe < t.log.cursor + t.log.metadata_size
print("AIMED", aimed, flush=True)
s = cut()
print("CUT", s is not None, t.resync_required, repr(t.reason), flush=True)
t.write(0, b"z" * 4096)         # writes go on (the guest is served) while a resync is owed
t.run_deferred()
if sys.argv[4] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
t.close()
print("CLOSED", flush=True)
"""


@pytest.mark.parametrize("end", ["close", "kill"])
def test_a_file_size_limit_hit_in_a_cut_ends_in_a_resync_and_earlier_logs_replay(tmp_path, end):
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE, fill=[(0, pattern(1, 2 * MiB))])
    replica = copy_file(path, tmp_path / "replica.vhdx")
    tracked(path, region_size=REGION).close()
    with VhdxDisk.open(replica, read_only=False) as rep:     # the replica as of tracking's start
        rep.write(0, read_vhdx(path))
    out = tmp_path / "out"
    out.mkdir()
    from replicator.hrl import writer
    limit = writer.HEADER_SIZE + writer.GROW
    r = child(_FSIZE_CHILD, path, out, limit, end, timeout=120)
    lines = r.stdout.splitlines()
    assert any(l.startswith("SEALED 1 ") for l in lines), r.stdout + r.stderr
    assert "AIMED True" in lines, r.stdout        # the limit was hit by the cut's own metadata block
    cut_line = next(l for l in lines if l.startswith("CUT "))
    # the cut that crossed the limit did not seal; a resync is owed, for a reason that names the failure
    assert cut_line.startswith("CUT False True"), r.stdout + r.stderr
    assert "File too large" in cut_line, cut_line
    if end == "kill":
        assert r.returncode == -signal.SIGKILL
    else:
        assert r.returncode == 0 and "CLOSED" in r.stdout, r.stderr
    # the sealed log from before the failure replays exactly
    first = next(l for l in lines if l.startswith("SEALED 1 ")).split()[2]
    with VhdxDisk.open(replica, read_only=False) as rep:
        apply_chain(rep, [first])
    assert read_vhdx(replica) == (out / "1.img").read_bytes()
    # reopening: a resync is required, and the disk opens and reads
    t = TrackedDisk(path, region_size=REGION)
    try:
        assert t.resync_required, "a log that never sealed was trusted"
        extents = t.begin_resync()
        assert extents, "a resync with nothing to compare after lost log data"
        image, fixed = t.read(0, SIZE), bytearray(read_vhdx(replica))
        for off, ln in extents:
            fixed[off:off + ln] = image[off:off + ln]
        assert bytes(fixed) == image, "a range changed in the lost log lies outside the resync's extents"
        t.end_resync()
    finally:
        t.close()
    assert read_vhdx(path) == image


_KILL_CHILD = """
import os, sys, signal
from replicator.tracking import TrackedDisk
path, after, seed, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
import hashlib, shutil
def pat(i, n): return hashlib.shake_128(i.to_bytes(8, "little")).digest(n)
t = TrackedDisk(path, region_size=256 << 10, log_thread=True)
t.disk.background_commits()
t.deferring = True
for c in range(3):
    t.write((c * 3 + seed) % 8 << 20, pat(c + seed, 300 << 10))
    t.write_zeroes(((c + 1) * 5) % 8 << 20, 64 << 10)
    p = t.cut_begin(); t.cut_sync(p, durable=False); s = t.cut_record(p); t._save_state(); t.run_deferred()
    assert s is not None, t.reason
    if after == "cut" and c == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    shutil.copyfile(s.path, os.path.join(out, f"{c}.hrl"))   # shipped: the replica holds it
    t.acknowledge(s.unique_id)
    if after == "ack" and c == 2:
        os.kill(os.getpid(), signal.SIGKILL)       # the acknowledgement's deferred work never ran
    t.run_deferred()
t.write(0, b"late" * 1024)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("after", ["cut", "ack", "writes"])
def test_kill_9_after_a_cut_or_acknowledge_then_reopen_requires_a_resync_that_restores(tmp_path, after):
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE, fill=[(0, pattern(1, 2 * MiB))])
    tracked(path, region_size=REGION).close()
    replica = copy_file(path, tmp_path / "replica.vhdx")
    out = tmp_path / "shipped"
    out.mkdir()
    r = child(_KILL_CHILD, path, after, 3, out)
    assert r.returncode == -signal.SIGKILL, r.stderr
    shipped = sorted(str(p) for p in out.iterdir())
    assert len(shipped) == (2 if after == "cut" else 3)
    with VhdxDisk.open(replica, read_only=False) as rep:      # the replica: every acknowledged log applied
        apply_chain(rep, shipped)
    t = TrackedDisk(path, region_size=REGION)
    try:
        assert t.resync_required, "the state after kill -9 was trusted"
        # every log the state still names reads back sealed (the unsealed active one is not named)
        for p in sealed_log_paths(path):
            with HrlReader(p, SIZE) as rd:
                assert rd.header.eol_location == os.path.getsize(p)
        # the resync's extents cover every byte where the replica differs from the disk
        disk, rep = t.read(0, SIZE), read_vhdx(replica)
        fixed = bytearray(rep)
        for off, ln in t.begin_resync():
            fixed[off:off + ln] = disk[off:off + ln]
        assert bytes(fixed) == disk, "a changed range lies outside the resync's extents"
        t.end_resync()
    finally:
        t.close()
