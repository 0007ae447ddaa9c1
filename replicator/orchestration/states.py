"""The replication state of each protected machine, with Hyper-V Replica's own state names, so operators who
know `Get-VMReplication` read ours the same way; persisted so a restarted daemon continues where it was.

Source of the names: the `VMReplicationState` enum of the Hyper-V PowerShell module (what `Get-VMReplication`
prints in its State column), cross-checked with `Msvm_ReplicationRelationship.ReplicationState` in the
Hyper-V WMI v2 documentation (the numbers in WMI_VALUES). Hyper-V's UI says "Resynchronization required" for
WaitingForStartResynchronize, "Prepared for planned failover" for PreparedForFailover (WMI "Synced
replication complete") and "Failover in progress" for RecoveryInProgress. docs/states.md draws the graph.

Test failover is not a state: as in Hyper-V, replication goes on while a test copy runs, so it is a
field (`test_failover`) beside the state. Fencing is not a state either (Hyper-V has none for it): a
primary whose replica refused its epoch keeps the state the failure left (Error) and records why in its
`fenced` field, which stops its cycles until it is lifted (daemon/primary.py).
"""
from __future__ import annotations

import json
import os
import time
from enum import Enum

from ..errors import ReplicatorError, UsageError
from ..durable import write_json_atomic

HISTORY_LIMIT = 50


class StateError(UsageError):
    """An operation that the machine's current state does not allow."""


class StateFileError(ReplicatorError):
    """A machine's persisted state cannot be read: the message names the file."""


class ReplicationState(str, Enum):
    Disabled = "Disabled"
    ReadyForInitialReplication = "ReadyForInitialReplication"
    InitialReplicationInProgress = "InitialReplicationInProgress"
    WaitingForInitialReplication = "WaitingForInitialReplication"
    Replicating = "Replicating"
    PreparedForFailover = "PreparedForFailover"
    FailedOverWaitingCompletion = "FailedOverWaitingCompletion"
    FailedOver = "FailedOver"
    Suspended = "Suspended"
    Error = "Error"
    WaitingForStartResynchronize = "WaitingForStartResynchronize"
    Resynchronizing = "Resynchronizing"
    ResynchronizeSuspended = "ResynchronizeSuspended"
    RecoveryInProgress = "RecoveryInProgress"
    FailbackInProgress = "FailbackInProgress"
    FailbackComplete = "FailbackComplete"


S = ReplicationState
# Msvm_ReplicationRelationship.ReplicationState, for tools that speak Hyper-V's WMI numbers.
WMI_VALUES = {S.Disabled: 0, S.ReadyForInitialReplication: 1, S.InitialReplicationInProgress: 2,
              S.WaitingForInitialReplication: 2, S.Replicating: 3, S.PreparedForFailover: 4,
              S.FailedOverWaitingCompletion: 5, S.FailedOver: 6, S.Suspended: 7, S.Error: 8,
              S.WaitingForStartResynchronize: 9, S.Resynchronizing: 10, S.ResynchronizeSuspended: 11,
              S.RecoveryInProgress: 12, S.FailbackInProgress: 13, S.FailbackComplete: 14}
CYCLING = frozenset({S.Replicating, S.Error})          # the scheduler runs cycles in these
IN_PROGRESS = frozenset({S.InitialReplicationInProgress, S.Resynchronizing, S.RecoveryInProgress,
                         S.FailbackInProgress})         # a job was running: resume it after a restart
_HAS_POINTS = (S.Replicating, S.Suspended, S.Error, S.WaitingForStartResynchronize, S.PreparedForFailover)
# A former primary whose machine was failed over without its help (unplanned) becomes the replica of the
# reverse direction from whatever state it was left in: `reverse` (docs/states.md, "Two sites").
_PRIMARY_RUNNING = (S.Replicating, S.Suspended, S.Error, S.WaitingForStartResynchronize, S.Resynchronizing,
                    S.ResynchronizeSuspended)


class Event(str, Enum):
    enable = "enable"
    start_initial = "start_initial"
    seed_exported = "seed_exported"
    initial_done = "initial_done"
    initial_failed = "initial_failed"
    pause = "pause"
    resume = "resume"
    error = "error"
    recovered = "recovered"
    resync_needed = "resync_needed"
    resync_start = "resync_start"
    resync_done = "resync_done"
    cancel_resync = "cancel_resync"
    prepare_failover = "prepare_failover"
    failover = "failover"
    failover_done = "failover_done"
    commit_failover = "commit_failover"
    cancel_failover = "cancel_failover"
    reverse = "reverse"
    reverse_in_sync = "reverse_in_sync"
    failback_start = "failback_start"
    failback_done = "failback_done"
    disable = "disable"


E = Event
_ROWS = [
    (E.enable, (S.Disabled,), S.ReadyForInitialReplication),
    (E.start_initial, (S.ReadyForInitialReplication,), S.InitialReplicationInProgress),
    (E.seed_exported, (S.InitialReplicationInProgress,), S.WaitingForInitialReplication),
    (E.initial_done, (S.InitialReplicationInProgress, S.WaitingForInitialReplication), S.Replicating),
    (E.initial_failed, (S.InitialReplicationInProgress, S.WaitingForInitialReplication),
     S.ReadyForInitialReplication),
    (E.pause, (S.Replicating, S.Error), S.Suspended),
    (E.pause, (S.Resynchronizing,), S.ResynchronizeSuspended),
    (E.resume, (S.Suspended,), S.Replicating),
    (E.resume, (S.ResynchronizeSuspended,), S.Resynchronizing),
    (E.error, (S.Replicating, S.Error), S.Error),
    (E.recovered, (S.Error,), S.Replicating),
    (E.resync_needed, (S.Replicating, S.Error, S.Suspended, S.WaitingForStartResynchronize, S.Resynchronizing,
                       S.ResynchronizeSuspended, S.FailbackComplete), S.WaitingForStartResynchronize),
    (E.resync_start, (S.WaitingForStartResynchronize,), S.Resynchronizing),
    (E.resync_done, (S.Resynchronizing,), S.Replicating),
    (E.cancel_resync, (S.Resynchronizing, S.ResynchronizeSuspended), S.WaitingForStartResynchronize),
    (E.prepare_failover, (S.Replicating,), S.PreparedForFailover),
    (E.failover, _HAS_POINTS + (S.FailedOverWaitingCompletion,), S.RecoveryInProgress),
    (E.failover_done, (S.RecoveryInProgress,), S.FailedOverWaitingCompletion),
    (E.commit_failover, (S.FailedOverWaitingCompletion,), S.FailedOver),
    (E.cancel_failover, (S.PreparedForFailover, S.RecoveryInProgress, S.FailedOverWaitingCompletion,
                         S.FailbackInProgress), S.Replicating),
    (E.reverse, (S.FailedOverWaitingCompletion, S.FailedOver, S.FailbackComplete) + _PRIMARY_RUNNING,
     S.ReadyForInitialReplication),
    (E.reverse_in_sync, (S.FailedOverWaitingCompletion, S.FailedOver, S.FailbackComplete, S.PreparedForFailover),
     S.Replicating),
    (E.failback_start, (S.Replicating, S.FailedOverWaitingCompletion, S.FailedOver), S.FailbackInProgress),
    (E.failback_done, (S.FailbackInProgress,), S.FailbackComplete),
    (E.disable, tuple(s for s in S if s is not S.Disabled), S.Disabled),
]
TRANSITIONS: dict[tuple[ReplicationState, Event], ReplicationState] = {
    (src, event): dst for event, sources, dst in _ROWS for src in sources}
_REVERSING = (E.reverse, E.reverse_in_sync)


def state_path(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, "machines", f"{name}.json")


class MachineState:
    """One machine's state, reason, timestamps and recent transitions; every change is saved at once."""

    def __init__(self, name: str, path: str | None = None, *, state: ReplicationState = S.ReadyForInitialReplication,
                 clock=time.time, history_limit: int = HISTORY_LIMIT):
        self.name, self.path, self.clock, self.history_limit = name, path, clock, history_limit
        self.state = ReplicationState(state)
        self.reason = ""
        self.since = self.updated = clock()
        self.history: list[dict] = []
        self.reversed = False               # True while the replica site runs the machine (after reverse)
        self.test_failover: dict | None = None
        self.fenced: dict | None = None     # {"epoch", "replica_epoch", "failed_over", "time"}: no cycles
        self.data: dict = {}                # free-form for callers (job ids, chosen point); persisted as is

    # ------------------------------------------------------------------ transitions
    def can(self, event: Event | str) -> bool:
        return (self.state, Event(event)) in TRANSITIONS

    def allowed_events(self) -> list[Event]:
        return [e for e in Event if self.can(e)]

    def fire(self, event: Event | str, reason: str = "") -> ReplicationState:
        """Apply an event; StateError (nothing changed) when the current state does not allow it."""
        try:
            event = Event(event)
        except ValueError:
            raise StateError(f"{self.name}: unknown event {event!r}") from None
        target = TRANSITIONS.get((self.state, event))
        if target is None:
            allowed = ", ".join(e.value for e in self.allowed_events()) or "none"
            raise StateError(f"{self.name}: {event.value} is not allowed in state {self.state.value} "
                             f"(allowed: {allowed})")
        if event is E.failback_start and self.state is S.Replicating and not self.reversed:
            raise StateError(f"{self.name}: failback_start needs reverse replication first (state "
                             f"{self.state.value}, replicating from the primary site)")
        now = self.clock()
        self.history.append({"time": now, "event": event.value, "from": self.state.value, "to": target.value,
                             "reason": reason})
        del self.history[:-self.history_limit]
        if target is not self.state:
            self.since = now
        self.state, self.reason, self.updated = target, reason, now
        if event in _REVERSING:
            self.reversed = not self.reversed
        self.save()
        return target

    def start_test_failover(self, point: int, path: str) -> None:
        if self.test_failover is not None:
            raise StateError(f"{self.name}: a test failover is already running ({self.test_failover['path']})")
        if self.state not in _HAS_POINTS:
            raise StateError(f"{self.name}: test failover is not allowed in state {self.state.value}")
        self.test_failover = {"point": point, "path": path, "started": self.clock()}
        self._note("test_failover_start", f"point {point} at {path}")

    def stop_test_failover(self) -> dict:
        if self.test_failover is None:
            raise StateError(f"{self.name}: no test failover is running (state {self.state.value})")
        done, self.test_failover = self.test_failover, None
        self._note("test_failover_stop", f"removed {done['path']}")
        return done

    def fence(self, info: dict, reason: str) -> None:
        """Record that the replica refused this machine's epoch: its cycles stop until unfence()."""
        self.fenced, self.reason = {**info, "time": self.clock()}, reason
        self._note("fenced", reason)

    def unfence(self, reason: str) -> None:
        if self.fenced is None:
            raise StateError(f"{self.name}: it is not fenced (state {self.state.value})")
        self.fenced, self.reason = None, reason
        self._note("unfenced", reason)

    def _note(self, event: str, reason: str) -> None:
        self.updated = self.clock()
        self.history.append({"time": self.updated, "event": event, "from": self.state.value,
                             "to": self.state.value, "reason": reason})
        del self.history[:-self.history_limit]
        self.save()

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return {"name": self.name, "state": self.state.value, "wmi_state": WMI_VALUES[self.state],
                "reason": self.reason, "since": self.since, "updated": self.updated, "reversed": self.reversed,
                "test_failover": self.test_failover, "fenced": self.fenced, "history": self.history,
                "data": self.data}

    def save(self) -> None:
        if self.path:
            write_json_atomic(self.path, self.to_dict())

    @classmethod
    def load(cls, state_dir: str, name: str, *, clock=time.time, history_limit: int = HISTORY_LIMIT,
             initial: ReplicationState = S.ReadyForInitialReplication) -> "MachineState":
        """The saved state of `name`, or a new one in `initial` (saved at once) when there is none."""
        path = state_path(state_dir, name)
        m = cls(name, path, state=initial, clock=clock, history_limit=history_limit)
        if not os.path.exists(path):
            m.save()
            return m
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            m.state, m.reason = ReplicationState(d["state"]), d.get("reason", "")
            m.since, m.updated = float(d["since"]), float(d["updated"])
            m.history = list(d.get("history", []))[-history_limit:]
            m.reversed, m.test_failover = bool(d.get("reversed")), d.get("test_failover")
            m.fenced = d.get("fenced")          # absent in files from before fencing
            m.data = dict(d.get("data") or {})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StateFileError(f"{path}: unreadable machine state ({e}); fix or remove it") from None
        return m
