"""Quiesce providers: a fake QEMU guest agent (answering, erroring, hanging, noisy) and scripts (true, false,
sleep past the timeout); thaw always runs; a failed quiesce gives a crash-consistent point and a warning."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time

import pytest

from replicator.orchestration.quiesce import QemuGuestAgentQuiesce, QuiesceFailed, ScriptQuiesce
from replicator.orchestration.scheduler import Scheduler


class FakeGuestAgent:
    """Answers like qemu-ga on a Unix socket. mode: ok, error, hang, thaw_error; `preamble` is stale output
    (an earlier client's replies, half a line, an event) sent first on every connection."""

    def __init__(self, path: str, mode: str = "ok", preamble: bytes = b""):
        self.path, self.mode, self.preamble = path, mode, preamble
        self.commands: list[str] = []
        self.frozen = False
        self.flushes = 0

    async def __aenter__(self):
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer):
        try:
            writer.write(self.preamble)
            while line := await reader.readline():
                self.flushes += line.count(b"\xff")
                line = line.replace(b"\xff", b"").strip()
                if line:
                    reply = await self._answer(json.loads(line))
                    writer.write(json.dumps(reply).encode() + b"\n")
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _answer(self, req: dict) -> dict:
        name = req["execute"]
        self.commands.append(name)
        if name == "guest-sync":
            return {"return": req["arguments"]["id"]}
        if name == "guest-fsfreeze-freeze":
            if self.mode == "hang":
                await asyncio.sleep(3600)
            if self.mode == "error":
                return {"error": {"class": "GenericError", "desc": "failed to freeze /data: Device or resource busy"}}
            self.frozen = True
            return {"return": 2}
        if name == "guest-fsfreeze-thaw":
            if self.mode == "thaw_error":
                return {"error": {"class": "GenericError", "desc": "thaw failed"}}
            was, self.frozen = self.frozen, False
            return {"return": 2 if was else 0}
        return {"error": {"class": "CommandNotFound", "desc": f"command {name} not found"}}


@pytest.fixture
def sock():
    d = tempfile.mkdtemp(prefix="qga", dir="/tmp")        # Unix socket paths must stay short
    yield os.path.join(d, "qga.sock")
    shutil.rmtree(d)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_guest_agent_freeze_cut_thaw(sock):
    async def main():
        async with FakeGuestAgent(sock) as ga:
            q = QemuGuestAgentQuiesce(sock, timeout=2)
            async with q:
                assert ga.frozen                            # the cut happens here
            assert not ga.frozen
            return ga, q

    ga, q = run(main())
    assert ga.commands == ["guest-sync", "guest-fsfreeze-freeze", "guest-sync", "guest-fsfreeze-thaw"]
    assert ga.flushes == 2 and q.frozen == 2
    assert list(q.log) == ["guest-fsfreeze-freeze: 2 filesystems frozen", "guest-fsfreeze-thaw: 2 filesystems thawed"]


def test_guest_agent_sync_skips_stale_replies(sock):
    async def main():
        async with FakeGuestAgent(sock, preamble=b'{"return": 7}\n\xff{"partial\n{"event": "X"}\n') as ga:
            return await QemuGuestAgentQuiesce(sock, timeout=2).command("guest-fsfreeze-freeze"), ga

    result, ga = run(main())
    assert result == 2 and ga.commands == ["guest-sync", "guest-fsfreeze-freeze"]


def test_guest_agent_error_fails_the_freeze_and_still_thaws(sock):
    async def main():
        async with FakeGuestAgent(sock, "error") as ga:
            with pytest.raises(QuiesceFailed) as e:
                async with QemuGuestAgentQuiesce(sock, timeout=2):
                    pytest.fail("the body must not run when the freeze failed")
            return ga, e.value

    ga, err = run(main())
    assert err.phase == "freeze" and "Device or resource busy (GenericError)" in err.message
    assert ga.commands[-1] == "guest-fsfreeze-thaw"


def test_guest_agent_hang_times_out_and_thaws(sock):
    async def main():
        async with FakeGuestAgent(sock, "hang") as ga:
            start = time.monotonic()
            with pytest.raises(QuiesceFailed, match=r"freeze timed out after 0.3 s"):
                async with QemuGuestAgentQuiesce(sock, timeout=0.3):
                    pass
            return ga, time.monotonic() - start

    ga, elapsed = run(main())
    assert elapsed < 2 and ga.commands[-1] == "guest-fsfreeze-thaw"


def test_guest_agent_missing_socket(sock):
    with pytest.raises(QuiesceFailed, match="guest agent socket"):
        run(QemuGuestAgentQuiesce(sock, timeout=1).__aenter__())


def test_thaw_failure_after_the_cut_is_reported_as_thaw(sock):
    async def main():
        async with FakeGuestAgent(sock, "thaw_error"):
            with pytest.raises(QuiesceFailed) as e:
                async with QemuGuestAgentQuiesce(sock, timeout=2):
                    pass
            return e.value

    err = run(main())
    assert err.phase == "thaw" and "thaw failed" in err.message


def test_an_error_in_the_body_thaws_and_propagates(sock):
    async def main():
        async with FakeGuestAgent(sock) as ga:
            with pytest.raises(RuntimeError, match="cut failed"):
                async with QemuGuestAgentQuiesce(sock, timeout=2):
                    raise RuntimeError("cut failed")
            return ga

    ga = run(main())
    assert not ga.frozen and ga.commands[-1] == "guest-fsfreeze-thaw"


def test_scripts_true(tmp_path):
    async def main():
        q = ScriptQuiesce("true", "true", timeout=5)
        async with q:
            pass
        return q

    q = run(main())
    assert list(q.log) == ["pre-freeze: true exited 0", "post-thaw: true exited 0"]


def test_script_false_fails_and_post_thaw_still_runs(tmp_path):
    marker = tmp_path / "thawed"

    async def main():
        with pytest.raises(QuiesceFailed, match="pre-freeze script 'sh' exited with 3: busy") as e:
            async with ScriptQuiesce(["sh", "-c", "echo busy; exit 3"], ["touch", str(marker)], timeout=5):
                pass
        return e.value

    assert run(main()).phase == "freeze" and marker.exists()


def test_script_past_the_timeout_is_killed_and_post_thaw_runs(tmp_path):
    pidfile, marker = tmp_path / "pid", tmp_path / "thawed"

    async def main():
        start = time.monotonic()
        with pytest.raises(QuiesceFailed, match="freeze timed out after 0.3 s"):
            async with ScriptQuiesce(["sh", "-c", f"echo $$ > {pidfile}; sleep 30"], ["touch", str(marker)],
                                     timeout=0.3):
                pass
        return time.monotonic() - start

    assert run(main()) < 3 and marker.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)


def test_failing_post_thaw_and_missing_script(tmp_path):
    async def main():
        with pytest.raises(QuiesceFailed) as e:
            async with ScriptQuiesce(None, "false", timeout=5):
                pass
        assert e.value.phase == "thaw"
        with pytest.raises(QuiesceFailed, match="cannot run"):
            async with ScriptQuiesce(str(tmp_path / "absent-script"), None, timeout=5):
                pass

    run(main())


@pytest.mark.parametrize("provider", ["script-timeout", "qga-hang", "qga-ok"])
def test_scheduler_takes_a_crash_consistent_point_when_quiesce_fails(sock, provider):
    """Real time: an hourly frequency makes the first tick an application-consistent one."""
    async def main():
        ticks, warnings, cuts = [], [], []

        async def cut(machine):
            cuts.append(machine)

        async def run_cycle(machine, consistency):
            return consistency

        s = Scheduler(run_cycle, cut=cut, on_result=lambda t, r, e: ticks.append(t),
                      on_warning=lambda m, w: warnings.append(w))
        mode = "hang" if provider == "qga-hang" else "ok"
        async with FakeGuestAgent(sock, mode) as ga:
            q = ScriptQuiesce("sleep 30", "true", timeout=0.3) if provider == "script-timeout" else \
                QemuGuestAgentQuiesce(sock, timeout=0.3)
            s.add("vm1", 3600, app_consistent_hours=1, quiesce=q)
            s.start()
            while not ticks:
                await asyncio.sleep(0.05)
            await s.stop(wait=False)
        return ticks[0], warnings, cuts, ga

    tick, warnings, cuts, ga = run(main())
    assert tick.wanted == "application" and tick.ok and cuts == ["vm1"]
    if provider == "qga-ok":
        assert tick.consistency == "application" and not warnings and not ga.frozen
    else:
        assert tick.consistency == "crash" and "timed out" in warnings[0] and "crash-consistent" in warnings[0]
