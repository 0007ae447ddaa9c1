"""Running an operator's script (recovery-plan actions, pre-freeze / post-thaw hooks): in its own session,
so a timeout or a cancellation kills it and everything it started."""
from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal

from ..priority import guest_placement


def argv_of(cmd: str | list) -> list[str]:
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


async def run_script(cmd: str | list, env: dict, timeout: float | None = None) -> tuple[int, str]:
    """(exit status, output with stderr folded in). Raises OSError when it cannot start, and
    asyncio.TimeoutError after `timeout` seconds (None: as long as the caller waits)."""
    with guest_placement():         # with replication_cpus, on the guests' CPUs
        proc = await asyncio.create_subprocess_exec(*argv_of(cmd), stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT, env={**os.environ, **env},
                                                    start_new_session=True)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace").strip()
