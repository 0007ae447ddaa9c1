"""The host's fencing table (daemon/fencing.py) as the agent and replicatord use it, and the fenced mark of
a machine's state (orchestration/states.py) across a restart and from older state files."""
from __future__ import annotations

import json
import os

import pytest

from replicator.daemon import fencing
from replicator.orchestration.states import MachineState, StateError


def test_no_file_is_standalone(tmp_path):
    assert fencing.load(str(tmp_path)) == {} and fencing.epoch_of(str(tmp_path), "vm01") is None


def test_update_follows_the_desired_document_and_never_lowers_an_epoch(tmp_path):
    d = str(tmp_path)
    changes = fencing.update(d, {"vm01": {"epoch": 3, "role": "primary"}, "vm02": {"epoch": 1, "role": "replica"}})
    assert changes == ["vm01: epoch 3, role primary", "vm02: epoch 1, role replica"]
    doc = json.loads(open(fencing.table_path(d)).read())
    assert doc == {"machines": {"vm01": {"epoch": 3, "role": "primary"}, "vm02": {"epoch": 1, "role": "replica"}}}
    assert fencing.update(d, {"vm01": {"epoch": 3, "role": "primary"}, "vm02": {"epoch": 1, "role": "replica"}}) == []
    changes = fencing.update(d, {"vm01": {"epoch": 2, "role": "replica"}})
    assert changes == ["vm01: epoch 2 refused, lower than the 3 held (epochs only go up)",
                       "vm01: epoch 3, role replica (was 3, primary)", "vm02: no longer fenced (standalone)"]
    assert fencing.load(d) == {"vm01": fencing.Entry(3, "replica")}
    assert fencing.epoch_of(d, "vm01") == 3 and fencing.epoch_of(d, "vm02") is None
    assert not [n for n in os.listdir(os.path.dirname(fencing.table_path(d))) if ".tmp" in n]


@pytest.mark.parametrize("machines, words", [
    ([], "must map machine names"),
    ({"vm01": 3}, "expected {epoch, role}"),
    ({"vm01": {"epoch": -1}}, "epoch must be an integer"),
    ({"vm01": {"epoch": True}}, "epoch must be an integer"),
    ({"vm01": {"epoch": "3"}}, "epoch must be an integer"),
    ({"vm01": {"epoch": 1 << 63}}, "epoch must be an integer"),
    ({"vm01": {"epoch": 1, "role": "owner"}}, "role must be primary or replica"),
])
def test_bad_documents_are_refused_in_one_line(tmp_path, machines, words):
    with pytest.raises(fencing.FencingError) as e:
        fencing.update(str(tmp_path), machines)
    assert words in e.value.message and "\n" not in e.value.message
    assert not os.path.exists(fencing.table_path(str(tmp_path)))       # nothing written


@pytest.mark.parametrize("text", ["{", "[]", '{"machines": {"vm01": {"epoch": "x"}}}'])
def test_an_unreadable_file_names_itself(tmp_path, text):
    path = fencing.table_path(str(tmp_path))
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(fencing.FencingError) as e:
        fencing.load(str(tmp_path))
    assert e.value.message.startswith(path) and "\n" not in e.value.message


def test_the_fenced_mark_is_kept_and_old_state_files_load(tmp_path):
    d = str(tmp_path)
    m = MachineState.load(d, "vm01")
    with pytest.raises(StateError):
        m.unfence("nothing to lift")
    m.fence({"epoch": 3, "replica_epoch": 4, "failed_over": True}, "fenced: why")
    again = MachineState.load(d, "vm01")
    assert again.fenced["replica_epoch"] == 4 and again.reason == "fenced: why"
    assert [h["event"] for h in again.history] == ["fenced"]
    fencing.lift_if_raised(again, 3)                 # the same epoch: still fenced
    assert again.fenced is not None
    fencing.lift_if_raised(again, 4)
    assert again.fenced is None and MachineState.load(d, "vm01").fenced is None
    path = os.path.join(d, "machines", "vm01.json")
    raw = json.loads(open(path).read())
    del raw["fenced"]                                # as a build from before fencing wrote it
    with open(path, "w") as f:
        json.dump(raw, f)
    assert MachineState.load(d, "vm01").fenced is None


def test_a_damaged_table_is_replaced_by_the_controllers_and_kept_aside(tmp_path):
    path = fencing.table_path(str(tmp_path))
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write('{"machines": {"vm01": {"epoch": "x"')
    changes = fencing.update(str(tmp_path), {"vm01": {"epoch": 4, "role": "primary"}})
    assert any("replaced by the controller's table" in c for c in changes), changes
    assert fencing.epoch_of(str(tmp_path), "vm01") == 4
    with open(path + ".damaged") as f:
        assert f.read().startswith('{"machines"')
