"""The fencing table of a host: the epoch and this host's role for each protected machine, so a primary
that was failed over is refused by its replica and stops, even while the controller is away
(docs/management-plane.md, "Fencing").

The file is `STATE_DIR/controller/fencing.json`:

    {"machines": {"vm01": {"epoch": 3, "role": "primary"}, "vm02": {"epoch": 1, "role": "replica"}}}

Who writes it: the controller agent (daemon/agent.py), from the `fencing` member of the desired document
(`GET /v1/hosts/self/desired`), with `update()` -- then it asks replicatord to reload. An operator without a
controller may write it with `save()` (or by hand, then reload). Every write is atomic (durable.py).

Who reads it: replicatord, each time it starts protecting a machine (start and every reload):
`epoch_of()` gives the epoch the machine's requests carry (X-Replicator-Epoch), None when the file or the
machine is absent (standalone: nothing is sent and the replica checks nothing, as before fencing). A
machine fenced at epoch E (its replica refused E) cycles again once its epoch here is above E
(daemon/primary.py).

The role is the controller's word on who owns the machine; replicatord sends the epoch whatever the role
(which machines it protects follows its configuration and their state's role, docs/states.md). Epochs are
enforced by replica servers (transport/server.py): a local:// target writes its store directly and an
azure:// one has no replica server, so neither carries one.

API:
  table_path(state_dir) -> str
  load(state_dir) -> dict[name, Entry]        FencingError (one line, naming the file) when unreadable
  save(state_dir, entries)                     the whole table, replacing the file
  update(state_dir, fencing) -> list[str]      apply a desired document's `fencing` member: machines absent
                                               from it are dropped; an epoch lower than the one held is
                                               kept at the held one (epochs only go up); returns one line
                                               per change
  epoch_of(state_dir, name) -> int | None
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from ..durable import write_json_atomic
from ..errors import ReplicatorError
from ..transport.auth import MAX_EPOCH, Fenced

log = logging.getLogger("replicatord")

ROLES = ("primary", "replica")


class FencingError(ReplicatorError):
    """The fencing table (or a document meant for it) is not what the contract says."""


@dataclass(frozen=True)
class Entry:
    epoch: int
    role: str

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "role": self.role}


def table_path(state_dir: str) -> str:
    return os.path.join(state_dir, "controller", "fencing.json")


def parse(doc, where: str) -> dict[str, Entry]:
    """The entries of a `machines` mapping ({NAME: {"epoch", "role"}}); FencingError naming `where`."""
    if not isinstance(doc, dict):
        raise FencingError(f"{where}: the fencing table must map machine names to {{epoch, role}}")
    out = {}
    for name, e in doc.items():
        if not isinstance(e, dict):
            raise FencingError(f"{where}: machine {name[:64]!r}: expected {{epoch, role}}")
        epoch, role = e.get("epoch"), e.get("role", "primary")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch <= MAX_EPOCH:
            raise FencingError(f"{where}: machine {name[:64]!r}: epoch must be an integer from 0 to {MAX_EPOCH}")
        if role not in ROLES:
            raise FencingError(f"{where}: machine {name[:64]!r}: role must be primary or replica, not {role!r:.40}")
        out[name] = Entry(epoch, role)
    return out


def load(state_dir: str) -> dict[str, Entry]:
    """The host's table; empty without a file (a standalone host)."""
    path = table_path(state_dir)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise FencingError(f"{path}: unreadable fencing table ({e})") from None
    if not isinstance(doc, dict):
        raise FencingError(f"{path}: the fencing table must be an object with \"machines\"")
    return parse(doc.get("machines", {}), path)


def save(state_dir: str, entries: dict[str, Entry]) -> None:
    write_json_atomic(table_path(state_dir), {"machines": {n: e.to_dict() for n, e in sorted(entries.items())}})


def update(state_dir: str, fencing) -> list[str]:
    """Make the table what a desired document's `fencing` says (see the module's docstring)."""
    wanted = parse(fencing, "the desired fencing table")
    changes = []
    try:
        held = load(state_dir)
    except FencingError as e:          # the controller is the authority on epochs: its table replaces a
        held = {}                      # damaged one (kept beside it for the operator), never the other way
        damaged = table_path(state_dir) + ".damaged"
        os.replace(table_path(state_dir), damaged)
        changes.append(f"{e.message}; replaced by the controller's table (the old file is {damaged})")
    table = {}
    for name, e in wanted.items():
        old = held.get(name)
        if old is not None and e.epoch < old.epoch:
            changes.append(f"{name}: epoch {e.epoch} refused, lower than the {old.epoch} held (epochs only go up)")
            e = Entry(old.epoch, e.role)
        if old != e:
            changes.append(f"{name}: epoch {e.epoch}, role {e.role}" + (f" (was {old.epoch}, {old.role})" if old else ""))
        table[name] = e
    changes += [f"{name}: no longer fenced (standalone)" for name in held if name not in wanted]
    if table != held or not os.path.exists(table_path(state_dir)):
        save(state_dir, table)
    return changes


def epoch_of(state_dir: str, name: str) -> int | None:
    entry = load(state_dir).get(name)
    return None if entry is None else entry.epoch


# ---------------------------------------------------------------------- a primary machine's fence
def fence(state, epoch: int | None, e: Fenced) -> None:
    """The replica refused `epoch` for this machine (state: its MachineState): stop its cycles, saying why
    in one line."""
    if e.failed_over:
        why = f"the replica site failed this machine over at epoch {e.epoch}"
    else:
        why = f"the replica knows epoch {e.epoch} for this machine (a newer primary took it over)"
    line = (f"fenced: {why}; this host's epoch is {epoch}: no cycles until the epoch is raised or "
            f"`replicator machine {state.name} resume`")
    log.error("%s: %s", state.name, line)
    state.fence({"epoch": epoch, "replica_epoch": e.epoch, "failed_over": e.failed_over}, line)


def lift_if_raised(state, epoch: int | None) -> None:
    """At (re)start: a newer epoch than the refused one, or none any more (standalone), lifts the fence."""
    fenced = state.fenced
    if fenced is None:
        return
    if epoch is None:
        state.unfence("no fencing epoch for this machine any more (standalone): cycles resume")
    elif epoch > (fenced.get("epoch") or 0):
        state.unfence(f"this host's epoch was raised to {epoch} (fenced at {fenced.get('epoch')}): cycles resume")
