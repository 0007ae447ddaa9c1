"""Fuzzing the seed media a stranger could hand an operator: a mutated seed.json and volumes whose stream
headers were rewritten (with the manifest's digests fixed up, as a deliberate forger would). `seed verify`
and `seed import` (the real command line, in process) must end with exit 0 or one line 'replicator: error:'
with a ReplicatorError's exit code, never an unexpected exception; they must agree; and an import that
succeeds leaves a replica equal to the disk."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import uuid

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from replicator import delta
from replicator.cli import main
from replicator.delta.format import read_header
from replicator.errors import FormatError, ReplicatorError
from replicator.kernels import Xxh3Hasher
from replicator.replica import ReplicaStore
from replicator.seed import export_machine
from replicator.tracking import TrackedDisk
from replicator.vhdx import VhdxDisk, create_vhdx

MiB = 1 << 20
CODES = {c.exit_code for c in (ReplicatorError, FormatError)} | {2, 3, 4, 8, 12, 24}


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    """A real seed of a 12 MiB disk with 6 MiB of data, in 4 MiB volumes (two or three of them)."""
    base = tmp_path_factory.mktemp("seedfuzz")
    disk = str(base / "vm.vhdx")
    payload = os.urandom(6 * MiB)
    with create_vhdx(disk, 12 * MiB, block_size=MiB) as d:
        d.write(0, payload)
    tracker = TrackedDisk(disk)
    try:
        export_machine("vm01", {"vm.vhdx": tracker}, str(base / "media"), volume_size=4 * MiB)
    finally:
        tracker.close()
    folder = base / "media" / "vm01"
    manifest = json.loads((folder / "seed.json").read_text())
    assert len(manifest["disks"][0]["volumes"]) >= 2
    return Seed(folder, manifest, payload)


class Seed(tuple):
    def __new__(cls, *parts):
        return super().__new__(cls, parts)

    def __repr__(self) -> str:                     # hypothesis prints its arguments: not 6 MiB of them
        return f"Seed({self[0]})"


def run_cli(*args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def check_agreement(folder, replica, payload) -> tuple[int, str]:
    v_code, v_err = run_cli("seed", "verify", folder)
    i_code, i_err = run_cli("seed", "import", folder, "--replica-root", replica)
    for code, err in ((v_code, v_err), (i_code, i_err)):
        if code:
            assert code in CODES and len(err.splitlines()) == 1 and err.startswith("replicator: error: "), err
    if v_code:                                   # import verifies first: the same refusal, nothing replicated
        assert (i_code, i_err) == (v_code, v_err)
        assert not os.path.isdir(os.path.join(replica, "disks")) or not ReplicaStore(replica).disk_ids()
    else:
        assert i_code == 0, i_err                # what verify accepts, import takes
        store = ReplicaStore(replica)
        [disk_id] = store.disk_ids()
        with VhdxDisk.open(store.disk(disk_id).image_path) as r:
            assert r.read(0, len(payload)) == payload
    return v_code, v_err


def fresh_copy(src, tmp_root) -> tuple[str, str]:
    work = os.path.join(tmp_root, uuid.uuid4().hex)
    shutil.copytree(src, os.path.join(work, "vm01"))
    return os.path.join(work, "vm01"), os.path.join(work, "replica")


# ---------------------------------------------------------------------------------------------- manifest
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
                           | st.text(max_size=40),
                           lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                                             children, max_size=3),
                           max_leaves=8)


def paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


@st.composite
def mutated_manifests(draw, manifest):
    m = copy.deepcopy(manifest)
    for _ in range(draw(st.integers(1, 3))):
        all_paths = [p for p in paths(m) if p]
        if not all_paths:
            break
        path = draw(st.sampled_from(all_paths))
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add", "nudge"]))
        if action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        elif action == "nudge" and isinstance(parent[path[-1]], int) and not isinstance(parent[path[-1]], bool):
            parent[path[-1]] += draw(st.sampled_from([-4096, -512, -1, 1, 512, 4096, MiB]))
        elif action == "nudge" and isinstance(parent[path[-1]], str):
            parent[path[-1]] = parent[path[-1]][::-1]
    return m


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_manifest(seed, tmp_path, data):
    folder, manifest, payload = seed
    m = data.draw(mutated_manifests(manifest))
    work, replica = fresh_copy(folder, tmp_path)
    with open(os.path.join(work, "seed.json"), "w") as f:
        json.dump(m, f)
    code, err = check_agreement(work, replica, payload)
    if json.dumps(m, sort_keys=True) == json.dumps(manifest, sort_keys=True):   # not ==: 1 == True in Python,
        assert code == 0, err                                                   # and the manifest is strict JSON


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_garbage_manifest(seed, tmp_path, raw):
    folder, manifest, payload = seed
    work, replica = fresh_copy(folder, tmp_path)
    with open(os.path.join(work, "seed.json"), "wb") as f:
        f.write(raw)
    assert check_agreement(work, replica, payload)[0] != 0


# ---------------------------------------------------------------------------------------------- volume headers
HEADER_CHANGES = {
    "disk_size": st.integers(0, 2 ** 45),
    "disk_id": st.uuids(),
    "generation": st.integers(0, 6),
    "base_generation": st.integers(0, 6),
    "kind": st.sampled_from(["delta", "full", "resync"]),
    "block_size": st.sampled_from([512, 4096, 65536, MiB, 2 * MiB]),
    "consistency": st.sampled_from(["crash", "application"]),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_forged_volume_headers(seed, tmp_path, data):
    """A volume's header rewritten with a valid CRC, and the manifest's size and digest made to match."""
    folder, manifest, payload = seed
    work, replica = fresh_copy(folder, tmp_path)
    m = copy.deepcopy(manifest)
    k = data.draw(st.integers(0, len(m["disks"][0]["volumes"]) - 1))
    vol = m["disks"][0]["volumes"][k]
    path = os.path.join(work, vol["file"])
    with open(path, "rb") as f:
        blob = f.read()
    header, raw = read_header(io.BytesIO(blob).read)
    fields = header.body()
    fields["disk_id"], fields["source_logs"] = header.disk_id, header.source_logs
    names = data.draw(st.lists(st.sampled_from(sorted(HEADER_CHANGES)), min_size=1, max_size=3, unique=True))
    for name in names:
        fields[name] = data.draw(HEADER_CHANGES[name])
    try:
        forged = delta.StreamHeader(**fields).pack()
    except ReplicatorError:
        assume(False)
    blob = forged + blob[len(raw):]
    with open(path, "wb") as f:
        f.write(blob)
    h = Xxh3Hasher()
    h.update(blob)
    vol["bytes"], vol["xxh3"] = len(blob), h.hexdigest()
    with open(os.path.join(work, "seed.json"), "w") as f:
        json.dump(m, f)
    code, err = check_agreement(work, replica, payload)
    if any(fields[n] != getattr(header, n) for n in ("disk_size", "disk_id", "generation", "base_generation",
                                                     "kind")):
        assert code != 0, "a volume header that contradicts the manifest was accepted"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_volume_bytes(seed, tmp_path, data):
    """Bytes of a volume flipped, cut or appended, digests left as they were: both commands name it."""
    folder, manifest, payload = seed
    work, replica = fresh_copy(folder, tmp_path)
    vol = manifest["disks"][0]["volumes"][data.draw(st.integers(0, len(manifest["disks"][0]["volumes"]) - 1))]
    path = os.path.join(work, vol["file"])
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    how = data.draw(st.sampled_from(["flip", "cut", "append", "empty", "remove"]))
    if how == "flip":
        at = data.draw(st.integers(0, min(len(blob) - 1, 4096)))
        blob[at] ^= data.draw(st.integers(1, 255))
    elif how == "cut":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif how == "append":
        blob += data.draw(st.binary(min_size=1, max_size=64))
    elif how == "empty":
        blob = bytearray()
    if how == "remove":
        os.unlink(path)
    else:
        with open(path, "wb") as f:
            f.write(blob)
    code, err = check_agreement(work, replica, payload)
    assert code == FormatError.exit_code and vol["file"] in err, err
