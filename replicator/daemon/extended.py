"""Extended replication: a replica site forwards a machine's cycles on to a third site.

Primary -> replica -> extended replica, never primary -> both (Hyper-V Replica's extended replication). The
leg runs on the replica host, from its replica store, at its own frequency (5 or 15 minutes), with its own
recovery points on the third site, compression and bandwidth limit, and its own statistics and health.

One extended cycle of a machine:
1. choose the newest machine cut every disk of the machine is at (the primary's checkpoint: one cut
   across its disks); while the primary is half-way through a machine cycle, wait a little;
2. per disk, encode the merged ranges of every generation since the one last forwarded, read from the
   replica image (replica/forward.py: no lock, checked against concurrent commits, read again if raced)
   into the leg's outbox; the first cycle of a disk copies it whole (a fuzzy copy, labelled
   `inconsistent`) and levels it at once with the ranges noted meanwhile;
3. send and commit each stream on the third site, then record the machine cut there (its recovery points);
4. only then forget what was forwarded.

Everything needed to finish a cycle is persisted before it is sent (STATE_DIR/extended/MACHINE.json):
after kill -9 the stream is sent again from its outbox file, resuming, and a commit the third site already
made is recognised by its stream id; nothing the replica applied is ever skipped.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from .. import delta
from ..durable import write_json_atomic
from ..errors import ReplicatorError, UsageError
from ..orchestration.extended import ExtendedSettings
from ..orchestration.health import MachineStats
from ..transport.auth import Ownership
from ..replica.forward import ChangeJournal, RacedCommit, SeedSource, Snapshot, encode_forward, new_stream_id, \
    snapshot, snapshot_settled

log = logging.getLogger("replicatord")

RACE_RETRIES = 20
SEED_VOLUME = 500 << 30                  # as `replicator seed export`'s default


class NothingYet(ReplicatorError):
    """Nothing to forward yet, and nothing wrong: the machine has no replica here yet (NotStarted), or its
    seed is not imported on the extended site yet (WaitingForSeed)."""

    exit_code = 13

    def __init__(self, message: str, state: str = "NotStarted"):
        super().__init__(message)
        self.state = state


@dataclass
class ExtendedResult:
    point: int | None
    bytes_sent: int = 0
    bytes_changed: int = 0             # the merged ranges read from the replica (the stream carries them)
    seconds: float = 0.0
    disks: dict = field(default_factory=dict)


def _state_problem(data) -> str | None:
    """What is wrong with a leg's state document (None: nothing), in a few words."""
    if not isinstance(data, dict) or not isinstance(data.get("disks"), dict):
        return "no disks mapping"
    for key, mine in data["disks"].items():
        if not isinstance(mine, dict) or not all(isinstance(mine.get(k), int) for k in ("generation", "forwarded")):
            return f"disk {key[:40]!r}: generation and forwarded must be integers"
        pending = mine.get("pending")
        if pending is not None and not (isinstance(pending, dict) and isinstance(pending.get("stream"), str)
                                        and isinstance(pending.get("path"), str)
                                        and all(isinstance(pending.get(k), int) for k in ("generation", "forwarded"))):
            return f"disk {key[:40]!r}: its pending stream is not stream, path, generation and forwarded"
    if not isinstance(data.get("seeds", {}), dict) or not isinstance(data.get("stats", {}), dict):
        return "seeds and stats must be mappings"
    return None


class ExtendedLeg:
    """One machine's extended leg from this replica store to a third site (a ReplicaTarget)."""

    def __init__(self, settings: ExtendedSettings, target, state_dir: str, *, clock=time.time):
        self.settings, self.target, self.clock = settings, target, clock
        self.name = settings.machine
        self.state_path = os.path.join(state_dir, "extended", f"{self.name}.json")
        self.outbox = os.path.join(state_dir, "extended", "outbox")
        os.makedirs(self.outbox, exist_ok=True)
        self.stats = MachineStats(self.name, settings.frequency, clock=clock, labels={"relationship": "Extended"})
        self.broken: str | None = None     # the state file cannot be read: the leg stays out, the file as it is
        try:
            self.data = self._load()
            self.stats.restore(self.data.get("stats", {}))
        except UsageError as e:
            self.broken, self.data = e.message, {"disks": {}}
            log.error("%s: extended leg out of service: %s", self.name, e.message)
        self.state = "Error" if self.broken else self.data.get("state", "NotStarted")
        self.reason: str | None = self.broken or self.data.get("reason")
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ persisted state
    def _load(self) -> dict:
        try:
            with open(self.state_path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {"disks": {}}
        except (OSError, ValueError) as e:
            raise UsageError(f"{self.state_path}: unreadable extended-replication state ({e}); it records "
                             "what the extended site holds: restore it, or remove it and the extended site's "
                             "disks to copy them again") from None
        problem = _state_problem(data)
        if problem:
            raise UsageError(f"{self.state_path}: unreadable extended-replication state ({problem}); it records "
                             "what the extended site holds: restore it, or remove it and the extended site's "
                             "disks to copy them again")
        return data

    def _save(self) -> None:
        if self.broken:                      # never over a file we could not read
            return
        self.data["stats"] = self.stats.snapshot()
        self.data["state"], self.data["reason"] = self.state, self.reason
        write_json_atomic(self.state_path, self.data)

    # ------------------------------------------------------------------ the machine's disks
    def disk_paths(self) -> dict[str, str]:
        """disk id -> replica disk folder, for the disks of this machine in the storage root: of its
        trust_group when one is set; several groups' disks under one machine name are refused (tenants
        sharing a root may each have a vm01)."""
        base = os.path.join(self.settings.storage, "disks")
        owners = Ownership(self.settings.storage)
        found, groups = {}, {}
        try:
            names = sorted(os.listdir(base))
        except FileNotFoundError:
            return {}
        for key in names:
            try:
                if str(uuid.UUID(key)) != key:       # .new-ID, .deleting-ID: a creation or removal under way
                    continue
            except ValueError:
                continue
            try:
                with open(os.path.join(base, key, "state.json")) as f:
                    st = json.load(f)
            except (OSError, ValueError):
                continue
            if st.get("machine") == self.name or (not st.get("machine") and st.get("name") == self.name):
                owner = owners.owner(key)
                if self.settings.trust_group and owner not in (None, self.settings.trust_group):
                    continue
                found[key] = os.path.join(base, key)
                if owner is not None:
                    groups.setdefault(owner, []).append(key)
        if len(groups) > 1:
            raise UsageError(f"{self.name}: trust groups {', '.join(sorted(groups))} each have a machine of this "
                             f"name in {self.settings.storage}: set trust_group in its [[extended]] table")
        return found

    def _cut(self, paths: dict[str, str]) -> tuple[int | None, dict[str, Snapshot], dict[str, dict]]:
        """The newest machine point every disk is at now: (point, snapshots, state documents). Without
        checkpoints (a primary that sends none) a disk's own latest generation is its cut."""
        snaps, states, common = {}, {}, None
        for key, path in paths.items():
            snaps[key] = snapshot(path)
            with open(os.path.join(path, "state.json")) as f:
                states[key] = json.load(f)
            at = {int(p) for p, g in states[key].get("cuts", []) if int(g) == snaps[key].generation}
            common = at if common is None else common & at
        if common:
            return max(common), snaps, states
        if all(not s.get("cuts") for s in states.values()):
            return None, snaps, states
        raise RacedCommit(f"{self.name}: the primary is between machine cuts")

    # ------------------------------------------------------------------ one cycle
    async def cycle(self) -> ExtendedResult:
        """Forward the newest machine cut to the third site; resumes a cycle a crash interrupted first.
        One at a time (the schedule's and an operator's)."""
        if self.state == "Continued" or self.broken:
            raise UsageError(self.broken or f"{self.name}: {self.reason}")
        async with self._lock:
            return await self._locked_cycle()

    async def _locked_cycle(self) -> ExtendedResult:
        started = time.monotonic()
        try:
            result = await self._cycle()
        except NothingYet as e:                     # not a failure: the primary leg has not begun
            self.state, self.reason = e.state, e.message
            self._save()
            raise
        except (ReplicatorError, OSError) as e:
            self.stats.record_failure(e)
            self.state, self.reason = "Error", (getattr(e, "message", None) or str(e)).splitlines()[0]
            self._save()
            raise
        result.seconds = time.monotonic() - started
        cut_time = max((d.get("time", 0.0) for d in result.disks.values()), default=None)
        self.stats.record_success(result.bytes_sent, result.seconds, cut_time or None)
        self.state, self.reason = "Replicating", None
        self._save()
        return result

    async def _cycle(self) -> ExtendedResult:
        await self._finish_pending()
        paths = self.disk_paths()
        if not paths:
            raise NothingYet(f"waiting for the first replica of {self.name} in {self.settings.storage}")
        idents = {}
        for key, path in paths.items():            # noted from now on, before anything is read
            idents[key] = await asyncio.to_thread(ChangeJournal(path).enable)
        result = ExtendedResult(point=None)
        again = []
        for key, mine in self.data["disks"].items():
            if key not in paths:
                continue
            if "journal" not in mine:               # recorded by an earlier build: its journal goes on
                mine["journal"] = idents[key]
            elif mine["journal"] != idents[key]:    # the disk was made again here: what C holds is another's
                again.append(key)
        initial = [k for k in paths if k not in self.data["disks"]]
        if initial and self.settings.seed_dir:
            await self._seeded(paths, initial, idents)
        elif initial:
            self.state = "InitialReplicationInProgress"
            self._save()
            await self._initial(paths, initial, result, idents)
        if again:
            log.warning("%s: the replica of disk(s) %s was made again on this site (removed and protected anew, "
                        "or adopted): copying it whole to %s", self.name, ", ".join(again), self.settings.target)
            self.state = "InitialReplicationInProgress"
            self._save()
            await self._initial(paths, again, result, idents)
        for attempt in range(RACE_RETRIES):
            try:
                point, prepared = await asyncio.to_thread(self._prepare, paths)
                break
            except RacedCommit:
                await asyncio.sleep(min(0.05 * (attempt + 1), 1.0))
        else:
            raise RacedCommit(f"{self.name}: the replica kept changing while the extended cycle read it; "
                              "trying again at the next cycle")
        result.point = point
        await self._ship(prepared, point, result)
        return result

    async def _initial(self, paths: dict[str, str], keys: list[str], result: ExtendedResult,
                       idents: dict[str, str]) -> None:
        """A whole copy of disks: the first one of disks the third site does not hold yet, or again over
        what it holds (zeros too) when this site's replica was made anew. Read while the replica may change
        (labelled inconsistent); the ranges noted since its generation level it in the same cycle."""
        for key in keys:
            again = key in self.data["disks"]
            info = await self.target.disk_info(uuid.UUID(key)) if not again and await self._exists(key) else None
            size = (await asyncio.to_thread(snapshot_settled, paths[key])).size
            if info is not None and info.generation > 0:
                raise UsageError(f"the extended site already holds disk {key} at generation {info.generation}, "
                                 "and this replica has no record of forwarding it: remove it there (or seed it) "
                                 "first")
            with open(os.path.join(paths[key], "state.json")) as f:
                name = json.load(f).get("name") or key      # the primary's disk name goes on with it
            # a copy made again goes on from what C holds (nothing, if its disk was removed there); a disk of
            # another size there is refused by C in one line (remove it there to copy it again)
            base = (await self.target.ensure_disk(uuid.UUID(key), size, name=name, machine=self.name)).generation
            base = base if again else 0
            stream = new_stream_id()
            path = self._outbox_file(stream)
            header_for = lambda snap: delta.StreamHeader(   # noqa: E731
                disk_id=uuid.UUID(key), disk_size=snap.size, block_size=snap.block_size, generation=base + 1,
                base_generation=base, consistency="inconsistent", created=snap.time or self.clock(), kind="full")
            snap, header, stats = await asyncio.to_thread(self._fuzzy_copy, paths[key], header_for, path, base > 0)
            self.data["disks"][key] = {"forwarded": snap.generation, "generation": base, "journal": idents[key],
                                       "pending": {"stream": stream, "path": path, "generation": base + 1,
                                                   "forwarded": snap.generation, "point": None,
                                                   "time": header.created, "full": True}}
            self._save()
            result.bytes_changed += stats.plain_bytes
            result.bytes_sent += await self._send_pending(key)

    async def _seeded(self, paths: dict[str, str], keys: list[str], idents: dict[str, str]) -> None:
        """Offline initial replication of the leg: the disks are written as a seed into seed_dir (once); the
        leg waits until the extended site holds every volume (`replicator seed import` there), then goes on
        with the changes noted since the seed's cut."""
        seeds = self.data.setdefault("seeds", {})
        if not all(k in seeds for k in keys):
            self.state, self.reason = "InitialReplicationInProgress", f"writing a seed into {self.settings.seed_dir}"
            self._save()
            await asyncio.to_thread(self._export_seed, paths, [k for k in keys if k not in seeds], seeds, idents)
        waiting = []
        for key in keys:
            seed = seeds[key]
            try:
                info = await self.target.disk_info(uuid.UUID(key))
            except ReplicatorError:
                info = None
            if info is not None and info.generation >= seed["volumes"]:
                self.data["disks"][key] = {"forwarded": seed["forwarded"], "generation": info.generation,
                                           "journal": seed.get("journal", idents[key]), "pending": None}
                del seeds[key]
            else:
                waiting.append(key)
        self._save()
        if waiting:
            raise NothingYet(f"waiting for the seed in {self.settings.seed_dir} to be imported on "
                             f"{self.settings.target} (`replicator seed import {self.settings.seed_dir}/{self.name} "
                             "--replica-root ROOT` there)", "WaitingForSeed")

    def _export_seed(self, paths: dict[str, str], keys: list[str], seeds: dict, idents: dict[str, str]) -> None:
        from ..seed.export import export_machine
        for key in keys:
            src = SeedSource(paths[key])
            try:
                with open(os.path.join(paths[key], "state.json")) as f:
                    name = json.load(f).get("name") or key
                manifest = export_machine(self.name, {name: src}, self.settings.seed_dir, volume_size=SEED_VOLUME,
                                          compress=self.settings.compression)
            finally:
                src.close()
            entry = manifest.disk(key)
            seeds[key] = {"forwarded": src.snap.generation, "volumes": len(entry.volumes), "journal": idents[key]}
            self._save()

    def _fuzzy_copy(self, disk_path: str, make_header, path: str, zeros: bool = False):
        """Copy the whole disk as it stands (worker thread): (snapshot, header, stats); a read that a
        commit broke is made again. `zeros`: the third site's copy holds data (unallocated goes as zeros)."""
        for attempt in range(RACE_RETRIES):
            snap = snapshot_settled(disk_path)
            header = make_header(snap)
            try:
                with open(path, "wb") as sink:
                    return snap, header, encode_forward(disk_path, snap, None, header, sink,
                                                        compress=self.settings.compression, full=True, fuzzy=True,
                                                        zeros=zeros)
            except RacedCommit:
                time.sleep(min(0.05 * (attempt + 1), 1.0))
        raise RacedCommit(f"{disk_path}: the replica kept changing while it was copied; trying again later")

    def _outbox_file(self, stream: str) -> str:
        """Every leg of the host shares the outbox; a file is marked with its machine ('+' is in no machine
        name), so a leg tidying its own never takes another leg's pending stream."""
        return os.path.join(self.outbox, f"{self.name}+{stream}.delta")

    async def _exists(self, key: str) -> bool:
        try:
            await self.target.disk_info(uuid.UUID(key))
            return True
        except ReplicatorError:
            return False

    def _prepare(self, paths: dict[str, str]) -> tuple[int | None, dict]:
        """Encode every disk's merged change at one machine cut (worker thread). RacedCommit: start over."""
        point, snaps, states = self._cut(paths)
        prepared = {}
        for key, path in paths.items():
            snap, mine = snaps[key], self.data["disks"][key]
            # every range noted past what C holds, also of cycles newer than the cut: a fuzzy copy may have
            # read a cycle that was then rolled back, and the image at the cut is right for all of them
            ranges = ChangeJournal(path).changes(mine["forwarded"])
            header = delta.StreamHeader(disk_id=uuid.UUID(key), disk_size=snap.size, block_size=snap.block_size,
                                        generation=mine["generation"] + 1, base_generation=mine["generation"],
                                        consistency=snap.consistency, created=snap.time or self.clock(),
                                        kind="delta", extra={"extended_from": snap.generation})
            stream = new_stream_id()
            out = self._outbox_file(stream)
            try:
                with open(out, "wb") as sink:
                    encode_forward(path, snap, ranges, header, sink, compress=self.settings.compression)
            except BaseException:
                for done in [out] + [x["path"] for x in prepared.values()]:
                    if os.path.exists(done):
                        os.unlink(done)
                raise
            if ChangeJournal(path).ident != mine.get("journal"):    # the folder was made again meanwhile
                os.unlink(out)
                for done in prepared.values():
                    os.unlink(done["path"])
                raise UsageError(f"{self.name}: the replica of disk {key} was made again during the extended "
                                 "cycle; the next cycle copies it whole")
            prepared[key] = {"stream": stream, "path": out, "generation": header.generation,
                             "forwarded": snap.generation, "point": point, "time": header.created,
                             "changed": sum(n for _, n in ranges)}
        return point, prepared

    async def _ship(self, prepared: dict, point: int | None, result: ExtendedResult) -> None:
        for key, pending in prepared.items():        # durable before anything is sent
            self.data["disks"][key]["pending"] = pending
        self._save()
        for key, pending in prepared.items():
            result.bytes_changed += pending.get("changed", 0)
            result.bytes_sent += await self._send_pending(key)
            result.disks[key] = {"generation": pending["generation"], "time": pending["time"]}
        await self._forward_domain(prepared)

    async def _forward_domain(self, prepared: dict) -> None:
        """The machine's replicated domain configuration goes on with its disks (a failover on the extended
        site then boots the machine, as on the replica site); sent when it changed."""
        from .domains import replicated_domain
        base = os.path.join(self.settings.storage, "disks")
        payload = await asyncio.to_thread(replicated_domain, [os.path.join(base, k) for k in prepared])
        if payload is None:
            return
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        if self.data.get("domain_sha256") == digest:
            return
        await self.target.put_config(self.name, payload, list(prepared))
        self.data["domain_sha256"] = digest
        self._save()

    async def _send_pending(self, key: str) -> int:
        """Send, commit and record one disk's pending stream, then forget what it forwarded."""
        mine = self.data["disks"][key]
        pending = mine["pending"]
        disk_id = uuid.UUID(key)
        info = await self.target.disk_info(disk_id)
        sent = 0
        if pending["stream"] not in info.committed and info.generation < pending["generation"]:
            if not os.path.exists(pending["path"]):
                if mine["generation"] == 0:         # the initial copy: nothing to level, it is made again
                    del self.data["disks"][key]
                elif pending.get("full"):           # a copy made again: made again once more
                    mine["journal"], mine["pending"] = None, None
                else:
                    mine["pending"] = None          # lost before it was sent: the ranges are still noted
                self._save()
                raise UsageError(f"{self.name}: the extended stream of disk {key} was lost before it was "
                                 "sent; the next cycle sends its changes again")
            sent = await self.target.send(disk_id, pending["stream"], pending["path"])
            await self.target.commit(disk_id, pending["stream"])
        if pending.get("point") is not None:
            await self.target.checkpoint(disk_id, pending["generation"], pending["point"],
                                         additional_points=self.settings.additional_points,
                                         disks=len(self.data["disks"]))
        mine["generation"], mine["forwarded"], mine["pending"] = pending["generation"], pending["forwarded"], None
        self._save()
        journal = ChangeJournal(os.path.join(self.settings.storage, "disks", key))
        if journal.enabled and journal.ident == mine.get("journal"):     # not a disk made again meanwhile
            journal.trim(pending["forwarded"])
        if os.path.exists(pending["path"]):
            os.unlink(pending["path"])
        return sent

    async def _finish_pending(self) -> None:
        for key, mine in list(self.data["disks"].items()):
            if mine.get("pending"):
                await self._send_pending(key)
        for name in os.listdir(self.outbox):        # this leg's streams of cycles that never became pending
            full = os.path.join(self.outbox, name)
            mine = [(m.get("pending") or {}).get("path") for m in self.data["disks"].values()]
            if name.startswith(f"{self.name}+") and full not in mine:
                os.unlink(full)

    def continued(self) -> None:
        """The machine failed over to this site: it is protected from here towards the extended site now
        (a primary leg of this site), and this leg forwards no more."""
        self.state, self.reason = "Continued", ("the machine failed over to this site; it replicates from here "
                                                f"to {self.settings.target} as a protected machine")
        self._save()

    # ------------------------------------------------------------------ running
    async def run(self, stop: asyncio.Event) -> None:
        """A cycle every `frequency` seconds until `stop` is set; each leaves one log line."""
        while not stop.is_set():
            if self.state == "Continued" or self.broken:
                return
            try:
                r = await self.cycle()
                log.info("%s: extended cycle to %s: point %s, %.1f MiB changed, %.1f MiB sent in %.1f s", self.name,
                         self.settings.target, r.point, r.bytes_changed / 2**20, r.bytes_sent / 2**20, r.seconds)
            except (ReplicatorError, OSError) as e:
                log.warning("%s: extended cycle to %s failed: %s", self.name, self.settings.target,
                            self.reason or e)
            try:
                await asyncio.wait_for(stop.wait(), self.settings.frequency)
            except asyncio.TimeoutError:
                pass

    def status(self) -> dict:
        """What `replicator status` shows for the leg (Measure-VMReplication -ReplicationRelationshipType
        Extended)."""
        return {"machine": self.name, "relationship": "Extended", "target": self.settings.target,
                "state": self.state, "reason": self.reason, "frequency": self.settings.frequency,
                "stats": self.stats.to_dict(),
                "disks": {k: {"generation": v["generation"], "forwarded": v["forwarded"]}
                          for k, v in self.data["disks"].items()}}
