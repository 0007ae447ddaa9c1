"""The machine state machine: every allowed transition, illegal ones refused, persistence, bounded history."""
from __future__ import annotations

import json
import os

import pytest

from replicator.orchestration.states import (IN_PROGRESS, TRANSITIONS, WMI_VALUES, Event, MachineState,
                                             ReplicationState, StateError, StateFileError, state_path,
                                             write_json_atomic)

S, E = ReplicationState, Event


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        self.t += 1
        return self.t


def machine(state, tmp_path=None, reversed_=False):
    m = MachineState("vm1", str(tmp_path / "vm1.json") if tmp_path else None, state=state, clock=Clock())
    m.reversed = reversed_
    return m


@pytest.mark.parametrize("src,event,dst", sorted(((s, e, d) for (s, e), d in TRANSITIONS.items()),
                                                 key=lambda x: (x[0].value, x[1].value)))
def test_every_allowed_transition(tmp_path, src, event, dst):
    m = machine(src, tmp_path, reversed_=True)
    assert m.can(event)
    assert m.fire(event, reason="because") is dst
    assert m.state is dst and m.reason == "because"
    assert m.history[-1] == {"time": m.updated, "event": event.value, "from": src.value, "to": dst.value,
                             "reason": "because"}
    with open(tmp_path / "vm1.json") as f:
        assert json.load(f)["state"] == dst.value


def test_every_illegal_transition_is_refused_and_changes_nothing():
    refused = 0
    for src in S:
        for event in E:
            if (src, event) in TRANSITIONS:
                continue
            m = machine(src)
            with pytest.raises(StateError) as e:
                m.fire(event)
            assert src.value in e.value.message and event.value in e.value.message
            assert m.state is src and m.history == []
            refused += 1
    assert refused > 200


def test_unknown_event_and_failback_needs_reverse():
    m = machine(S.Replicating)
    with pytest.raises(StateError, match="unknown event 'explode'"):
        m.fire("explode")
    with pytest.raises(StateError, match="needs reverse replication first"):
        m.fire(E.failback_start)


def test_every_state_is_reachable_and_has_a_way_out():
    reachable, frontier = {S.ReadyForInitialReplication}, [S.ReadyForInitialReplication]
    while frontier:
        s = frontier.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is s and dst not in reachable:
                reachable.add(dst)
                frontier.append(dst)
    assert reachable == set(S)
    assert all(any(src is s for src, _ in TRANSITIONS) for s in S)
    assert set(WMI_VALUES) == set(S)


def test_planned_failover_reverse_and_failback_round_trip(tmp_path):
    m = MachineState.load(str(tmp_path), "vm1", clock=Clock())
    for ev in (E.start_initial, E.initial_done, E.prepare_failover, E.failover, E.failover_done,
               E.commit_failover, E.reverse_in_sync):
        m.fire(ev)
    assert m.state is S.Replicating and m.reversed
    m.fire(E.failback_start)
    m.fire(E.failback_done)
    m.fire(E.reverse_in_sync)
    assert m.state is S.Replicating and not m.reversed


def test_persistence_across_reload(tmp_path):
    clock = Clock()
    m = MachineState.load(str(tmp_path), "vm1", clock=clock)
    assert os.path.exists(state_path(str(tmp_path), "vm1")) and m.state is S.ReadyForInitialReplication
    m.fire(E.start_initial, "network")
    m.fire(E.initial_done)
    m.fire(E.resync_needed, "log not closed cleanly")
    m.data["job"] = "job-00007"
    m.start_test_failover(12, "/srv/test/vm1")
    again = MachineState.load(str(tmp_path), "vm1", clock=clock)
    assert again.state is S.WaitingForStartResynchronize and again.reason == "log not closed cleanly"
    assert again.history == m.history and again.since == m.since and again.data == {"job": "job-00007"}
    assert again.test_failover["point"] == 12
    assert not list(tmp_path.glob("machines/*.tmp.*"))


def test_history_is_bounded(tmp_path):
    m = MachineState.load(str(tmp_path), "vm1", clock=Clock(), history_limit=5)
    m.fire(E.start_initial)
    m.fire(E.initial_done)
    for _ in range(10):
        m.fire(E.pause)
        m.fire(E.resume)
    assert len(m.history) == 5 and m.history[-1]["event"] == "resume"
    assert len(MachineState.load(str(tmp_path), "vm1", history_limit=5).history) == 5


def test_since_changes_only_with_the_state():
    m = machine(S.Replicating)
    m.fire(E.error, "target unreachable")
    since = m.since
    m.fire(E.error, "still unreachable")
    assert m.since == since and m.updated > since and m.reason == "still unreachable"


def test_test_failover_is_beside_the_state():
    m = machine(S.Replicating)
    m.start_test_failover(3, "/t")
    with pytest.raises(StateError, match="already running"):
        m.start_test_failover(4, "/t2")
    m.fire(E.error, "cycle failed")                      # replication goes on during a test failover
    assert m.stop_test_failover()["path"] == "/t" and m.test_failover is None
    with pytest.raises(StateError, match="no test failover"):
        m.stop_test_failover()
    with pytest.raises(StateError, match="not allowed in state ReadyForInitialReplication"):
        machine(S.ReadyForInitialReplication).start_test_failover(1, "/t")


def test_corrupt_state_file_names_the_file(tmp_path):
    path = state_path(str(tmp_path), "vm1")
    write_json_atomic(path, {"state": "Exploded", "since": 1, "updated": 1})
    with pytest.raises(StateFileError, match="vm1.json"):
        MachineState.load(str(tmp_path), "vm1")
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(StateFileError, match="unreadable"):
        MachineState.load(str(tmp_path), "vm1")


def test_in_progress_states_are_resumable_after_restart():
    assert S.InitialReplicationInProgress in IN_PROGRESS and S.Replicating not in IN_PROGRESS


def test_docs_table_matches_the_transition_table():
    doc = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "states.md")
    with open(doc) as f:
        text = f.read()
    documented = {}
    for line in text.split("## Transitions")[1].split("```")[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("Event", "---"):
            continue
        event, sources, target = cells
        names = [s for s in S if s is not S.Disabled] if sources.startswith("every state") else \
            [S(x.strip().split(" (")[0]) for x in sources.split(",")]
        for src in names:
            documented[(src, E(event))] = S(target)
    assert documented == TRANSITIONS
