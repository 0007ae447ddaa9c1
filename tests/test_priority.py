"""CPU lists (replication_cpus) as taskset and systemd write them, and replicatord's threads moved onto them."""
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.priority import MAX_CPUS, cpu_list, parse_cpu_list


@pytest.mark.parametrize("text,cpus", [("1", {1}), ("0-3,8", {0, 1, 2, 3, 8}), (" 2 , 4-5 ", {2, 4, 5}),
                                       ("3-3", {3}), ("8191", {8191}), ("0,0-1", {0, 1})])
def test_cpu_lists_read(text, cpus):
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["", " ", "a", "1,", ",1", "1,,2", "3-1", "1-", "-1", "1-2-3", "8192", "0-8192",
                                  "٣", "1.0", "0x1", "00001", "+1", "1 2", "9" * 5000])
def test_cpu_lists_refused_in_one_line(text):
    with pytest.raises(ValueError) as e:
        parse_cpu_list(text)
    assert "\n" not in str(e.value) and ("CPU list" in str(e.value) or "range of CPUs" in str(e.value))


@given(st.sets(st.integers(0, MAX_CPUS - 1), min_size=1, max_size=64))
def test_the_short_form_reads_back(cpus):
    assert parse_cpu_list(cpu_list(cpus)) == cpus


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to move threads between")
def test_pinning_moves_every_thread_and_unpinning_brings_them_back():
    """In a child process (affinity is the process's own): threads made before and after the pin follow it; the
    CPUs it was started with are the exports'; None puts every thread back; a CPU it may not use is refused."""
    code = textwrap.dedent("""
        import os, threading, time
        from replicator import priority
        start = frozenset(os.sched_getaffinity(0))
        last = max(start)
        stop = threading.Event()
        before = threading.Thread(target=stop.wait); before.start()
        def threads():
            return {int(t): frozenset(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
        assert priority.export_cpus() is None
        priority.pin_replication(frozenset({last}))
        after = threading.Thread(target=stop.wait); after.start()
        assert set(threads().values()) == {frozenset({last})}, threads()
        assert priority.export_cpus() == start and priority.allowed_cpus() == start
        priority.pin_replication(frozenset({min(start)}))        # a reload to another CPU
        assert set(threads().values()) == {frozenset({min(start)})} and priority.export_cpus() == start
        try:
            priority.pin_replication(frozenset({max(start) + 1}))
            raise SystemExit("a CPU outside the started set was taken")
        except ValueError as e:
            assert "may run only on CPUs" in str(e), e
        priority.pin_replication(None)
        assert set(threads().values()) == {start} and priority.export_cpus() is None
        stop.set(); before.join(); after.join()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to move threads between")
def test_an_operators_script_runs_where_the_guests_run():
    """A hook or plan script started while replicatord is pinned gets the CPUs it was started with; the thread
    that started it goes back to replication's."""
    code = textwrap.dedent("""
        import asyncio, os
        from replicator import priority
        from replicator.orchestration.scripts import run_script
        start = frozenset(os.sched_getaffinity(0))
        priority.pin_replication(frozenset({max(start)}))
        rc, out = asyncio.run(run_script(["sh", "-c", "taskset -c -p $$"], {}))
        assert rc == 0, out
        seen = priority.parse_cpu_list(out.rsplit(":", 1)[1].strip())
        assert seen == start, (seen, start)
        assert frozenset(os.sched_getaffinity(0)) == {max(start)}
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
